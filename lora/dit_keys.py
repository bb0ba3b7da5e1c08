"""Key maps for the DiT families without ComfyUI: which ComfyUI weight each module of a LoRA file
changes, for the names files come in that ComfyUI 0.3.75's own map (``comfy.lora.model_lora_keys_unet``)
drops. No ComfyUI import; the loader nodes add these entries to ComfyUI's map (ComfyUI's wins where it
has a name), the standalone ``lora.patch.load_into`` uses them alone, and the converter reads them.

Two directions, one function each:

    from lora import dit_keys
    # file module names -> ComfyUI targets (what the loader and a converter to ComfyUI names need)
    dit_keys.comfy_targets("wan", ["transformer.blocks.0.attn1.to_q", "lora_unet_blocks_22.self_attn.q"], shapes)
    # {"transformer.blocks.0.attn1.to_q": "diffusion_model.blocks.0.self_attn.q.weight", ...}

    # ComfyUI targets -> the module name a file of another naming uses (a converter to diffusers names)
    dit_keys.file_names("hunyuan-video", [("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 256, 256))],
                        shapes, naming="diffusers")
    # {(... , (0, 256, 256)): "transformer.transformer_blocks.0.attn.to_k"}

A target is ComfyUI's key-map value: a state-dict key (``"diffusion_model.….weight"``), ``(key, (0, start,
length))`` for a row block of a fused weight (q, k or v of a fused qkv; Flux's and HunyuanVideo's
``linear1`` holds q, k, v and the MLP input), or ``(key, None, swap_halves)`` where the file's rows are the
model's with its two halves swapped (diffusers' ``norm_out.linear`` is (scale, shift), ComfyUI's
``adaLN_modulation.1`` is (shift, scale)): ``swap_halves`` turns a ΔW from the file's row order into the
model's. ``lora.patch`` and ComfyUI's ModelPatcher both read these three forms.

What is mapped (names are matched flat: any of the wrappers ``lora.arch.flat_name`` strips, ``.`` and
``_`` alike, so ``transformer.``, ``diffusion_model.``, ``lycoris_`` (SimpleTuner's LyCORIS),
``lora_transformer_`` (OneTrainer), ``lora_unet_`` (kohya, musubi-tuner), ``oft_unet_`` (kohya OFT) and
files that mix separators such as ``lora_unet_blocks_22.self_attn.q`` all resolve):

- every family: the model's own module paths (ComfyUI's names; Qwen-Image's and HiDream's are
  diffusers'), in any wrapper and separator (needs ``shapes``, the model's state-dict shapes);
- Flux.1: diffusers names (``transformer_blocks.N.attn.to_q`` -> a row block of ``img_attn.qkv``,
  ``single_transformer_blocks.N.proj_mlp`` -> the MLP rows of ``linear1`` ...) and XLabs' processor
  names (``double_blocks.N.processor.qkv_lora1`` -> ``img_attn.qkv``, ``…qkv_lora2`` -> ``txt_attn.qkv``,
  ``…proj_lora1/2`` -> ``img_attn.proj`` / ``txt_attn.proj``, ``single_blocks.N.processor.qkv_lora`` -> the
  q, k, v rows of ``linear1``, ``…proj_lora`` -> ``linear2``);
- HunyuanVideo: diffusers names (the double / single blocks as Flux's, the token refiner, the
  embedders) and the original Tencent names musubi-tuner and diffusion-pipe write (``img_mlp.fc1``,
  ``img_mod.linear``, ``modulation.linear``, ``time_in.mlp.0`` ...);
- Wan 2.x: diffusers names (``blocks.N.attn1.to_q`` -> ``blocks.N.self_attn.q``, ``attn2.add_k_proj`` ->
  ``cross_attn.k_img``, ``ffn.net.0.proj`` -> ``ffn.0``, the condition embedder, ``proj_out`` -> ``head.head``);
- Lumina 2 / Z-Image: both diffusers namings (Lumina 2's ``attn.to_q``, ``feed_forward.linear_1``,
  ``norm1.linear``; Z-Image's ``attention.to_q``, ``all_x_embedder.2-1``), q/k/v into the fused
  ``attention.qkv`` with Lumina 2's grouped-query k/v widths.

Row blocks are computed from the target weight's shape (rows R, input width d): q is rows [0, d); in a
fused qkv k and v share the rest, (R − d) / 2 each (grouped-query attention included); in ``linear1``
q, k, v are d rows each and the MLP input the R − 3d after them. Without ``shapes`` they come from the
module's own (rows, input width) in ``widths``, which a converter reads off the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from .arch import Arch, flat_name, get

UNET = "diffusion_model."
NAMINGS = ("diffusers", "lycoris", "onetrainer", "kohya", "comfy")

Target = Any     # str | (str, (dim, start, length)) | (str, None, swap_halves)


def swap_halves(delta: torch.Tensor) -> torch.Tensor:
    """A ΔW in diffusers' (scale, shift) row order -> ComfyUI's (shift, scale): its two halves swapped
    (the same function both ways)."""
    first, second = delta.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


# ---- row blocks of fused weights ------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A row block of a fused weight: ``span(R, d, r)`` -> (start, length), from the target's rows R and
    input width d, or (R None) from the module's own rows r; ``fits(R, d)``: the weight is fused so."""
    name: str
    span: Callable[[int | None, int, int | None], tuple[int, int]]
    fits: Callable[[int, int], bool]


def _kv(R, d, r):
    return (R - d) // 2 if R is not None else r


def _qkv_fits(R, d):
    return R > d and (R - d) % 2 == 0


Q = Part("q", lambda R, d, r: (0, d), _qkv_fits)
K = Part("k", lambda R, d, r: (d, _kv(R, d, r)), _qkv_fits)
V = Part("v", lambda R, d, r: (d + _kv(R, d, r), _kv(R, d, r)), _qkv_fits)
L1 = tuple(Part(n, lambda R, d, r, i=i: (i * d, d), lambda R, d: R > 3 * d)          # q, k, v of linear1
           for i, n in enumerate("qkv"))
MLP = Part("mlp", lambda R, d, r: (3 * d, R - 3 * d if R is not None else r), lambda R, d: R > 3 * d)
QKV = Part("qkv", lambda R, d, r: (0, 3 * d), lambda R, d: R >= 3 * d)               # linear1's q, k, v together
SWAP = "swap"


@dataclass(frozen=True)
class Rule:
    """A module of another naming (``file``, dotted, ``{n}`` a block index) and the ComfyUI module it
    is (``comfy``), whole, a row block of it (``part``) or with its halves swapped (SWAP)."""
    file: str
    comfy: str
    part: Part | str | None = None
    diffusers: bool = True      # False: ``file`` is another tool's name (XLabs, original HunyuanVideo)
    variant: str | None = None  # the variant whose diffusers class has these names (None: every variant)

    def file_regex(self) -> re.Pattern:
        return _template_regex(self.file.replace(".", "_"))

    def comfy_regex(self) -> re.Pattern:
        return _template_regex(self.comfy)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)") + "$")


def _rules(prefix_file: str, prefix_comfy: str, pairs, diffusers: bool = True, variant: str | None = None
           ) -> tuple[Rule, ...]:
    return tuple(Rule(prefix_file + f, prefix_comfy + c, *(p or [None]), diffusers=diffusers, variant=variant)
                 for f, c, *p in pairs)


# Flux.1 and HunyuanVideo: the same diffusers names for the double- and single-stream blocks
_DOUBLE = _rules("transformer_blocks.{n}.", "double_blocks.{n}.", [
    ("attn.to_q", "img_attn.qkv", Q), ("attn.to_k", "img_attn.qkv", K), ("attn.to_v", "img_attn.qkv", V),
    ("attn.add_q_proj", "txt_attn.qkv", Q), ("attn.add_k_proj", "txt_attn.qkv", K),
    ("attn.add_v_proj", "txt_attn.qkv", V),
    ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
    ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
    ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
])
_SINGLE = _rules("single_transformer_blocks.{n}.", "single_blocks.{n}.", [
    ("attn.to_q", "linear1", L1[0]), ("attn.to_k", "linear1", L1[1]), ("attn.to_v", "linear1", L1[2]),
    ("proj_mlp", "linear1", MLP), ("proj_out", "linear2"), ("norm.linear", "modulation.lin"),
])
_VECTOR_EMBEDDERS = _rules("time_text_embed.", "", [
    ("timestep_embedder.linear_1", "time_in.in_layer"), ("timestep_embedder.linear_2", "time_in.out_layer"),
    ("text_embedder.linear_1", "vector_in.in_layer"), ("text_embedder.linear_2", "vector_in.out_layer"),
    ("guidance_embedder.linear_1", "guidance_in.in_layer"), ("guidance_embedder.linear_2", "guidance_in.out_layer"),
])
_FINAL = _rules("", "final_layer.", [("norm_out.linear", "adaLN_modulation.1", SWAP), ("proj_out", "linear")])
# XLabs (x-flux DoubleStreamBlockLoraProcessor / SingleStreamBlockLoraProcessor): one LoRA on the whole
# fused qkv; the single-block qkv_lora adds to linear1's q, k, v rows only, proj_lora to all of linear2
_XLABS = _rules("double_blocks.{n}.processor.", "double_blocks.{n}.", [
    ("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
    ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj"),
], diffusers=False) + _rules("single_blocks.{n}.processor.", "single_blocks.{n}.", [
    ("qkv_lora", "linear1", QKV), ("qkv", "linear1", QKV),       # "qkv_lora.up.weight" splits as "qkv" + "_lora.up…"
    ("proj_lora", "linear2"), ("proj", "linear2"),
], diffusers=False)
_FLUX = _DOUBLE + _SINGLE + _VECTOR_EMBEDDERS + _FINAL + _XLABS + _rules("", "", [
    ("x_embedder", "img_in"), ("context_embedder", "txt_in"),
])

_HUNYUAN_REFINER = _rules("context_embedder.token_refiner.refiner_blocks.{n}.",
                          "txt_in.individual_token_refiner.blocks.{n}.", [
    ("attn.to_q", "self_attn.qkv", Q), ("attn.to_k", "self_attn.qkv", K), ("attn.to_v", "self_attn.qkv", V),
    ("attn.to_out.0", "self_attn.proj"), ("ff.net.0.proj", "mlp.0"), ("ff.net.2", "mlp.2"),
    ("norm_out.linear", "adaLN_modulation.1"),
])
# the original (Tencent) names musubi-tuner and diffusion-pipe write; the rest of them flatten like
# ComfyUI's (img_attn_qkv = img_attn.qkv) and need no rule
_HUNYUAN_ORIGINAL = tuple(
    Rule(f"double_blocks.{{n}}.{s}_{a}", f"double_blocks.{{n}}.{s}_{b}", diffusers=False)
    for s in ("img", "txt") for a, b in (("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), ("mod.linear", "mod.lin"))
) + _rules("", "", [
    ("single_blocks.{n}.modulation.linear", "single_blocks.{n}.modulation.lin"),
    ("txt_in.individual_token_refiner.blocks.{n}.mlp.fc1", "txt_in.individual_token_refiner.blocks.{n}.mlp.0"),
    ("txt_in.individual_token_refiner.blocks.{n}.mlp.fc2", "txt_in.individual_token_refiner.blocks.{n}.mlp.2"),
    ("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.in_layer"),
    ("txt_in.t_embedder.mlp.2", "txt_in.t_embedder.out_layer"),
    ("txt_in.c_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    ("txt_in.c_embedder.linear_2", "txt_in.c_embedder.out_layer"),
    ("time_in.mlp.0", "time_in.in_layer"), ("time_in.mlp.2", "time_in.out_layer"),
    ("guidance_in.mlp.0", "guidance_in.in_layer"), ("guidance_in.mlp.2", "guidance_in.out_layer"),
], diffusers=False)
_HUNYUAN = _DOUBLE + _SINGLE + _VECTOR_EMBEDDERS + _FINAL + _HUNYUAN_REFINER + _HUNYUAN_ORIGINAL + _rules("", "", [
    ("x_embedder.proj", "img_in.proj"), ("context_embedder.proj_in", "txt_in.input_embedder"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.in_layer"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.out_layer"),
    ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.out_layer"),
])

_WAN = tuple(
    Rule(f"blocks.{{n}}.{a}.{f}", f"blocks.{{n}}.{b}.{c}")
    for a, b in (("attn1", "self_attn"), ("attn2", "cross_attn"))
    for f, c in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
) + _rules("", "", [
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"), ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("proj_out", "head.head"),
])

_NEXTDIT_STACKS = ("layers", "noise_refiner", "context_refiner")
_LUMINA2 = tuple(
    Rule(f"{s}.{{n}}.{f}", f"{s}.{{n}}.{c}", *p, variant="lumina2") for s in _NEXTDIT_STACKS for f, c, *p in (
        ("attn.to_q", "attention.qkv", Q), ("attn.to_k", "attention.qkv", K), ("attn.to_v", "attention.qkv", V),
        ("attn.to_out.0", "attention.out"), ("feed_forward.linear_1", "feed_forward.w1"),
        ("feed_forward.linear_2", "feed_forward.w2"), ("feed_forward.linear_3", "feed_forward.w3"),
        ("norm1.linear", "adaLN_modulation.1"))
) + _rules("", "", [
    ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_caption_embed.caption_embedder.1", "cap_embedder.1"),
    ("norm_out.linear_1", "final_layer.adaLN_modulation.1"), ("norm_out.linear_2", "final_layer.linear"),
], variant="lumina2")
# Z-Image's diffusers names: its feed_forward.w1 …, adaLN_modulation.0, t_embedder and cap_embedder are ComfyUI's own
_Z_IMAGE = tuple(
    Rule(f"{s}.{{n}}.{f}", f"{s}.{{n}}.{c}", *p, variant="z-image") for s in _NEXTDIT_STACKS for f, c, *p in (
        ("attention.to_q", "attention.qkv", Q), ("attention.to_k", "attention.qkv", K),
        ("attention.to_v", "attention.qkv", V), ("attention.to_out.0", "attention.out"))
) + _rules("", "", [
    ("all_x_embedder.2-1", "x_embedder"), ("all_final_layer.2-1.linear", "final_layer.linear"),
    ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
], variant="z-image")

RULES: dict[str, tuple[Rule, ...]] = {"flux": _FLUX, "hunyuan-video": _HUNYUAN, "wan": _WAN,
                                      "lumina2": _LUMINA2 + _Z_IMAGE}
# families whose diffusers module names are ComfyUI's own (the native lookup maps every naming of them)
SAME_NAMES = frozenset({"qwen-image", "hidream"})


def _compiled(arch_id: str | None) -> tuple[tuple[Rule, re.Pattern, re.Pattern], ...]:
    if arch_id not in _COMPILED:
        _COMPILED[arch_id] = tuple((r, r.file_regex(), r.comfy_regex()) for r in RULES.get(arch_id, ()))
    return _COMPILED[arch_id]


_COMPILED: dict[str | None, tuple] = {}


# ---- file names -> ComfyUI targets ------------------------------------------------------------------
def _arch_id(arch: Arch | str | None) -> str | None:
    if arch is None or isinstance(arch, str):
        return None if arch is None else get(arch).id
    return arch.id


def _split_prefix(shapes: Mapping[str, Any] | None) -> str:
    """The form the caller's keys take: "diffusion_model." (ComfyUI's model.state_dict()) or bare."""
    if shapes is None or any(k.startswith(UNET) for k in shapes):
        return UNET
    return ""


def _native(shapes: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """flat module name -> weight key, for every weight of the model; names two paths share are left out."""
    out: dict[str, str | None] = {}
    for key in shapes:
        if not key.startswith(prefix) or not key.endswith(".weight"):
            continue
        flat = flat_name(key[len(prefix):-len(".weight")])
        out[flat] = None if flat in out else key
    return {f: k for f, k in out.items() if k is not None}


def _rows_in(shape) -> tuple[int, int] | None:
    dims = tuple(int(n) for n in shape)
    return (dims[0], dims[1]) if len(dims) >= 2 else None


def comfy_targets(arch: Arch | str | None, modules: Iterable[str], shapes: Mapping[str, Any] | None = None, *,
                  widths: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Target]:
    """{module: target} for every module of a file this map knows (the others are left out).

    ``arch``: the model's architecture (an ``Arch`` or its id; None: only the model's own names).
    ``modules``: the file's module names as the file spells them (``lora.parse(...).modules``).
    ``shapes``: the model's state-dict key -> shape, keys as ComfyUI's ``model.model.state_dict()`` has them
    ("diffusion_model.…") or without that prefix (targets then come back without it too). With it, a module
    maps only onto a weight the model has, and row blocks are sized from that weight. Without it only
    rule-based names (diffusers, XLabs, original HunyuanVideo) map, to "diffusion_model." keys, and row
    blocks are sized from ``widths`` = {module: (rows, input width)} read off the file (a LoRA's up rows
    and down columns).
    """
    prefix = _split_prefix(shapes)
    native = _native(shapes, prefix) if shapes is not None else {}
    rules = _compiled(_arch_id(arch))
    out: dict[str, Target] = {}
    for module in modules:
        flat = flat_name(module)
        if flat in native:
            out[module] = native[flat]
            continue
        for rule, file_re, _ in rules:
            hit = file_re.match(flat)
            if hit is None:
                continue
            target = _target(rule, hit.groupdict(), prefix, shapes, (widths or {}).get(module))
            if target is not None:
                out[module] = target
            break
    return out


def _target(rule: Rule, groups: dict, prefix: str, shapes, width) -> Target | None:
    key = prefix + rule.comfy.format(**groups) + ".weight"
    shape = None
    if shapes is not None:
        if key not in shapes:
            return None            # a layer this model does not have (reported as not in this model)
        shape = _rows_in(shapes[key])
    if rule.part is None:
        return key
    if rule.part == SWAP:
        return (key, None, swap_halves)
    if shape is not None:
        R, d = shape
        if not rule.part.fits(R, d):
            return None            # the weight is not fused the way this family's is
        start, length = rule.part.span(R, d, None)
    elif width is not None:
        start, length = rule.part.span(None, width[1], width[0])
    else:
        return None
    return (key, (0, start, length))


# ---- ComfyUI targets -> file names ------------------------------------------------------------------
def _wrap(name: str, naming: str) -> str:
    if naming == "diffusers":
        return "transformer." + name
    if naming == "lycoris":
        return "lycoris_" + name.replace(".", "_")
    if naming == "onetrainer":
        return "lora_transformer_" + name.replace(".", "_")
    if naming == "kohya":
        return "lora_unet_" + name.replace(".", "_")
    if naming == "comfy":
        return UNET + name
    raise ValueError(f"naming {naming!r} is not one of {NAMINGS}")


def file_names(arch: Arch | str | None, targets: Iterable[Target], shapes: Mapping[str, Any] | None = None, *,
               naming: str = "diffusers", variant: str | None = None) -> dict[Target, str]:
    """{target: module name in ``naming``} for ComfyUI targets (the inverse of ``comfy_targets``).

    ``naming``: "diffusers" (``transformer.`` + the diffusers module path, what diffusers / PEFT save),
    "lycoris" (SimpleTuner's ``lycoris_`` + the flat diffusers path), "onetrainer" (``lora_transformer_`` +
    flat), "kohya" (``lora_unet_`` + the flat ComfyUI path) or "comfy" (``diffusion_model.`` + the ComfyUI
    path). The diffusers-based namings take this family's rules; a whole weight no rule renames keeps
    its ComfyUI path (diffusers names Wan's ``patch_embedding`` and Lumina 2's ``x_embedder`` as ComfyUI
    does; Qwen-Image's and HiDream's names are all ComfyUI's); families without rules (SD3 ...) give
    nothing. Row blocks need ``shapes`` (their weight's rows and width); "kohya" and "comfy" name
    whole weights only. ``variant``: the Variant id where a family's variants have different diffusers
    classes (Lumina 2: "lumina2" or "z-image"); by default read from ``shapes`` (Z-Image's blocks carry
    ``adaLN_modulation.0``), else Lumina 2.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming {naming!r} is not one of {NAMINGS}")
    arch_id = _arch_id(arch)
    if variant is None and arch_id == "lumina2":
        z = shapes is not None and any(re.search(r"\.adaLN_modulation\.0\.weight$", k) for k in shapes)
        variant = "z-image" if z else "lumina2"
    rules = [c for c in _compiled(arch_id) if c[0].diffusers and c[0].variant in (None, variant)]
    out: dict[Target, str] = {}
    for target in targets:
        key, offset, fn = _unpack(target)
        if not key.endswith(".weight"):
            continue
        path = (key[len(UNET):] if key.startswith(UNET) else key)[:-len(".weight")]
        if naming in ("kohya", "comfy"):
            name = path if offset is None and fn is None else None
        else:
            name = _diffusers_name(rules, path, offset, fn, shapes, key)
            if name is None and offset is None and fn is None and (arch_id in SAME_NAMES or arch_id in RULES) \
                    and not any(comfy_re.match(path) for _, _, comfy_re in rules):
                name = path
        if name is not None:
            out[target] = _wrap(name, naming)
    return out


def _unpack(target: Target) -> tuple[str, tuple | None, Callable | None]:
    if isinstance(target, str):
        return target, None, None
    key, offset, *rest = target
    return key, (tuple(offset) if offset is not None else None), (rest[0] if rest else None)


def _diffusers_name(rules, path: str, offset, fn, shapes, key) -> str | None:
    shape = _rows_in(shapes[key]) if shapes is not None and key in shapes else None
    for rule, _, comfy_re in rules:
        if isinstance(rule.part, Part) != (offset is not None) or (rule.part == SWAP) != (fn is not None):
            continue
        hit = comfy_re.match(path)
        if hit is None:
            continue
        if offset is not None:
            if shape is None or not rule.part.fits(*shape) or (0, *rule.part.span(*shape, None)) != offset:
                continue
        return rule.file.format(**hit.groupdict())
    return None
