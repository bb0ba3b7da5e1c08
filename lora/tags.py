"""A1111 prompt tags, ``<lora:NAME:TE:UNET:DYN>``, read as A1111 reads them, and removed from the text.

The grammar (A1111 ``modules/extra_networks.py`` ``parse_prompt`` and ``ExtraNetworkParams``,
``extensions-builtin/Lora/extra_networks_lora.py`` ``activate``):

    <lora:NAME>                     TE = UNET = 1
    <lora:NAME:TE>                  UNET defaults to TE
    <lora:NAME:TE:UNET>
    <lora:NAME:TE:UNET:DYN>         DYN: the DyLoRA rank to use
    <lora:NAME:te=0.5:unet=1:dyn=8> named forms (an item with one "=" is named, the rest positional;
                                    a named value wins over the positional one)
    <lora:NAME:1:lbw=OUTALL>        hako-mikan's sd-webui-lora-block-weight: a preset name or a vector
    <lyco:NAME:…>                   the same (A1111 registers "lyco" as an alias of "lora")

TE is the text-encoder strength, UNET the diffusion model's. Arguments are split on ":"; a vector's
commas stay inside its item. Unlike A1111 (whose pattern ``<(\\w+):([^>]+)>`` passes anything it
cannot read through as prompt text), a tag that cannot be read is an error naming it: ``<lora:>``,
``<lora:x:abc>``, an unclosed ``<lora:``, an unknown ``name=`` argument (hako-mikan's step control
``start=``/``stop=``/``step=`` and ``lbwe=`` are not supported). Tags of other kinds
(``<hypernet:…>``) are left in the text. Removing a tag removes exactly its characters, as A1111
does. No ComfyUI import; names are resolved by the caller (``lora.names``).

    tags, text = parse("a cat, <lora:styles/inkwash:0.8:lbw=OUTALL>")
    tags[0].name, tags[0].te, tags[0].unet, tags[0].lbw     # 'styles/inkwash', 0.8, 0.8, 'OUTALL'
    text                                                    # 'a cat, '
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import LoraError

KINDS = ("lora", "lyco")
NAMED = ("te", "unet", "dyn", "lbw")
_OPEN = re.compile(r"<(lora|lyco):", re.IGNORECASE)
MAX_SHOWN = 60     # characters of a tag quoted in a message


class TagError(LoraError):
    """A prompt tag that cannot be read; ``tag`` is its text, ``start``/``end`` its span."""

    def __init__(self, message: str, *, tag: str, start: int, end: int):
        super().__init__(message)
        self.tag, self.start, self.end = tag, start, end


@dataclass(frozen=True)
class Tag:
    """One ``<lora:…>`` tag: where it is in the text, and what it asks for."""
    start: int
    end: int              # text[start:end] is the whole tag, "<" to ">"
    text: str
    kind: str             # "lora" or "lyco", lower-cased
    name: str             # as written (a file stem, a relative path without extension, or an alias)
    te: float             # text-encoder strength
    unet: float           # diffusion-model strength
    dyn: int | None = None
    lbw: str | None = None


@dataclass(frozen=True)
class Scanned:
    """A tag found in the text: read (``tag``) or not (``error``)."""
    start: int
    end: int
    text: str
    tag: Tag | None = None
    error: TagError | None = None


def quote(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


def _number(value: str, what: str, tag: str, start: int, end: int) -> float:
    try:
        v = float(value)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v):
        raise TagError(f"tag {quote(tag)}: {value.strip()!r} is not a number (the {what})", tag=tag,
                       start=start, end=end)
    return v


def _rank(value: str, tag: str, start: int, end: int) -> int:
    try:
        v = int(value)
    except ValueError:
        v = -1
    if v < 0:
        raise TagError(f"tag {quote(tag)}: dyn {value.strip()!r} is not a rank (a whole number, 0 for all)",
                       tag=tag, start=start, end=end)
    return v


def read_tag(text: str, start: int, end: int) -> Tag:
    """The tag text[start:end] (``<kind:args>``) read; TagError naming it when it cannot be."""
    whole = text[start:end]
    kind, _, body = whole[1:-1].partition(":")
    items = body.split(":")
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            key = parts[0].strip().lower()
            if key not in NAMED:
                raise TagError(f"tag {quote(whole)}: unknown argument {parts[0].strip()!r}= (LoRA Lab reads "
                               f"{', '.join(k + '=' for k in NAMED)})", tag=whole, start=start, end=end)
            named[key] = parts[1].strip()
        else:
            positional.append(item.strip())
    name = positional[0] if positional else ""
    if not name:
        raise TagError(f"tag {quote(whole)} names no LoRA: write <{kind.lower()}:NAME> or <{kind.lower()}:NAME:0.8>",
                       tag=whole, start=start, end=end)
    if len(positional) > 4:
        raise TagError(f"tag {quote(whole)} has {len(positional)} ':'-separated parts; at most 4 "
                       f"(NAME:TE:UNET:DYN), then named ones (lbw=…)", tag=whole, start=start, end=end)
    te = _number(positional[1], "text-encoder strength, TE", whole, start, end) if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(named["te"], "text-encoder strength, te=", whole, start, end)
    unet = _number(positional[2], "diffusion-model strength, UNET", whole, start, end) if len(positional) > 2 else te
    if "unet" in named:
        unet = _number(named["unet"], "diffusion-model strength, unet=", whole, start, end)
    dyn = _rank(positional[3], whole, start, end) if len(positional) > 3 else None
    if "dyn" in named:
        dyn = _rank(named["dyn"], whole, start, end)
    lbw = named.get("lbw")
    if lbw is not None and not lbw:
        raise TagError(f"tag {quote(whole)}: lbw= is empty (a preset name or one number per block)",
                       tag=whole, start=start, end=end)
    return Tag(start, end, whole, kind.lower(), name, te, unet, dyn or None, lbw)


def scan(text: str) -> list[Scanned]:
    """Every ``<lora:``/``<lyco:`` tag in ``text``, in order, each read or with the error that says why
    not. A tag ends at the first ``>``; one that meets a ``<`` or a line end first is unclosed (it
    then spans to that point)."""
    out = []
    pos = 0
    while True:
        m = _OPEN.search(text, pos)
        if m is None:
            return out
        start = m.start()
        close = text.find(">", m.end())
        stops = [i for i in (text.find("<", m.end()), text.find("\n", m.end())) if i != -1]
        cut = min(stops) if stops else len(text)
        if close == -1 or close > cut:
            whole = text[start:cut]
            err = TagError(f"tag {quote(whole.rstrip())!s} is not closed: end it with '>'", tag=whole, start=start, end=cut)
            out.append(Scanned(start, cut, whole, error=err))
            pos = cut
            continue
        end = close + 1
        try:
            out.append(Scanned(start, end, text[start:end], tag=read_tag(text, start, end)))
        except TagError as e:
            out.append(Scanned(start, end, text[start:end], error=e))
        pos = end


def parse(text: str) -> tuple[list[Tag], str]:
    """(the tags, the text without them); TagError for the first tag that cannot be read."""
    found = scan(text)
    for s in found:
        if s.error is not None:
            raise s.error
    return [s.tag for s in found], strip(text, found)


def strip(text: str, found) -> str:
    """``text`` without the spans of ``found`` (Tags or Scanned), exactly as A1111 removes them."""
    out, pos = [], 0
    for s in found:
        out.append(text[pos:s.start])
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


__all__ = ["KINDS", "Scanned", "Tag", "TagError", "parse", "read_tag", "scan", "strip"]
