"""DoRA (weight-decomposed adaptation) on top of any ΔW, exactly as each producer defines it.

Two producers, two strength rules (equal at strength 1):

LyCORIS ``dora_scale`` (``lycoris.functional.general.weight_decompose``)::

    W' = W + ΔW                                   ΔW at strength 1
    n  = ‖W'‖ per output row (dora_scale (out, 1, …)) or per input column ((1, in, …)), + eps
    W''= W' · (s·(m/n − 1) + 1)                   strength s blends only the rescale

PEFT ``lora_magnitude_vector`` (``peft.tuners.lora.dora``; s multiplies PEFT's ``scaling``)::

    W''= m · (W + s·ΔW) / ‖W + s·ΔW‖              norm per output row, no eps

Both norms are of the *patched* weight. ComfyUI core normalises the output axis against the
unpatched W and blends W + s·(W'' − W); see the formats table in README.md.

Bypass (``bypass``): the rescale is a per-channel factor c, so the merged layer is c ⊙ (W + ΔW)·x
(output axis) or (W + ΔW)·(c ⊙ x) (input axis), with ΔW·x from the adapter's own forward route.
c needs ‖W + s·ΔW‖ per channel = √(‖W‖² + 2s·⟨W, ΔW⟩ + s²·‖ΔW‖²); the three per-channel terms come
from W·factorsᵀ and the factors' Gram matrices (``Adapter.dora_terms``), never from ΔW, and are
cached per weight (W is frozen), so a strength change or an fp8 weight costs nothing extra.
"""
from __future__ import annotations

import weakref

import torch

from ..errors import LoraError
from ..ops import Op, on_channels

EPS = torch.finfo(torch.float32).eps     # the merged path's eps: it works on a float32 copy of W


def magnitude_axis(dora_scale: torch.Tensor, shape: torch.Size, *, file=None, key=None) -> int:
    """0 when the magnitude is per output channel, 1 when per input channel.

    LyCORIS stores (out, 1, …) or (1, in, …); a flat vector is read by its length, output first.
    """
    n, s = dora_scale.numel(), tuple(dora_scale.shape)
    if dora_scale.dim() > 1:
        if len(shape) > 1 and s[0] == 1 and s[1] == shape[1] and n == shape[1]:
            return 1
        if s[0] == shape[0] and n == shape[0]:
            return 0
    elif n == shape[0]:
        return 0
    elif len(shape) > 1 and n == shape[1]:
        return 1
    raise LoraError(f"dora_scale has shape {s} ({n} values), which fits neither the output axis "
                    f"({shape[0]}) nor the input axis ({shape[1] if len(shape) > 1 else 'n/a'}) "
                    f"of the target weight {tuple(shape)}", file=file, key=key)


def check_peft_magnitude(magnitude: torch.Tensor, shape: torch.Size, *, file=None, key=None) -> None:
    """PEFT keeps one magnitude per output channel: (out,) for Linear, (1, out, 1, …) for Conv."""
    if magnitude.numel() != shape[0]:
        raise LoraError(f"lora_magnitude_vector has shape {tuple(magnitude.shape)} ({magnitude.numel()} values) "
                        f"but the target weight {tuple(shape)} has {shape[0]} output channels",
                        file=file, key=key)


def _norm(w: torch.Tensor, axis: int) -> torch.Tensor:
    """‖w‖ over every axis but ``axis``, shaped to broadcast against ``w``."""
    keep = [1] * w.dim()
    keep[axis] = w.shape[axis]
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).norm(dim=1).reshape(keep)


def apply_dora_(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float,
                *, file=None, key=None) -> torch.Tensor:
    """LyCORIS rule, in place on ``weight`` (a float working copy): W ← (W+ΔW)·(s·(m/‖W+ΔW‖ − 1) + 1)."""
    axis = magnitude_axis(dora_scale, weight.shape, file=file, key=key)
    weight.add_(delta.to(weight.dtype))
    norm = _norm(weight, axis).add_(torch.finfo(weight.dtype).eps)
    scale = dora_scale.to(device=weight.device, dtype=weight.dtype).reshape(norm.shape) / norm
    if strength != 1.0:
        scale = strength * (scale - 1) + 1
    return weight.mul_(scale)


def apply_peft_dora_(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float,
                     *, file=None, key=None) -> torch.Tensor:
    """PEFT rule, in place on ``weight``: W ← m·(W + s·ΔW)/‖W + s·ΔW‖ (per output row)."""
    check_peft_magnitude(magnitude, weight.shape, file=file, key=key)
    weight.add_(delta.to(weight.dtype), alpha=strength)
    norm = _norm(weight, 0)
    return weight.mul_(magnitude.to(device=weight.device, dtype=weight.dtype).reshape(norm.shape) / norm)


def finish_(adapter, weight: torch.Tensor, delta: torch.Tensor, strength: float) -> torch.Tensor:
    """weight + s·ΔW, or the DoRA form when the adapter carries a magnitude (in place)."""
    if adapter.dora_scale is not None:
        return apply_dora_(weight, delta, adapter.dora_scale, strength, file=adapter.file, key=adapter.prefix)
    if adapter.peft_magnitude is not None:
        return apply_peft_dora_(weight, delta, adapter.peft_magnitude, strength, file=adapter.file, key=adapter.prefix)
    return weight.add_(delta.to(weight.dtype), alpha=strength)


def check_magnitude(adapter, shape: torch.Size, key) -> None:
    """Raise before any math when the adapter's magnitude fits neither axis of the target."""
    if adapter.dora_scale is not None:
        magnitude_axis(adapter.dora_scale, shape, file=adapter.file, key=adapter.prefix)
    if adapter.peft_magnitude is not None:
        check_peft_magnitude(adapter.peft_magnitude, shape, file=adapter.file, key=adapter.prefix)


# ---- bypass ---------------------------------------------------------------------------------------
def bypass(adapter, x: torch.Tensor, weight: torch.Tensor, strength: float, op: Op,
           base: torch.Tensor | None) -> torch.Tensor | None:
    """Δy of a DoRA adapter without ΔW; None when the adapter has no structured norm terms or no
    forward route (the caller then builds ΔW)."""
    peft = adapter.dora_scale is None
    axis = 0 if peft else magnitude_axis(adapter.dora_scale, weight.shape, file=adapter.file, key=adapter.prefix)
    terms = _terms(adapter, weight, axis)
    if terms is None:
        return None
    wsq, cross, sq = (t.to(device=x.device, dtype=x.dtype) for t in terms)
    m = (adapter.peft_magnitude if peft else adapter.dora_scale).to(device=x.device, dtype=x.dtype).flatten()
    if peft:      # c = m / ‖W + sΔW‖, ΔW scaled by s inside
        c = m / (wsq + (2 * strength) * cross + strength * strength * sq).clamp_min(0).sqrt()
        dw = adapter.delta_forward(x, weight, op, strength)
    else:         # c = s·(m / (‖W + ΔW‖ + eps) − 1) + 1, ΔW at strength 1
        c = m / ((wsq + 2 * cross + sq).clamp_min(0).sqrt() + EPS)
        if strength != 1.0:
            c = strength * (c - 1) + 1
        if axis == 1:  # (W + ΔW)·(c ⊙ x) − W·x: the rescale acts on the layer's input channels
            cx = on_channels(c.repeat(op.groups), x.dim(), op.channel_axis)
            dw = adapter.delta_forward(x * cx, weight, op, 1.0)
            if dw is None:
                return None
            return dw + op(x * (cx - 1), weight.to(device=x.device, dtype=x.dtype))
        dw = adapter.delta_forward(x, weight, op, 1.0)
    if dw is None:
        return None
    if base is None:
        base = op(x, weight.to(device=x.device, dtype=x.dtype))
    c = on_channels(c, base.dim(), op.channel_axis)
    return (base + dw).mul_(c).sub_(base)


def _terms(adapter, weight: torch.Tensor, axis: int):
    """(‖W‖², ⟨W, ΔW⟩, ‖ΔW‖²) per channel of ``axis``, cached on the adapter for this weight (frozen
    factors only: trainable ones change every step)."""
    factors = [t for t in adapter.factors().values() if isinstance(t, torch.Tensor)]
    frozen = not any(t.requires_grad for t in factors)
    key = (axis, weight.device, weight.dtype, tuple(weight.shape), _version(weight))
    hit = adapter._cache.get("dora_terms")
    if frozen and hit is not None and hit[0] == key and hit[1]() is weight:
        return hit[2]
    with torch.no_grad():
        parts = adapter.dora_terms(weight, axis)
        if parts is None:
            return None
        w = weight.detach().float()
        terms = ((w * w).movedim(axis, 0).reshape(w.shape[axis], -1).sum(1), *(t.detach() for t in parts))
    if frozen:
        adapter._cache["dora_terms"] = (key, weakref.ref(weight), terms)
    return terms


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:      # inference tensors keep no version counter
        return -1


def low_rank_terms(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, axis: int):
    """⟨W, UV⟩ and ‖UV‖² per channel of ``axis`` for ΔW.flatten(1) = U·V, in O(R·W) without UV:
    output rows: ⟨W_i, ΔW_i⟩ = Σ_m U[i,m]·(W·Vᵀ)[i,m],  ‖ΔW_i‖² = (U·VVᵀ·Uᵀ)_ii;
    input columns j (over rows and kernel): Σ_mk (UᵀW)[m,j,k]·V[m,j,k] and Σ_k V_jkᵀ·UᵀU·V_jk."""
    w = weight.detach().float()
    u, v = u.float(), v.float()
    if axis == 0:
        wf = w.flatten(1)
        return ((wf @ v.T) * u).sum(1), ((u @ (v @ v.T)) * u).sum(1)
    out, inn = w.shape[:2]
    w3, v3 = w.reshape(out, inn, -1), v.reshape(v.shape[0], inn, -1)
    cross = (torch.einsum("om,ojk->mjk", u, w3) * v3).sum((0, 2))
    return cross, torch.einsum("mjk,mn,njk->j", v3, u.T @ u, v3)
