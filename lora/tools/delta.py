"""ΔW of one adapter from its factors alone: what merge and resize can rewrite without a model.

Algorithms whose ΔW does not depend on the layer's weight give a ``svd.Delta``:
    LoRA / LoCon (Tucker ``lora_mid`` folded into down, γ into up)   U·V of rank r
    LoHa                                                             U·V of rank r² where that is smaller, else dense
    LoKr                                                             dense kron(W1, W2)·γ
    diff (a whole weight change)                                     dense
Changes of a vector (a bias ``diff_b``, norm ``w_norm`` / ``b_norm``, a 1-D ``diff``) are not
low-rank matrices: ``vector`` gives them as tensors, to be summed and written back as diffs.

Refused, with an error naming the module: algorithms whose ΔW is a function of the base weight W
(IA3: W ⊙ w; OFT/BOFT: rotations of W; GLoRA: W·A + B; set_weight; any DoRA magnitude). A file
alone does not determine them; apply the file to its model and extract the difference instead.
"""
from __future__ import annotations

import torch

from ..adapters.base import Adapter
from ..adapters.full import Diff, DiffBias, NormBias, NormWeight
from ..adapters.loha import LoHa, half_shape
from ..adapters.lokr import LoKr, kron
from ..adapters.lora import LoRA
from .svd import Delta


def _lora(a: LoRA, device) -> Delta:
    u, v = a.low_rank(device, torch.float32)
    kernel = (a.down.shape[1], *a.mid.shape[2:]) if a.mid is not None else tuple(a.down.shape[1:])
    return Delta(u.shape[0], v.shape[1], u, v, kernel=kernel if len(kernel) > 1 else None)


def _loha(a: LoHa, device) -> Delta:
    shape = half_shape(a.w1_a, a.w1_b, a.t1)
    out, cols = shape[0], torch.Size(shape[1:]).numel()
    kernel = tuple(shape[1:]) if len(shape) > 2 else None
    lr = a.low_rank(device, torch.float32)
    if lr is not None:
        return Delta(out, cols, lr[0], lr[1], kernel=kernel)
    dense = a.delta(torch.empty(out, cols, device=device))
    return Delta(out, cols, dense=dense, kernel=kernel)


def _lokr(a: LoKr, device) -> Delta:
    d = kron(*a.halves(device)) * a.scale
    return Delta(d.shape[0], d[0].numel(), dense=d.flatten(1), kernel=tuple(d.shape[1:]) if d.dim() > 2 else None)


def _diff(a: Diff, device) -> Delta:
    d = a.diff.to(device=device, dtype=torch.float32)
    return Delta(d.shape[0], d[0].numel(), dense=d.flatten(1), kernel=tuple(d.shape[1:]) if d.dim() > 2 else None)


def _lokr_shape(a: LoKr) -> tuple[int, ...]:
    w1, w2 = a.halves("cpu")       # the halves are small; their Kronecker product is not built
    n = max(w1.dim(), w2.dim())
    s1, s2 = (*w1.shape, *[1] * (n - w1.dim())), (*w2.shape, *[1] * (n - w2.dim()))
    return tuple(x * y for x, y in zip(s1, s2))


def _layout_of_shape(shape) -> tuple[int, int, tuple[int, ...] | None]:
    return shape[0], torch.Size(shape[1:]).numel(), tuple(shape[1:]) if len(shape) > 2 else None


_MATRIX = {LoRA: _lora, LoHa: _loha, LoKr: _lokr, Diff: _diff}
# (out, cols, kernel) of ΔW without building it
_LAYOUT = {
    LoRA: lambda a: (a.up.shape[0], a.down[0].numel() * (a.mid[0, 0].numel() if a.mid is not None else 1),
                     (a.down.shape[1], *a.mid.shape[2:]) if a.mid is not None
                     else tuple(a.down.shape[1:]) if a.down.dim() > 2 else None),
    LoHa: lambda a: _layout_of_shape(half_shape(a.w1_a, a.w1_b, a.t1)),
    LoKr: lambda a: _layout_of_shape(_lokr_shape(a)),
    Diff: lambda a: _layout_of_shape(a.diff.shape),
}
_VECTOR = (DiffBias, NormWeight, NormBias)
SUPPORTED = "LoRA/LoCon, LoHa, LoKr and full diffs"


def is_vector(a: Adapter) -> bool:
    """A change of a bias or norm vector (or a 1-D diff): summed and kept as a diff, never factorised."""
    return isinstance(a, _VECTOR) or (isinstance(a, Diff) and a.diff.dim() < 2)


def vector(a: Adapter) -> torch.Tensor:
    """The change a vector adapter makes at strength 1, float32."""
    return a.diff.float()


def layout(a: Adapter) -> tuple[int, int, tuple[int, ...] | None]:
    """(out, cols, kernel) of ΔW from the factor shapes alone (see ``svd.Delta``); LoraError like
    ``matrix`` for an algorithm the tools cannot rewrite."""
    check(a)
    return _LAYOUT[type(a)](a)


def matrix(a: Adapter, device: torch.device | str = "cpu") -> Delta:
    """ΔW of a weight-independent algorithm at strength 1; LoraError for the others."""
    check(a)
    return _MATRIX[type(a)](a, device)


def check(a: Adapter) -> None:
    """LoraError unless the tools can rewrite this adapter without its model."""
    if a.has_magnitude:
        raise a.err("a DoRA magnitude rescales by the norms of the base weight: the file alone does not "
                    f"determine the change. The tools rewrite {SUPPORTED} without a model; load this file "
                    "onto its model and use Extract LoRA on (model, patched model) instead")
    if type(a) not in _MATRIX:
        raise a.err(f"{a.label}'s change is computed from the base model's weights (not from the file alone). "
                    f"The tools rewrite {SUPPORTED} without a model; load this file onto its model and use "
                    "Extract LoRA on (model, patched model) instead")
