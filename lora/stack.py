"""A stack of LoRAs as rows: the stack node's own ``rows`` (JSON), a ``LORA_STACK`` from other packs
(Efficiency Nodes, Comfyroll: a list of ``(lora_name, strength_model, strength_clip)`` tuples) and
prompt tags (``lora.tags``) all become :class:`Row`s, checked before anything is loaded, each error
naming its row. No ComfyUI import.

The ``rows`` JSON form (what the stack node's UI writes, and what a hand-written API prompt sends
as the string input ``rows``)::

    [{"on": true, "lora": "styles/inkwash.safetensors", "strength": 0.8},
     {"lora": "detail.safetensors", "strength_model": 1.0, "strength_clip": 0.5,
      "blocks": "OUTALL", "dyn_rank": 8}]

    lora            required: the file as the loaders list it (a relative path with its extension);
                    a stem or a path without extension also resolves (lora.names)
    on              default true; a row that is off is skipped
    strength        both strengths at once (default 1)
    strength_model  the diffusion model's strength (default: strength)
    strength_clip   the text encoder's strength (default: strength)
    blocks          block weights: a preset name or a vector (lora.blocks); "" or absent: none
    dyn_rank        DyLoRA files: the rank to use; 0 or absent: every stored rank
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from .errors import LoraError
from .tags import Tag, quote

ROW_KEYS = ("on", "lora", "strength", "strength_model", "strength_clip", "blocks", "dyn_rank")


@dataclass(frozen=True)
class Row:
    """One LoRA of a stack. ``where`` says where it came from, for messages ("row 2")."""
    lora: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    blocks: str = ""
    dyn_rank: int = 0
    on: bool = True
    where: str = ""

    def options(self) -> dict:
        """Parse options for the loader (DyLoRA rank)."""
        return {"dyn_rank": self.dyn_rank} if self.dyn_rank else {}


def _strength(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"{where}: {what} must be a finite number, not {value!r}")
    return float(value)


def rows_from_json(text: str | None) -> list[Row]:
    """The stack node's ``rows`` input (see the module docstring); "" means no rows. LoraError
    naming the row (counted from 1) and the key that is wrong."""
    if text is None or not str(text).strip():
        return []
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LoraError(f"rows is not valid JSON ({e}); expected a list like "
                        '[{"lora": "name.safetensors", "strength": 1.0}]') from None
    if not isinstance(data, list):
        raise LoraError(f"rows must be a JSON list of rows, not {type(data).__name__}")
    return [_row(item, f"row {i}") for i, item in enumerate(data, 1)]


def _row(item: Any, where: str) -> Row:
    if not isinstance(item, dict):
        raise LoraError(f"{where}: a row is an object like {{\"lora\": \"name.safetensors\", \"strength\": 1}}, "
                        f"not {item!r}")
    unknown = [k for k in item if k not in ROW_KEYS]
    if unknown:
        raise LoraError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a row has {', '.join(ROW_KEYS)}")
    on = item.get("on", True)
    if not isinstance(on, bool):
        raise LoraError(f"{where}: on must be true or false, not {on!r}")
    lora = item.get("lora")
    if not isinstance(lora, str) or not lora.strip():
        raise LoraError(f"{where}: lora must name a file from the loras folders, not {lora!r}")
    both = _strength(item.get("strength", 1.0), "strength", where)
    sm = _strength(item.get("strength_model", both), "strength_model", where)
    sc = _strength(item.get("strength_clip", both), "strength_clip", where)
    blocks = item.get("blocks") or ""
    if not isinstance(blocks, str):
        if isinstance(blocks, list):   # a vector written as a JSON list
            blocks = ",".join(str(v) for v in blocks)
        else:
            raise LoraError(f"{where}: blocks must be a preset name or a vector like \"1,0,0,…\", not {blocks!r}")
    dyn = item.get("dyn_rank", 0) or 0
    if isinstance(dyn, bool) or not isinstance(dyn, int) or dyn < 0:
        raise LoraError(f"{where}: dyn_rank must be a whole number >= 0 (0: every rank), not {dyn!r}")
    return Row(lora.strip(), sm, sc, blocks.strip(), dyn, on, where)


def rows_from_stack(items: Iterable | None) -> list[Row]:
    """A ``LORA_STACK`` input: ``(lora_name, strength_model, strength_clip)`` tuples (or lists)."""
    if items is None:
        return []
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise LoraError("lora_stack must be a list of (lora_name, strength_model, strength_clip), "
                        f"not {type(items).__name__}")
    out = []
    for i, item in enumerate(items, 1):
        where = f"lora_stack item {i}"
        if not isinstance(item, (tuple, list)) or len(item) < 3 or not isinstance(item[0], str):
            raise LoraError(f"{where}: expected (lora_name, strength_model, strength_clip), got {item!r}")
        where = f"{where} ({item[0]})"
        out.append(Row(item[0].strip(), _strength(item[1], "strength_model", where),
                       _strength(item[2], "strength_clip", where), where=where))
    return out


def rows_from_tags(tags: Sequence[Tag]) -> list[Row]:
    """Prompt tags as rows: te -> strength_clip, unet -> strength_model, dyn, lbw -> blocks."""
    return [Row(t.name, t.unet, t.te, t.lbw or "", t.dyn or 0, True, f"tag {quote(t.text)}") for t in tags]


def as_stack(rows: Iterable[Row]) -> list[tuple[str, float, float]]:
    """The ``LORA_STACK`` form of rows (block weights and DyLoRA ranks have no place in it)."""
    return [(r.lora, r.strength_model, r.strength_clip) for r in rows]


def to_json(rows: Iterable[Row]) -> str:
    """The ``rows`` JSON of rows (the inverse of rows_from_json, defaults left out)."""
    out = []
    for r in rows:
        d = {k: v for k, v in asdict(r).items() if k != "where"}
        if d["strength_model"] == d["strength_clip"]:
            d["strength"] = d.pop("strength_model")
            d.pop("strength_clip")
        out.append({k: v for k, v in d.items() if not (k in ("blocks", "dyn_rank") and not v)})
    return json.dumps(out)


def join_words(per_row: Iterable[Iterable[str]]) -> str:
    """Trigger words of every row, in stack order, as one comma-separated string (each once)."""
    seen, out = set(), []
    for words in per_row:
        for w in words:
            if w.lower() not in seen:
                seen.add(w.lower())
                out.append(w)
    return ", ".join(out)


__all__ = ["ROW_KEYS", "Row", "as_stack", "join_words", "rows_from_json", "rows_from_stack", "rows_from_tags",
           "to_json"]
