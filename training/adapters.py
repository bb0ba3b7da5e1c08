"""Trainable adapters: a thin ``nn.Module`` that owns one layer's adapter factors as Parameters.

The math is the adapter's own, in ``lora.adapters`` (one formula per algorithm, shared with the
loader): ``Adapter.init`` gives fresh factors the way kohya / LyCORIS initialise them,
``Adapter.bypass`` the forward-pass change autograd flows through (Δy = s·up(down(x)) for LoRA; no
full-size ΔW per layer per step, see lora/bypass.py), ``Adapter.to_state_dict`` the file's keys.
This module only holds the parameters (the way PEFT's layer owns them), hooks them into the
frozen layers, and names them for the optimizer.

    targets = find_targets(model, name_of)                  # {file module name: Linear/Conv layer}
    adapters = create_adapters(targets, "LoRA", rank=8, alpha=1.0, seed=0, dtype=torch.float32)
    with Installed(targets, adapters):                      # y = layer(x) + Δy(x)
        ...train...
    sd = adapters["lora_unet_x"].state_dict_for("lora_unet_x")   # kohya / LyCORIS keys
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch
from torch import nn

from ..lora.adapters import by_label
from ..lora.adapters import trainable as _trainable_classes
from ..lora.adapters.base import Adapter, alpha_tensor
from ..lora.ops import Op, on_channels
from .errors import TrainingError

# Parameter names (roles) that training before 0.2 used, per algorithm; they name the optimizer
# state in files it saved, so resume translates them (training/resume.py).
LEGACY_ROLES = {
    "loha": {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"},
    "lokr": {"w1": "lokr_w1", "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"},
    "oft": {"blocks": "oft_blocks"},
}


def algorithms() -> list[str]:
    """The trainable algorithms' labels (node combo options), in registry order: LoRA, LoHa, …"""
    return [c.label for c in _trainable_classes()]


def trainable(algorithm: str) -> type[Adapter]:
    """The adapter class for a trainable algorithm, by label or name in any case ("LoRA", "lora")."""
    cls = by_label(algorithm)
    if cls is None or not cls.trainable:
        raise TrainingError(f"algorithm {algorithm!r} cannot be trained; choose one of {', '.join(algorithms())}")
    return cls


def layer_op(module: nn.Module) -> Op | None:
    """The op of a layer training can adapt (Linear, ungrouped zero-padded Conv1-3d); None otherwise."""
    try:
        op = Op.of(module)
    except TypeError:
        return None
    return op if op.groups == 1 and op.padding_mode == "zeros" else None


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, so a layer's init does not depend on which other layers are trained."""
    return mix(seed, zlib.crc32(name.encode()))


def mix(*values: int) -> int:
    """Fold integers into one 63-bit seed (splitmix64 steps); stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TrainableAdapter(nn.Module):
    """One layer's adapter with its factors as Parameters (``factors``, keyed by role).

    ``adapter`` is the ``lora.adapters`` object whose tensors *are* these Parameters, so its math
    (``bypass``, ``delta``, ``to_state_dict``) sees every optimizer step. alpha is a plain float
    (not trained); a file without one gets the algorithm's ``default_alpha`` (scale 1).
    """

    def __init__(self, adapter: Adapter, op: Op, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.op = op
        self.algorithm = type(adapter)
        self.alpha = adapter.default_alpha() if adapter.alpha is None else float(adapter.alpha)
        self.factors = nn.ParameterDict({
            role: nn.Parameter(t.detach().to(device=device, dtype=dtype).clone())
            for role, t in adapter.factors().items() if t is not None and role != "alpha"})
        self._bind()

    def _bind(self) -> None:
        a = self.algorithm.from_factors(dict(self.factors), prefix="", file=None, options={})
        a.alpha = self.alpha          # the float itself, not its float32 rounding
        self.adapter = a

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._bind()                  # .to() may have made new Parameters
        return out

    @property
    def name(self) -> str:
        return self.algorithm.name

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.factors.values())).dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The layer's output ``y`` for input ``x`` plus this adapter's change (strength 1)."""
        a = self.adapter
        base = None
        if a.uses_base():            # W·x: the layer's output without its bias
            bias = getattr(layer, "bias", None)
            base = y if bias is None else y - on_channels(bias.to(device=y.device, dtype=y.dtype), y.dim(),
                                                          self.op.channel_axis)
        dy = a.bypass(x.to(self.dtype), layer.weight, 1.0, self.op, base)
        if dy is None:
            raise TrainingError(f"{a.label} has no forward-pass route for a layer of shape {self.op.shape}")
        return y + dy.to(y.dtype)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (float32) on ``weight``: the merged change (tests; never used per step)."""
        return self.adapter.delta(weight)

    def state_dict_for(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """File keys -> detached CPU tensors (``.alpha`` as a 0-d float32, as kohya writes it)."""
        out = {k: t.detach().to("cpu", dtype or t.dtype).clone()
               for k, t in self.adapter.to_state_dict(prefix).items() if k != prefix + ".alpha"}
        out[prefix + ".alpha"] = alpha_tensor(self.alpha)
        return out


# ---- finding layers and building adapters for them ----------------------------------------------
def find_targets(root: nn.Module, name_of: Callable[[str], str | None]) -> dict[str, nn.Module]:
    """{file module name: layer} for every Linear/Conv layer ``name_of`` names (None = skip)."""
    out: dict[str, nn.Module] = {}
    for path, module in root.named_modules():
        if layer_op(module) is None:
            continue
        name = name_of(path)
        if name is None:
            continue
        if name in out:
            raise TrainingError(f"two layers map to the same file name {name!r}")
        out[name] = module
    return out


def check_rank(targets: dict[str, nn.Module], rank: int, algorithm: str) -> None:
    """A rank the smallest layer cannot hold is an input error, not something to clamp silently."""
    cls = trainable(algorithm)
    limits = {n: cls.max_rank(layer_op(m)) for n, m in targets.items()}
    bad = {n: r for n, r in limits.items() if rank > r}
    if bad:
        worst = min(bad.values())
        names = ", ".join(sorted(bad)[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise TrainingError(f"rank {rank} is larger than {len(bad)} layer(s) allow (largest possible rank "
                            f"there: {worst}; e.g. {names}); choose rank ≤ {worst}")


def create_adapters(targets: dict[str, nn.Module], algorithm: str, rank: int, alpha: float, seed: int,
                    dtype: torch.dtype, resume: dict[str, Adapter] | None = None) -> dict[str, TrainableAdapter]:
    """One trainable adapter per target, on the target's device, in ``dtype``: fresh (``init`` with a
    generator seeded from (seed, layer name)) or continuing ``resume``'s adapters (from a file)."""
    cls = trainable(algorithm)
    if resume is None:
        check_rank(targets, rank, algorithm)
    out = {}
    for name, layer in targets.items():
        op = layer_op(layer)
        if resume is not None:
            a = resume[name]
        else:
            a = cls.init(op, rank, alpha, torch.Generator().manual_seed(layer_seed(seed, name)))
        out[name] = TrainableAdapter(a, op, dtype, layer.weight.device)
    return out


class Installed:
    """Forward hooks that add each adapter's bypass term; ``remove()`` restores the plain layers."""

    def __init__(self, targets: dict[str, nn.Module], adapters: dict[str, TrainableAdapter]):
        self.handles = []
        for name, layer in targets.items():
            self.handles.append(layer.register_forward_hook(_hook(adapters[name]), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _hook(adapter: TrainableAdapter):
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        return adapter(x, output, module)
    return hook


__all__ = ["Installed", "LEGACY_ROLES", "TrainableAdapter", "algorithms", "check_rank",
           "create_adapters", "find_targets", "layer_op", "layer_seed", "mix", "trainable"]
