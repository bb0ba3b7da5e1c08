"""One process of a data-parallel run of the training loop on the tiny denoiser (no ComfyUI): started by
tests/unit/test_training_distributed.py as ``python dist_rig.py OUT_DIR`` with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every process trains each scenario of
``SCENARIOS``; process 0 saves the LoRAs to OUT_DIR/<scenario>.pt."""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# buckets of 3 samples and a global batch of 4 over 2 processes: full shares (2 + 2) never happen,
# the short batch is split 2 + 1; two micro-batches per step
RIG = dict(n=3, sizes=((8, 8), (8, 12)))
SCENARIOS = {
    "sgd": dict(optimizer="SGD", learning_rate=5e-2, batch_size=4, grad_accumulation_steps=2, steps=3),
    "adamw": dict(optimizer="AdamW", learning_rate=1e-2, batch_size=4, grad_accumulation_steps=2, steps=3),
}


def rig_class():
    import importlib.util

    from loralab_testkit.comfy_env import register_pack

    register_pack()
    path = os.path.join(os.path.dirname(HERE), "unit", "test_training_model.py")
    spec = importlib.util.spec_from_file_location("loralab_test_training_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Rig


def main(out_dir: str) -> int:
    import torch

    Rig = rig_class()
    from loralab.training import distributed
    from loralab.training.errors import TrainingError

    world = distributed.from_env("cpu", timeout_s=120)
    try:
        for name, kw in SCENARIOS.items():
            r = Rig(**RIG).train(world=world, **kw)
            if world.main:
                torch.save({"lora": dict(r.lora), "losses": r.losses}, os.path.join(out_dir, f"{name}.pt"))
        try:
            Rig(**RIG).train(world=world, batch_size=3, steps=1)
        except TrainingError as e:
            if world.main:
                with open(os.path.join(out_dir, "odd_batch.txt"), "w") as fh:
                    fh.write(str(e))
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
