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
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
from comfy.weight_adapter.base import WeightAdapterBase

from ..lora import LoraError, Parsed, arch, blocks, match, parse, read
from ..lora.io import PICKLE_SUFFIXES, read_header
from ..lora import bypass as bypass_mode
from ..lora import dit_keys
from ..lora.adapters.base import Adapter
from ..lora.keys import canonical
from ..lora.patch import accumulate_, mismatch, split_target

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
    """float32 work buffers per device (the weight, and a stack's stacked LoRA factors: ``slot``),
    alive only while a patcher loads (see FastPatch.load)."""
    depth = 0
    buffers: dict

    def get(self, device: torch.device, shape, slot: str = "work") -> torch.Tensor:
        shape = torch.Size(shape)
        if self.depth == 0:   # used outside a load(): no reuse, plain temporary
            return torch.empty(shape, dtype=torch.float32, device=device)
        buf = self.buffers.get((device, slot))
        if buf is None or buf.numel() < shape.numel():
            buf = self.buffers[(device, slot)] = torch.empty(shape.numel(), dtype=torch.float32, device=device)
        return buf[: shape.numel()].view(shape)


_scratch = _Scratch()


class FastPatch:
    """Mixin for a ModelPatcher clone that carries LoRA Lab patches.

    Everything stays ComfyUI's: the same ``patches`` dict, ``backup`` entries and
    ``unpatch_model``, the lowvram path (LowVramPatch calling ComfyPatch). Only a full-weight
    patch made entirely of our adapters takes a faster route: the weight is converted into one
    reused float32 buffer, LoRA factors are accumulated into it in place (no ΔW-sized temporary;
    a stack's LoRAs in one product, ``lora.patch.accumulate_``), and it is written once into a new
    tensor of the weight's dtype. Core allocates a float32 copy,
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
        work = accumulate_(work, [(patch.adapter, strength) for strength, patch, *_ in patches], _scratch.get)
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


class _Root:
    """A model (or CLIP) module with its tensor keys and modules, looked up once per load."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.keys = set(module.state_dict().keys())
        self.modules = dict(module.named_modules())

    def bypass_split(self, patches: dict, strength_of) -> tuple[list, dict[float, dict]]:
        """(bypass changes: (key, adapter, strength) for whole tensors of Linear/Conv layers and row
        blocks of their weights, q, k, v of a fused qkv; the rest to merge, grouped by strength: norms,
        layout-changed targets, grouped convs, rows of a bias). Keys of other roots are left out;
        strength 0 is skipped."""
        changes, rest = [], {}
        for key, patch in patches.items():
            name, offset, function = split_target(key)
            if name not in self.keys:
                continue
            strength = strength_of(key)
            if strength == 0.0:
                continue
            try:
                op = bypass_mode.Op.of(self.modules.get(name.rpartition(".")[0]))
            except TypeError:
                op = None             # not a Linear/Conv (e.g. a norm): merged instead
            routed = op is not None and function is None and (
                offset is None or (offset[0] == 0 and op.groups == 1 and patch.adapter.target == "weight"))
            if routed:
                changes.append((key, patch.adapter, strength))
            else:
                rest.setdefault(strength, {})[key] = patch
        return changes, rest

    def merge_groups(self, patches: dict, strength_of) -> dict[float, dict]:
        """This root's patches grouped by strength (add_patches takes one per call); 0 skipped."""
        groups: dict[float, dict] = {}
        for key, patch in patches.items():
            if split_target(key)[0] in self.keys:
                strength = strength_of(key)
                if strength != 0.0:
                    groups.setdefault(strength, {})[key] = patch
        return groups


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
    """File module name -> the model's target, for ``lora.patch.match`` (see :class:`ModelKeys`)."""
    return ModelKeys(model, clip).for_file(modules)


class ModelKeys:
    """A model's key maps for LoRA files.

    ComfyUI's own maps (``comfy.lora.model_lora_keys_unet/clip``) first; then, for the modules of a
    file that neither they nor their kohya form (``keys.canonical``) name, LoRA Lab's
    (``lora.dit_keys.comfy_targets``: the model's module paths in any wrapper and separator, and the
    diffusers / XLabs / original names core drops for Flux, HunyuanVideo, Wan, Lumina 2 and Z-Image).
    Where ComfyUI has a name it decides, so what core loads right loads the same. ComfyUI's maps are
    built once; the model's family and weight shapes once, for the first file that needs them (a
    stack's files share both).
    """

    def __init__(self, model, clip, ident: arch.Identity | None = None):
        self.model = model
        self.comfy: dict = {}
        if model is not None:
            self.comfy = comfy.lora.model_lora_keys_unet(model.model, self.comfy)
        if clip is not None:
            self.comfy = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, self.comfy)
        self._ident = ident
        self._shapes: dict | None = None

    def for_file(self, modules) -> dict:
        """The map for a file with these module names (ComfyUI's own when it names them all)."""
        missing = [m for m in modules if m not in self.comfy and canonical(m) not in self.comfy]
        if self.model is None or not missing:
            return self.comfy
        if self._shapes is None:
            self._ident = self._ident or model_arch(self.model)
            self._shapes = {k: v.shape for k, v in self.model.model.state_dict().items()
                            if k.startswith(dit_keys.UNET)}
        family = self._ident.arch if self._ident is not None else None
        return {**self.comfy, **dit_keys.comfy_targets(family, missing, self._shapes)}


def _target_shape(root: torch.nn.Module, key) -> torch.Size | None:
    name, offset, _ = split_target(key)
    try:
        t = comfy.utils.get_attr(root, name)
    except AttributeError:
        return None
    shape = list(t.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return torch.Size(shape)


@dataclass
class Item:
    """One LoRA of a stack for :func:`load_loras`."""
    source: object                  # a file path, or a LORA_MODEL (a plain state dict)
    strength_model: float = 1.0
    strength_clip: float = 1.0
    options: dict = field(default_factory=dict)
    blocks: str = ""                # block weights: a preset name or a vector (lora.blocks); "" none
    label: str = ""                 # where it came from ("row 2"), prefixed to its report and errors


@dataclass
class _Prepared:
    item: Item
    patches: dict                   # model / CLIP tensor key -> ComfyPatch
    match: object                   # lora.patch.Match
    file_arch: object
    weights: dict | None            # block name -> weight
    n_te_ignored: int
    blocks_layout: object = None    # lora.blocks.Blocks of the model, when weights are given
    n_model: int = 0
    n_clip: int = 0
    merged_instead: int = 0

    def strength_of(self, strength: float):
        if self.weights is None:
            return lambda key: strength
        layout = self.blocks_layout
        return lambda key: strength * blocks.weight_of(layout, self.weights, key)


def _labelled(e: LoraError, label: str) -> LoraError:
    if not label:
        return e
    out = LoraError(f"{label}: {e}")
    out.file, out.key = e.file, e.key
    return out


def _prepare(item: Item, keys: ModelKeys, roots: list, model_id, has_clip: bool, cache: dict | None) -> _Prepared:
    """Read, match and check one item against the model (raises LoraError; nothing is cloned)."""
    if isinstance(item.source, dict):
        name = "LORA_MODEL input"
        parsed, n_keys, file_arch = _parsed_dict(item.source, name, item.options)
    else:
        name = os.path.basename(item.source)
        sub = None if cache is None else cache.setdefault(item.source, {})
        parsed, n_keys, file_arch = _parsed(item.source, item.options, sub)
    m = match(parsed, keys.for_file(parsed.modules), file=name, n_file_keys=n_keys, skip=() if has_clip else ("lora_te",))
    patches = {}
    for t in m.targets:
        shape = next((s for s in (_target_shape(r, t.key) for r in roots) if s is not None), None)
        if shape is not None:
            try:
                t.adapter.check_target(shape, split_target(t.key)[0])
            except LoraError as e:
                raise _with_diagnosis(e, file_arch, model_id) from None
        patches[t.key] = ComfyPatch(t.adapter)
    p = _Prepared(item, patches, m, file_arch, None,
                  0 if has_clip else sum(canonical(x).startswith("lora_te") for x in parsed.modules))
    if item.blocks:
        model_family = model_id.arch if model_id is not None else None
        p.blocks_layout = blocks.layout(model_family)
        p.weights = blocks.weights_for(model_family, item.blocks)
    return p


def _item_text(p: _Prepared, model_id, bypass: bool, has_clip: bool) -> str:
    it = p.item
    text = p.match.summary(p.file_arch, model_id)
    how = "bypassed (applied in the forward pass)" if bypass else "patched"
    text += f"\n{how} {p.n_model} model tensor(s) at strength {it.strength_model:g}"
    if has_clip:
        text += f", {p.n_clip} text-encoder tensor(s) at strength {it.strength_clip:g}"
    if p.weights is not None:
        text += f"\nblock weights {it.blocks}: {blocks.describe(p.blocks_layout, p.weights)}"
    if p.merged_instead:
        text += (f"; {p.merged_instead} tensor(s) merged instead (no forward route: not a Linear/Conv weight, "
                 "or a target whose rows the key map reorders)")
    if p.n_te_ignored:
        text += f"; {p.n_te_ignored} text-encoder module(s) ignored (no CLIP input)"
    return f"{it.label}: {text}" if it.label else text


def _add(patcher, root: _Root, p: _Prepared, strength: float, bypass: bool, changes: list) -> tuple[int, int]:
    """Add one item's patches to ``patcher`` at ``strength`` × its block weights: merged now, or its
    bypass changes appended to ``changes`` (installed once for the whole stack). Returns (tensors
    handled, of which merged instead of bypassed)."""
    strength_of = p.strength_of(strength)
    if bypass:
        found, rest = root.bypass_split(p.patches, strength_of)
        changes.extend(found)
    else:
        found, rest = [], root.merge_groups(p.patches, strength_of)
    merged = sum(len(patcher.add_patches(group, s)) for s, group in rest.items())
    return len(found) + merged, merged if bypass else 0


def load_loras(model, clip, items: list[Item], *, cache: dict | None = None, bypass: bool = False,
               require_match: bool = False) -> tuple[object, object, Report]:
    """Patch ONE clone of ``model`` and of ``clip`` with every item, in order; inputs are never mutated.

    Every item is read, matched and checked (and its block weights resolved) before anything is
    cloned: a LoraError (prefixed with the item's label) leaves nothing half-done. All items' patches
    go onto the same clone (merged), or into one forward-pass injection (``bypass``). ``cache``: a
    dict the caller keeps between runs (parsed files by path). With ``require_match``, an item none
    of whose keys match raises with its report.
    """
    model_id = model_arch(model)
    keys = ModelKeys(model, clip, model_id)
    roots = [r for r in (model.model if model is not None else None,
                         clip.cond_stage_model if clip is not None else None) if r is not None]
    prepared = []
    for item in items:
        try:
            prepared.append(_prepare(item, keys, roots, model_id, clip is not None, cache))
        except LoraError as e:
            raise _labelled(e, item.label) from None
    if cache is not None:   # forget files no longer in the stack
        used = {it.source for it in items if isinstance(it.source, str)}
        for path in [k for k in cache if k not in used]:
            del cache[path]
    if require_match:
        for p in prepared:
            if not p.match.ok:
                text = _item_text(p, model_id, bypass, clip is not None)
                raise LoraError(f"{text}\n(on_no_match is 'stop the run': set it to 'warn' to pass the model through)")

    new_model, new_clip = model, clip
    use_model = model is not None and any(p.item.strength_model != 0.0 for p in prepared)
    use_clip = clip is not None and any(p.item.strength_clip != 0.0 for p in prepared)
    if use_model:
        new_model = fast_patcher(model.clone())
        model_root, model_changes = _Root(model.model), []
    if use_clip:
        new_clip = clip.clone()
        fast_patcher(new_clip.patcher)
        clip_root, clip_changes = _Root(clip.cond_stage_model), []
    for p in prepared:
        if use_model and p.item.strength_model != 0.0:
            p.n_model, k = _add(new_model, model_root, p, p.item.strength_model, bypass, model_changes)
            p.merged_instead += k
        if use_clip and p.item.strength_clip != 0.0:
            p.n_clip, k = _add(new_clip.patcher, clip_root, p, p.item.strength_clip, bypass, clip_changes)
            p.merged_instead += k
    if use_model:
        add_bypass(new_model, model_changes)
    if use_clip:
        add_bypass(new_clip.patcher, clip_changes)

    texts = []
    for p in prepared:
        texts.append(_item_text(p, model_id, bypass, clip is not None))
        clean = p.match.ok and not p.match.unmatched and not p.match.unknown
        (log.info if clean else log.warning)("%s", texts[-1])
    n_model, n_clip = sum(p.n_model for p in prepared), sum(p.n_clip for p in prepared)
    return new_model, new_clip, Report("\n\n".join(texts), n_model, n_clip)


def load_lora(model, clip, source, strength_model: float, strength_clip: float, *,
              options: dict | None = None, cache: dict | None = None,
              bypass: bool = False, require_match: bool = False) -> tuple[object, object, Report]:
    """Patch clones of ``model`` / ``clip`` with one LoRA (:func:`load_loras` with one item).

    ``source``: a file path, or a LORA_MODEL (a plain state dict, as core's TrainLoraNode and ours
    produce). Raises LoraError (naming file, key and shapes) before anything is cloned when the
    file is unreadable or a factor does not fit its target, and, with ``require_match``, when none
    of its keys match (the error is the report).
    """
    return load_loras(model, clip, [Item(source, strength_model, strength_clip, options or {})], cache=cache,
                      bypass=bypass, require_match=require_match)


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
