"""The single adapter registry.

Every algorithm registers once; ``register`` checks that its name and label are unique and that a
file suffix it shares with another class (OFT and BOFT share ``.oft_blocks``) means the same role,
and fills the one table everything reads: suffix lookup here, ``trainable()`` / ``labels()`` for
node combo options. Which class owns a module is asked of the classes (``accepts``), as LyCORIS'
``algo_check`` and ComfyUI's ``load()`` returning None do. ``parse`` turns a flat state dict into
``{module prefix: [Adapter, ...]}`` (one adapter per target tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LoraError
from ..peft_meta import alpha_equiv, peft_configs
from .base import COMMON_ROLES, Adapter
from .boft import BOFT
from .full import Diff, DiffBias, NormBias, NormWeight, SetWeight
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT
from .oft_flux import FluxOFT

ADAPTERS: dict[str, type[Adapter]] = {}
# suffix -> (role, classes that declare it; () for roles every algorithm may carry); longest first
_SUFFIXES: list[tuple[str, str, tuple[type[Adapter], ...]]] = [(s, r, ()) for s, r in COMMON_ROLES.items()]


def register(cls: type[Adapter]) -> type[Adapter]:
    if not cls.name or cls.name in ADAPTERS:
        raise ValueError(f"adapter name {cls.name!r} is empty or registered twice")
    if not cls.label or any(c.label.lower() == cls.label.lower() for c in ADAPTERS.values()):
        raise ValueError(f"adapter {cls.name!r}: label {cls.label!r} is empty or taken")
    if not cls.identify <= set(cls.roles.values()):
        raise ValueError(f"adapter {cls.name!r}: identify roles {sorted(cls.identify)} are not among its roles")
    rows = {s: (r, owners) for s, r, owners in _SUFFIXES}
    for suffix, role in cls.roles.items():
        if suffix in rows and (rows[suffix][0] != role or not rows[suffix][1]):
            raise ValueError(f"adapter {cls.name!r}: suffix {suffix!r} already means {rows[suffix][0]!r}")
    for suffix, role in cls.roles.items():
        rows[suffix] = (role, rows.get(suffix, (role, ()))[1] + (cls,))
    _SUFFIXES[:] = sorted(((s, r, owners) for s, (r, owners) in rows.items()), key=lambda t: -len(t[0]))
    ADAPTERS[cls.name] = cls
    return cls


# PEFT's DoRA magnitude is a LoRA role ("peft_magnitude"): its strength rule differs from dora_scale's.
for _cls in (LoRA, Diff, DiffBias, NormWeight, NormBias, SetWeight, LoHa, LoKr, IA3, GLoRA, OFT, BOFT, FluxOFT):
    register(_cls)


def split_key(key: str) -> tuple[str, tuple[type[Adapter], ...], str] | None:
    """'a.b.lora_up.weight' -> ('a.b', (LoRA,), 'up'); None for a key no adapter knows."""
    for suffix, role, owners in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], owners, role
    return None


@dataclass
class ModuleKeys:
    """Everything a file stores under one module prefix, before any class is chosen."""
    prefix: str
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)          # role -> file key
    claims: dict[type[Adapter], list[str]] = field(default_factory=dict)  # class -> the file keys it declares


@dataclass
class Parsed:
    modules: dict[str, list[Adapter]]   # prefix -> adapters (one per target tensor)
    keys: dict[str, list[str]]          # prefix -> the file keys it consumed
    unknown: list[str]                  # file keys no adapter understands


def group(sd: dict[str, torch.Tensor], file: str | None = None) -> tuple[dict[str, ModuleKeys], list[str]]:
    modules: dict[str, ModuleKeys] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        hit = split_key(key)
        if hit is None:
            unknown.append(key)
            continue
        prefix, owners, role = hit
        m = modules.setdefault(prefix, ModuleKeys(prefix))
        if role in m.keys:
            raise LoraError(f"two keys give the same factor {role!r}: {m.keys[role]!r} and {key!r}",
                            file=file, key=prefix)
        m.factors[role] = t
        m.keys[role] = key
        for cls in owners:
            m.claims.setdefault(cls, []).append(key)
    return modules, unknown


def adapters_of(m: ModuleKeys, *, file: str | None = None, options: dict | None = None) -> list[Adapter]:
    """The adapters one module carries; refuses a module with keys of two algorithms on one target."""
    options = options or {}
    by_target: dict[str, list[type[Adapter]]] = {}
    for cls in m.claims:
        own = _own_factors(cls, m)
        if cls.accepts(own):
            by_target.setdefault(cls.target, []).append(cls)
    adapters = []
    for target, classes in by_target.items():
        if len(classes) > 1:
            shape = {m.keys[r]: tuple(t.shape) for r, t in m.factors.items()}
            desc = "; ".join(f"{c.name} ({', '.join(f'{k} {shape[k]}' for k in sorted(m.claims[c]))})" for c in classes)
            raise LoraError(f"module carries keys of {len(classes)} algorithms for its {target}: {desc}",
                            file=file, key=m.prefix)
        cls = classes[0]
        adapters.append(cls.from_factors(_own_factors(cls, m), prefix=m.prefix, file=file, options=options))
    if m.claims and not adapters:
        if _only_generic(m):  # e.g. a bare ".weight" key: IA3's suffix, but no IA3 without "on_input"
            return []
        raise LoraError(f"incomplete module: keys {sorted({k for ks in m.claims.values() for k in ks})} "
                        "do not make up any known algorithm", file=file, key=m.prefix)
    return adapters


def _own_factors(cls: type[Adapter], m: ModuleKeys) -> dict[str, torch.Tensor]:
    roles = set(cls.roles.values()) | set(COMMON_ROLES.values())
    return {r: t for r, t in m.factors.items() if r in roles}


def _only_generic(m: ModuleKeys) -> bool:
    """True when every key the module's classes claim has a role its class marks generic."""
    role_of = {k: r for r, k in m.keys.items()}
    return all({role_of[k] for k in ks} <= c.generic_roles for c, ks in m.claims.items())


def parse(sd: dict[str, torch.Tensor], *, file: str | None = None, options: dict | None = None) -> Parsed:
    """``options``: ``metadata`` (the file header, for PEFT alphas), algorithm options (``dyn_rank``)."""
    options = options or {}
    modules, unknown = group(sd, file)
    _peft_alphas(modules, options.get("metadata"))
    out: dict[str, list[Adapter]] = {}
    keys: dict[str, list[str]] = {}
    for prefix, m in modules.items():
        adapters = adapters_of(m, file=file, options=options)
        if adapters:
            out[prefix] = adapters
            keys[prefix] = list(m.keys.values())
        else:  # only shared roles (a stray .alpha): nothing to apply
            unknown.extend(m.keys.values())
    return Parsed(out, keys, sorted(unknown))


def _peft_alphas(modules: dict[str, ModuleKeys], metadata: dict | None) -> None:
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


def trainable() -> list[type[Adapter]]:
    """The algorithms training can create, in registry order."""
    return [c for c in ADAPTERS.values() if c.trainable]


def by_label(value: str) -> type[Adapter] | None:
    """The class whose label or name is ``value`` (any case: "LoRA", "lora"); None when none is."""
    v = value.lower()
    return next((c for c in ADAPTERS.values() if v in (c.label.lower(), c.name)), None)
