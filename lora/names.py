"""How a LoRA file is named inside prompt text, ``<lora:NAME:weight>`` as A1111 and Forge write it,
and how such a name is found again among the files ComfyUI lists (``folder_paths`` names: paths
relative to a loras folder, subfolders included, with the extension).

A name in a tag is the file's stem (``<lora:detail_tweaker:0.8>``) when no other listed file has
that stem, else its path without the extension (``<lora:styles/anime/detail_tweaker:0.8>``). A tag
resolves to a listed file by, in this order (the first step with any hit decides):

    1. its full listed name, then its path without the extension;
    2. a stem (or path without extension) only one file has, exactly, then ignoring case;
    3. its alias: the ``ss_output_name`` kohya writes into the file's metadata (A1111 answers to it
       too), exactly, then ignoring case.

Two or more files answering at one step make the name ambiguous. The autocomplete, the UI's tag
highlighting, the prompt node and the stack node all use these functions, so a name the UI
suggests always resolves and a name the UI marks is the one the node refuses.
"""
from __future__ import annotations

import collections
import difflib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Union

from .errors import LoraError

Aliases = Union[Mapping[str, str], Callable[[], Mapping[str, str]], None]   # listed name -> alias (lazy)
MAX_CLOSE = 5


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


@dataclass
class Found:
    """What a name refers to: ``name`` (a listed name) when exactly one file answers; else the files
    that answer equally (ambiguous) or none, with the closest listed names."""
    tag: str
    name: str | None = None
    matches: list[str] = field(default_factory=list)
    close: list[str] = field(default_factory=list)
    by: str | None = None       # "name", "path", "stem", "alias"

    def error(self) -> str | None:
        """The message for a name that does not resolve (None when it does)."""
        if self.name is not None:
            return None
        if not self.tag:
            return "no LoRA name given"
        if len(self.matches) > 1:
            how = "alias (ss_output_name)" if self.by == "alias" else "name"
            return (f"{self.tag!r} is ambiguous: {len(self.matches)} files answer to that {how} "
                    f"({', '.join(self.matches[:MAX_CLOSE])}); write the path without the extension, "
                    f"e.g. {_no_ext(self.matches[0])!r}")
        said = f"no LoRA named {self.tag!r} in the loras folders"
        return said + (f"; closest: {', '.join(self.close)}" if self.close else "")


def _steps(aliases: Aliases):
    """(how, key of a listed name, compare) in resolution order; aliases read only when reached."""
    table: list = []

    def alias_of(n):
        if not table:     # the table once, when the alias steps are reached
            table.append((aliases() if callable(aliases) else aliases) or {})
        return table[0].get(n)

    yield "name", _norm, str.__eq__
    yield "path", _no_ext, str.__eq__
    yield "stem", None, str.__eq__
    yield "stem", None, lambda a, b: a.lower() == b.lower()
    if aliases is not None:
        yield "alias", alias_of, lambda a, b: a is not None and a == b
        yield "alias", alias_of, lambda a, b: a is not None and a.lower() == b.lower()


def find(tag: str, names: Iterable[str], aliases: Aliases = None) -> Found:
    """Resolve ``tag`` among the listed ``names`` (see the module docstring). ``aliases``: listed name
    -> alias, or a function returning that table (called only when the earlier steps find nothing)."""
    names = list(names)
    tag = _norm(tag)
    if not tag:
        return Found(tag)
    for how, key, same in _steps(aliases):
        if key is None:      # a stem, or a path without extension, that one file has
            hits = [n for n in names if same(_stem(n), tag) or same(_no_ext(n), tag)]
        else:
            hits = [n for n in names if same(key(n), tag)]
        hits = list(dict.fromkeys(hits))
        if len(hits) == 1:
            return Found(tag, hits[0], hits, by=how)
        if hits and how != "path":     # a path without extension shared by a.pt and a.safetensors: try stems
            return Found(tag, None, sorted(hits), by=how)
    return Found(tag, close=closest(tag, names))


def closest(tag: str, names: list[str], n: int = MAX_CLOSE) -> list[str]:
    """The listed names whose stem or path looks most like ``tag`` (for "did you mean")."""
    keys: dict[str, str] = {}
    for name in names:
        for k in (_stem(name).lower(), _no_ext(name).lower()):
            keys.setdefault(k, name)
    hits = difflib.get_close_matches(tag.lower(), list(keys), n=n * 2, cutoff=0.5)
    hits += [k for k in keys if tag.lower() in k and k not in hits]
    return list(dict.fromkeys(keys[k] for k in hits))[:n]


def resolve(tag: str, names: Iterable[str], aliases: Aliases = None) -> str | None:
    """The listed name ``tag`` refers to, or None when no file, or more than one, fits it."""
    return find(tag, names, aliases).name


def lookup(tag: str, names: Iterable[str], aliases: Aliases = None, *, what: str = "") -> str:
    """The listed name ``tag`` refers to; LoraError (prefixed with ``what``, e.g. "row 2") naming it
    and the closest files, or the files it could mean, when it does not resolve."""
    found = find(tag, names, aliases)
    if found.name is None:
        raise LoraError(f"{what}: {found.error()}" if what else found.error())
    return found.name


# ---- aliases from the files' own metadata -----------------------------------------------------------
_ALIAS_CACHE: dict[str, tuple[tuple[int, int], str | None]] = {}


def alias_of(path: str) -> str | None:
    """The alias a file gives itself (kohya's ``ss_output_name``), read from its header; cached by
    modification time and size. None for pickles, unreadable files and files without one."""
    from .io import PICKLE_SUFFIXES, read_header

    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _ALIAS_CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    alias = None
    if not path.lower().endswith(PICKLE_SUFFIXES):
        try:
            alias = (read_header(path).metadata.get("ss_output_name") or "").strip() or None
        except LoraError:
            alias = None
    _ALIAS_CACHE[path] = (stamp, alias)
    return alias


def aliases(paths: Mapping[str, str]) -> dict[str, str]:
    """{listed name: alias} for the files that carry one; ``paths``: listed name -> full path."""
    out = {}
    for name, path in paths.items():
        a = alias_of(path)
        if a:
            out[name] = a
    return out


__all__ = ["Found", "alias_of", "aliases", "closest", "find", "lookup", "resolve", "tag_names"]
