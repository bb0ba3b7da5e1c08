"""Continue training from an existing file: its factors, its step count (from metadata, whatever
the file is called) and, when it carries it, its optimizer state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..lora.io import LoraFile
from ..lora.keys import canonical, describe, guess_file_arch
from . import metadata as meta
from .adapters import TRAINABLE, LayerSpec
from .errors import TrainingError

# file suffix -> (algorithm, role), longest first, from the trainable classes
_SUFFIXES = sorted(((s, cls.name, role) for cls in TRAINABLE.values() for s, role in cls.suffixes.items()),
                   key=lambda t: -len(t[0]))


@dataclass
class Resume:
    source: str                                     # file name, for messages and metadata
    factors: dict[str, dict[str, torch.Tensor]]     # target name -> role -> tensor (incl. "alpha")
    steps: int = 0
    optimizer: str | None = None
    optimizer_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None      # '<target>/<role>' -> the EMA, when the file's tensors are one


def _split(key: str) -> tuple[str, str, str] | None:
    """'x.lora_up.weight' -> ('x', 'lora', 'up'); alpha -> ('x', '', 'alpha')."""
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "", "alpha"
    for suffix, algo, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], algo, role
    return None


def load(file: LoraFile, targets: Mapping[str, nn.Module], algorithm: str, arch: str | None) -> Resume:
    """Match ``file`` against the layers being trained; refuse it when it is for another model
    or another algorithm, naming what differs. A file whose tensors are an EMA continues from the
    live factors its header carries, and its tensors seed the EMA."""
    name = file.name
    online = file.metadata.get("lora_lab.online_weights")
    if online:
        ema_file = file
        file = LoraFile(file.path, meta.decode_tensors(online, "lora_lab.online_weights", file=name), file.metadata)
    file_arch = meta.read_architecture(file.metadata)
    if arch and file_arch and file_arch != "unknown" and file_arch != arch:
        raise TrainingError(f"existing_lora was trained for {file_arch!r}, this model is {arch!r}", file=name)

    modules: dict[str, dict[str, torch.Tensor]] = {}
    algos: dict[str, set[str]] = {}
    unknown = []
    for key, t in file.tensors.items():
        hit = _split(key)
        if hit is None:
            unknown.append(key)
            continue
        prefix, algo, role = hit
        modules.setdefault(prefix, {})[role] = t
        if algo:
            algos.setdefault(algo, set()).add(prefix)
    if unknown:
        raise TrainingError(f"existing_lora has {len(unknown)} key(s) that no trainable algorithm continues "
                            f"(e.g. full '.diff' / '.diff_b' tensors or DoRA scales): {describe(unknown)}", file=name)
    if not algos:
        raise TrainingError("existing_lora holds no LoRA/LoHa/LoKr/OFT factors", file=name)
    if set(algos) != {algorithm}:
        found = ", ".join(f"{a} ({len(p)} modules)" for a, p in sorted(algos.items()))
        raise TrainingError(f"existing_lora holds {found}, but the algorithm chosen is {algorithm!r}: choose "
                            f"{' or '.join(sorted(algos))} to continue it, or train a new LoRA", file=name)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    missing = []
    for prefix, f in modules.items():
        if len(f) == 1 and "alpha" in f:
            continue          # a stray alpha without factors: nothing to continue
        target = prefix if prefix in targets else canonical(prefix)
        if target not in targets:
            missing.append(prefix)
            continue
        factors[target] = f
    if missing and all(canonical(m).startswith("lora_te") for m in missing):
        raise TrainingError(f"existing_lora has a text-encoder LoRA ({len(missing)} modules): to continue it, connect "
                            "clip and set text_encoder_lr > 0", file=name)
    if missing:
        shapes = {k: tuple(t.shape) for k, t in file.tensors.items()}
        guess = guess_file_arch(shapes)
        hint = f" (the file looks like a {guess} LoRA)" if guess else ""
        raise TrainingError(f"{len(missing)} of {len(modules)} modules of existing_lora are not layers this model "
                            f"trains{hint}: {describe(missing)}", file=name)
    for target, f in factors.items():
        spec = LayerSpec.of(targets[target])
        TRAINABLE[algorithm].from_factors(spec, f, torch.float32, target)   # shape check, clear message

    r = Resume(source=name, factors=factors, steps=meta.read_steps(file.metadata),
               optimizer=file.metadata.get("lora_lab.optimizer"))
    if "lora_lab.steps" not in file.metadata and "ss_steps" not in file.metadata:
        r.notes.append(f"{name} records no step count; counting from 0")
    state = file.metadata.get("lora_lab.optimizer_state")
    if state:
        r.optimizer_state = meta.decode_tensors(state, "lora_lab.optimizer_state", file=name)
    else:
        r.notes.append(f"{name} carries no optimizer state; the optimizer starts fresh")
    if online:
        r.ema = _param_names(ema_file.tensors, factors.keys())
    elif file.metadata.get("lora_lab.weights") == "ema":
        r.notes.append(f"{name} holds EMA weights without the live ones (too large for the header): training "
                       "continues from the EMA")
    return r


def _param_names(tensors: Mapping[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
    """File tensors as '<target>/<role>' (the names the loop's parameter table uses)."""
    out = {}
    for key, t in tensors.items():
        hit = _split(key)
        if hit is None or hit[2] == "alpha":
            continue
        prefix, _, role = hit
        target = prefix if prefix in targets else canonical(prefix)
        out[f"{target}/{role}"] = t
    return out
