"""Bypass mode: apply adapters in the forward pass, y = W·x + b + Σ Δy, never writing a weight.

For weights that cannot be patched in place (fp8, quantised custom layers) and for strength changes
that cost nothing. Each adapter gives Δy(x) such that W·x + Δy equals the layer with the merged
weight W + ΔW_s, through its own ``Adapter.bypass(x, weight, strength, op, base)``, which never
builds a ΔW of the weight's size:

    LoRA / LoCon / Tucker   s·γ·up(mid(down(x))), the factors run as the layer runs W (grouped convs too)
    LoHa (incl. Tucker)     the Hadamard product as one rank-r1·r2 product U·(V·x) (Tucker: U·T·V)
    LoKr                    Linear: vec(W1·X·W2ᵀ); Conv: W2 as a batched conv over x's c channel groups,
                            then a channel mix by W1 (or the reverse when the kernel is W1's)
    GLoRA                   W·(a1·a2·x) + b1·(bm)·b2·x
    OFT / BOFT              the rotation of the layer's output channels
    IA3                     a scale of the output channels (or of the input's)
    diff / set_weight       the stored tensor run as the layer's op
    DoRA (LyCORIS, PEFT)    the plain route above, rescaled per channel; the norms ‖W + s·ΔW‖ come
                            from W·factorsᵀ and the factors' Gram matrices, cached per weight (dora.py)

Where an adapter has no such route ``bypass`` returns None and Δy = op(x, ΔW_s) with ΔW_s =
merged − W (``weight_delta``, float32). That fallback remains only where the layer or the format
leaves no cheaper form, each for the reason given:
    - grouped convs with Tucker LoRA/LoHa, LoKr, GLoRA, OFT/BOFT: the factors' own convs would mix
      channels across groups (OFT: rotating rows of W across groups is not a mix of the outputs);
    - GLoRA's old layout, and DoRA on GLoRA, OFT or BOFT: no low-rank form of ⟨W, ΔW⟩ to take
      the norms from (the weight-dependent ΔW needs W·W-products);
    - LoKr whose two halves both carry kernel dims (a kernel that is itself a Kronecker product,
      which no tool writes).
LoHa whose rank-r1·r2 form is larger than ΔW itself (r1·r2·(out + in·k) ≥ out·in·k) builds ΔW from
its factors, never reading W: there ΔW is the smaller and faster form. DoRA on the input axis costs
one extra W·x per forward (the rescale acts on W's input).

Adapters are applied independently against the layer's own weight, so a stack of additive adapters
equals merged mode; a stack holding a non-additive one (OFT, BOFT, DoRA) equals applying each to the
original weight, not one after another as merged mode does.

    handle = attach(model, [("blocks.0.proj.weight", adapter, 0.8)])
    handle.set_strength(0.5)     # next forward uses it
    handle.remove()              # the model is exactly as before
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable

import torch

from .errors import LoraError
from .ops import Op, on_channels

if TYPE_CHECKING:
    from .adapters.base import Adapter

__all__ = ["Bypassed", "Entry", "Op", "attach", "bias_delta", "delta_output", "on_channels", "weight_delta"]


def _rows_of(key, adapter: "Adapter") -> tuple[str, tuple[int, int] | None]:
    """(tensor key, (start, length) of a row block or None) of a key ``attach`` accepts."""
    if isinstance(key, str):
        return key, None
    name, offset, *function = key
    if function and function[0] is not None:
        raise LoraError(f"{name!r}: a target whose layout the key map changes has no forward route (merge it)",
                        file=adapter.file, key=adapter.prefix)
    if offset is None:
        return name, None
    dim, start, length = offset
    if dim != 0:
        raise LoraError(f"{name!r}: only row blocks (dim 0) have a forward route, not dim {dim}",
                        file=adapter.file, key=adapter.prefix)
    return name, (int(start), int(length))


def weight_delta(adapter: "Adapter", weight: torch.Tensor, strength: float) -> torch.Tensor:
    """ΔW_s = merged − W in float32, whatever the adapter's strength rule (the fallback route)."""
    w = weight.detach().float()
    return adapter.apply_(w.clone(), strength).sub_(w)


def delta_output(adapter: "Adapter", x: torch.Tensor, weight: torch.Tensor, strength: float, op: Op,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """Δy for one adapter on a weight. ``x`` in the math dtype (float32); ``base`` = W·x if known."""
    dy = adapter.bypass(x, weight, strength, op, base=base)
    if dy is None:
        dy = op(x, weight_delta(adapter, weight, strength).to(device=x.device, dtype=x.dtype))
    return dy


def bias_delta(adapter: "Adapter", bias: torch.Tensor, strength: float, ndim: int, axis: int) -> torch.Tensor:
    """A bias adapter's Δy: Δb on the channel axis."""
    return on_channels(weight_delta(adapter, bias, strength), ndim, axis)


@dataclass(eq=False)
class Entry:
    key: Any                                # the tensor key, or (key, (0, start, length)) for a row block
    adapter: "Adapter"
    strength: float
    rows: tuple[int, int] | None = None     # (start, length) of the output rows the adapter changes


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
        if any(e.adapter.target == "weight" and e.adapter.uses_base() for e in live):
            base = output.to(math)
            if module.bias is not None:
                base = base - on_channels(module.bias.to(base), base.dim(), self.op.channel_axis)
        acc = output.to(math)
        axis = self.op.channel_axis
        blocks = None       # Δy of row-block adapters (q, k, v of a fused qkv), placed in their rows
        for e in live:
            if e.adapter.target == "bias":
                acc = acc + bias_delta(e.adapter, module.bias, e.strength, acc.dim(), axis).to(acc)
            elif e.rows is None:
                acc = acc + delta_output(e.adapter, xm, module.weight, e.strength, self.op, base)
            else:
                start, length = e.rows
                op = replace(self.op, shape=(length, *self.op.shape[1:]))
                dy = delta_output(e.adapter, xm, module.weight.narrow(0, start, length), e.strength, op,
                                  None if base is None else base.narrow(axis, start, length))
                blocks = torch.zeros_like(acc) if blocks is None else blocks
                blocks.narrow(axis, start, length).add_(dy)
        if blocks is not None:
            acc = acc + blocks
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


def attach(model: torch.nn.Module, changes: Iterable[tuple[Any, "Adapter", float]]) -> Bypassed:
    """Hook every (tensor key, adapter, strength) onto its layer; all checked before any hook is added.

    A key is a tensor key, or ``(weight key, (0, start, length))`` for an adapter of a row block of a
    fused weight (ComfyUI's key-map form): its Δy lands in those output rows. Row blocks need a Linear
    or an ungrouped conv; a key with a layout function (``(key, offset, function)``) has no forward
    route (merge those)."""
    modules = dict(model.named_modules())
    layers: dict[str, _Layer] = {}
    for key, adapter, strength in changes:
        full, rows = _rows_of(key, adapter)
        name, _, attr = full.rpartition(".")
        module = modules.get(name)
        tensor = getattr(module, attr, None) if module is not None else None
        if not isinstance(tensor, torch.Tensor) or attr != adapter.target:
            raise LoraError(f"model has no {adapter.target} tensor {full!r} for {adapter.name}",
                            file=adapter.file, key=adapter.prefix)
        shape = tensor.shape if rows is None else torch.Size((rows[1], *tensor.shape[1:]))
        if rows is not None and (adapter.target != "weight" or rows[0] + rows[1] > tensor.shape[0]):
            raise LoraError(f"rows {rows[0]}…{rows[0] + rows[1] - 1} are not a row block of {full!r} "
                            f"{tuple(tensor.shape)}", file=adapter.file, key=adapter.prefix)
        adapter.check_target(shape, full)
        if name not in layers:
            try:
                layers[name] = _Layer(module, Op.of(module))
            except TypeError as e:
                raise LoraError(f"{full!r}: {e}", file=adapter.file, key=adapter.prefix) from None
        if rows is not None and layers[name].op.groups != 1:
            raise LoraError(f"{full!r}: a row block of a grouped conv has no forward route (merge it)",
                            file=adapter.file, key=adapter.prefix)
        layers[name].entries.append(Entry(key, adapter, float(strength), rows))
    for layer in layers.values():
        layer.hook = layer.module.register_forward_hook(layer, with_kwargs=True)
    return Bypassed(layers)
