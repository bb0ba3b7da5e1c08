"""How a LoRA file is named inside prompt text, ``<lora:NAME:weight>`` as A1111 and Forge write it,
and how such a name is found again among the files ComfyUI lists (``folder_paths`` names: paths
relative to a loras folder, subfolders included, with the extension).

A name in a tag is the file's stem (``<lora:detail_tweaker:0.8>``) when no other listed file has
that stem, else its path without the extension (``<lora:styles/anime/detail_tweaker:0.8>``). A tag
resolves to a listed file by its full name, its path without extension, or a stem that only one
file has (case-insensitively when that is still unambiguous). The autocomplete, the UI's tag
highlighting and prompt nodes all use these two functions, so a name the UI suggests always resolves.
"""
from __future__ import annotations

import collections
import posixpath
from typing import Iterable


def _norm(name: str) -> str:
    return name.replace("\\", "/").strip()


def _no_ext(name: str) -> str:
    return posixpath.splitext(_norm(name))[0]


def _stem(name: str) -> str:
    return posixpath.basename(_no_ext(name))


def tag_names(names: Iterable[str]) -> dict[str, str]:
    """{listed name: the name to write in ``<lora:…>``} (shortest form that resolves back to it)."""
    names = list(names)
    stems = collections.Counter(_stem(n).lower() for n in names)
    return {n: _stem(n) if stems[_stem(n).lower()] == 1 else _no_ext(n) for n in names}


def resolve(tag: str, names: Iterable[str]) -> str | None:
    """The listed name ``tag`` refers to, or None when no file, or more than one, fits it."""
    names = list(names)
    tag = _norm(tag)
    if not tag:
        return None
    for form in (_norm, _no_ext):
        hits = [n for n in names if form(n) == tag]
        if len(hits) == 1:
            return hits[0]
    for same in (lambda a, b: a == b, lambda a, b: a.lower() == b.lower()):
        hits = [n for n in names if same(_stem(n), tag) or same(_no_ext(n), tag)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None     # ambiguous: two files answer to this name
    return None
