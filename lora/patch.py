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
    if isinstance(key, str) and key.endswith(".weight"):
        return key[: -len(".weight")] + ".bias"
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


@torch.no_grad()
def apply(obj: torch.nn.Module | Mapping[str, torch.Tensor],
          changes: Iterable[tuple[str, Adapter, float]]) -> Patched:
    """Add every (key, adapter, strength) change in place; all or nothing.

    All deltas are computed and checked before the first tensor is written, so a bad adapter
    (wrong shape, non-finite result) leaves the model exactly as it was.
    """
    tensors = tensors_of(obj)
    by_key: dict[str, list[tuple[Adapter, float]]] = {}
    for key, adapter, strength in changes:
        if key not in tensors:
            raise LoraError(f"model has no tensor {key!r}", file=adapter.file, key=adapter.prefix)
        adapter.check_target(tensors[key].shape, key)
        by_key.setdefault(key, []).append((adapter, strength))
    new: dict[str, torch.Tensor] = {}
    for key, items in by_key.items():
        t = tensors[key]
        work = t.detach().to(torch.float32, copy=True)
        for adapter, strength in items:
            work = adapter.apply_(work, strength)
        check_finite(work, what="patched weight", file=items[0][0].file, key=key)
        new[key] = work
    handle = Patched(tensors)
    for key, work in new.items():
        handle.backup[key] = tensors[key].detach().clone()
        tensors[key].copy_(work)
    return handle
