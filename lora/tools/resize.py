"""Resize a LoRA to a lower rank: to a fixed rank, or per layer by a dynamic rule (kohya's
``networks/resize_lora.py``).

Each layer's ΔW (``delta.matrix``: LoRA/LoCon, Tucker folded; LoHa and LoKr too, which become LoRA)
is replaced by its best rank-k approximation in the Frobenius norm (Eckart–Young: the truncated SVD,
computed exactly from the factors, ``svd.svd``). k is ``rank`` (``conv_rank`` for kernels > 1×1),
or what ``method`` / ``param`` pick (``svd.keep``), capped by ``rank`` / ``conv_rank`` and by the rank
the layer has. A LoRA layer keeps its scale: up = Uₖ·Σₖ/γ, alpha = γ·k (γ = alpha / rank of the
input), as kohya writes it; a LoHa / LoKr layer is written with alpha = k (scale 1). Bias and norm
diffs are copied. The report gives each layer's rank and the Frobenius share of its ΔW it keeps.

Differences from kohya's script: the dynamic rules keep the rank their definitions give (kohya keeps
one more); the SVD is of the r × r core of the factors (exact, no out × in SVD); LoHa/LoKr/Tucker
files are resized (kohya reads lora_down/lora_up only); ``clamp_quantile`` is off by default (kohya's
resize never clamps; its merge and extract do, at 0.99); a rank above every stored one is an error,
not a file padded with zero ranks.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ..adapters.loha import LoHa
from ..adapters.lora import LoRA
from ..errors import LoraError
from ..keys import canonical
from . import common, delta
from .common import Layer, Result, Source
from .svd import check_method, check_quantile, check_rank, factors, keep, kept_share, svd


def resize(source: Source | str, rank: int, *, conv_rank: int | None = None, method: str | None = None,
           param: float | None = None, clamp_quantile: float | None = None, dtype: str = "auto",
           device=None, svd_method: str = "exact") -> Result:
    """The resized file as a Result (``common.save`` / ``save_in`` write it). ``rank`` is the rank
    (with ``method``: the largest rank a layer may get); ``conv_rank`` the same for kernels > 1×1
    (default: ``rank``, capped at what each layer stores)."""
    src = common.load(source) if isinstance(source, str) else source
    rank = check_rank(rank)
    conv_given = conv_rank is not None and conv_rank != 0
    conv_rank = check_rank(conv_rank, "conv_rank") if conv_given else rank
    method, param = check_method(method, param)
    q = check_quantile(clamp_quantile)
    out_dtype = common.save_dtype(dtype, [src])
    dev = common.device_of(device)

    plans = _plan(src)
    _check_ranks(src, plans, rank, conv_rank if conv_given else None, method)

    tensors, layers, linear, conv, converted = {}, [], [], [], Counter()
    for prefix, a, lay in plans:
        out_prefix = canonical(prefix)
        if lay is None:                                 # a bias / norm diff: copied as it is
            tensors.update(a.to_state_dict(out_prefix))
            continue
        d = delta.matrix(a, dev)
        cap = min(conv_rank if common.is_conv(d.kernel) else rank, lay.stored)
        u, s, vh = svd(d, method=svd_method, rank=cap)
        k = keep(s, cap, method, param)
        up, down = factors(u, s, vh, k, q)
        gamma = a.scale if isinstance(a, LoRA) else 1.0
        alpha = gamma * k
        tensors.update(common.lora_keys(out_prefix, up / gamma, down, alpha, d.kernel, out_dtype))
        (conv if common.is_conv(d.kernel) else linear).append((k, alpha))
        if not isinstance(a, LoRA):
            converted[a.label] += 1
        layers.append(Layer(out_prefix, k, _before(a, lay), kept_share(s, k)))
        del d, u, s, vh

    old = max((lay.stored for _, _, lay in plans if lay is not None), default=0)
    how = (f"dynamic resize with {method} {param:g} from rank {old} (at most {rank}"
           f"{f', conv {conv_rank}' if conv_given else ''})" if method else
           f"dimension is resized from {old} to {rank}{f' (conv: {conv_rank})' if conv_given else ''}")
    meta = common.carried(src.metadata)
    meta.update(common.network(linear, conv))
    meta.update(common.describe_arch(src.identity, "lora"))
    meta["ss_training_comment"] = common.comment(how + " by LoRA Lab", src.metadata.get("ss_training_comment"))
    meta.update(common.tool_keys("resize", {"rank": rank, "conv_rank": conv_rank, "method": method,
                                            "param": param, "clamp_quantile": q, "dtype": common.dtype_name(out_dtype)}, [src]))
    return Result("resize", tensors, meta, _summary(src, layers, how, converted, q), layers)


@dataclass
class _Layout:
    out: int
    cols: int
    kernel: tuple[int, ...] | None
    stored: int          # the rank the file stores for the layer (a bound for LoHa / LoKr / diff)


def _plan(src: Source) -> list[tuple[str, object, _Layout | None]]:
    """(prefix, adapter, layout or None for a vector change) per adapter, in file order, from the
    factor shapes alone; refuses weight-dependent algorithms before any work is done."""
    out = []
    for prefix, adapters in src.parsed.modules.items():
        for a in adapters:
            if delta.is_vector(a):
                out.append((prefix, a, None))
                continue
            rows, cols, kernel = delta.layout(a)
            bound = min(rows, cols)
            stored = a.rank if isinstance(a, LoRA) else min(bound, a.rank ** 2) if isinstance(a, LoHa) else bound
            out.append((prefix, a, _Layout(rows, cols, kernel, min(stored, bound))))
    return out


def _before(a, lay: _Layout) -> str:
    r = getattr(a, "rank", None)
    return f"{a.label} rank {r}" if r is not None else f"{a.label} {lay.out}×{lay.cols}"


def _check_ranks(src: Source, plans, rank: int, conv_rank: int | None, method: str | None) -> None:
    """A fixed rank above every rank the file stores (for its linear or its conv layers) is a
    mistake, not a resize: refuse it rather than write zero ranks."""
    if method is not None:
        return
    for conv, asked, what in ((False, rank, "rank"), (True, conv_rank, "conv_rank")):
        if asked is None:
            continue
        stored = [lay.stored for _, _, lay in plans if lay is not None and common.is_conv(lay.kernel) == conv]
        if not stored and conv:
            continue
        if stored and asked > max(stored):
            kind = "kernels > 1×1" if conv else "linear and 1×1 layers"
            raise LoraError(f"{what} {asked} is above the rank the file stores for its {kind} (at most "
                            f"{max(stored)}): resizing only lowers ranks", file=src.name)


def _summary(src: Source, layers: list[Layer], how: str, converted: Counter, q) -> list[str]:
    if not layers:
        return [f"{src.name}: no low-rank layers to resize"]
    kept = [x.kept for x in layers]
    worst = min(layers, key=lambda x: x.kept)
    ranks = Counter(x.rank for x in layers)
    lines = [f"from {src.name} ({src.identity.name or 'unknown architecture'}): {how}",
             f"{len(layers)} layers, ranks " + ", ".join(f"{r}×{n}" for r, n in sorted(ranks.items())),
             f"Frobenius share kept: mean {100 * sum(kept) / len(kept):.2f}%, lowest {100 * worst.kept:.2f}% "
             f"({worst.name})"]
    if converted:
        lines.append("rewritten as LoRA: " + ", ".join(f"{n} {label}" for label, n in converted.items()))
    if q is not None:
        lines.append(f"factors clamped at their {q:g} quantile (kohya's clamp): the kept shares are before clamping")
    if math.isnan(sum(kept)):
        lines.append("warning: a layer's share is not a number")
    return lines
