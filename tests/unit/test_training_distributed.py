"""Data-parallel training (training/distributed.py) on the tiny denoiser, two real processes over gloo
(no ComfyUI, no torchrun: the test gives each process torchrun's environment itself): the LoRA equals
a one-process run's with the same seed and global batch, also when a bucket is smaller than the
batch (uneven shares) and with gradient accumulation; an odd batch is refused. scripts/train.py under
torchrun is tested in tests/comfy/test_train_script.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from loralab.training import distributed
from loralab.training.errors import TrainingError
from support import dist_rig
from tolerances import TOL, rel_err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, dist_rig.__file__, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return out


@pytest.mark.parametrize("scenario", list(dist_rig.SCENARIOS))
def test_two_processes_train_the_lora_one_process_does(two_processes, scenario):
    Rig = dist_rig.rig_class()
    one = Rig(**dist_rig.RIG).train(**dist_rig.SCENARIOS[scenario])
    two = torch.load(os.path.join(two_processes, f"{scenario}.pt"))
    assert two["lora"].keys() == one.lora.keys()
    tol = TOL[f"distributed_{scenario}_fp32"]
    worst = max(rel_err(two["lora"][k], one.lora[k]) for k in one.lora if not k.endswith(".alpha"))
    assert worst <= tol, worst
    assert worst > 0 or scenario == "sgd"       # not vacuous: the reductions did differ somewhere
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one.losses), rtol=1e-5)


def test_a_batch_that_does_not_divide_by_the_processes_is_refused(two_processes):
    with open(os.path.join(two_processes, "odd_batch.txt")) as fh:
        msg = fh.read()
    assert "batch_size = 3 does not divide by the 2 processes" in msg


def test_shares_cover_every_position_once():
    for size in (1, 2, 4):
        for count in range(0, 9):
            parts = [distributed.World(r, size).part(8, count) for r in range(size)]
            assert [p for part in parts for p in part] == list(range(count))
    with pytest.raises(TrainingError, match="does not divide"):
        distributed.World(0, 4).check_batch(6)
    assert not distributed.launched() or int(os.environ["WORLD_SIZE"]) > 1


def test_a_sample_draws_the_same_noise_whatever_batch_it_is_in():
    """Sharding must not change a sample's σ and noise: per-sample generators from (seed, step, micro,
    position) give the same draws for a sample alone or in a batch."""
    from loralab.training import loop, objective

    obj = objective.Objective(objective.DiscreteSchedule(), "eps", noise_offset=0.05)
    x0 = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    gens = lambda ps: [loop.sample_generator(7, 3, 1, p) for p in ps]   # noqa: E731
    whole = obj.draw(x0, gens(range(4)))
    tail = obj.draw(x0[2:], gens(range(2, 4)))
    assert all(torch.equal(a[2:], b) for a, b in zip(whole, tail))
