"""scripts/train.py with a process that dies: ``torchrun … tests/support/train_and_die.py RANK STEP <train.py
arguments>`` runs the script unchanged, except that process RANK kills itself (SIGKILL: no cleanup, no
message, as an out-of-memory kill or a lost machine) right after its optimizer step STEP."""
from __future__ import annotations

import importlib.util
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    rank, step, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    spec = importlib.util.spec_from_file_location("loralab_train_script", os.path.join(ROOT, "scripts", "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if int(os.environ.get("RANK", "0")) == rank:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        done = [0]

        def die(optimizer, args, kwargs):
            done[0] += 1
            if done[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_post_hook(die)
    return script.main(argv)


if __name__ == "__main__":
    sys.exit(main())
