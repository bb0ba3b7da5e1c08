"""Extract a LoRA from two models: ΔW = tuned − base per layer, each replaced by its best rank-k
approximation (kohya's ``networks/extract_lora_from_models.py``).

The models come as ``Weights``: read one tensor at a time, so no more than one layer of each model
is ever held in float32 (``FileWeights`` memory-maps a safetensors checkpoint; nodes/tools.py reads
a ComfyUI MODEL / CLIP with the patches ComfyUI computes, e.g. a model and its LoRA-patched self).

Layers: every Linear / Conv weight (``.weight`` of 2 to 5 dims) of the diffusion model (UNet or DiT),
and of the text encoders the layers kohya trains (the attention and MLP Linears of CLIP's encoder
layers, named ``lora_te…_text_model_encoder_layers_…``; not T5, not the text projection). Each needs a name in the key map (``naming``): kohya's by default. Layers whose
difference is at most ``min_diff`` everywhere (default 0: identical) are skipped, so an unchanged
text encoder adds nothing. Rank per layer: ``rank`` (``conv_rank`` for kernels > 1×1; 0 skips them),
or a dynamic rule as in ``resize``; alpha = rank (scale 1). ``svd_method="lowrank"`` (fixed ranks only)
trades exactness for speed (see ``svd``). ``clamp_quantile`` is kohya's clamp
(its default 0.99), off by default so that a model that *is* base + a rank-r LoRA gives that LoRA
back exactly.

Refused: models of different architectures, or layers whose shapes differ (models of other sizes).
Differences from kohya's script: any family (kohya: SD1/2/SDXL), conv layers by default (kohya:
only with --conv_dim), the dynamic rules, the Gram-matrix SVD (4-20× faster on conv layers, as exact:
bench/svd.py), per-layer skipping of identical layers (kohya: the whole text encoder at 0.01).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any, Callable, Mapping

import torch

from .. import arch as arch_table
from ..errors import LoraError
from ..io import read_header
from ..sd_keys import model_key_map
from . import common, naming
from .common import Layer, Result
from .svd import Delta, check_method, check_quantile, check_rank, check_svd_method, factors, keep, kept_share, svd

_TE_NAMES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_TE_LAYER = "_text_model_encoder_layers_"      # CLIP's encoder layers: the text-encoder layers kohya trains


class Weights:
    """A model's weights, read one tensor at a time. Subclasses give ``shapes`` and ``get``."""
    name: str = "model"
    metadata: Mapping[str, str] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor (any dtype, any device); the caller makes it float32."""
        raise NotImplementedError

    def dtype(self) -> torch.dtype:
        return torch.float32

    def identity(self) -> arch_table.Identity:
        return arch_table.identify(self.shapes(), self.metadata)

    def key_map(self) -> dict[str, Any]:
        """Names for its weights without ComfyUI: ``sd_keys`` for SD1.x/SD2.x/SDXL, else the native
        diffusion-model names (``naming.native_key_map``)."""
        shapes = self.shapes()
        found = self.identity().arch
        if found is not None and found.key_map == arch_table.SD_KEYS:
            return model_key_map(list(shapes), shapes)
        return naming.native_key_map(shapes)


class FileWeights(Weights):
    """A safetensors checkpoint (or diffusion-model / text-encoder file), memory-mapped."""

    _DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, path: str):
        if not path.lower().endswith(".safetensors"):
            raise LoraError("extract reads .safetensors model files (convert a pickle checkpoint first)", file=path)
        self.path, self.name = path, os.path.basename(path)
        self._header = read_header(path)
        self.metadata = self._header.metadata
        self._file = None

    def shapes(self):
        return dict(self._header.shapes)

    def dtype(self):
        found = {self._DTYPES.get(d) for d in self._header.dtypes.values()}
        return next((d for d in (torch.float32, torch.bfloat16, torch.float16) if d in found), torch.float32)

    def get(self, key):
        from safetensors import safe_open

        if self._file is None:
            self._file = safe_open(self.path, framework="pt", device="cpu")
        return self._file.get_tensor(key)


class StateDictWeights(Weights):
    """Tensors already in memory (tests, scripts)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "state dict", metadata=None):
        self.tensors, self.name, self.metadata = tensors, name, dict(metadata or {})

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def dtype(self):
        found = {t.dtype for t in self.tensors.values()}
        return next((d for d in (torch.float32, torch.bfloat16, torch.float16) if d in found), torch.float32)

    def get(self, key):
        return self.tensors[key]


def extract(base: Weights, tuned: Weights, rank: int, *, conv_rank: int | None = None, method: str | None = None,
            param: float | None = None, clamp_quantile: float | None = None, min_diff: float = 0.0,
            style: str = "kohya", key_map: Mapping[str, Any] | None = None, identity=None,
            dtype: str = "auto", device=None, svd_method: str = "exact",
            progress: Callable[[int, int], None] | None = None) -> Result:
    """The LoRA tuned − base as a Result. ``key_map`` (names → model keys) and ``identity`` (what
    the model is) default to what the base's own keys give; ComfyUI callers pass ComfyUI's."""
    rank = check_rank(rank)
    conv_rank = rank if conv_rank is None else conv_rank
    if conv_rank != 0:
        conv_rank = check_rank(conv_rank, "conv_rank")
    method, param = check_method(method, param)
    svd_method = check_svd_method(svd_method, method)
    q = check_quantile(clamp_quantile)
    if min_diff < 0 or not math.isfinite(min_diff):
        raise LoraError(f"min_diff must be ≥ 0 (got {min_diff})")
    dev = common.device_of(device)
    out_dtype = common.DTYPES[dtype] if dtype != "auto" else _widest(base.dtype(), tuned.dtype())
    identity = identity or _same_model(base, tuned)
    the_arch = identity.arch if identity is not None else None
    targets = layers(base, tuned, key_map if key_map is not None else base.key_map(), style, the_arch)

    tensors, report, linear, conv, skipped, identical = {}, [], [], [], 0, 0
    for i, (key, name, shape) in enumerate(targets):
        if progress is not None:
            progress(i, len(targets))
        kernel = tuple(shape[1:]) if len(shape) > 2 else None
        is_conv = common.is_conv(kernel)
        if is_conv and conv_rank == 0:
            skipped += 1
            continue
        diff = tuned.get(key).to(dev, torch.float32) - base.get(key).to(dev, torch.float32)
        if not bool(torch.isfinite(diff).all()):
            raise LoraError("the difference of the two models is not finite (NaN or inf in a weight)", key=key)
        if float(diff.abs().max()) <= min_diff:
            identical += 1
            continue
        d = Delta(shape[0], diff[0].numel(), dense=diff.flatten(1), kernel=kernel)
        cap = min(conv_rank if is_conv else rank, d.rank)
        u, s, vh = svd(d, method=svd_method, rank=cap)
        k = keep(s, cap, method, param)
        up, down = factors(u, s, vh, k, q)
        tensors.update(common.lora_keys(name, up.cpu(), down.cpu(), float(k), kernel, out_dtype))
        (conv if is_conv else linear).append((k, float(k)))
        report.append(Layer(name, k, "×".join(map(str, shape)), kept_share(s, k)))
        del diff, d, u, s, vh
    if progress is not None:
        progress(len(targets), len(targets))
    if not tensors:
        raise LoraError(f"the two models do not differ in any of the {len(targets)} layers compared"
                        + (f" by more than {min_diff:g}" if min_diff else "") + ": there is nothing to extract",
                        file=tuned.name)

    how = (f"extracted by LoRA Lab from {tuned.name} − {base.name}: " +
           (f"dynamic {method} {param:g}, at most rank {rank}" if method else f"rank {rank}") +
           (f", conv rank {conv_rank}" if conv_rank != rank else ""))
    meta = {**common.network(linear, conv), **common.describe_arch(identity, "lora")}
    meta["ss_training_comment"] = how
    meta["ss_sd_model_name"] = base.name
    meta.update(common.tool_keys("extract", {"rank": rank, "conv_rank": conv_rank, "method": method, "param": param,
                                             "clamp_quantile": q, "min_diff": min_diff, "style": style, "svd": svd_method,
                                             "dtype": common.dtype_name(out_dtype)}, [base, tuned]))
    kept = [x.kept for x in report]
    worst = min(report, key=lambda x: x.kept)
    summary = [f"{how} ({identity.name if identity is not None and identity.name else 'unknown architecture'})",
               f"{len(report)} layers, ranks " + ", ".join(f"{r}×{n}" for r, n in sorted(Counter(x.rank for x in report).items())),
               f"Frobenius share of the difference kept: mean {100 * sum(kept) / len(kept):.2f}%, lowest "
               f"{100 * worst.kept:.2f}% ({worst.name})"]
    if identical:
        summary.append(f"{identical} layer(s) equal in both models" + (f" (within {min_diff:g})" if min_diff else "")
                       + ": left out")
    if skipped:
        summary.append(f"{skipped} conv layer(s) with kernels > 1×1 left out (conv_rank 0)")
    if q is not None:
        summary.append(f"factors clamped at their {q:g} quantile (kohya's clamp): the kept shares are before clamping")
    return Result("extract", tensors, meta, summary, report)


def _widest(*dtypes: torch.dtype) -> torch.dtype:
    return next((d for d in (torch.float32, torch.bfloat16, torch.float16) if d in dtypes), torch.float32)


def _same_model(base: Weights, tuned: Weights) -> arch_table.Identity:
    a, b = base.identity(), tuned.identity()
    if a.arch is not None and b.arch is not None and a.arch is not b.arch:
        raise LoraError(f"the models are of different architectures: {base.name} is {arch_table.a(a.name)} model, "
                        f"{tuned.name} {arch_table.a(b.name)} model; a LoRA is their difference, so they must be "
                        "the same kind of model")
    return a if a.arch is not None else b


def layers(base: Weights, tuned: Weights, key_map: Mapping[str, Any], style: str, the_arch=None
           ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(model key, LoRA name, shape) of every layer to extract, in the base's key order; LoraError
    when the tuned model lacks one or has it in another shape."""
    names = naming.names_for(key_map, style, the_arch)
    te_ok = {k for n, k in key_map.items() if isinstance(k, str) and n.startswith(_TE_NAMES) and _TE_LAYER in n}
    shapes, other = base.shapes(), tuned.shapes()
    out, missing, differ = [], [], []
    for key, shape in shapes.items():
        name = names.get(key)
        if name is None or not key.endswith(".weight") or not 2 <= len(shape) <= 5:
            continue
        if naming.text_encoder_key(name) and key not in te_ok:
            continue
        if key not in other:
            missing.append(key)
        elif tuple(other[key]) != tuple(shape):
            differ.append(f"{key} {tuple(shape)} vs {tuple(other[key])}")
        else:
            out.append((key, name, tuple(shape)))
    if differ:
        raise LoraError(f"{len(differ)} layer(s) differ in shape between {base.name} and {tuned.name}, so they are "
                        f"models of different sizes or kinds: {', '.join(differ[:3])}" + (", …" if len(differ) > 3 else ""))
    if missing:
        raise LoraError(f"{tuned.name} lacks {len(missing)} layer(s) of {base.name} (e.g. {', '.join(missing[:3])}): "
                        "extract needs two models of the same kind")
    if not out:
        raise LoraError(f"no layer of {base.name} has a LoRA name (is it a diffusion model or text encoder "
                        "LoRA Lab knows?)")
    return out
