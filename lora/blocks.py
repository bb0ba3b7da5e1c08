"""Per-block weights, as A1111's LoRA Block Weight (hako-mikan/sd-webui-lora-block-weight) and the
Inspire Pack's LoraLoaderBlockWeight define them: one multiplier per block of the model, given as a
vector (``1,0,0,0,1,1,…``) or a preset name (``OUTALL``). No ComfyUI import.

A layout (:class:`Blocks`, one per architecture family in ``lora.arch``) names the blocks in order
and says which block a module belongs to. A vector is read by its length (the ``forms``):

    SD1.x / SD2.x  17  BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 … OUT11   (the blocks a LoRA has)
                   26  BASE IN00 … IN11 M00 OUT00 … OUT11                     (LoCon: every block)
    SDXL           12  BASE IN04 IN05 IN07 IN08 M00 OUT00 … OUT05
                   20  BASE IN00 … IN08 M00 OUT00 … OUT08
    Flux.1         58  BASE D00 … D18 S00 … S37   (double, then single blocks, as Inspire numbers them)

Semantics (hako-mikan's ``ratiodealer`` / ``to26``, Inspire's ``load_lbw``):
    - BASE weighs the text encoders (SD, SDXL) and, for Flux, every module outside the double and
      single blocks (text encoders, ``img_in``, ``txt_in``, ``final_layer``… : Inspire's "others");
    - a short form gives the blocks it leaves out weight 0 (a 17-value vector on a LoCon silences
      IN00, IN03, …), as hako-mikan's ``to26`` does;
    - a UNet module in no block (``time_embed``, ``out``, ``label_emb``) keeps weight 1;
    - the weight multiplies the row's strength: strength_model for the diffusion model, strength_clip
      for the text encoders.
Random and parameter placeholders (hako-mikan's R, U, X; Inspire's R, U, A, B) are refused: a
block weight here is a number, so a workflow gives the same image every time.

    w = weights_for(arch.get("sd1"), "OUTALL")      # {"BASE": 1.0, "IN00": 0.0, …, "OUT11": 1.0}
    weight_of(arch.get("sd1").blocks, w, "lora_unet_output_blocks_5_1_proj_in")   # 1.0
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from .errors import LoraError

_PLACEHOLDER = re.compile(r"[RUABXruab]([+-][\d.]*)?")   # hako-mikan's R, U, X(+n); Inspire's R, U, A, B (a, b: half)


@dataclass(frozen=True, eq=False)
class Blocks:
    """Block layout of an architecture family for per-block weights.

    ``names``    every block, in order (BASE first): the full form;
    ``forms``    vector length -> the blocks its values are for, in order; blocks a form leaves out
                 weigh 0;
    ``of``       a module's *flat* name (``lora.arch.flat_name``: kohya, ComfyUI, diffusers and PEFT
                 names all arrive flat) -> its block name, or None for a module in no block;
    ``presets``  preset name -> its vector (one of ``forms``' lengths);
    ``title``    how messages call the layout ("SD1.x / SD2.x").
    """
    title: str
    names: tuple[str, ...]
    forms: Mapping[int, tuple[str, ...]]
    of: Callable[[str], str | None]
    presets: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def block(self, key: Any) -> str | None:
        """The block of a module or tensor key in any naming ((key, offset…) tuples too)."""
        return _block(self, key if isinstance(key, str) else key[0])

    def lengths(self) -> str:
        """'17 (BASE, IN01, …, OUT11) or 26 (BASE, IN00, …, OUT11)', for messages."""
        return " or ".join(f"{n} ({_ends(names)})" for n, names in sorted(self.forms.items()))


@lru_cache(maxsize=65536)
def _block(blocks: Blocks, name: str) -> str | None:
    from .arch import flat_name

    return blocks.of(flat_name(name))


def _ends(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, …, {names[-1]}"


# ---- the layouts -----------------------------------------------------------------------------------
def _seq(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(n))


# text encoders in every naming flat_name produces: kohya te/te1/te2/te3, ComfyUI clip_l/clip_g/clip_h
# and t5xxl, hako-mikan's "encoder" / "embedders" / "transformer_resblocks" (OpenCLIP) keys
_TE = re.compile(r"(te\d?|clip_[lgh]|t5xxl|llama|text_encoders?(_\d)?|conditioner|cond_stage_model)_"
                 r"|(encoder|embedders|transformer_resblocks)(_|$)")
_LDM = re.compile(r"(input_blocks|output_blocks)_(\d+)(_|$)|middle_block(_|$)")
_DIFFUSERS = re.compile(r"(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)(_|$)"
                        r"|mid_block(_|$)|conv_in(_|$)")


def _unet_block(names: frozenset[str]) -> Callable[[str], str | None]:
    """``of`` for an ldm UNet (SD1.x, SD2.x, SDXL): ldm names (``input_blocks_4_1_…``) and diffusers
    names (``down_blocks_1_attentions_0_…``: input block 1 + 3·i + j, its downsampler 3·(i + 1);
    ``up_blocks_i_…_j``: output block 3·i + j, its upsampler 3·i + 2)."""

    def of(flat: str) -> str | None:
        if _TE.match(flat):
            return "BASE"
        m = _LDM.match(flat)
        if m:
            if m.group(1) is None:
                found = "M00"
            else:
                found = f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
            return found if found in names else None
        m = _DIFFUSERS.match(flat)
        if m:
            if m.group(1) is None:
                found = "M00" if flat.startswith("mid_block") else "IN00"
            else:
                i, part, j = int(m.group(2)), m.group(3), int(m.group(4))
                if m.group(1) == "down":
                    found = f"IN{3 * (i + 1) if part == 'downsamplers' else 1 + 3 * i + j:02d}"
                else:
                    found = f"OUT{3 * i + 2 if part == 'upsamplers' else 3 * i + j:02d}"
            return found if found in names else None
        return None

    return of


_DOUBLE = re.compile(r"(double_blocks|transformer_blocks)_(\d+)(_|$)")
_SINGLE = re.compile(r"(single_blocks|single_transformer_blocks)_(\d+)(_|$)")


def _flux_block(flat: str) -> str:
    """``of`` for Flux.1 (Inspire): double blocks D00…D18, single blocks S00…S37 (native, kohya, XLabs
    and diffusers names); everything else, text encoders included, is BASE."""
    for pattern, letter, n in ((_SINGLE, "S", 38), (_DOUBLE, "D", 19)):
        m = pattern.match(flat)
        if m and int(m.group(2)) < n:
            return f"{letter}{int(m.group(2)):02d}"
    return "BASE"


def _vec(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _lyc(prefix: str, names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Inspire's LyC presets (NONE, ALL, INALL, MIDALL, OUTALL) in the full form. Inspire's own vectors
    count blocks as a file holds them (27 for SD, 21 for SDXL); each gives one value per group
    (BASE, IN, M, OUT), written here on the layout's names."""
    groups = {"NONE": (0, 0, 0, 0), "ALL": (1, 1, 1, 1), "INALL": (1, 1, 0, 0), "MIDALL": (1, 0, 1, 0),
              "OUTALL": (1, 0, 0, 1)}
    out = {}
    for name, values in groups.items():
        by_group = dict(zip(("BASE", "IN", "M", "OUT"), map(float, values)))
        out[prefix + name] = tuple(next(v for g, v in by_group.items() if n.startswith(g)) for n in names)
    return out


_SD_NAMES = ("BASE",) + _seq("IN", 12) + ("M00",) + _seq("OUT", 12)
_SD_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
_SD_PRESETS = {
    # hako-mikan's defaults (DEF_WEIGHT_PRESET), 17 values; Inspire's SD-* carry the same vectors
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    # Inspire's lbw-preset.txt additions (its R/A/B presets ROUT, AOUT, AB are left out: placeholders)
    "MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
    "MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
    "MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
}
SD_UNET = Blocks(
    "SD1.x / SD2.x", _SD_NAMES, {17: _SD_17, 26: _SD_NAMES}, _unet_block(frozenset(_SD_NAMES)),
    {**{k: _vec(v) for k, v in _SD_PRESETS.items()},
     **{f"SD-{k}": _vec(v) for k, v in _SD_PRESETS.items()},
     **_lyc("SD-LyC-", _SD_NAMES)})

_XL_NAMES = ("BASE",) + _seq("IN", 9) + ("M00",) + _seq("OUT", 9)
_XL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + _seq("OUT", 6)
_XL_PRESETS = {   # Inspire's SDXL-* (12 values), also under the names every layout has (ALL, NONE, ALL0.5)
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
}
SDXL_UNET = Blocks(
    "SDXL", _XL_NAMES, {12: _XL_12, 20: _XL_NAMES}, _unet_block(frozenset(_XL_NAMES)),
    {**{k: _vec(v) for k, v in _XL_PRESETS.items() if k in ("NONE", "ALL", "ALL0.5")},
     **{f"SDXL-{k}": _vec(v) for k, v in _XL_PRESETS.items() if k != "ALL0.5"},
     **_lyc("SDXL-LyC-", _XL_NAMES)})

_FLUX_NAMES = ("BASE",) + _seq("D", 19) + _seq("S", 38)


def _flux(base: float, double: Sequence[float] | float, single: Sequence[float] | float) -> tuple[float, ...]:
    d = [double] * 19 if isinstance(double, (int, float)) else list(double)
    s = [single] * 38 if isinstance(single, (int, float)) else list(single)
    return (float(base), *map(float, d), *map(float, s))


def _span(n: int, lo: int, hi: int) -> list[float]:
    return [1.0 if lo <= i <= hi else 0.0 for i in range(n)]


FLUX_DIT = Blocks(
    "Flux.1", _FLUX_NAMES, {58: _FLUX_NAMES}, _flux_block,
    {"NONE": _flux(0, 0, 0), "ALL": _flux(1, 1, 1), "ALL0.5": _flux(0.5, 0.5, 0.5),
     # Inspire's FLUX-* presets. Its FLUX-DBL-* give 20 values (BASE + the double blocks) and Inspire
     # then weighs every later block with the last value given: written out here in full
     "FLUX-ALL": _flux(1, 1, 1),
     "FLUX-DBL-ALL": _flux(1, 1, 1),
     "FLUX-DBL-FRONT7": _flux(1, _span(19, 0, 6), 0),
     "FLUX-DBL-MID6": _flux(1, _span(19, 7, 12), 0),
     "FLUX-DBL-TAIL6": _flux(1, _span(19, 13, 18), 1),
     "FLUX-SINGLE-ALL": _flux(1, 0, 1),
     "FLUX-SINGLE-1to10": _flux(1, 0, _span(38, 0, 9)),
     "FLUX-SINGLE-11to20": _flux(1, 0, _span(38, 10, 19)),
     "FLUX-SINGLE-21to30": _flux(1, 0, _span(38, 20, 29)),
     "FLUX-SINGLE-31to37": _flux(1, 0, _span(38, 30, 37))})


# ---- reading a spec ---------------------------------------------------------------------------------
def _arch(arch):
    from . import arch as archs

    return archs.get(arch) if isinstance(arch, str) else arch


def layout(arch) -> Blocks:
    """The block layout of an Arch (or arch id); LoraError when the family has none (or is unknown: None)."""
    from . import arch as archs

    a = _arch(arch)
    if a is None:
        raise LoraError("block weights need the model's architecture, and it is not one LoRA Lab knows")
    if a.blocks is None:
        have = ", ".join(dict.fromkeys(x.name for x in archs.ARCHS if x.blocks is not None))
        raise LoraError(f"block weights are not defined for {a.name} models (LoRA Lab has block layouts for {have})")
    return a.blocks


def preset(blocks: Blocks, name: str) -> tuple[float, ...] | None:
    """A preset's vector by name (case-insensitive), or None."""
    want = name.strip().lower()
    return next((v for k, v in blocks.presets.items() if k.lower() == want), None)


def _number(text: str, i: int, spec: str) -> float:
    t = text.strip()
    if _PLACEHOLDER.fullmatch(t):
        raise LoraError(f"block weights {spec!r}: value {i + 1} is {t!r}; random (R, U) and parameter (A, B, X) "
                        "placeholders are not supported, write a number")
    try:
        v = float(t)
    except ValueError:
        raise LoraError(f"block weights {spec!r}: value {i + 1} ({t!r}) is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise LoraError(f"block weights {spec!r}: value {i + 1} ({t!r}) is not a finite number")
    return v


def _looks_like_name(text: str) -> bool:
    return "," not in text and not re.fullmatch(r"\s*[-+]?[\d.]+\s*", text)


def parse_spec(blocks: Blocks, spec: str | Sequence[float], *, model: str | None = None) -> tuple[float, ...]:
    """The values of a preset name or a vector (``"1,0,0.5,…"``, a sequence of numbers, or an Inspire
    preset line ``"NAME:1,0,…"``), checked against the layout's lengths. ``model`` names the model
    in messages ("SD1.5")."""
    who = model or blocks.title
    if not isinstance(spec, str):
        values = tuple(_number(str(v), i, str(list(spec))) for i, v in enumerate(spec))
        text = ",".join(f"{v:g}" for v in values)
    else:
        text = spec.strip()
        if not text:
            raise LoraError("block weights are empty: give a preset name or one number per block")
        if ":" in text and "," in text.partition(":")[2]:   # "NAME:1,0,…" as preset files write it
            text = text.partition(":")[2].strip()
        if _looks_like_name(text):
            found = preset(blocks, text)
            if found is None:
                raise LoraError(_unknown_preset(blocks, text, who))
            return found
        values = tuple(_number(v, i, text) for i, v in enumerate(text.split(",")))
    if len(values) not in blocks.forms:
        raise LoraError(f"block weights {text!r} give {len(values)} values; {who} takes {blocks.lengths()}")
    return values


def _unknown_preset(blocks: Blocks, name: str, who: str) -> str:
    from . import arch as archs

    elsewhere = [a.name for a in archs.ARCHS if a.blocks is not None and a.blocks is not blocks
                 and preset(a.blocks, name) is not None]
    said = f"block-weight preset {name!r} is not one {who} has"
    if elsewhere:
        said += f" (it is a preset for {', '.join(dict.fromkeys(elsewhere))})"
    return f"{said}; presets for {who}: {', '.join(blocks.presets)}; or give {blocks.lengths()} numbers"


def weights_for(arch, spec: str | Sequence[float]) -> dict[str, float]:
    """{block name: weight} for every block of ``arch``'s layout (an Arch or its id), from a preset
    name or a vector; blocks the vector's form leaves out weigh 0. LoraError says what is wrong:
    no layout for this family, an unknown preset (and which are known), a placeholder or a value
    that is not a number, a length this family does not take (and which it takes)."""
    a = _arch(arch)
    blocks = layout(a)
    values = parse_spec(blocks, spec, model=a.name)
    out = dict.fromkeys(blocks.names, 0.0)
    out.update(zip(blocks.forms[len(values)], values))
    return out


def weight_of(blocks: Blocks, weights: Mapping[str, float], key: Any) -> float:
    """The multiplier of one module or tensor key (any naming): its block's weight, 1 outside every block."""
    block = blocks.block(key)
    return 1.0 if block is None else weights.get(block, 1.0)


def describe(blocks: Blocks, weights: Mapping[str, float]) -> str:
    """'BASE 1, IN00–IN03 0, IN04–IN08 1, M00 0, …': runs of equal weights, for reports."""
    parts, run = [], []
    for name in blocks.names:
        if run and weights[name] != weights[run[0]]:
            parts.append(run)
            run = []
        run.append(name)
    if run:
        parts.append(run)
    return ", ".join(f"{r[0] if len(r) == 1 else f'{r[0]}–{r[-1]}'} {weights[r[0]]:g}" for r in parts)


def layouts() -> dict[Blocks, list[str]]:
    """Every layout, with the names of the families that use it."""
    from . import arch as archs

    out: dict[Blocks, list[str]] = {}
    for a in archs.ARCHS:
        if a.blocks is not None:
            out.setdefault(a.blocks, []).append(a.name)
    return out


def problem(spec: str) -> str | None:
    """What is wrong with a spec when the model is not known yet (the UI, before a run): None when
    some family's layout takes it, else the message for the first family."""
    first = None
    for layout, families in layouts().items():
        try:
            parse_spec(layout, spec, model=" / ".join(families))
            return None
        except LoraError as e:
            first = first or str(e)
    return first


def catalogue() -> dict:
    """Every layout with its forms and presets, JSON-ready (for the UI): {arch id: {...}}."""
    from . import arch as archs

    out = {}
    for a in archs.ARCHS:
        if a.blocks is None:
            continue
        b = a.blocks
        out[a.id] = {"name": a.name, "layout": b.title,
                     "forms": {str(n): list(names) for n, names in b.forms.items()},
                     "presets": {k: ",".join(f"{v:g}" for v in vec) for k, vec in b.presets.items()}}
    return out


__all__ = ["Blocks", "FLUX_DIT", "SDXL_UNET", "SD_UNET", "catalogue", "describe", "layout", "layouts", "parse_spec",
           "preset", "problem", "weight_of", "weights_for"]
