"""Trainable adapters in bypass form: y = layer(x) + Δ(x), where Δ never needs ΔW.

A base layer stays frozen and untouched; a forward hook adds the adapter's contribution to its
output, so no full-size ΔW (and no patched copy of W) is built per layer per step. Each class
stores its factors under the names and shapes the producing tool writes (kohya / LyCORIS), so
``state_dict`` is the file's content and ``from_factors`` resumes from one.

    LoRA   ΔW = s · up · down                       Δ(x) = s · up(down(x))
    LoHa   ΔW = s · (w1a·w1b) ⊙ (w2a·w2b)           = s · U·V with U = w1a ⊙row w2a (out, r²),
                                                      V = w1b ⊙col w2b (r², in): a rank-r² LoRA
    LoKr   ΔW = s · w1 ⊗ w2                          Δ(x) = w1 · X · w2ᵀ with x viewed as X (c, d)
    OFT    W' = R·W blockwise on the output axis,   Δ(x) = (R − I)ᵀ(Wx) per block
           R = (I + Q)(I − Q)⁻¹, Q = B − Bᵀ

s = alpha / rank (LoKr with a full w2: 1). Convolutions use the layer's own stride, padding and
dilation for the first factor and a 1×1 for the second, so the factors keep their 4-D shapes.
LoHa falls back to building ΔW only when r²·(out + in·k) exceeds out·in·k (then ΔW is smaller).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TrainingError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about the layer it wraps."""
    out_features: int
    in_features: int
    kernel: tuple[int, ...] = ()          # () for Linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    @classmethod
    def of(cls, module: nn.Module) -> "LayerSpec | None":
        """The spec of a Linear / Conv1-3d layer, None for anything an adapter cannot wrap."""
        if isinstance(module, nn.Linear):
            return cls(module.out_features, module.in_features)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if module.groups != 1 or module.padding_mode != "zeros":
                return None
            return cls(module.out_channels, module.in_channels, tuple(module.kernel_size),
                       tuple(module.stride), module.padding, tuple(module.dilation))
        return None

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def k(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    def first(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Apply ``w`` (shaped like this layer's weight, other out size) as the layer would."""
        if not self.is_conv:
            return F.linear(x, w)
        return _CONV[len(self.kernel)](x, w, None, self.stride, self.padding, self.dilation)

    def second(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Apply ``w`` (out, r) as a 1×1 mixing of channels."""
        if not self.is_conv:
            return F.linear(h, w)
        return _CONV[len(self.kernel)](h, w.reshape(*w.shape[:2], *[1] * len(self.kernel)))

    def max_rank(self) -> int:
        return min(self.out_features, self.in_features * self.k)


def factorize(dim: int) -> tuple[int, int]:
    """dim = m · n with m ≤ n as close to √dim as possible (m = 1 for primes)."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


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


class Trainable(nn.Module):
    """One layer's trainable factors. Subclasses set ``name`` (the adapter registry id) and
    ``suffixes`` (file suffix -> parameter name) and implement create / delta / bypass."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[dict[str, str]] = {}

    def __init__(self, spec: LayerSpec, alpha: float, factors: dict[str, torch.Tensor]):
        super().__init__()
        self.spec = spec
        self.alpha = float(alpha)
        for role, t in factors.items():
            setattr(self, role, nn.Parameter(t))

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator,
               dtype: torch.dtype) -> "Trainable":
        raise NotImplementedError

    @classmethod
    def from_factors(cls, spec: LayerSpec, factors: dict[str, torch.Tensor], dtype: torch.dtype,
                     where: str) -> "Trainable":
        """Resume from a file's factors; raises TrainingError naming ``where`` if they do not fit."""
        own = {role: factors[role] for role in cls.suffixes.values() if role in factors}
        alpha = factors.get("alpha")
        self = cls._from(spec, {r: t.detach().to(dtype).clone() for r, t in own.items()},
                         None if alpha is None else float(alpha.float().reshape(-1)[0]))
        try:
            got = self.delta_shape()
        except RuntimeError as e:
            raise TrainingError(f"{cls.name} factors {_shapes(own)} are inconsistent: {e}", key=where) from None
        if tuple(got) != spec.shape:
            raise TrainingError(f"{cls.name} factors {_shapes(own)} give a change of shape {tuple(got)}, "
                                f"the layer's weight is {spec.shape}", key=where)
        return self

    @classmethod
    def _from(cls, spec, factors, alpha):
        raise NotImplementedError

    # ---- what gets saved ------------------------------------------------------------------
    def factors(self) -> dict[str, torch.Tensor]:
        return {role: getattr(self, role) for role in dict.fromkeys(self.suffixes.values()) if hasattr(self, role)}

    def state_dict_for(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """File keys -> detached CPU tensors (``.alpha`` as a 0-d float32, as kohya writes it)."""
        suffix_of = {}
        for suffix, role in self.suffixes.items():
            suffix_of.setdefault(role, suffix)
        out = {prefix + suffix_of[r]: t.detach().to("cpu", dtype or t.dtype).clone() for r, t in self.factors().items()}
        out[prefix + ".alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        return out

    # ---- math -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.delta().shape)

    def delta(self) -> torch.Tensor:
        """ΔW in float32, shaped like the layer's weight (tests and fallbacks; not used per step)."""
        raise NotImplementedError

    def bypass(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The change this adapter makes to the layer output ``y`` for input ``x`` (same shape as y)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.bypass(x, y).to(y.dtype)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _shapes(factors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{r} {tuple(t.shape)}" for r, t in factors.items())


class TrainLoRA(Trainable):
    name = "lora"
    suffixes = {".lora_up.weight": "up", ".lora_down.weight": "down"}

    @classmethod
    def create(cls, spec, rank, alpha, generator, dtype):
        down = torch.empty(rank, spec.in_features, *spec.kernel)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        up = torch.zeros(spec.out_features, rank, *[1] * len(spec.kernel))   # starts as the base model
        return cls._from(spec, {"up": up.to(dtype), "down": down.to(dtype)}, alpha)

    @classmethod
    def _from(cls, spec, f, alpha):
        if "up" not in f or "down" not in f:
            raise TrainingError(f"LoRA module needs up and down factors, found {sorted(f)}")
        down, up = f["down"], f["up"]
        rank = down.shape[0]
        # Linear-shaped factors of a 1x1 conv (and the reverse) are reshaped, as every loader does.
        up = up.reshape(up.shape[0], -1)
        up = up.reshape(*up.shape, *[1] * len(spec.kernel))
        if down[0].numel() == spec.in_features * spec.k:
            down = down.reshape(rank, spec.in_features, *spec.kernel)
        f = {"up": up, "down": down}
        return cls(spec, rank if alpha is None else alpha, f)

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self):
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.spec.shape) * self.scale

    def bypass(self, x, y):
        x = x.to(self._dtype())
        return self.spec.second(self.spec.first(x, self.down) * self.scale, self.up.flatten(1))


class TrainLoHa(Trainable):
    name = "loha"
    suffixes = {".hada_w1_a": "w1a", ".hada_w1_b": "w1b", ".hada_w2_a": "w2a", ".hada_w2_b": "w2b"}

    @classmethod
    def create(cls, spec, rank, alpha, generator, dtype):
        n_in = spec.in_features * spec.k
        # One Hadamard side starts at zero so the model starts unchanged; the other is random.
        w1a = torch.randn(spec.out_features, rank, generator=generator) * 0.1
        w1b = torch.randn(rank, n_in, generator=generator)
        w2a = torch.zeros(spec.out_features, rank)
        w2b = torch.randn(rank, n_in, generator=generator)
        return cls._from(spec, {k: v.to(dtype) for k, v in dict(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b).items()}, alpha)

    @classmethod
    def _from(cls, spec, f, alpha):
        missing = {"w1a", "w1b", "w2a", "w2b"} - set(f)
        if missing:
            raise TrainingError(f"LoHa module lacks {sorted(missing)} (Tucker 'hada_t1/t2' files cannot be resumed)")
        f = {k: v.reshape(v.shape[0], -1) for k, v in f.items()}
        return cls(spec, f["w1b"].shape[0] if alpha is None else alpha, f)

    @property
    def rank(self):
        return self.w1b.shape[0]

    def delta(self):
        w1 = self.w1a.float() @ self.w1b.float()
        w2 = self.w2a.float() @ self.w2b.float()
        return (w1 * w2).reshape(self.spec.shape) * self.scale

    def factorized(self) -> bool:
        r1, r2 = self.w1b.shape[0], self.w2b.shape[0]
        s = self.spec
        return r1 * r2 * (s.out_features + s.in_features * s.k) < s.out_features * s.in_features * s.k

    def bypass(self, x, y):
        x = x.to(self._dtype())
        s = self.spec
        if self.factorized():
            # (w1a·w1b) ⊙ (w2a·w2b) = U·V: U[i,(p,q)] = w1a[i,p]·w2a[i,q], V[(p,q),j] = w1b[p,j]·w2b[q,j]
            u = (self.w1a[:, :, None] * self.w2a[:, None, :]).flatten(1)
            v = (self.w1b[:, None, :] * self.w2b[None, :, :]).flatten(0, 1)
            return s.second(s.first(x, v.reshape(-1, s.in_features, *s.kernel)) * self.scale, u)
        w = ((self.w1a @ self.w1b) * (self.w2a @ self.w2b) * self.scale).reshape(s.shape)
        return s.first(x, w)


class TrainLoKr(Trainable):
    name = "lokr"
    suffixes = {".lokr_w1": "w1", ".lokr_w2": "w2", ".lokr_w2_a": "w2a", ".lokr_w2_b": "w2b"}

    @classmethod
    def create(cls, spec, rank, alpha, generator, dtype):
        a, b = factorize(spec.out_features)       # out = a·b; w1 gets the small side
        c, d = factorize(spec.in_features)        # in  = c·d
        w1 = torch.empty(a, c)
        nn.init.kaiming_uniform_(w1, a=math.sqrt(5), generator=generator)
        if rank >= max(b, d) / 2:                 # a rank that large is no saving: store w2 whole
            f = {"w1": w1, "w2": torch.zeros(b, d, *spec.kernel)}
            alpha = rank                          # scale 1, which is what loaders use without w2_a/b
        else:
            w2a = torch.empty(b, rank)
            nn.init.kaiming_uniform_(w2a, a=math.sqrt(5), generator=generator)
            f = {"w1": w1, "w2a": w2a, "w2b": torch.zeros(rank, d * spec.k)}
        return cls._from(spec, {k: v.to(dtype) for k, v in f.items()}, alpha)

    @classmethod
    def _from(cls, spec, f, alpha):
        if "w1" not in f or not ("w2" in f or {"w2a", "w2b"} <= set(f)):
            raise TrainingError(f"LoKr module needs lokr_w1 and lokr_w2 (or lokr_w2_a/b), found {sorted(f)} "
                                "(w1_a/w1_b or Tucker t2 files cannot be resumed)")
        if "w2b" in f:
            f = {**f, "w2b": f["w2b"].reshape(f["w2b"].shape[0], -1)}
        self = cls(spec, 1.0 if alpha is None else alpha, f)
        if alpha is None:
            self.alpha = float(self.rank)
        return self

    @property
    def rank(self):
        return self.w2b.shape[0] if hasattr(self, "w2b") else 1

    @property
    def scale(self):
        return self.alpha / self.rank if hasattr(self, "w2b") else 1.0

    def _w2(self) -> torch.Tensor:
        """w2 as (b, d, *kernel)."""
        if hasattr(self, "w2"):
            return self.w2
        b = self.w2a.shape[0]
        return (self.w2a @ self.w2b).reshape(b, -1, *self.spec.kernel)

    def delta(self):
        w2 = self._w2().float()
        w1 = self.w1.float().reshape(*self.w1.shape, *[1] * (w2.dim() - 2))
        return torch.kron(w1, w2).reshape(self.spec.shape) * self.scale

    def bypass(self, x, y):
        x = x.to(self._dtype())
        s = self.spec
        a, c = self.w1.shape
        b = self.w2a.shape[0] if hasattr(self, "w2a") else self.w2.shape[0]
        d = s.in_features // c
        if not s.is_conv:
            z = x.unflatten(-1, (c, d))                                    # (..., c, d)
            if hasattr(self, "w2"):
                z = F.linear(z, self.w2)                                   # (..., c, b)
            else:
                z = F.linear(F.linear(z, self.w2b), self.w2a)
            out = torch.einsum("ac,...cb->...ab", self.w1, z)
            return out.flatten(-2) * self.scale
        n, spatial = x.shape[0], x.shape[2:]
        z = x.reshape(n * c, d, *spatial)
        sub = LayerSpec(b, d, s.kernel, s.stride, s.padding, s.dilation)
        if hasattr(self, "w2"):
            z = sub.first(z, self.w2)
        else:
            z = sub.second(sub.first(z, self.w2b.reshape(-1, d, *s.kernel)), self.w2a)
        z = z.reshape(n, c, b, *z.shape[2:])
        out = torch.einsum("ac,ncb...->nab...", self.w1, z)
        return out.flatten(1, 2) * self.scale


class TrainOFT(Trainable):
    """Diagonal OFT (LyCORIS ``oft_blocks``): ``rank`` is the block size; alpha (the constraint on
    ‖Q‖, 0 = none) is saved as-is; the layer's bias is not rotated, exactly as when merged."""

    name = "oft"
    suffixes = {".oft_blocks": "blocks"}

    @classmethod
    def create(cls, spec, rank, alpha, generator, dtype):
        size = max(d for d in range(1, min(rank, spec.out_features) + 1) if spec.out_features % d == 0)
        blocks = torch.zeros(spec.out_features // size, size, size)      # R = I: starts as the base model
        return cls._from(spec, {"blocks": blocks.to(dtype)}, 0.0)

    @classmethod
    def _from(cls, spec, f, alpha):
        if "blocks" not in f or f["blocks"].dim() != 3:
            raise TrainingError(f"OFT module needs 3-D oft_blocks, found {_shapes(f)}")
        return cls(spec, 0.0 if alpha is None else alpha, f)

    def attach(self, bias: torch.Tensor | None) -> None:
        """Remember the layer's bias (not as a parameter of ours: it is the base model's)."""
        self.__dict__["_bias"] = bias

    @property
    def rank(self):
        return self.blocks.shape[-1]

    @property
    def scale(self):
        return 1.0

    def rotation(self) -> torch.Tensor:
        """R − I per block, float32."""
        b = self.blocks.float()
        q = b - b.transpose(1, 2)
        if self.alpha > 0:   # LyCORIS semantics: the constraint scales with the output size
            limit = self.alpha * self.spec.out_features
            norm = q.norm() + 1e-8
            q = torch.where(norm > limit, q * (limit / norm), q)
        eye = torch.eye(b.shape[-1], device=b.device)
        return (eye + q) @ torch.linalg.inv(eye - q) - eye

    def delta_shape(self):
        k, n, _ = self.blocks.shape
        return (k * n, *self.spec.shape[1:])

    def delta(self):
        raise TrainingError("OFT's ΔW depends on the base weight: use delta_for(weight)")

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.rotation()
        k, n, _ = r.shape
        w = weight.float().reshape(k, n, -1)
        return torch.einsum("knm,knj->kmj", r, w).reshape(weight.shape)

    def bypass(self, x, y):
        h = y if getattr(self, "_bias", None) is None else y - _bias_view(self._bias, y, self.spec)
        r = self.rotation().to(h.dtype)
        if self.spec.is_conv:
            h = h.movedim(1, -1)
        k, n, _ = r.shape
        out = torch.einsum("knm,...kn->...km", r, h.unflatten(-1, (k, n))).flatten(-2)
        return out.movedim(-1, 1) if self.spec.is_conv else out


def _bias_view(bias: torch.Tensor, y: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    b = bias.to(device=y.device, dtype=y.dtype)
    return b.reshape(-1, *[1] * len(spec.kernel)) if spec.is_conv else b


TRAINABLE: dict[str, type[Trainable]] = {c.name: c for c in (TrainLoRA, TrainLoHa, TrainLoKr, TrainOFT)}


def algorithms() -> list[str]:
    """Trainable algorithm names, in the adapter registry's order where it knows them."""
    from ..lora.adapters import ADAPTERS

    known = [n for n in ADAPTERS if n in TRAINABLE]
    return known + [n for n in TRAINABLE if n not in known]


def trainable(algorithm: str) -> type[Trainable]:
    try:
        return TRAINABLE[algorithm.lower()]
    except KeyError:
        raise TrainingError(f"algorithm {algorithm!r} cannot be trained; choose one of {', '.join(TRAINABLE)}") from None


# ---- finding layers and hooking adapters into them --------------------------------------------
def find_targets(root: nn.Module, name_of: Callable[[str], str | None]) -> dict[str, nn.Module]:
    """{file module name: layer} for every Linear/Conv layer ``name_of`` names (None = skip)."""
    out: dict[str, nn.Module] = {}
    for path, module in root.named_modules():
        if LayerSpec.of(module) is None:
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
    too_small = {n: LayerSpec.of(m).max_rank() for n, m in targets.items()}
    if algorithm == "oft":
        too_small = {n: LayerSpec.of(m).out_features for n, m in targets.items()}
    bad = {n: r for n, r in too_small.items() if rank > r}
    if bad:
        worst = min(bad.values())
        names = ", ".join(sorted(bad)[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise TrainingError(f"rank {rank} is larger than {len(bad)} layer(s) allow (largest possible rank "
                            f"there: {worst}; e.g. {names}); choose rank ≤ {worst}")


def build(targets: dict[str, nn.Module], algorithm: str, rank: int, alpha: float, seed: int,
          dtype: torch.dtype, resume: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Trainable]:
    """One adapter per target, on the target's device: fresh from ``seed`` or from ``resume`` factors."""
    cls = trainable(algorithm)
    if resume is None:
        check_rank(targets, rank, cls.name)
    out = {}
    for name, layer in targets.items():
        spec = LayerSpec.of(layer)
        if resume is not None:
            a = cls.from_factors(spec, resume[name], dtype, name)
        else:
            g = torch.Generator().manual_seed(layer_seed(seed, name))
            a = cls.create(spec, rank, alpha, g, dtype)
        out[name] = a.to(layer.weight.device)
        if isinstance(a, TrainOFT):
            a.attach(layer.bias)
    return out


class Installed:
    """Forward hooks that add each adapter's bypass term; ``remove()`` restores the plain layers."""

    def __init__(self, targets: dict[str, nn.Module], adapters: dict[str, Trainable]):
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


def _hook(adapter: Trainable):
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        return adapter(x, output)
    return hook
