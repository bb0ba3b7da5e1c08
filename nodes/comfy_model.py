"""Glue between LoRA Lab's core and ComfyUI's model objects. The only place (with the node
modules) that imports ``comfy``.

Weights are changed through ComfyUI's own ModelPatcher (``add_patches``), so offloading,
lowvram partial loading, hooks and model reuse keep working; our adapters are wrapped as
ComfyUI weight adapters whose ``calculate_weight`` runs LoRA Lab's math.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
from comfy.weight_adapter.base import WeightAdapterBase

from ..lora import LoraError, Parsed, arch, match, parse, read
from ..lora.io import PICKLE_SUFFIXES, read_header
from ..lora import bypass as bypass_mode
from ..lora import dit_keys
from ..lora.adapters.base import Adapter
from ..lora.keys import canonical
from ..lora.patch import mismatch, split_target

log = logging.getLogger("LoRA Lab")


def _is_identity(function) -> bool:
    probe = torch.empty(0)
    try:
        return function is None or function(probe) is probe
    except Exception:
        return False


class ComfyPatch(WeightAdapterBase):
    """A LoRA Lab adapter in the shape ComfyUI's ModelPatcher expects.

    ``calculate_weight`` always works in float32 and writes the result back into the tensor it
    was handed (ComfyUI relies on in-place updates for offset/narrowed keys and returns the
    tensor in its own dtype on the lowvram path), instead of core's half-precision math there.
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.name = adapter.name
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weights=None):
        if strength == 0.0:
            return weight
        work = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
        if _is_identity(function):
            out = self.adapter.apply_(work, strength)
        else:
            patched = self.adapter.apply_(work.clone(), strength)
            out = work.add_(function(patched - work))
        if out is not weight:
            weight.copy_(out)
        return weight

    def __repr__(self):
        return f"ComfyPatch({self.adapter!r})"


_Backup = collections.namedtuple("Backup", ["weight", "inplace_update"])  # what unpatch_model reads
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class _Scratch(threading.local):
    """One float32 work buffer per device, alive only while a patcher loads (see FastPatch.load)."""
    depth = 0
    buffers: dict

    def get(self, device: torch.device, shape: torch.Size) -> torch.Tensor:
        if self.depth == 0:   # used outside a load(): no reuse, plain temporary
            return torch.empty(shape, dtype=torch.float32, device=device)
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < shape.numel():
            buf = self.buffers[device] = torch.empty(shape.numel(), dtype=torch.float32, device=device)
        return buf[: shape.numel()].view(shape)


_scratch = _Scratch()


class FastPatch:
    """Mixin for a ModelPatcher clone that carries LoRA Lab patches.

    Everything stays ComfyUI's: the same ``patches`` dict, ``backup`` entries and
    ``unpatch_model``, the lowvram path (LowVramPatch calling ComfyPatch). Only a full-weight
    patch made entirely of our adapters takes a faster route: the weight is converted into one
    reused float32 buffer, LoRA factors are accumulated into it in place (no ΔW-sized temporary),
    and it is written once into a new tensor of the weight's dtype. Core allocates a float32 copy,
    a ΔW, a scaled ΔW and the result for every weight; those page faults dominate its time.
    ``clone()`` uses ``self.__class__``, so clones made downstream keep the fast route.
    """

    def load(self, *args, **kwargs):
        _scratch.depth += 1
        if _scratch.depth == 1:
            _scratch.buffers = {}
        try:
            return super().load(*args, **kwargs)
        finally:
            _scratch.depth -= 1
            if _scratch.depth == 0:
                _scratch.buffers = {}

    @torch.no_grad()
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        patches = self.patches.get(key)
        if not patches or not all(isinstance(p[1], ComfyPatch) and p[2] == 1.0 and p[3] is None and p[4] is None
                                  for p in patches):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        weight, set_func, convert_func = comfy.model_patcher.get_key_weight(self.model, key)
        if set_func is not None or convert_func is not None or weight.dtype not in _FLOATS:
            return super().patch_weight_to_device(key, device_to, inplace_update)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            self.backup[key] = _Backup(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        device = weight.device if device_to is None else torch.device(device_to)
        work = _scratch.get(device, weight.shape)
        work.copy_(weight)
        for strength, patch, *_ in patches:
            if strength != 0.0:
                work = patch.adapter.apply_(work, strength)
        if inplace_update:
            comfy.utils.copy_to_param(self.model, key, work)
        else:
            out = torch.empty(weight.shape, dtype=weight.dtype, device=device)
            out.copy_(work)
            comfy.utils.set_attr_param(self.model, key, out)


_fast_classes: dict[type, type] = {}


def fast_patcher(patcher):
    """Give a (freshly cloned, ours) ModelPatcher the FastPatch route; returns it."""
    cls = type(patcher)
    if not issubclass(cls, FastPatch):
        sub = _fast_classes.get(cls)
        if sub is None:
            sub = _fast_classes[cls] = type(f"LoraLab{cls.__name__}", (FastPatch, cls), {})
        patcher.__class__ = sub
    return patcher


BYPASS_KEY = "loralab_bypass"


def add_bypass(patcher, changes: list[tuple[str, Adapter, float]]) -> int:
    """Apply adapters in the forward pass of ``patcher``'s model (never writing a weight).

    Installed as a ModelPatcher injection: ComfyUI injects it when this clone is loaded and ejects
    it when another clone of the same model takes over, so a strength change swaps hooks and
    never re-patches or reloads weights. Works for weights that cannot be patched in place (fp8,
    quantised ops): the layer's own forward runs untouched.
    """
    if not changes:
        return 0
    state = {}

    def inject(mp):
        state["handle"] = bypass_mode.attach(mp.model, changes)

    def eject(mp):
        handle = state.pop("handle", None)
        if handle is not None:
            handle.remove()

    injections = list(patcher.get_injections(BYPASS_KEY) or [])
    injections.append(comfy.patcher_extension.PatcherInjection(inject=inject, eject=eject))
    patcher.set_injections(BYPASS_KEY, injections)
    return len(changes)


def _bypass_changes(root: torch.nn.Module, patches: dict, strength: float):
    """Split patches into bypass changes (whole tensors of Linear/Conv layers, and row blocks of their
    weights: q, k, v of a fused qkv) and the rest (merged: norms, layout-changed targets, grouped convs)."""
    sd_keys = set(root.state_dict().keys())
    changes, rest = [], {}
    modules = dict(root.named_modules())
    for key, patch in patches.items():
        name, offset, function = split_target(key)
        if name not in sd_keys:
            continue
        owner = modules.get(name.rpartition(".")[0])
        try:
            op = bypass_mode.Op.of(owner)
        except TypeError:
            rest[key] = patch         # not a Linear/Conv (e.g. a norm): merged instead
            continue
        if function is not None or (offset is not None and (offset[0] != 0 or op.groups != 1
                                                            or patch.adapter.target != "weight")):
            rest[key] = patch         # no forward route for this target (rows of a bias too): merged instead
            continue
        changes.append((key, patch.adapter, strength))
    return changes, rest


@dataclass
class Report:
    text: str
    patched_model: int = 0
    patched_clip: int = 0


def model_arch(model) -> arch.Identity | None:
    """What a MODEL is, from the table: its variant by ComfyUI model-config class and unet_config, its
    width (for the size label) from its weights' shapes."""
    if model is None:
        return None
    config = model.model.model_config
    shapes = {k: getattr(v, "shape", ()) for k, v in model.model.diffusion_model.state_dict().items()}
    return arch.identify_model(type(config).__name__, config.unet_config, shapes=shapes)


def key_map(model, clip, modules=()) -> dict:
    """File module name -> the model's target, for ``lora.patch.match``.

    ComfyUI's own maps (``comfy.lora.model_lora_keys_unet/clip``) first; then, for the ``modules`` of the
    file that neither they nor their kohya form (``keys.canonical``) name, LoRA Lab's
    (``lora.dit_keys.comfy_targets``: the model's module paths in any wrapper and separator, and the
    diffusers / XLabs / original names core drops for Flux, HunyuanVideo, Wan, Lumina 2 and Z-Image).
    Where ComfyUI has a name it decides, so what core loads right loads the same.
    """
    km: dict = {}
    if model is not None:
        km = comfy.lora.model_lora_keys_unet(model.model, km)
    if clip is not None:
        km = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, km)
    missing = [m for m in modules if m not in km and canonical(m) not in km]
    if model is not None and missing:
        ident = model_arch(model)
        shapes = {k: v.shape for k, v in model.model.state_dict().items() if k.startswith(dit_keys.UNET)}
        km.update(dit_keys.comfy_targets(ident.arch if ident is not None else None, missing, shapes))
    return km


def _target_shape(root: torch.nn.Module, key) -> torch.Size | None:
    name, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
    try:
        t = comfy.utils.get_attr(root, name)
    except AttributeError:
        return None
    shape = list(t.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return torch.Size(shape)


def _patch(patcher, root: torch.nn.Module, patches: dict, strength: float, bypass: bool) -> tuple[int, int]:
    """Add patches to ``patcher`` (merged, or bypass hooks); returns (tensors handled, merged instead)."""
    if not bypass:
        return len(patcher.add_patches(patches, strength)), 0
    changes, rest = _bypass_changes(root, patches, strength)
    merged = len(patcher.add_patches(rest, strength)) if rest else 0
    return add_bypass(patcher, changes) + merged, merged


def load_lora(model, clip, source, strength_model: float, strength_clip: float, *,
              options: dict | None = None, cache: dict | None = None,
              bypass: bool = False, require_match: bool = False) -> tuple[object, object, Report]:
    """Patch clones of ``model`` / ``clip`` with a LoRA; inputs are never mutated.

    ``source``: a file path, or a LORA_MODEL (a plain state dict, as core's TrainLoraNode and ours
    produce). Raises LoraError (naming file, key and shapes) before anything is cloned when the
    file is unreadable or a factor does not fit its target, and, with ``require_match``, when none
    of its keys match (the error is the report).
    """
    if isinstance(source, dict):
        name = "LORA_MODEL input"
        parsed, n_keys, file_arch = _parsed_dict(source, name, options or {})
    else:
        name = os.path.basename(source)
        parsed, n_keys, file_arch = _parsed(source, options or {}, cache)
    use_model = model is not None and strength_model != 0.0
    use_clip = clip is not None and strength_clip != 0.0
    km = key_map(model, clip, parsed.modules)
    skip = () if clip is not None else ("lora_te",)
    m = match(parsed, km, file=name, n_file_keys=n_keys, skip=skip)

    roots = []
    if model is not None:
        roots.append(model.model)
    if clip is not None:
        roots.append(clip.cond_stage_model)
    model_id = model_arch(model)
    patches = {}
    for t in m.targets:
        shape = next((s for s in (_target_shape(r, t.key) for r in roots) if s is not None), None)
        if shape is not None:
            try:
                t.adapter.check_target(shape, t.key if isinstance(t.key, str) else t.key[0])
            except LoraError as e:
                raise _with_diagnosis(e, file_arch, model_id) from None
        patches[t.key] = ComfyPatch(t.adapter)

    new_model, new_clip = model, clip
    n_model = n_clip = 0
    merged_instead = 0
    if use_model:
        new_model = fast_patcher(model.clone())
        n_model, k = _patch(new_model, model.model, patches, strength_model, bypass)
        merged_instead += k
    if use_clip:
        new_clip = clip.clone()
        fast_patcher(new_clip.patcher)
        n_clip, k = _patch(new_clip.patcher, clip.cond_stage_model, patches, strength_clip, bypass)
        merged_instead += k

    text = m.summary(file_arch, model_id)
    how = "bypassed (applied in the forward pass)" if bypass else "patched"
    text += f"\n{how} {n_model} model tensor(s) at strength {strength_model:g}"
    if clip is not None:
        text += f", {n_clip} text-encoder tensor(s) at strength {strength_clip:g}"
    if merged_instead:
        text += (f"; {merged_instead} tensor(s) merged instead (no forward route: not a Linear/Conv weight, "
                 "or a target whose rows the key map reorders)")
    n_te = 0 if clip is not None else sum(canonical(p).startswith("lora_te") for p in parsed.modules)
    if n_te:
        text += f"; {n_te} text-encoder module(s) ignored (no CLIP input)"
    (log.info if m.ok and not m.unmatched and not m.unknown else log.warning)("%s", text)
    if require_match and not m.ok:
        raise LoraError(f"{text}\n(on_no_match is 'stop the run': set it to 'warn' to pass the model through)")
    return new_model, new_clip, Report(text, n_model, n_clip)


def _with_diagnosis(e: LoraError, file_arch, model_id) -> LoraError:
    """A shape error, plus what the file and the model are when they differ (a 1.3B LoRA on a 14B model)."""
    said = mismatch(file_arch, model_id)
    if said is None:
        return e
    out = LoraError(f"{e}. The file is {said} ({file_arch.why}): load it on {arch.a(file_arch.name)} model")
    out.file, out.key = e.file, e.key
    return out


def _parsed_dict(sd: dict, name: str, options: dict):
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LoraError(f"LORA_MODEL must map key names to tensors; {len(bad)} value(s) are not tensors "
                        f"(first: {bad[0]!r})", file=name)
    parsed = parse(sd, file=name, options=options)
    return parsed, len(sd), arch.identify(sd)


def _shapes_and_metadata(path: str):
    """(key -> shape, metadata) from a safetensors header alone; None for a pickle or a header
    ``read`` will refuse (it then says why)."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        return None
    try:
        h = read_header(path)
    except LoraError:
        return None
    return h.shapes, h.metadata


def _parsed(path: str, options: dict, cache: dict | None):
    st = os.stat(path)
    ident = (path, st.st_mtime_ns, st.st_size, tuple(sorted(options.items())))
    if cache is not None and cache.get("ident") == ident:
        return cache["value"]
    header = _shapes_and_metadata(path)
    identity = arch.identify(*header) if header else None
    if identity is not None and identity.kind == "weights":
        # a checkpoint in the loras folder: say so from its header, without reading gigabytes of weights
        value = (Parsed({}, {}, sorted(header[0])), len(header[0]), identity)
    else:
        f = read(path)
        parsed = parse(f.tensors, file=f.name, options={**options, "metadata": f.metadata})
        value = (parsed, len(f.tensors), identity or arch.identify(f.tensors, f.metadata))
    if cache is not None:
        cache.clear()
        cache.update(ident=ident, value=value)
    return value
