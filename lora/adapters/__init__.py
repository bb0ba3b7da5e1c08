"""The single adapter registry.

Every algorithm registers once; registration checks that its name and file suffixes are unique and
fills every table from the class attributes (suffix lookup, node combo options). ``parse`` turns a
flat state dict into ``{module prefix: [Adapter, ...]}`` (one adapter per target tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LoraError
from .base import COMMON_ROLES, Adapter
from .full import Diff, DiffBias, NormBias, NormWeight, SetWeight
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT
from ..peft_meta import alpha_equiv, peft_configs

ADAPTERS: dict[str, type[Adapter]] = {}
# suffix -> (adapter class or None for roles every algorithm may carry, role); longest suffix first
_SUFFIXES: list[tuple[str, type[Adapter] | None, str]] = [(s, None, r) for s, r in COMMON_ROLES.items()]


def register(cls: type[Adapter]) -> type[Adapter]:
    if not cls.name or cls.name in ADAPTERS:
        raise ValueError(f"adapter name {cls.name!r} is empty or registered twice")
    taken = {s for s, _, _ in _SUFFIXES}
    clash = taken & set(cls.roles)
    if clash:
        raise ValueError(f"adapter {cls.name!r}: suffixes {sorted(clash)} already belong to another adapter")
    if not cls.identify <= set(cls.roles.values()):
        raise ValueError(f"adapter {cls.name!r}: identify roles {sorted(cls.identify)} are not among its roles")
    ADAPTERS[cls.name] = cls
    _SUFFIXES.extend((s, cls, r) for s, r in cls.roles.items())
    _SUFFIXES.sort(key=lambda t: -len(t[0]))
    return cls


# BOFT shares OFT's suffixes (oft_blocks with 4 dims): OFT hands it over.
# PEFT's DoRA magnitude is a LoRA role ("peft_magnitude"): its strength rule differs from dora_scale's.
for _cls in (LoRA, Diff, DiffBias, NormWeight, NormBias, SetWeight, LoHa, LoKr, IA3, GLoRA, OFT):
    register(_cls)


def split_key(key: str) -> tuple[str, type[Adapter] | None, str] | None:
    """'a.b.lora_up.weight' -> ('a.b', LoRA, 'up'); None for a key no adapter knows."""
    for suffix, cls, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], cls, role
    return None


@dataclass
class Module:
    """Everything a file stores under one module prefix."""
    prefix: str
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)          # role -> file key
    algos: dict[type[Adapter], list[str]] = field(default_factory=dict)  # class -> its file keys


@dataclass
class Parsed:
    modules: dict[str, list[Adapter]]   # prefix -> adapters (one per target tensor)
    keys: dict[str, list[str]]          # prefix -> the file keys it consumed
    unknown: list[str]                  # file keys no adapter understands


def group(sd: dict[str, torch.Tensor], file: str | None = None) -> tuple[dict[str, Module], list[str]]:
    modules: dict[str, Module] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        hit = split_key(key)
        if hit is None:
            unknown.append(key)
            continue
        prefix, cls, role = hit
        m = modules.setdefault(prefix, Module(prefix))
        if role in m.keys:
            raise LoraError(f"two keys give the same factor {role!r}: {m.keys[role]!r} and {key!r}",
                            file=file, key=prefix)
        m.factors[role] = t
        m.keys[role] = key
        if cls is not None:
            m.algos.setdefault(cls, []).append(key)
    return modules, unknown


def build(m: Module, *, file: str | None = None, options: dict | None = None) -> list[Adapter]:
    """The adapters one module carries; refuses a module with keys of two algorithms on one target."""
    options = options or {}
    by_target: dict[str, list[type[Adapter]]] = {}
    for cls in m.algos:
        if cls.identify & set(m.factors):
            by_target.setdefault(cls.target, []).append(cls)
    adapters = []
    for target, classes in by_target.items():
        if len(classes) > 1:
            shape = {m.keys[r]: tuple(t.shape) for r, t in m.factors.items()}
            desc = "; ".join(f"{c.name} ({', '.join(f'{k} {shape[k]}' for k in sorted(m.algos[c]))})" for c in classes)
            raise LoraError(f"module carries keys of {len(classes)} algorithms for its {target}: {desc}",
                            file=file, key=m.prefix)
        cls = classes[0]
        own = {r: t for r, t in m.factors.items() if r in set(cls.roles.values()) | set(COMMON_ROLES.values())}
        adapters.append(cls.from_factors(own, prefix=m.prefix, file=file, options=options))
    if m.algos and not adapters:
        if _only_generic(m):  # e.g. a bare ".weight" key: IA3's suffix, but no IA3 without "on_input"
            return []
        raise LoraError(f"incomplete module: keys {sorted(k for ks in m.algos.values() for k in ks)} "
                        "do not make up any known algorithm", file=file, key=m.prefix)
    return adapters


def _only_generic(m: Module) -> bool:
    """True when every key the module's algorithms claim has a role its class marks generic."""
    role_of = {k: r for r, k in m.keys.items()}
    return all({role_of[k] for k in ks} <= getattr(c, "generic_roles", frozenset()) for c, ks in m.algos.items())


def parse(sd: dict[str, torch.Tensor], *, file: str | None = None, options: dict | None = None) -> Parsed:
    """``options``: ``metadata`` (the file header, for PEFT alphas), algorithm options (``dyn_rank``)."""
    options = options or {}
    modules, unknown = group(sd, file)
    _peft_alphas(modules, options.get("metadata"))
    out: dict[str, list[Adapter]] = {}
    keys: dict[str, list[str]] = {}
    for prefix, m in modules.items():
        adapters = build(m, file=file, options=options)
        if adapters:
            out[prefix] = adapters
            keys[prefix] = list(m.keys.values())
        else:  # only shared roles (a stray .alpha): nothing to apply
            unknown.extend(m.keys.values())
    return Parsed(out, keys, sorted(unknown))


def _peft_alphas(modules: dict[str, Module], metadata: dict | None) -> None:
    """Give PEFT modules without ``.alpha`` keys the alpha their header's LoraConfig implies."""
    configs = peft_configs(metadata or {})
    if not configs:
        return
    for m in modules.values():
        down = m.factors.get("down")
        if "alpha" in m.factors or down is None or not m.keys.get("down", "").endswith(_PEFT_DOWN):
            continue
        a = alpha_equiv(configs, m.prefix, down.shape[0])
        if a is not None:
            m.factors["alpha"] = torch.tensor(a)


_PEFT_DOWN = (".lora_A.weight", ".lora_A.default.weight", ".lora_A")


def names() -> list[str]:
    return list(ADAPTERS)
