"""Merge several LoRA files into one, each with its ratio (and per-block weights).

Two ways, as kohya's scripts offer them:

- **Concatenate** (``rank`` None or 0; kohya ``merge_lora.py --concat``): per layer,
  up = [c₁·γ₁·up₁ | c₂·γ₂·up₂ | …], down = [down₁; down₂; …], alpha = Σ rᵢ (scale 1), so
  up·down = Σ cᵢ·ΔWᵢ exactly; cᵢ = ratio × block weight. LoRA / LoCon only (Tucker ``lora_mid`` is
  folded into down); bias and norm diffs are summed, whole ``diff`` layers summed as a diff. A layer
  that is LoHa or LoKr in some file cannot be concatenated exactly while staying a LoRA: the error
  says to give a rank. kohya scales both factors by √(alpha/base_alpha)·ratio and keeps the first
  file's alpha over the concatenated rank, which changes every layer's scale; here it is exact.
- **SVD** (``rank`` R, ``conv_rank``; kohya ``svd_merge_lora.py``): per layer ΔW = Σ cᵢ·ΔWᵢ (any of
  LoRA/LoCon, LoHa, LoKr, diff), then its best rank-R approximation (``svd``), alpha = R.
  ``clamp_quantile`` is kohya's clamp (its default 0.99), off here by default, so the result is the
  optimal rank-R approximation (Eckart–Young). R is capped by the layer's size.

Refused (``LoraError``, nothing written): files made for different architectures; files whose layers
differ (compared by their kohya names, so one file may use kohya and another PEFT names); algorithms
whose ΔW depends on the base weights (IA3, OFT, BOFT, GLoRA, DoRA: see ``delta``).

Per-block weights (``MergeInput.blocks``) are the stack's (``lora/blocks.py``: a preset or a vector in
A1111 LoRA Block Weight's forms, placed by the file's architecture); see ``block_scale``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import blocks
from ..adapters.full import Diff
from ..adapters.lora import LoRA
from ..errors import LoraError
from ..info import trigger_words
from ..keys import canonical, describe
from ..patch import match
from . import common, delta
from .common import Layer, Result, Source
from .svd import Delta, check_quantile, check_rank, factors, kept_share, svd


@dataclass
class MergeInput:
    """One file to merge: its path (or a loaded Source), its ratio and optional per-block weights."""
    source: Source | str
    ratio: float = 1.0
    blocks: str | None = None

    @classmethod
    def parse(cls, text: str) -> "MergeInput":
        """``PATH`` or ``PATH:RATIO`` (the command line's form; the ratio is what follows the last ':')."""
        head, sep, tail = text.rpartition(":")
        if sep and head and not tail.startswith(("\\", "/")):
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text)


def merge(inputs: Sequence[MergeInput], *, rank: int | None = None, conv_rank: int | None = None,
          clamp_quantile: float | None = None, dtype: str = "auto", device=None, svd_method: str = "exact",
          key_map: common.KeyMap | None = None) -> Result:
    """The merged file as a Result; see the module docstring. ``key_map`` (a model's: names -> keys,
    as the loaders match, or a function of the files' module names giving them) compares layers by the model weight they change, so files naming the same
    layers differently (kohya's ldm and diffusers paths) merge; without it, by their kohya names."""
    if not inputs:
        raise LoraError("nothing to merge: give at least one LoRA")
    concat = not rank
    if not concat:
        rank = check_rank(rank)
        conv_rank = check_rank(conv_rank, "conv_rank") if conv_rank else rank
    elif conv_rank:
        raise LoraError("conv_rank needs a rank: concatenation keeps every rank of every file")
    q = check_quantile(clamp_quantile)
    if concat and q is not None:
        raise LoraError("clamp_quantile applies to an SVD merge (give a rank); concatenation is exact")
    sources = [i.source if isinstance(i.source, Source) else common.load(i.source) for i in inputs]
    ratios = [float(i.ratio) for i in inputs]
    the_arch = _same_arch(sources)
    layers_of = _same_layers(sources, common.key_map_for(key_map, {p for s in sources for p in s.parsed.modules}))
    scales = [block_scale(s.identity, i.blocks) for s, i in zip(sources, inputs)]
    out_dtype = common.save_dtype(dtype, sources)
    dev = common.device_of(device)

    tensors, layers, linear, conv = {}, [], [], []
    for per_file in layers_of.values():
        name = canonical(per_file[0][0])
        coeffs = [r * (sc(p) if sc else 1.0) for (p, _), r, sc in zip(per_file, ratios, scales)]
        adapters = [a for _, a in per_file]
        if delta.is_vector(adapters[0]):
            total = sum(c * delta.vector(a) for a, c in zip(adapters, coeffs))
            tensors.update(type(adapters[0])(diff=total.to(out_dtype)).to_state_dict(name))
            continue
        for s, a in zip(sources, adapters):
            try:
                delta.check(a)
            except LoraError as e:
                raise LoraError(f"{e} (in {s.name})") from None
        if concat:
            layer, kind = _concat(name, adapters, coeffs, sources, out_dtype, dev, tensors)
        else:
            layer, kind = _svd(name, adapters, coeffs, rank, conv_rank, q, out_dtype, dev, svd_method, tensors)
        if layer is not None:
            layers.append(layer)
            (conv if kind else linear).append((layer.rank, float(layer.rank)))

    how = (f"ranks concatenated (exact), {len(sources)} files" if concat else
           f"merged ΔW truncated by SVD to rank {rank}" + (f" (conv {conv_rank})" if conv_rank != rank else ""))
    listing = ", ".join(f"{s.name} ×{r:g}" + (f" (blocks {i.blocks})" if i.blocks else "")
                        for s, r, i in zip(sources, ratios, inputs))
    meta = {**common.network(linear, conv), **common.describe_arch(_identity(sources, the_arch), "lora")}
    meta["ss_training_comment"] = f"merged by LoRA Lab from {listing}: {how}"
    meta["modelspec.merged_from"] = ", ".join(s.metadata.get("modelspec.title") or s.name.rsplit(".", 1)[0]
                                              for s in sources)
    words = list(dict.fromkeys(w for s in sources for w in trigger_words(s.metadata)))
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    meta.update(common.tool_keys("merge", {"ratios": ratios, "blocks": [i.blocks for i in inputs], "rank": rank or 0,
                                           "conv_rank": conv_rank or 0, "clamp_quantile": q,
                                           "dtype": common.dtype_name(out_dtype)}, sources))
    summary = [f"{listing} ({the_arch.name if the_arch else 'unknown architecture'}): {how}",
               f"{len(layers)} layers" + (", ranks " + ", ".join(f"{r}×{n}" for r, n in
                                                                sorted(Counter(x.rank for x in layers if x.rank).items()))
                                          if any(x.rank for x in layers) else "")]
    if not concat and layers:
        kept = [x.kept for x in layers if x.kept is not None]
        worst = min((x for x in layers if x.kept is not None), key=lambda x: x.kept)
        summary.append(f"Frobenius share of the merged ΔW kept: mean {100 * sum(kept) / len(kept):.2f}%, "
                       f"lowest {100 * worst.kept:.2f}% ({worst.name})")
    return Result("merge", tensors, meta, summary, layers)


def _concat(name, adapters, coeffs, sources, dtype, dev, tensors):
    """One layer by concatenation: (Layer, is a conv); writes the layer's keys into ``tensors``."""
    if all(isinstance(a, Diff) for a in adapters):
        total = sum(c * delta.matrix(a, dev).matrix() for a, c in zip(adapters, coeffs))
        shape = adapters[0].diff.shape
        tensors.update(Diff(diff=total.reshape(shape).to(dtype).cpu()).to_state_dict(name))
        return Layer(name, None, "sum of diffs", 1.0), common.is_conv(tuple(shape[1:]))
    for s, a in zip(sources, adapters):
        if not isinstance(a, LoRA):
            raise LoraError(f"{a.label} cannot be concatenated with other layers and stay exact: merge with a rank "
                            f"(SVD) to turn the merged layer into a LoRA", file=s.name, key=a.prefix)
    parts = [(delta.matrix(a, dev), c) for a, c in zip(adapters, coeffs) if c != 0]
    if not parts:
        return None, False
    d0 = parts[0][0]
    kernel = next((d.kernel for d, _ in parts if d.kernel), None)
    up = torch.cat([d.u * c for d, c in parts], 1)
    down = torch.cat([d.v for d, _ in parts], 0)
    k = up.shape[1]
    tensors.update(common.lora_keys(name, up.cpu(), down.cpu(), float(k), kernel, dtype))
    before = " + ".join(f"rank {d.u.shape[1]}" for d, _ in parts)
    return Layer(name, k, before, 1.0), common.is_conv(kernel or d0.kernel)


def _svd(name, adapters, coeffs, rank, conv_rank, q, dtype, dev, svd_method, tensors):
    """One layer by SVD of the merged ΔW: (Layer, is a conv)."""
    total: Delta | None = None
    for a, c in zip(adapters, coeffs):
        if c == 0:
            continue
        d = delta.matrix(a, dev).scaled(c)
        total = d if total is None else total.plus(d)
    if total is None:
        return None, False
    conv = common.is_conv(total.kernel)
    cap = min(conv_rank if conv else rank, total.rank)
    u, s, vh = svd(total, method=svd_method, rank=cap)
    k = max(1, min(cap, len(s)))
    up, down = factors(u, s, vh, k, q)
    tensors.update(common.lora_keys(name, up.cpu(), down.cpu(), float(k), total.kernel, dtype))
    before = " + ".join(f"{a.label} rank {a.rank}" if hasattr(a, "rank") else a.label for a in adapters)
    return Layer(name, k, before, kept_share(s, k)), conv


# ---- checks ------------------------------------------------------------------------------------------
def _same_arch(sources: list[Source]):
    archs = {s.identity.arch for s in sources if s.identity.arch is not None}
    if len(archs) > 1:
        said = "; ".join(f"{s.name}: {s.identity.name or 'unknown'}" for s in sources)
        raise LoraError(f"the files are made for different architectures ({said}): a merged file would fit none")
    return next(iter(archs), None)


def _identity(sources: list[Source], the_arch):
    return next((s.identity for s in sources if s.identity.arch is the_arch and s.identity.variant), None) or \
        next((s.identity for s in sources if s.identity.arch is the_arch), None)


def _layer_ids(s: Source, key_map) -> dict[str, str]:
    """prefix -> what identifies its layer: the model key it changes (with a key map), else its kohya name."""
    ids = {p: canonical(p) for p in s.parsed.modules}
    if key_map is not None:
        m = match(s.parsed, key_map, file=s.name, n_file_keys=len(s.tensors))
        ids.update({t.source: str(t.key if isinstance(t.key, str) else t.key[0]) for t in m.targets})
    return ids


def _same_layers(sources: list[Source], key_map=None) -> dict:
    """{(layer id, target): [(prefix, adapter) per file]}; LoraError when the files' layers differ."""
    tables = []
    for s in sources:
        table = {}
        ids = _layer_ids(s, key_map)
        for prefix, adapters in s.parsed.modules.items():
            for a in adapters:
                key = (ids[prefix], a.target)
                if key in table:
                    raise LoraError(f"two modules of the file change the same {a.target} ({table[key][0]!r} and "
                                    f"{prefix!r})", file=s.name, key=prefix)
                table[key] = (prefix, a)
        tables.append(table)
    first = tables[0]
    for s, t in zip(sources[1:], tables[1:]):
        missing, extra = sorted(k[0] for k in first.keys() - t.keys()), sorted(k[0] for k in t.keys() - first.keys())
        if missing or extra:
            said = []
            if missing:
                said.append(f"{len(missing)} layer(s) of {sources[0].name} are not in it: {describe(missing, 4)}")
            if extra:
                said.append(f"it has {len(extra)} layer(s) {sources[0].name} has not: {describe(extra, 4)}")
            hint = "" if key_map is not None else (" (or the same layers under other names: give the model, so "
                                                   "layers are compared by the weight they change)")
            raise LoraError("the files change different layers, so no merged file can stand for both: "
                            + "; ".join(said) + ". Merge files trained on the same layers" + hint, file=s.name)
        for key, (_prefix, a) in t.items():
            _same_shape(sources[0], first[key][1], s, a)
    return {k: [t[k] for t in tables] for k in first}


def _same_shape(s0: Source, a0, s: Source, a) -> None:
    if delta.is_vector(a0) != delta.is_vector(a):
        raise LoraError(f"{a.prefix!r} changes a vector in one file and a matrix in the other", file=s.name)
    if delta.is_vector(a0):
        shapes = (tuple(a0.diff.shape), tuple(a.diff.shape))
    else:
        for src, ad in ((s0, a0), (s, a)):
            try:
                delta.check(ad)
            except LoraError as e:
                raise LoraError(f"{e} (in {src.name})") from None
        shapes = (delta.layout(a0)[:2], delta.layout(a)[:2])
    if shapes[0] != shapes[1]:
        raise LoraError(f"layer {a.prefix!r} changes a weight of shape {shapes[1]} here but {shapes[0]} in "
                        f"{s0.name}: the files are for models of different sizes", file=s.name)


# ---- per-block weights -------------------------------------------------------------------------------
def block_scale(identity, spec: str | None) -> Callable[[str], float] | None:
    """module prefix -> block weight, for per-block merging; None when no weights are given.

    The stack's block weights (``lora/blocks.py``: ``weights_for(arch, spec)``, a preset or a vector in
    A1111 LoRA Block Weight's forms) placed by the file's architecture (``blocks.weight_of``, any naming).
    A module in no block keeps weight 1."""
    if not spec or not str(spec).strip():
        return None
    the_arch = identity.arch if identity is not None else None
    if the_arch is None or the_arch.blocks is None:
        raise LoraError(f"no block layout is known for {the_arch.name if the_arch else 'this file'}: per-block "
                        "weights cannot be applied")
    weights = blocks.weights_for(the_arch, spec)
    return lambda prefix: float(blocks.weight_of(the_arch.blocks, weights, prefix))

