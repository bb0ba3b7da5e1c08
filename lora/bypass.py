"""Bypass mode: apply adapters in the forward pass, y = W·x + b + Σ Δy, never writing a weight.

For weights that cannot be patched in place (fp8, quantised custom layers) and for strength changes
that cost nothing. Each adapter gives Δy(x) such that W·x + Δy equals the layer with the merged
weight W + ΔW_s: through its own ``bypass(x, weight, strength, op, base=None)`` when it has a cheaper
form (LoRA: up(down(x)); OFT: a rotation of W·x; IA3: a channel scale), and otherwise — or when that
returns None — through Δy = op(x, ΔW_s), ΔW_s = merged − W computed in float32.

Adapters are applied independently against the layer's own weight, so a stack of additive adapters
equals merged mode; a stack holding a non-additive one (OFT, BOFT, DoRA) equals applying each to the
original weight, not one after another as merged mode does.

    handle = attach(model, [("blocks.0.proj.weight", adapter, 0.8)])
    handle.set_strength(0.5)     # next forward uses it
    handle.remove()              # the model is exactly as before
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F

from .errors import LoraError

if TYPE_CHECKING:
    from .adapters.base import Adapter

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Op:
    """How a layer applies its weight (bias excluded): F.linear, or F.convNd with its geometry."""
    conv_dims: int = 0                     # 0: Linear; 1, 2, 3: ConvNd
    stride: tuple | int = 1
    padding: tuple | int | str = 0
    dilation: tuple | int = 1
    groups: int = 1
    padding_mode: str = "zeros"
    pad: tuple = ()                        # F.pad amounts when padding_mode is not "zeros"

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Op":
        if isinstance(module, torch.nn.Linear):
            return cls()
        if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed:
            dims = len(module.kernel_size)
            return cls(dims, module.stride, module.padding, module.dilation, module.groups, module.padding_mode,
                       tuple(getattr(module, "_reversed_padding_repeated_twice", ())))
        raise TypeError(f"bypass supports Linear and Conv1d/2d/3d layers, not {type(module).__name__}")

    @property
    def channel_axis(self) -> int:
        return 1 if self.conv_dims else -1

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer's own op: y = W·x (no bias)."""
        if not self.conv_dims:
            return F.linear(x, w)
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.pad, mode=self.padding_mode), 0
        return _CONV[self.conv_dims](x, w, None, self.stride, padding, self.dilation, self.groups)

    def pointwise(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A 1×1 (stride 1, no padding) application of w: channel mixing only."""
        return F.linear(x, w) if not self.conv_dims else _CONV[self.conv_dims](x, w)


def weight_delta(adapter: "Adapter", weight: torch.Tensor, strength: float) -> torch.Tensor:
    """ΔW_s = merged − W in float32, whatever the adapter's strength rule."""
    w = weight.detach().float()
    return adapter.apply_(w.clone(), strength).sub_(w)


def delta_output(adapter: "Adapter", x: torch.Tensor, weight: torch.Tensor, strength: float, op: Op,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """Δy for one adapter on a weight. ``x`` in the math dtype (float32); ``base`` = W·x if known."""
    fast = getattr(adapter, "bypass", None)
    dy = fast(x, weight, strength, op, base=base) if fast is not None else None
    if dy is None:
        dy = op(x, weight_delta(adapter, weight, strength).to(x.device))
    return dy


def on_channels(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along ``axis`` of a ``ndim``-dim activation."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def bias_delta(adapter: "Adapter", bias: torch.Tensor, strength: float, ndim: int, axis: int) -> torch.Tensor:
    """A bias adapter's Δy: Δb on the channel axis."""
    return on_channels(weight_delta(adapter, bias, strength), ndim, axis)


@dataclass(eq=False)
class Entry:
    key: str
    adapter: "Adapter"
    strength: float


@dataclass(eq=False)
class _Layer:
    module: torch.nn.Module
    op: Op
    entries: list[Entry] = field(default_factory=list)
    hook: object = None

    def __call__(self, module, args, kwargs, output):
        live = [e for e in self.entries if e.strength != 0]
        if not live:
            return output
        x = args[0] if args else kwargs["input"]
        math = torch.float64 if x.dtype == torch.float64 else torch.float32
        xm = x.to(math)
        base = None
        if any(getattr(e.adapter, "bypass_uses_base", False) and e.adapter.target == "weight" for e in live):
            base = output.to(math)
            if module.bias is not None:
                base = base - on_channels(module.bias.to(base), base.dim(), self.op.channel_axis)
        acc = output.to(math)
        for e in live:
            if e.adapter.target == "bias":
                acc = acc + bias_delta(e.adapter, module.bias, e.strength, acc.dim(), self.op.channel_axis).to(acc)
            else:
                acc = acc + delta_output(e.adapter, xm, module.weight, e.strength, self.op, base)
        return acc.to(output.dtype)


class Bypassed:
    """Handle on the hooks ``attach`` installed: change strengths at once, remove cleanly."""

    def __init__(self, layers: dict[str, _Layer]):
        self._layers = layers

    @property
    def entries(self) -> list[Entry]:
        return [e for layer in self._layers.values() for e in layer.entries]

    def set_strength(self, strength: float, *, key: str | None = None) -> None:
        """New strength for every adapter (or those on ``key``); the next forward uses it."""
        for e in self.entries:
            if key is None or e.key == key:
                e.strength = float(strength)

    def remove(self) -> None:
        for layer in self._layers.values():
            if layer.hook is not None:
                layer.hook.remove()
                layer.hook = None
        self._layers = {}


def attach(model: torch.nn.Module, changes: Iterable[tuple[str, "Adapter", float]]) -> Bypassed:
    """Hook every (tensor key, adapter, strength) onto its layer; all checked before any hook is added."""
    modules = dict(model.named_modules())
    layers: dict[str, _Layer] = {}
    for key, adapter, strength in changes:
        name, _, attr = key.rpartition(".")
        module = modules.get(name)
        tensor = getattr(module, attr, None) if module is not None else None
        if not isinstance(tensor, torch.Tensor) or attr != adapter.target:
            raise LoraError(f"model has no {adapter.target} tensor {key!r} for {adapter.name}",
                            file=adapter.file, key=adapter.prefix)
        adapter.check_target(tensor.shape, key)
        if name not in layers:
            try:
                layers[name] = _Layer(module, Op.of(module))
            except TypeError as e:
                raise LoraError(f"{key!r}: {e}", file=adapter.file, key=adapter.prefix) from None
        layers[name].entries.append(Entry(key, adapter, float(strength)))
    for layer in layers.values():
        layer.hook = layer.module.register_forward_hook(layer, with_kwargs=True)
    return Bypassed(layers)
