"""Data-parallel training over torch.distributed: several processes, on one machine or many, train
one LoRA as a single process would with the same seed and global batch.

How a step is split (``loop.train_step``):

- every process draws the same global batch (bucket and sample indices come from a generator
  seeded by (seed, step, micro-batch), as in a single process);
- process r of W computes positions [r·B/W, (r+1)·B/W) of it (B = batch_size, which must divide by
  W); each sample's noise and timestep come from a generator seeded by (seed, step, micro-batch,
  position), so a sample's draws do not depend on which process computes it;
- each process back-propagates Σ(its samples' losses) / (samples in the global batch), and after
  the step's micro-batches one all-reduce (SUM) of every gradient plus the per-micro-batch losses
  gives every process the gradient of the global batch's mean loss: the same update everywhere.

This is what DistributedDataParallel does (gradients summed in one flat bucket, averaged over the
global batch), written out because the trained parameters are adapters hooked into a model that is
not one nn.Module to wrap. NCCL on CUDA, gloo on the CPU; ``torchrun`` provides the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). A process that dies makes the others' next
collective fail (or time out): they stop with ``PeerLost``, naming the step.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .errors import TrainingError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class PeerLost(TrainingError):
    """A collective failed: another process died, was stopped, or the network between them broke."""


@dataclass
class World:
    """This process's place in the run; the default is a single process (no collectives at all)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    started: bool = field(default=False, repr=False)    # this object initialised the process group

    @property
    def main(self) -> bool:
        """Process 0: the one that writes files and logs."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise TrainingError(f"batch_size = {batch_size} does not divide by the {self.size} processes of this run: "
                                f"each process takes an equal share of every batch (use a multiple of {self.size})")

    def part(self, batch_size: int, count: int) -> range:
        """Positions of a global batch of ``count`` samples (≤ ``batch_size``) this process computes."""
        per = batch_size // self.size
        return range(min(self.rank * per, count), min((self.rank + 1) * per, count))

    def reduce(self, params: Mapping[str, torch.nn.Parameter], values: torch.Tensor, step: int) -> torch.Tensor:
        """Sum every parameter's gradient and ``values`` over the processes, in one collective; the
        summed gradients are written back (a parameter without a gradient gets one of zeros when any
        process has one). Returns the summed ``values``. A single process returns ``values``."""
        if self.size == 1:
            return values
        plist = list(params.values())
        device = plist[0].device if plist else values.device
        flat = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
                for p in plist]
        buf = torch.cat([*(f.to(device) for f in flat), values.to(device=device, dtype=torch.float32)])
        self._all_reduce(buf, step)
        offset = 0
        for p in plist:
            n = p.numel()
            p.grad = buf[offset: offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        return buf[offset:].to(values.dtype).cpu()

    def all_reduce(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Sum ``t`` over the processes, in place (nothing for a single process)."""
        if self.size > 1:
            self._all_reduce(t, step)
        return t

    def _all_reduce(self, t: torch.Tensor, step: int) -> None:
        import torch.distributed as dist

        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except Exception as e:    # gloo: RuntimeError / DistBackendError; NCCL: DistBackendError or a timeout
            raise PeerLost(f"process {self.rank} of {self.size} lost the other processes at step {step + 1} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}): another "
                           "process died or was stopped, or the network between them broke. Nothing of this step "
                           "was applied; resume from the last saved file (any number of processes)") from None

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            try:
                dist.barrier()
            except Exception as e:
                raise PeerLost(f"process {self.rank} of {self.size} lost the other processes while waiting for "
                               f"them ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.started = False


SINGLE = World()


def launched() -> bool:
    """True when torchrun (or another launcher) set this process up as one of several."""
    return all(k in os.environ for k in ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env(device: torch.device | str | None = None, timeout_s: float = 1800.0) -> World:
    """This process's World from torchrun's environment, with the process group started (NCCL for
    a CUDA ``device``, gloo otherwise), or SINGLE when the process was not launched as one of several.
    ``timeout_s``: how long a collective waits for a silent peer before failing."""
    if not launched():
        return SINGLE
    import torch.distributed as dist

    try:
        rank, size, local = (int(os.environ[k]) for k in ENV)
    except ValueError:
        raise TrainingError(f"torchrun's environment is malformed: {', '.join(f'{k}={os.environ.get(k)!r}' for k in ENV)}") from None
    backend = "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"
    if not dist.is_available():
        raise TrainingError("this PyTorch was built without torch.distributed: run one process")
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": torch.device(device)} if backend == "nccl" else {}))
    except Exception as e:
        raise TrainingError(f"process {rank} of {size} could not join the others ({backend}; "
                            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')!r}, MASTER_PORT={os.environ.get('MASTER_PORT')!r}):"
                            f" {type(e).__name__}: {e}") from None
    return World(rank, size, local, backend, started=True)


__all__ = ["ENV", "PeerLost", "SINGLE", "World", "from_env", "launched"]
