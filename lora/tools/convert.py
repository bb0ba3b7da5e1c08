"""Convert a LoRA file to kohya's or ComfyUI's key names for one model, keeping its algorithm.

Any file LoRA Lab loads (kohya, diffusers, PEFT, transformers-5, LyCORIS, ComfyUI names; LoRA, LoCon,
LoHa, LoKr, IA3, GLoRA, OFT, BOFT, DoRA, diffs) is matched against the model's key map exactly as the
loaders match it (``module_targets``: ``lora.patch.match``, raw name first, then its kohya form), and
each module is written under the name ``naming.names_for`` picks for its target weight. The factors
are copied bit for bit (a LoKr stays a LoKr, in the producer's suffixes), the metadata carried over.

Two rewrites are not renames:
- modules that target slices of one fused weight (diffusers' to_q / to_k / to_v onto Flux's ``qkv``,
  OpenCLIP's q/k/v onto ``in_proj_weight``) become one LoRA on the fused weight: up is block-diagonal
  (each slice's rows get its up·γ), down the slices' downs stacked, alpha = total rank: the same ΔW,
  exactly. Only LoRA slices can be fused so; another algorithm on a slice is refused.
- a PEFT DoRA magnitude (``lora_magnitude_vector``, which ComfyUI core does not read) is written as
  LyCORIS' ``dora_scale`` (out, 1, …): the same weight at strength 1 (the two producers blend other
  strengths differently; see the formats table).

Refused, nothing written: modules the model does not have (a file for another architecture: the
error carries the loader's diagnosis), two modules on one weight, a text-encoder module without a
text encoder to name it.

The key map is the one function a newer map plugs into: inside ComfyUI, nodes/comfy_model.py
``key_map(model, clip)`` (ComfyUI's maps, and any LoRA Lab adds there); standalone,
``extract.FileWeights(model file).key_map()`` (``sd_keys`` for SD1.x/SD2.x/SDXL, native names otherwise).
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Any, Mapping

import torch

from .. import arch as arch_table
from ..adapters.lora import LoRA
from ..errors import LoraError
from ..keys import canonical, describe
from ..patch import Target, match
from . import common, naming
from .common import Layer, Result, Source

_TE_HEADS = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.", "cond_stage_model.", "conditioner.")


def module_targets(src: Source, key_map: Mapping[str, Any], *, text_encoder: bool = True,
                   model: arch_table.Identity | None = None) -> list[Target]:
    """Where each module of the file lands in the model: the loaders' own match. LoraError (with
    the loaders' diagnosis) when a module has no target."""
    skip = () if text_encoder else ("lora_te",)
    m = match(src.parsed, key_map, file=src.name, n_file_keys=len(src.tensors), skip=skip)
    if m.unmatched:
        raise LoraError("the file does not fit this model, so it cannot be renamed for it: "
                        + m.summary(src.identity, model), file=src.name)
    if not text_encoder:
        te = [p for p in src.parsed.modules if canonical(p).startswith("lora_te") or p.startswith(_TE_HEADS)]
        if te:
            raise LoraError(f"{len(te)} module(s) change a text encoder ({describe(te, 3)}): connect the text "
                            "encoder (CLIP) to convert them", file=src.name)
    if not m.targets:
        raise LoraError("the file does not fit this model, so it cannot be renamed for it: "
                        + m.summary(src.identity, model), file=src.name)
    return m.targets


def convert(source: Source | str, key_map: common.KeyMap, style: str, *, model: arch_table.Identity | None = None,
            shapes: Mapping[str, Any] | None = None, text_encoder: bool = True) -> Result:
    """The renamed file as a Result. ``key_map``: names -> keys of the model to convert for (or a
    function of the file's module names giving them, ``common.KeyMap``);
    ``model``: what that model is (for metadata and messages); ``shapes``: its keys' shapes (the
    size of a fused weight whose slices the file covers only in part); ``style``: "kohya" or "comfy"."""
    if style not in naming.STYLES:
        raise LoraError(f"convert to {style!r}: use one of {', '.join(naming.STYLES)}")
    src = common.load(source) if isinstance(source, str) else source
    key_map = common.key_map_for(key_map, src.parsed.modules)
    targets = module_targets(src, key_map, text_encoder=text_encoder, model=model)
    the_arch = model.arch if model is not None and model.arch is not None else src.identity.arch
    names = naming.names_for(key_map, style, the_arch)

    whole: dict[str, list[Target]] = defaultdict(list)
    placed: dict[str, list[tuple[tuple, Target]]] = defaultdict(list)
    for t in targets:
        if isinstance(t.key, str):
            whole[t.key].append(t)
        else:
            where = _placed(t.key)
            placed[where[0]].append((where, t))

    tensors, layers, algos, notes = {}, [], Counter(), Counter()
    for key, ts in whole.items():
        if len(ts) > 1:
            raise LoraError(f"modules {ts[0].source!r} and {ts[1].source!r} both change {key!r}", file=src.name)
        t = ts[0]
        name = _name(names, key, t, src)
        a = t.adapter
        if isinstance(a, LoRA) and a.peft_magnitude is not None:
            a = _as_dora_scale(a)
            notes["PEFT DoRA magnitude written as dora_scale"] += 1
        tensors.update(a.to_state_dict(name))
        algos[a.label] += 1
        layers.append(Layer(name, note=f"{a.label} from {t.source}"))
    for key, parts in placed.items():
        if key in whole:
            raise LoraError(f"module {whole[key][0].source!r} changes {key!r} and {parts[0][1].source!r} a part of it",
                            file=src.name)
        name = _name(names, key, parts[0][1], src)
        size = (shapes or {}).get(key)
        tensors.update(_place(key, parts, name, src, int(size[0]) if size is not None else None))
        algos["LoRA"] += 1
        if len(parts) > 1 or parts[0][0][1] is not None:
            notes["slices fused into one LoRA on a fused weight"] += 1
        if any(f is not None for (_, _, f), _ in parts):
            notes["rows reordered to the model's layout (e.g. scale/shift swapped)"] += 1
        layers.append(Layer(name, note="LoRA from " + ", ".join(t.source for _, t in parts)))

    algorithm = "lora" if set(algos) == {"LoRA"} else "+".join(sorted({a.lower() for a in algos}))
    target = (model.name if model is not None and model.name else the_arch.name if the_arch else "this model")
    meta = common.carried(src.metadata)
    meta.update(common.describe_arch(model if model is not None and model.arch is not None else src.identity, algorithm))
    meta["ss_training_comment"] = common.comment(f"converted to {style} key names for {target} by LoRA Lab",
                                                 src.metadata.get("ss_training_comment"))
    meta.update(common.tool_keys("convert", {"style": style, "model": target}, [src]))
    summary = [f"from {src.name} ({src.identity.name or 'unknown architecture'}): {len(layers)} modules renamed to "
               f"{style} names for {target}",
               "algorithms: " + ", ".join(f"{label} ×{n}" for label, n in algos.most_common())]
    summary += [f"{what}: {n}" for what, n in notes.items()]
    return Result("convert", tensors, meta, summary, layers)


def _placed(key) -> tuple[str, tuple[int, int, int] | None, object]:
    """(weight key, (dim, start, length) or None, function or None) of a target that is not a whole
    tensor: sd_keys' (key, dim, start, length), ComfyUI's (key, offset) and (key, offset, function)
    (a function such as swap_scale_shift reorders the rows of ΔW)."""
    if len(key) == 4 and isinstance(key[1], int):
        return key[0], tuple(key[1:]), None
    return key[0], tuple(key[1]) if key[1] is not None else None, key[2] if len(key) > 2 else None


def _name(names: Mapping[str, str], key: str, t: Target, src: Source) -> str:
    weight = key[: -len(".bias")] + ".weight" if key.endswith(".bias") else key
    name = names.get(weight)
    if name is None:
        raise LoraError(f"the model's key map has no name for {weight!r} (the target of {t.source!r})", file=src.name)
    return name


def _as_dora_scale(a: LoRA) -> LoRA:
    m = a.peft_magnitude.reshape(-1)
    dims = max(a.down.dim(), (a.mid.dim() if a.mid is not None else 2))
    return dataclasses.replace(a, dora_scale=m.reshape(m.shape[0], *[1] * (dims - 1)), peft_magnitude=None)


def _place(key: str, parts: list[tuple[tuple, Target]], name: str, src: Source, rows: int | None
           ) -> dict[str, torch.Tensor]:
    """One LoRA on the weight ``key`` (``rows`` rows, when known) from LoRAs on row slices of it and/or
    through a row function (ComfyUI's swap_scale_shift): up carries each part's rows, downs are stacked,
    rows no part covers are zero. The same ΔW, exactly; other algorithms are refused."""
    for (_, offset, _), t in parts:
        a = t.adapter
        if not isinstance(a, LoRA) or a.has_magnitude or (offset is not None and offset[0] != 0):
            what = a.label + (" with DoRA" if a.has_magnitude else "") + (
                f" on dimension {offset[0]}" if offset is not None and offset[0] else "")
            raise LoraError(f"{what} on a part of the fused weight {key!r} (or one whose rows the model orders "
                            "differently) cannot be written under the model's own name and stay the same algorithm; "
                            "only LoRA can be rewritten so", file=src.name, key=t.source)
    pieces = []
    for (_, offset, function), t in parts:
        u, v = t.adapter.low_rank("cpu", torch.float32)
        if function is not None:
            moved = function(u)
            if not torch.allclose(moved @ v, function(u @ v), rtol=1e-5, atol=1e-7):
                raise LoraError(f"the model's key map transforms {key!r} in a way that is not a row reordering",
                                file=src.name, key=t.source)
            u = moved
        start, length = (offset[1], offset[2]) if offset is not None else (0, u.shape[0])
        if u.shape[0] != length:
            raise LoraError(f"a slice of {length} rows gets a change of {u.shape[0]} rows", file=src.name, key=key)
        pieces.append((start, u, v))
    rows = rows or max(start + u.shape[0] for start, u, _ in pieces)
    total = sum(u.shape[1] for _, u, _ in pieces)
    up = torch.zeros(rows, total)
    col = 0
    for start, u, _ in pieces:
        up[start:start + u.shape[0], col:col + u.shape[1]] = u
        col += u.shape[1]
    down = torch.cat([v for _, _, v in pieces], 0)
    first = parts[0][1].adapter
    kernel = tuple(first.down.shape[1:]) if first.mid is None and first.down.dim() > 2 else None
    dtype = first.up.dtype if first.up.dtype.is_floating_point else torch.float32
    return common.lora_keys(name, up, down, float(total), kernel, dtype)
