"""Faults to inject in tests (no ComfyUI import)."""
from __future__ import annotations


def disk_full_save_file(tensors, path, metadata=None):
    """Stands in for safetensors.torch.save_file: writes part of the file, then fails as a full disk does."""
    with open(path, "wb") as fh:
        fh.write(b"partial")
    raise OSError(28, "No space left on device")
