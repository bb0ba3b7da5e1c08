"""What the LoRA tools share: the input files, the result a tool returns, the metadata that says how
an output was made, and writing it (atomically, never over an existing file).

Metadata of an output (every value a string, as safetensors requires):
    kohya       ss_network_module, ss_network_dim, ss_network_alpha ("Dynamic" when layers differ),
                ss_network_args (conv_dim / conv_alpha when convolutions differ), ss_base_model_version,
                ss_v2, ss_output_name, ss_training_comment (what the tool did, then the input's comment),
                sshs_model_hash / sshs_legacy_hash (sd-webui-additional-networks' hashes, as kohya's
                tools compute them: tensors + ss_* metadata)
    model spec  modelspec.sai_model_spec, .architecture (<id>/lora or /lycoris), .implementation,
                .title, .date (SOURCE_DATE_EPOCH when set, for reproducible files), .merged_from
    LoRA Lab    lora_lab.version, lora_lab.tool, lora_lab.tool_args (JSON), lora_lab.sources (JSON:
                [{"file", "sshs_model_hash"}]), lora_lab.algorithm, lora_lab.architecture
Carried over from an input (resize, convert): its ss_* / modelspec.* training information. Dropped:
its lora_lab.* keys (resume state: step count, optimizer moments, which no longer fit the factors)
and its old hashes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

import torch

from .. import arch
from ..adapters import Parsed, parse
from ..arch import Identity
from ..errors import LoraError
from ..io import read, relative_parts, write
from ..keys import describe

VERSION = "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One input LoRA file, read and parsed."""
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    parsed: Parsed
    identity: Identity

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def dtype(self) -> torch.dtype:
        """The widest floating dtype of its factors (what "same as the input" saves in)."""
        found = {t.dtype for t in self.tensors.values() if t.is_floating_point()}
        for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            if d in found:
                return torch.float32 if d == torch.float64 else d
        return torch.float32


# A model's key map (file module name -> the model's target), or a function giving one for a file's module
# names: ComfyUI's maps name what core loads, and LoRA Lab adds the names core drops for the modules a
# file has (nodes/comfy_model.key_map with the model bound: diffusers / XLabs / mixed-separator DiT names).
KeyMap = Union[Mapping[str, Any], Callable[[list], Mapping[str, Any]]]


def key_map_for(key_map: KeyMap | None, modules: Iterable[str]) -> Mapping[str, Any] | None:
    """The key map to match a file with these module names against: ``key_map`` itself, or what the
    function gives for them."""
    return key_map(list(modules)) if callable(key_map) else key_map


def load(path: str) -> Source:
    """Read and parse a LoRA file; LoraError when it has keys of no known format (a tool rewriting it
    would lose them) or no LoRA modules at all."""
    f = read(path)
    parsed = parse(f.tensors, file=f.name, options={"metadata": f.metadata})
    ident = arch.identify(f.tensors, f.metadata)
    if ident.kind == "weights":
        raise LoraError(f"this is {arch.a(ident.name or 'model')} checkpoint (plain weights), not a LoRA", file=f.name)
    if parsed.unknown:
        raise LoraError(f"{len(parsed.unknown)} key(s) are of no LoRA format LoRA Lab knows and would be lost: "
                        f"{describe(parsed.unknown)}", file=f.name)
    if not parsed.modules:
        raise LoraError("the file holds no LoRA modules", file=f.name)
    return Source(path, f.tensors, dict(f.metadata), parsed, ident)


def save_dtype(value: str, sources: Iterable[Source] = ()) -> torch.dtype:
    """"auto" (the widest dtype of the inputs), "fp32", "fp16" or "bf16"."""
    if value == "auto":
        found = [s.dtype() for s in sources]
        for d in (torch.float32, torch.bfloat16, torch.float16):
            if d in found:
                return d
        return torch.float32
    if value not in DTYPES:
        raise LoraError(f"dtype {value!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[value]


def dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, d in DTYPES.items() if d == dtype), str(dtype).replace("torch.", ""))


def device_of(value: str | torch.device | None) -> torch.device:
    """"auto"/None: CUDA when torch sees it, else the CPU."""
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


# ---- the result --------------------------------------------------------------------------------------
@dataclass
class Layer:
    """One line of a report: a module of the output and what the tool did to it."""
    name: str
    rank: int | None = None         # rank written (None: not a low-rank module)
    before: str = ""                # what it was ("LoRA rank 16", "sum of 2")
    kept: float | None = None       # Frobenius share of ΔW kept (1 = exact)
    note: str = ""


@dataclass
class Result:
    """What a tool made, before it is written: tensors, metadata (without the name-dependent keys
    ``finish`` adds), the report's summary lines and one Layer per module."""
    tool: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    summary: list[str]
    layers: list[Layer] = field(default_factory=list)

    def report(self, name: str | None = None) -> str:
        head = [f"{self.tool}: {name}" if name else self.tool, *self.summary]
        rows = [_row(x) for x in self.layers]
        return "\n".join(head + (["", "per layer:"] + rows if rows else []))


def _row(x: Layer) -> str:
    parts = [x.name]
    if x.before:
        parts.append(x.before)
    if x.rank is not None:
        parts.append(f"→ rank {x.rank}")
    if x.kept is not None:
        parts.append(f"keeps {100 * x.kept:.2f}% (Frobenius)")
    if x.note:
        parts.append(x.note)
    return "  " + " | ".join(parts)


# ---- metadata ----------------------------------------------------------------------------------------
_DROP = re.compile(r"^(lora_lab\.|sshs_)")


def carried(metadata: Mapping[str, str]) -> dict[str, str]:
    """An input's metadata minus what no longer holds for a rewritten file (see the module docstring)."""
    return {k: v for k, v in metadata.items() if not _DROP.match(k)}


def variant_of(identity: Identity | None) -> arch.Variant | None:
    if identity is None or identity.arch is None:
        return None
    return identity.variant or identity.named_variant or identity.arch.variants[0]


def describe_dims(values: Iterable) -> str:
    """"8" when every layer has the same value, else "Dynamic" (kohya's word for it)."""
    vals = sorted({_num(v) for v in values})
    return vals[0] if len(vals) == 1 else "Dynamic" if vals else "None"


def _num(v) -> str:
    f = float(v)
    return str(int(f)) if f.is_integer() else str(f)


def network(linear: list[tuple[int, float]], conv: list[tuple[int, float]], module: str = "networks.lora") -> dict:
    """ss_network_* keys from (rank, alpha) per linear / per conv (kernel > 1) layer."""
    both = linear or conv
    meta = {"ss_network_module": module,
            "ss_network_dim": describe_dims(r for r, _ in both),
            "ss_network_alpha": describe_dims(a for _, a in both)}
    args = {}
    if conv and linear:
        args = {"conv_dim": describe_dims(r for r, _ in conv), "conv_alpha": describe_dims(a for _, a in conv)}
    meta["ss_network_args"] = json.dumps(args)
    return meta


def describe_arch(identity: Identity | None, algorithm: str = "lora") -> dict[str, str]:
    """kohya / model-spec / LoRA Lab ids of the architecture an output is made for."""
    v = variant_of(identity)
    if v is None:
        return {"lora_lab.algorithm": algorithm}
    ss, spec, impl = v.metadata_ids()
    return {"ss_base_model_version": ss, "ss_v2": str(ss.startswith("sd_v2")),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{spec}/{'lora' if algorithm == 'lora' else 'lycoris'}",
            "modelspec.implementation": impl, "lora_lab.architecture": v.id, "lora_lab.algorithm": algorithm}


def tool_keys(tool: str, args: Mapping, sources: Iterable[Source]) -> dict[str, str]:
    return {"lora_lab.version": VERSION, "lora_lab.tool": tool,
            "lora_lab.tool_args": json.dumps(dict(args), sort_keys=True),
            "lora_lab.sources": json.dumps([{"file": s.name, "sshs_model_hash": s.metadata.get("sshs_model_hash", "")}
                                            for s in sources])}


def comment(what: str, before: str | None) -> str:
    before = (before or "").strip()
    return f"{what}; {before}" if before and before != "None" else what


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    ts = float(epoch) if epoch and epoch.strip().isdigit() else time.time()
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash), computed as kohya's ``precalculate_safetensors_hashes``:
    the file as safetensors would write it with only the ss_* metadata; the new hash is the SHA-256
    of everything after the header, the legacy one of 64 KiB at offset 1 MiB (8 hex digits)."""
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
               {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(raw[:8], "little")
    model = hashlib.sha256(raw[8 + n:]).hexdigest()
    legacy = hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    return model, legacy


def finish(result: Result, output_name: str) -> dict[str, str]:
    """The result's metadata with what depends on the output's name and bytes."""
    meta = dict(result.metadata)
    meta["ss_output_name"] = output_name
    meta["modelspec.title"] = output_name
    meta["modelspec.date"] = _date()
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = hashes(result.tensors, meta)
    return meta


# ---- writing -----------------------------------------------------------------------------------------
def save(result: Result, path: str) -> str:
    """Write ``result`` at ``path`` (.safetensors), atomically; LoraError if a file is there already."""
    if not path.endswith(".safetensors"):
        raise LoraError("the output must be a .safetensors file", file=path)
    if os.path.exists(path):
        raise LoraError("a file of this name exists already; nothing was overwritten", file=path)
    name = os.path.splitext(os.path.basename(path))[0]
    return write(path, result.tensors, finish(result, name), overwrite=False)


def save_in(result: Result, loras_folder: str, filename_prefix: str) -> tuple[str, str]:
    """Write into the loras folder as ``<prefix>_NNNNN.safetensors`` (the first free number; subfolders
    in the prefix are created). Returns (path, name as loader lists show it). LoraError for a prefix
    that leaves the folder."""
    parts = relative_parts(filename_prefix, "filename_prefix")
    if not parts:
        raise LoraError("filename_prefix is empty")
    folder = os.path.join(loras_folder, *parts[:-1])
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LoraError(f"cannot create the folder {folder!r}: {e.strerror or e}") from None
    pattern = re.compile(re.escape(parts[-1]) + r"_(\d{5,})\.safetensors$")
    n = max((int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))), default=0)
    for _ in range(100):    # another writer may take a number between the listing and the write
        n += 1
        path = os.path.join(folder, f"{parts[-1]}_{n:05d}.safetensors")
        try:
            save(result, path)
        except LoraError as e:
            if os.path.exists(path) and "exists already" in str(e):
                continue
            raise
        return path, os.path.relpath(path, loras_folder).replace(os.sep, "/")
    raise LoraError(f"no free file name for {filename_prefix!r} after 100 tries", file=folder)


# ---- output modules ----------------------------------------------------------------------------------
def lora_keys(prefix: str, up: torch.Tensor, down: torch.Tensor, alpha: float, kernel: tuple[int, ...] | None,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file keys of one LoRA module (kohya's: ``.lora_up.weight``, ``.lora_down.weight``, ``.alpha``)
    from up (out, k), down (k, in·k) and the layer's (in, *k) when known (a conv's 4-D factors)."""
    from ..adapters.lora import LoRA

    k = down.shape[0]
    if kernel:
        up = up.reshape(up.shape[0], k, *[1] * (len(kernel) - 1))
        down = down.reshape(k, *kernel)
    return LoRA(up=up.to(dtype).contiguous(), down=down.to(dtype).contiguous(), alpha=float(alpha)).to_state_dict(prefix)


def is_conv(kernel: tuple[int, ...] | None) -> bool:
    """A layer with a kernel larger than 1×1 (kohya's conv rank applies to it)."""
    return bool(kernel) and torch.Size(kernel[1:]).numel() > 1
