"""Continue training from an existing file: its factors, its step count (from metadata, whatever
the file is called) and, when it carries it, its optimizer state.

The file is read by the loader's own registry (``lora.adapters.parse``), so every naming and
factor layout the loader reads for a trainable algorithm can be continued, and the factors mean
exactly what they mean when the file is loaded (e.g. alpha = 0 is scale 1, as kohya trains it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..lora.adapters import parse
from ..lora.adapters.base import Adapter
from ..lora.errors import LoraError
from ..lora.io import LoraFile
from ..lora import arch as archs
from ..lora.keys import canonical, describe
from . import metadata as meta
from .adapters import LEGACY_ROLES, algorithms, trainable
from .errors import TrainingError


@dataclass
class Resume:
    source: str                                     # file name, for messages and metadata
    adapters: dict[str, Adapter]                    # target name -> the file's adapter for it
    steps: int = 0
    optimizer: str | None = None
    optimizer_state: dict[str, torch.Tensor] | None = None    # '<target>/<role>/<state key>' -> tensor
    notes: list[str] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None      # '<target>/<role>' -> the EMA, when the file's tensors are one


def load(file: LoraFile, targets: Mapping[str, nn.Module], algorithm: str, arch: str | None) -> Resume:
    """Match ``file`` against the layers being trained; refuse it when it is for another model
    or another algorithm, naming what differs. A file whose tensors are an EMA continues from the
    live factors its header carries, and its tensors seed the EMA.

    ``arch``: the model's architecture as metadata names it (a lora.arch variant id or modelspec id).
    """
    name = file.name
    cls = trainable(algorithm)
    online = file.metadata.get("lora_lab.online_weights")
    if online:
        ema_file = file
        file = LoraFile(file.path, meta.decode_tensors(online, "lora_lab.online_weights", file=name), file.metadata)
    model_arch, model_variant, _ = archs.by_metadata({"lora_lab.architecture": arch} if arch else {})
    file_arch, _, said = archs.by_metadata(file.metadata)
    if model_arch is not None and file_arch is not None and file_arch is not model_arch:
        raise TrainingError(f"existing_lora was trained for {said}; this model is "
                            f"{(model_variant or model_arch).name} ({arch!r})", file=name)

    parsed = parse(file.tensors, file=name, options={"metadata": file.metadata})
    unknown = [k for k in parsed.unknown if not k.endswith(".alpha")]    # a stray alpha: nothing to continue
    if unknown:
        raise TrainingError(f"existing_lora has {len(unknown)} key(s) of no known format: {describe(unknown)}",
                            file=name)
    found: dict[str, list[str]] = {}
    for prefix, adapters in parsed.modules.items():
        for a in adapters:
            found.setdefault(a.name, []).append(prefix)
    if not found:
        raise TrainingError(f"existing_lora holds no {'/'.join(algorithms())} factors", file=name)
    if set(found) != {cls.name}:
        desc = ", ".join(f"{a} ({len(p)} modules)" for a, p in sorted(found.items()))
        can = [c.label for c in map(_trainable_or_none, found) if c is not None]
        hint = (f"choose {' or '.join(can)} to continue it, or train a new LoRA" if can else
                f"training continues only {', '.join(algorithms())} files")
        raise TrainingError(f"existing_lora holds {desc}, but the algorithm chosen is {algorithm!r}: {hint}", file=name)

    chosen: dict[str, Adapter] = {}
    missing = []
    for prefix, (a,) in parsed.modules.items():
        target = prefix if prefix in targets else canonical(prefix)
        if target not in targets:
            missing.append(prefix)
            continue
        problem = a.resume_problem()
        if problem:
            raise TrainingError(f"existing_lora cannot be continued: {problem}", file=name, key=prefix)
        chosen[target] = a
    if missing and all(canonical(m).startswith("lora_te") for m in missing):
        raise TrainingError(f"existing_lora has a text-encoder LoRA ({len(missing)} modules): to continue it, connect "
                            "clip and set text_encoder_lr > 0", file=name)
    if missing:
        guess = archs.identify(file.tensors, file.metadata).name
        hint = f" (the file looks like {archs.a(guess)} LoRA)" if guess else ""
        raise TrainingError(f"{len(missing)} of {len(parsed.modules)} modules of existing_lora are not layers this "
                            f"model trains{hint}: {describe(missing)}", file=name)
    for target, a in chosen.items():
        try:
            a.check_target(targets[target].weight.shape, target)
        except LoraError as e:
            raise TrainingError(str(e)) from None

    r = Resume(source=name, adapters=chosen, steps=meta.read_steps(file.metadata),
               optimizer=file.metadata.get("lora_lab.optimizer"))
    if "lora_lab.steps" not in file.metadata and "ss_steps" not in file.metadata:
        r.notes.append(f"{name} records no step count; counting from 0")
    state = file.metadata.get("lora_lab.optimizer_state")
    if state:
        r.optimizer_state = _current_names(meta.decode_tensors(state, "lora_lab.optimizer_state", file=name),
                                           cls.name)
    else:
        r.notes.append(f"{name} carries no optimizer state; the optimizer starts fresh")
    if online:
        r.ema = _param_names(ema_file, chosen.keys())
    elif file.metadata.get("lora_lab.weights") == "ema":
        r.notes.append(f"{name} holds EMA weights without the live ones (too large for the header): training "
                       "continues from the EMA")
    return r


def _trainable_or_none(algorithm: str):
    try:
        return trainable(algorithm)
    except TrainingError:
        return None


def _current_names(state: dict[str, torch.Tensor], algorithm: str) -> dict[str, torch.Tensor]:
    """Optimizer state keyed '<target>/<role>/<key>' with the roles of today's adapters (files
    trained before the adapters were unified name them w1a, blocks, …; see LEGACY_ROLES)."""
    legacy = LEGACY_ROLES.get(algorithm, {})
    out = {}
    for key, t in state.items():
        parts = key.rsplit("/", 2)
        if len(parts) == 3:
            parts[1] = legacy.get(parts[1], parts[1])
        out["/".join(parts)] = t
    return out


def _param_names(file: LoraFile, targets) -> dict[str, torch.Tensor]:
    """A file's factors as '<target>/<role>' (the names the loop's parameter table uses)."""
    out = {}
    for prefix, adapters in parse(file.tensors, file=file.name, options={"metadata": file.metadata}).modules.items():
        target = prefix if prefix in targets else canonical(prefix)
        for a in adapters:
            out.update({f"{target}/{role}": t for role, t in a.factors().items() if t is not None and role != "alpha"})
    return out
