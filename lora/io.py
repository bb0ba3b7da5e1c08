"""Reading and writing LoRA files: safetensors with metadata, pickle only when it is plain tensors.

Every failure is a LoraError naming the file; nothing here writes anywhere but the target path,
and ``write`` is atomic (temporary file in the same folder, fsync, rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch

from .errors import LoraError, check_finite

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class LoraFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def read(path: str, *, check: bool = True) -> LoraFile:
    """Load every tensor (on the CPU) and the header metadata of a LoRA file."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraError("no such file", file=path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        tensors, metadata = _read_pickle(path), {}
    else:
        tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise LoraError("the file holds no tensors", file=name)
    if check:
        for k, t in tensors.items():
            check_finite(t, what="factor", file=name, key=k)
    return LoraFile(path, tensors, metadata)


MAX_HEADER = 100 * 1000 * 1000   # bytes; the safetensors library refuses larger headers too


def _header_length(fh, size: int, name: str) -> int:
    """The JSON header's length from the 8-byte prefix, checked against the file size."""
    head = fh.read(8)
    if len(head) < 8:
        raise LoraError(f"file is {size} bytes long, too short to be safetensors (truncated?)", file=name)
    header_len = int.from_bytes(head, "little")
    if header_len + 8 > size:
        raise LoraError(f"header claims {header_len} bytes but the file has only {size - 8} after it "
                        "(truncated or not a safetensors file)", file=name)
    if header_len > MAX_HEADER:
        raise LoraError(f"header claims {header_len} bytes, more than safetensors allows ({MAX_HEADER})", file=name)
    return header_len


@dataclass
class Header:
    """A safetensors file's header: what it says about itself, without any tensor data."""
    path: str
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]     # tensor name -> shape
    dtypes: dict[str, str]                 # tensor name -> safetensors dtype ("F16", "BF16", ...)
    size: int                              # the file's size in bytes

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def read_header(path: str) -> Header:
    """Read only the 8-byte length and the JSON header of a safetensors file; never the tensors.

    Cheap for files of any size (one small read), so UIs can list and describe many files.
    """
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header_len = _header_length(fh, size, name)
            raw = fh.read(header_len)
    except OSError as e:
        raise LoraError(f"cannot read: {e.strerror or e}", file=name) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"not a valid safetensors file: the header is not JSON ({e})", file=name) from None
    if not isinstance(header, dict):
        raise LoraError("not a valid safetensors file: the header is not a JSON object", file=name)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LoraError("not a valid safetensors file: __metadata__ must map names to strings", file=name)
    shapes, dtypes = {}, {}
    for k, v in header.items():
        shape = v.get("shape") if isinstance(v, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or not isinstance(v.get("dtype"), str):
            raise LoraError("not a valid safetensors file: the entry has no dtype or shape", file=name, key=k)
        shapes[k] = tuple(shape)
        dtypes[k] = v["dtype"]
    return Header(path, dict(meta), shapes, dtypes, size)


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            _header_length(fh, size, name)
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except LoraError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"not a valid safetensors file: {e}", file=name) from None
    return tensors, metadata


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    name = os.path.basename(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... all mean "refused"
        raise LoraError("refusing to load this pickle file: it does not load with "
                        f"torch.load(weights_only=True) ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                        "Convert it to .safetensors", file=name) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraError("pickle file is not a flat dict of tensors", file=name)
    return dict(obj)


def write(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
          overwrite: bool = True) -> str:
    """Write safetensors atomically: a reader sees the old file or the whole new one, never a part.

    ``overwrite=False``: the file appears under ``path`` only if no file is there (a hard link of the
    finished temporary, which fails rather than replace, even when two writers race); otherwise
    LoraError and nothing is left behind."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LoraError(f"folder {folder!r} does not exist", file=path)
    if not os.access(folder, os.W_OK):
        raise LoraError(f"folder {folder!r} is not writable", file=path)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise LoraError(f"could not write: {e}", file=path) from None
        raise
    return path


def _place_new(tmp: str, path: str) -> None:
    """Move the finished ``tmp`` to ``path`` unless a file is there. A hard link is atomic and fails
    on an existing name; where the file system has no hard links, the name is claimed first
    (O_EXCL) and then replaced by the finished file."""
    exists = LoraError("a file of this name exists already; nothing was overwritten", file=path)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise exists from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def relative_parts(value: str, what: str) -> list[str]:
    """The folder parts of a name meant to stay inside a models folder; refuses one that leaves it.

    Absolute paths, drive letters and ``..`` components are refused outright rather than
    silently rewritten, so a crafted API prompt gets a clear error instead of some other file.
    """
    unix = value.replace("\\", "/")
    parts = [p for p in unix.split("/") if p not in ("", ".")]
    if os.path.isabs(value) or unix.startswith("/") or (len(value) > 1 and value[1] == ":") or ".." in parts:
        raise LoraError(f"{what} {value!r} must stay inside the loras folders (no absolute path, no '..')")
    return parts


def resolve_in(folders: list[str], name: str) -> str:
    """Full path of ``name`` inside one of ``folders``; refuses names that try to leave them.

    ``name`` is what a loader combo holds: a path relative to a loras folder, subfolders allowed.
    """
    parts = relative_parts(name, "lora_name")
    for folder in folders:
        full = os.path.join(folder, *parts)
        if os.path.isfile(full):
            return full
    raise LoraError(f"not found in the loras folders ({', '.join(folders) or 'none configured'})", file=name)
