"""GLoRA (LyCORIS ``glora``): ΔW = γ · (W·A + B), a low-rank mix of the weight's own input channels
plus a LoRA, γ = alpha / rank (1 for a missing or 0 alpha).

Current layout (lycoris-lora ≥ 2; rank = a2.shape[0]):
    a1 (in, r[,1…])  a2 (r, in[,1…])  b1 (out, r[,1…])  b2 (r, in·k) or (r, in, *k)
    W·A = W ×_in (a1·a2)   i.e. (W·A)[o, j, …] = Σ_i W[o, i, …] · (a1·a2)[i, j]
    B   = b1·b2, or with ``bm`` (r, r, *k) and 1×1 b1/b2:  B[o, i, …] = Σ_mn bm[m, n, …]·b1[o, m]·b2[n, i]
Old layout (first LyCORIS GLoRA, as ComfyUI reads it; rank = a1.shape[0]):
    a1 (r, n)  a2 (n, r)  b1 (r, n)  b2 (out, r),  n = in·k:   ΔW = γ · (W_flat·a2·a1 + b2·b1)
The layout is read off the shapes; when both fit (a square layer), the one with the smaller rank
wins, the current one on a tie. ComfyUI core drops ``bm``.

Bypass: Δy = s·γ·(W·(a1·a2·x) + b1·(bm)·b2·x), each factor run as the layer's op (one extra W·x).
The old layout, grouped convs and GLoRA with DoRA build ΔW (see lora/bypass.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, alpha_tensor, alpha_value, ensure_same_numel, lycoris_scale, pick, tucker


@dataclass(eq=False, repr=False)
class GLoRA(Adapter):
    name = "glora"
    label = "GLoRA"
    roles = {".a1.weight": "glora_a1", ".a2.weight": "glora_a2", ".b1.weight": "glora_b1",
             ".b2.weight": "glora_b2", ".bm.weight": "glora_bm"}
    identify = frozenset({"glora_a1", "glora_a2", "glora_b1", "glora_b2"})

    a1: torch.Tensor = None
    a2: torch.Tensor = None
    b1: torch.Tensor = None
    b2: torch.Tensor = None
    bm: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    old_layout: bool = False

    @classmethod
    def from_factors(cls, factors, *, prefix, file, options):
        a1, a2, b1, b2 = pick(factors, ("glora_a1", "glora_a2", "glora_b1", "glora_b2"),
                              algo="GLoRA", prefix=prefix, file=file)
        self = cls(a1=a1, a2=a2, b1=b1, b2=b2, bm=factors.get("glora_bm"), alpha=alpha_value(factors.get("alpha")),
                   dora_scale=factors.get("dora_scale"), file=file, prefix=prefix)
        self.old_layout = self._read_layout()
        return self

    def _read_layout(self) -> bool:
        a1, a2, b1, b2 = (t.flatten(1).shape for t in (self.a1, self.a2, self.b1, self.b2))
        shapes = f"a1 {tuple(self.a1.shape)}, a2 {tuple(self.a2.shape)}, b1 {tuple(self.b1.shape)}, b2 {tuple(self.b2.shape)}"
        if self.bm is not None:
            bm = tuple(self.bm.shape[:2])
            if not (a1[1] == a2[0] and bm == (b1[1], b2[0])):
                raise self.err(f"ranks disagree: {shapes}, bm {tuple(self.bm.shape)}")
            return False
        new = b2[0] == b1[1] == a1[1] == a2[0]
        old = b2[1] == b1[0] == a1[0] == a2[1]
        if not (new or old):
            raise self.err(f"ranks disagree: {shapes} fit neither GLoRA layout")
        return old and (not new or a1[0] < a2[0])

    def factors(self):
        return {"glora_a1": self.a1, "glora_a2": self.a2, "glora_b1": self.b1, "glora_b2": self.b2,
                "glora_bm": self.bm, "alpha": alpha_tensor(self.alpha), "dora_scale": self.dora_scale}

    @property
    def rank(self) -> int:
        return (self.a1 if self.old_layout else self.a2).shape[0]

    @property
    def scale(self) -> float:
        return lycoris_scale(self.alpha, self.rank)

    def _mats(self, device, dtype=torch.float32):
        return [t.to(device=device, dtype=dtype).flatten(1) for t in (self.a1, self.a2, self.b1, self.b2)]

    def delta(self, weight):
        self.check_target(weight.shape, self.prefix)
        a1, a2, b1, b2 = self._mats(weight.device)
        w = weight.float()
        if self.old_layout:
            d = (w.flatten(1) @ a2 @ a1).reshape(weight.shape) + (b2 @ b1).reshape(weight.shape)
        else:
            d = torch.einsum("oi...,ij->oj...", w, a1 @ a2)
            if self.bm is not None:
                d += tucker(self.bm.to(device=weight.device, dtype=torch.float32), b1.T, b2)
            else:
                d += (b1 @ b2).reshape(weight.shape)
        ensure_same_numel(self, d.numel(), weight.shape, self.prefix)
        return d.mul_(self.scale)

    def check_target(self, shape, key):
        a1, a2, b1, b2 = (t.flatten(1).shape for t in (self.a1, self.a2, self.b1, self.b2))
        if self.old_layout:
            fits = a2[0] == a1[1] == shape[1:].numel() and b2[0] == shape[0] and b2[0] * b1[1] == shape.numel()
        else:
            k = self.bm.shape[2:].numel() if self.bm is not None else 1
            fits = a1[0] == a2[1] == shape[1] and b1[0] == shape[0] and b1[0] * b2[1] * k == shape.numel()
        if not fits:
            raise self.err(f"GLoRA factors a1 {tuple(self.a1.shape)}, a2 {tuple(self.a2.shape)}, b1 {tuple(self.b1.shape)}, "
                           f"b2 {tuple(self.b2.shape)} do not fit target {key!r} of shape {tuple(shape)}")
        super().check_target(shape, key)

    def delta_forward(self, x, weight, op, scale, base=None):
        """scale·γ·(W·(a1·a2·x) + b1·(bm)·b2·x), each factor as the layer's op; ΔW never built."""
        if self.old_layout or op.groups != 1:
            return None
        a1, a2, b1, b2 = self._mats(x.device, x.dtype)
        a = op.pointwise(op.pointwise(x, a2), a1)
        if self.bm is None:
            h = op(x, b2.reshape(b2.shape[0], *weight.shape[1:]))
        else:
            h = op(op.pointwise(x, b2), self.bm.to(device=x.device, dtype=x.dtype))
        b = op.pointwise(h, b1)
        return (op(a, weight.to(device=x.device, dtype=x.dtype)) + b).mul_(scale * self.scale)
