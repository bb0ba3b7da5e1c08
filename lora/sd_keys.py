"""Standalone key map for SD1.x, SD2.x and SDXL: LoRA module names -> a model's own weight keys.

``model_key_map(keys)`` is what ``patch.match`` needs when no ComfyUI is present: for a plain torch
module or state dict it lists, for every weight, each name a LoRA file may give that weight.
The model may be named in any of these ways (one dict may mix components, e.g. a checkpoint):

- original / ldm checkpoints: ``model.diffusion_model.input_blocks…``, SD1 CLIP-L
  ``cond_stage_model.transformer.text_model…``, SD2 OpenCLIP-H ``cond_stage_model.model…``,
  SDXL ``conditioner.embedders.0.transformer…`` (CLIP-L) and ``conditioner.embedders.1.model…``
  (OpenCLIP-G); bare ldm UNet keys ``input_blocks…`` too;
- ComfyUI's internal names: ``diffusion_model.…``, ``clip_l.transformer.…``, ``clip_g…``, ``clip_h…``;
- diffusers / transformers: ``down_blocks…`` (UNet alone, or under ``unet.``), ``text_model…``
  (CLIPTextModel, transformers 4) or ``encoder.layers…`` (transformers 5), also under
  ``text_encoder.`` / ``text_encoder_2.``.

Names produced for a weight ``<prefix><path>.weight``:

- the raw module path ``<prefix><path>`` (for every ``.weight`` key, VAE included);
- UNet: ``lora_unet_<ldm path>`` and ``lora_unet_<diffusers path>`` (dots -> ``_``),
  ``diffusion_model.<ldm path>`` and the bare diffusers path; the ldm <-> diffusers block
  correspondence is read from the keys themselves (levels, resnets per level, which blocks have
  attention), so reduced models work;
- text encoders: ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` + the transformers path, as
  kohya and ComfyUI name them: a lone encoder (SD1 CLIP-L, SD2 OpenCLIP-H) answers to ``lora_te_``
  and ``lora_te1_`` (a lone OpenCLIP-G also to ``lora_te2_``); with two (SDXL) CLIP-L answers to
  ``lora_te_``/``lora_te1_`` and OpenCLIP-G to ``lora_te2_``; plus ComfyUI's generic
  ``text_encoders.clip_x.transformer.<path>`` where the prefix or the width says which CLIP it is.
  OpenCLIP's ``text_projection`` is stored transposed, so no kohya name is given to it.

Diffusers/PEFT file prefixes (``unet.down_blocks…``, ``text_encoder.encoder.layers…``) are not
listed: ``lora.keys.canonical`` turns them into the kohya names above.

A map value is either a key (str) or a **slice** ``(key, dim, start, length)``: the weight is
``tensor[key].narrow(dim, start, length)``. Slices occur where OpenCLIP fuses q, k and v into one
``attn.in_proj_weight`` of shape ``(3*d, d)``: q is ``(key, 0, 0, d)``, k ``(key, 0, d, d)``, v
``(key, 0, 2*d, d)``. Computing ``d`` needs that tensor's shape, so pass tensors or ``shapes``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence, Union

Slice = tuple[str, int, int, int]
KeyTarget = Union[str, Slice]

# ---- UNet: ldm <-> diffusers -------------------------------------------------------------------
# Whole modules that are named differently but sit outside the repeated blocks.
_UNET_BASIC = {
    "input_blocks.0.0": ("conv_in",),
    "time_embed.0": ("time_embedding.linear_1",),
    "time_embed.2": ("time_embedding.linear_2",),
    # SDXL calls it add_embedding, unCLIP class_embedding; the ldm model has one label_emb
    "label_emb.0.0": ("add_embedding.linear_1", "class_embedding.linear_1"),
    "label_emb.0.2": ("add_embedding.linear_2", "class_embedding.linear_2"),
    "out.0": ("conv_norm_out",),
    "out.2": ("conv_out",),
}
_UNET_BASIC_BACK = {d: ldm for ldm, ds in _UNET_BASIC.items() for d in ds}
# Sub-modules of one block, per block kind (ldm name -> diffusers name); attention is identical.
_SUB = {
    "resnet": {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"},
    "down": {"op": "conv"},
    "up": {"conv": "conv"},
}
_SUB_BACK = {kind: {d: ldm for ldm, d in table.items()} for kind, table in _SUB.items()}
_RESNET_PARTS = {"in_layers", "emb_layers", "out_layers", "skip_connection"}

_LDM_TOP = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_DIFF_TOP = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
             "time_embedding", "add_embedding", "class_embedding")

_LDM_BLOCK = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)\.(\d+)|(middle_block)\.(\d+))\.([^.]+)")
_DIFF_BLOCK = re.compile(
    r"^(?:(down_blocks|up_blocks)\.(\d+)|(mid_block))\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def _block_kind(parts: set[str]) -> str:
    if parts & _RESNET_PARTS:
        return "resnet"
    if parts == {"op"}:
        return "down"
    if parts == {"conv"}:
        return "up"
    return "attention"


def _pairs_from_ldm(paths: Iterable[str]) -> list[tuple[str, str, str]]:
    """(ldm block, diffusers block, kind) for every block, walking the ldm blocks in order.

    A level ends at its down/upsampler (the last level has none), so the number of resnets per
    level and which of them carry attention come out of the walk, not from a model config.
    """
    children: dict[tuple[str, int], dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for p in paths:
        m = _LDM_BLOCK.match(p)
        if m:
            group, n, c = (m[1], m[2], m[3]) if m[1] else (m[4], 0, m[5])
            children[(group, int(n))][int(c)].add(m[6])
    pairs = []

    def blocks(group):
        return sorted((n, ch) for (g, n), ch in children.items() if g == group)

    x = i = 0
    for n, ch in blocks("input_blocks"):
        if n == 0:
            continue        # conv_in, a basic module
        kinds = {c: _block_kind(parts) for c, parts in ch.items()}
        if "down" in kinds.values():
            for c in kinds:
                pairs.append((f"input_blocks.{n}.{c}", f"down_blocks.{x}.downsamplers.0", "down"))
            x, i = x + 1, 0
            continue
        for c, kind in sorted(kinds.items()):
            pairs.append((f"input_blocks.{n}.{c}", f"down_blocks.{x}.{_PLURAL[kind]}.{i}", kind))
        i += 1
    count = {"resnet": 0, "attention": 0}
    for _, ch in blocks("middle_block"):
        for c, parts in sorted(ch.items()):
            kind = _block_kind(parts)
            if kind in count:
                pairs.append((f"middle_block.{c}", f"mid_block.{_PLURAL[kind]}.{count[kind]}", kind))
                count[kind] += 1
    x = i = 0
    for n, ch in blocks("output_blocks"):
        kinds = {c: _block_kind(parts) for c, parts in ch.items()}
        for c, kind in sorted(kinds.items()):
            d = f"up_blocks.{x}.upsamplers.0" if kind == "up" else f"up_blocks.{x}.{_PLURAL[kind]}.{i}"
            pairs.append((f"output_blocks.{n}.{c}", d, kind))
        x, i = (x + 1, 0) if "up" in kinds.values() else (x, i + 1)
    return pairs


_PLURAL = {"resnet": "resnets", "attention": "attentions"}


def _pairs_from_diffusers(paths: Iterable[str]) -> list[tuple[str, str, str]]:
    """The same (ldm block, diffusers block, kind) list, from diffusers names."""
    levels: dict[tuple[str, int], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for p in paths:
        m = _DIFF_BLOCK.match(p)
        if m:
            levels[(m[1] or m[3], int(m[2] or 0))][m[4]].add(int(m[5]))
    pairs = []

    def level_list(group):
        return sorted((x, parts) for (g, x), parts in levels.items() if g == group)

    n = 1
    for x, parts in level_list("down_blocks"):
        for i in sorted(parts["resnets"]):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{x}.resnets.{i}", "resnet"))
            if i in parts["attentions"]:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{x}.attentions.{i}", "attention"))
            n += 1
        if parts["downsamplers"]:
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{x}.downsamplers.0", "down"))
            n += 1
    c = 0
    for _, parts in level_list("mid_block"):
        for j in range(max(parts["resnets"] | parts["attentions"], default=-1) + 1):
            for kind in ("resnet", "attention"):
                if j in parts[_PLURAL[kind]]:
                    pairs.append((f"middle_block.{c}", f"mid_block.{_PLURAL[kind]}.{j}", kind))
                    c += 1
    n = 0
    for x, parts in level_list("up_blocks"):
        res = sorted(parts["resnets"])
        for i in res:
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{x}.resnets.{i}", "resnet"))
            c = 1
            if i in parts["attentions"]:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{x}.attentions.{i}", "attention"))
                c = 2
            if i == res[-1] and parts["upsamplers"]:
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{x}.upsamplers.0", "up"))
            n += 1
    return pairs


class UnetNames:
    """Translate UNet module paths between ldm and diffusers naming for one model's structure."""

    def __init__(self, paths: Iterable[str]):
        paths = list(paths)
        ldm = [p for p in paths if p.split(".", 1)[0] in _LDM_TOP]
        diff = [p for p in paths if p.split(".", 1)[0] in _DIFF_TOP]
        pairs = _pairs_from_ldm(ldm) + _pairs_from_diffusers(diff)
        self._to_diff = {l: (d, k) for l, d, k in pairs}
        self._to_ldm = {d: (l, k) for l, d, k in pairs}

    def to_diffusers(self, module: str) -> tuple[str, ...]:
        """ldm module path -> its diffusers path(s); () when it has none."""
        if module in _UNET_BASIC:
            return _UNET_BASIC[module]
        depth = 2 if module.startswith("middle_block.") else 3
        parts = module.split(".")
        hit = self._to_diff.get(".".join(parts[:depth]))
        if hit is None:
            return ()
        sub = _translate(".".join(parts[depth:]), _SUB.get(hit[1]))
        return (f"{hit[0]}.{sub}",) if sub else ()

    def to_ldm(self, module: str) -> str | None:
        """diffusers module path -> its ldm path, or None."""
        if module in _UNET_BASIC_BACK:
            return _UNET_BASIC_BACK[module]
        parts = module.split(".")
        depth = 3 if parts[0] == "mid_block" else 4
        hit = self._to_ldm.get(".".join(parts[:depth]))
        if hit is None:
            return None
        sub = _translate(".".join(parts[depth:]), _SUB_BACK.get(hit[1]))
        return f"{hit[0]}.{sub}" if sub else None


def _translate(sub: str, table: Mapping[str, str] | None) -> str | None:
    if table is None:           # attention blocks: the same names on both sides
        return sub or None
    return table.get(sub)


# ---- text encoders -----------------------------------------------------------------------------
# prefix -> (kind, slot, ComfyUI clip name). kind "hf": transformers CLIPTextModel(WithProjection)
# names below the prefix; "openclip": OpenCLIP names. slot 1 = CLIP-L of SDXL (and SD1's only
# encoder), 2 = OpenCLIP-G of SDXL, 0 = an encoder that is alone by nature.
_TE_PREFIXES = (
    ("cond_stage_model.transformer.", "hf", 1, "clip_l"),
    ("cond_stage_model.model.", "openclip", 0, "clip_h"),
    ("conditioner.embedders.0.transformer.", "hf", 1, "clip_l"),
    ("conditioner.embedders.0.model.", "openclip", 0, None),   # SD2 (sgm layout) or SDXL refiner
    ("conditioner.embedders.1.model.", "openclip", 2, "clip_g"),
    ("clip_l.transformer.", "hf", 1, "clip_l"),
    ("clip_g.transformer.", "hf", 2, "clip_g"),
    ("clip_h.transformer.", "hf", 0, "clip_h"),
    ("text_encoder.", "hf", 1, None),
    ("text_encoder_2.", "hf", 2, None),
)
# transformers >= 5 (and very old SD1 checkpoints) lack the "text_model." level
_NO_TEXT_MODEL = ("encoder.layers.", "embeddings.token_embedding.", "embeddings.position_embedding.",
                  "final_layer_norm.")
_OPENCLIP = (   # OpenCLIP module -> transformers module (per layer: resblocks.N -> layers.N)
    ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"),
)
_OPENCLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding",
                 "positional_embedding": "text_model.embeddings.position_embedding",
                 "ln_final.weight": "text_model.final_layer_norm"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _hf_module(inner: str) -> str | None:
    """transformers path of a weight below a CLIP prefix -> module path with text_model., or None."""
    if not inner.endswith(".weight"):
        return None
    if inner.startswith(_NO_TEXT_MODEL):
        inner = "text_model." + inner
    if inner.startswith(("text_model.", "text_projection.")):
        return inner[: -len(".weight")]
    return None


def _openclip_targets(key: str, inner: str, shape: Sequence[int] | None) -> list[tuple[str, KeyTarget]]:
    """(transformers module path, target) for one OpenCLIP tensor; q/k/v become slices."""
    if inner in _OPENCLIP_TOP:
        return [(_OPENCLIP_TOP[inner], key)]
    m = _RESBLOCK.match(inner)
    if not m:
        return []           # text_projection is stored transposed: no kohya name can mean it
    layer, rest = f"text_model.encoder.layers.{m[1]}", m[2]
    if rest == "attn.in_proj_weight":
        if shape is None:
            raise ValueError(f"{key!r} fuses q, k and v: its shape is needed to split it "
                             f"(pass tensors or shapes to model_key_map)")
        d = int(shape[0]) // 3
        return [(f"{layer}.self_attn.{p}_proj", (key, 0, j * d, d)) for j, p in enumerate("qkv")]
    for old, new in _OPENCLIP:
        if rest == old + ".weight":
            return [(f"{layer}.{new}", key)]
    return []


# ---- the map -----------------------------------------------------------------------------------
def _shape_of(keys, shapes, k) -> tuple[int, ...] | None:
    """Shape of ``k`` from ``shapes`` (shapes or tensors), else from ``keys`` if it holds tensors."""
    for source in (shapes, keys):
        if isinstance(source, Mapping) and k in source:
            return tuple(int(n) for n in getattr(source[k], "shape", source[k]))
    return None


def _flat(dotted: str) -> str:
    return dotted.replace(".", "_")


def _put(out: dict[str, KeyTarget], name: str, target: KeyTarget) -> None:
    old = out.setdefault(name, target)
    if old != target:   # two tensors claiming one name: patching either would be a silent bug
        raise ValueError(f"LoRA name {name!r} would mean both {old!r} and {target!r}")


def _split(keys: Iterable[str]):
    """Sort keys into UNet components (prefix -> inner paths) and text-encoder components."""
    unet: dict[str, list[str]] = defaultdict(list)
    te: dict[tuple[str, str, int, str | None], list[str]] = defaultdict(list)
    for k in keys:
        for prefix in ("model.diffusion_model.", "diffusion_model.", "unet."):
            if k.startswith(prefix):
                unet[prefix].append(k[len(prefix):])
                break
        else:
            for prefix, kind, slot, clip in _TE_PREFIXES:
                if k.startswith(prefix):
                    te[(prefix, kind, slot, clip)].append(k[len(prefix):])
                    break
            else:
                head = k.split(".", 1)[0]
                if head in _LDM_TOP or head in _DIFF_TOP:
                    unet[""].append(k)
                elif k.startswith(("text_model.", "text_projection.") + _NO_TEXT_MODEL):
                    te[("", "hf", 0, None)].append(k)
    return unet, te


def model_key_map(keys: Iterable[str] | Mapping[str, Any],
                  shapes: Mapping[str, Any] | None = None) -> dict[str, KeyTarget]:
    """LoRA module name -> model weight key (or slice ``(key, dim, start, length)``).

    ``keys``: the model's state-dict keys, or the state dict itself (its tensors give the shapes
    that splitting fused OpenCLIP q/k/v needs; else pass ``shapes``: key -> shape or tensor).
    Raises ValueError if two tensors would answer to one name, or a fused q/k/v has no shape.
    """
    tensors = keys if isinstance(keys, Mapping) else None
    keys = list(keys)

    def shape(k):
        return _shape_of(tensors, shapes, k)

    out: dict[str, KeyTarget] = {}
    for k in keys:                                   # generic: the module path itself
        if k.endswith(".weight"):
            _put(out, k[: -len(".weight")], k)
    unet, te = _split(keys)
    for prefix, inner in unet.items():
        _unet_names(out, prefix, inner)
    slots = {slot for (_, _, slot, _) in te}
    for (prefix, kind, slot, clip), inner in te.items():
        if 1 in slots and 2 in slots:
            heads = ("lora_te_", "lora_te1_") if slot == 1 else ("lora_te2_",) if slot == 2 else ()
        else:   # a lone encoder: kohya SD1/SD2 use lora_te_, ComfyUI also accepts lora_te1_
            heads = ("lora_te_", "lora_te1_") + (("lora_te2_",) if slot == 2 else ())
        _te_names(out, prefix, kind, heads, clip, inner, shape)
    return out


def _unet_names(out: dict[str, KeyTarget], prefix: str, inner: list[str]) -> None:
    names = UnetNames(inner)
    for p in inner:
        if not p.endswith(".weight"):
            continue
        module, key = p[: -len(".weight")], prefix + p
        if module.split(".", 1)[0] in _LDM_TOP:
            ldm, diff = module, names.to_diffusers(module)
        else:
            ldm = names.to_ldm(module)
            diff = tuple(dict.fromkeys((module,) + (names.to_diffusers(ldm) if ldm else ())))
        if ldm is not None:
            _put(out, "lora_unet_" + _flat(ldm), key)
            _put(out, "diffusion_model." + ldm, key)
        for d in diff:              # kohya diffusers-path names, and the bare diffusers path
            _put(out, "lora_unet_" + _flat(d), key)
            _put(out, d, key)


# ComfyUI's CLIP names, where the prefix does not say which CLIP it is: the width tells
_CLIP_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}


def _te_names(out, prefix, kind, heads, clip, inner, shape) -> None:
    if clip is None:
        emb = "token_embedding.weight" if kind == "openclip" else next(
            (p for p in inner if p.endswith("embeddings.token_embedding.weight")), "")
        s = shape(prefix + emb)
        clip = _CLIP_BY_WIDTH.get(s[-1]) if s else None
    for p in inner:
        key = prefix + p
        if kind == "hf":
            module = _hf_module(p)
            found = [(module, key)] if module else []
        else:
            found = _openclip_targets(key, p, shape(key))
            if p == "positional_embedding" or p.endswith("in_proj_weight"):
                _put(out, key, key)      # parameters without ".weight": the raw name is the key
        for module, target in found:
            for head in heads:
                _put(out, head + _flat(module), target)
            if clip:
                _put(out, f"text_encoders.{clip}.transformer.{module}", target)
