"""Write a trained LoRA where every loader finds it: a loras folder, atomically, with metadata."""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from ..lora.errors import LoraError
from ..lora.io import relative_parts, write
from . import metadata as meta


def next_path(folder: str, prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors`` with the first number not yet taken."""
    pattern = re.compile(re.escape(prefix) + r"_(\d{5,})\.safetensors$")
    taken = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    return os.path.join(folder, f"{prefix}_{max(taken, default=0) + 1:05d}.safetensors")


def save(lora: Mapping[str, torch.Tensor], loras_folder: str, *, subfolder: str = "",
         filename_prefix: str = "lora", trigger_words: str = "", optimizer_state: bool = True) -> tuple[str, str]:
    """Save ``lora`` under ``loras_folder/subfolder`` as ``<prefix>_NNNNN.safetensors``.

    Returns (full path, name relative to the loras folder, as loader combos list it). The write is
    atomic (temporary file in the same folder, then rename): a failure leaves no partial file.
    """
    if not lora:
        raise LoraError("the LoRA to save is empty")
    prefix_parts = relative_parts(filename_prefix, "filename_prefix")
    if not prefix_parts:
        raise LoraError("filename_prefix is empty")
    parts = relative_parts(subfolder, "subfolder") + prefix_parts
    folder = os.path.join(loras_folder, *parts[:-1])
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LoraError(f"cannot create the folder {folder!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise LoraError(f"the folder {folder!r} is not writable")
    path = next_path(folder, parts[-1])
    save_to(lora, path, trigger_words=trigger_words, optimizer_state=optimizer_state)
    return path, os.path.relpath(path, loras_folder).replace(os.sep, "/")


def save_to(lora: Mapping[str, torch.Tensor], path: str, *, trigger_words: str = "",
            optimizer_state: bool = True, overwrite: bool = False) -> str:
    """Write ``lora`` to exactly ``path`` (atomic; an existing file is refused unless ``overwrite``),
    with the metadata and, unless ``optimizer_state`` is False, the resume state."""
    if not lora:
        raise LoraError("the LoRA to save is empty")
    if os.path.exists(path) and not overwrite:
        raise LoraError("the file exists already: choose another output name (nothing is overwritten)", file=path)
    output_name = os.path.splitext(os.path.basename(path))[0]
    info = getattr(lora, "info", None) or meta.from_keys(lora)
    online = meta.encode_tensors(getattr(lora, "online_weights", None)) if optimizer_state else None
    budget = meta.MAX_OPTIMIZER_STATE - len(online or "")
    state = meta.encode_tensors(getattr(lora, "optimizer_state", None), budget) if optimizer_state else None
    header = meta.build(info, output_name=output_name, trigger_words=trigger_words, optimizer_state=state,
                        online_weights=online)
    return write(path, dict(lora), header)
