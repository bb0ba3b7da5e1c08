"""Match a parsed LoRA file against a model's keys, and patch / restore plain torch tensors.

``match`` is shared by the standalone path and the ComfyUI nodes (which pass ComfyUI's own key
map). ``apply`` changes tensors in place in their own dtype (math in float32) and returns a
handle whose ``restore`` gives back every original value bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .adapters import Parsed
from .adapters.base import Adapter
from .errors import LoraError, check_finite
from .keys import canonical, describe


@dataclass
class Target:
    key: Any            # the model's tensor key (ComfyUI may use (key, offset) tuples)
    adapter: Adapter
    source: str         # module prefix in the file


@dataclass
class Match:
    file: str
    targets: list[Target] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)      # module prefixes with no model key
    unknown: list[str] = field(default_factory=list)        # file keys no algorithm understands
    n_file_keys: int = 0
    n_matched_keys: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.targets)

    def summary(self, model_arch: str | None = None, file_arch: str | None = None) -> str:
        head = f"{self.file}: {self.n_matched_keys} of {self.n_file_keys} keys match this model"
        lines = [head + (f" ({len(self.targets)} tensors patched)" if self.targets else "")]
        if not self.targets and file_arch and model_arch and file_arch != model_arch:
            lines[0] += f": the file looks like an {file_arch} LoRA, the model is {model_arch}"
        elif not self.targets and file_arch:
            lines[0] += f": the file looks like a LoRA for {file_arch}"
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} module(s) not in this model: {describe(self.unmatched)}")
        if self.unknown:
            lines.append(f"{len(self.unknown)} key(s) of no known format: {describe(self.unknown)}")
        return "\n".join(lines)


def bias_key(key: Any) -> Any:
    name = key if isinstance(key, str) else key[0]
    if name.endswith(".weight"):
        bias = name[: -len(".weight")] + ".bias"
        return bias if isinstance(key, str) else (bias,) + tuple(key[1:])
    if name.endswith("_weight"):   # fused OpenCLIP in_proj_weight -> in_proj_bias
        bias = name[: -len("_weight")] + "_bias"
        return bias if isinstance(key, str) else (bias,) + tuple(key[1:])
    return None


def match(parsed: Parsed, key_map: Mapping[str, Any], *, file: str, n_file_keys: int,
          skip: Iterable[str] = ()) -> Match:
    """Resolve each module of the file to a model key (raw name first, then its canonical form).

    ``skip``: prefixes of module names this caller does not handle (counted as neither).
    """
    skip = tuple(skip)
    m = Match(file=file, unknown=list(parsed.unknown), n_file_keys=n_file_keys)
    for prefix, adapters in parsed.modules.items():
        key = key_map.get(prefix)
        if key is None:
            key = key_map.get(canonical(prefix))
        if key is None:
            if not (skip and canonical(prefix).startswith(skip)):
                m.unmatched.append(prefix)
            continue
        for a in adapters:
            k = key if a.target == "weight" else bias_key(key)
            if k is None:
                raise LoraError(f"{a.name} changes a bias but target {key!r} has none", file=file, key=prefix)
            m.targets.append(Target(k, a, prefix))
        m.n_matched_keys += len(parsed.keys[prefix])
    return m


# ---- standalone patching of plain tensors -----------------------------------------------------------
class Patched:
    """Restore handle: original values of every tensor changed, copied once before the change."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors
        self.backup: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def restore(self) -> None:
        for k, orig in self.backup.items():
            self._tensors[k].copy_(orig)
        self.backup.clear()


def tensors_of(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return obj.state_dict(keep_vars=True) if isinstance(obj, torch.nn.Module) else obj


def target_view(tensors: Mapping[str, torch.Tensor], key) -> torch.Tensor:
    """The tensor a key names: ``"a.weight"``, or a slice ``(key, dim, start, length)`` of a fused
    tensor (OpenCLIP's q/k/v ``in_proj_weight``, see sd_keys)."""
    name = key if isinstance(key, str) else key[0]
    t = tensors.get(name)
    if t is None:
        return None
    return t if isinstance(key, str) else t.narrow(key[1], key[2], key[3])


@torch.no_grad()
def apply(obj: torch.nn.Module | Mapping[str, torch.Tensor],
          changes: Iterable[tuple[Any, Adapter, float]]) -> Patched:
    """Add every (key, adapter, strength) change in place; all or nothing.

    All results are computed and checked before the first tensor is written, so a bad adapter
    (wrong shape, non-finite result) leaves the model exactly as it was.
    """
    tensors = tensors_of(obj)
    by_key: dict[Any, list[tuple[Adapter, float]]] = {}
    for key, adapter, strength in changes:
        view = target_view(tensors, key)
        if view is None:
            raise LoraError(f"model has no tensor {key!r}", file=adapter.file, key=adapter.prefix)
        adapter.check_target(view.shape, key if isinstance(key, str) else key[0])
        by_key.setdefault(key, []).append((adapter, strength))
    new: dict[Any, torch.Tensor] = {}
    for key, items in by_key.items():
        work = target_view(tensors, key).detach().to(torch.float32, copy=True)
        for adapter, strength in items:
            work = adapter.apply_(work, strength)
        check_finite(work, what="patched weight", file=items[0][0].file, key=str(key))
        new[key] = work
    handle = Patched(tensors)
    for key, work in new.items():
        name = key if isinstance(key, str) else key[0]
        if name not in handle.backup:
            handle.backup[name] = tensors[name].detach().clone()
        target_view(tensors, key).copy_(work)
    return handle


def load_into(obj: torch.nn.Module | Mapping[str, torch.Tensor], path: str, strength: float = 1.0, *,
              key_map: Mapping[str, Any] | None = None, options: dict | None = None) -> tuple[Patched, Match]:
    """Standalone one-call use: read ``path``, match it to ``obj`` (SD1.x/SD2.x/SDXL names in any
    naming, via ``sd_keys.model_key_map`` unless a ``key_map`` is given) and patch in place.

    Returns the restore handle and the match report; raises LoraError when nothing matches.
    """
    from .adapters import parse
    from .io import read
    from .keys import guess_file_arch
    from .sd_keys import detect_arch, model_key_map

    tensors = tensors_of(obj)
    f = read(path)
    parsed = parse(f.tensors, file=f.name, options={**(options or {}), "metadata": f.metadata})
    km = key_map if key_map is not None else model_key_map(list(tensors), {k: t.shape for k, t in tensors.items()})
    m = match(parsed, km, file=f.name, n_file_keys=len(f.tensors))
    if not m.targets:
        arch = detect_arch(list(tensors), {k: t.shape for k, t in tensors.items()})
        raise LoraError(m.summary(arch, guess_file_arch({k: tuple(v.shape) for k, v in f.tensors.items()})),
                        file=f.name)
    return apply(tensors, [(t.key, t.adapter, strength) for t in m.targets]), m
