"""Match a parsed LoRA file against a model's keys, and patch / restore plain torch tensors.

``match`` is shared by the standalone path and the ComfyUI nodes (which pass ComfyUI's own key
map). ``apply`` changes tensors in place in their own dtype (math in float32) and returns a
handle whose ``restore`` gives back every original value bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .adapters import Parsed
from .adapters.base import Adapter
from .arch import Arch, Identity, a, flat_name
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

    def summary(self, file: Identity | None = None, model: Identity | None = None) -> str:
        """The load report: how much matched, and when something is off, why and what to do.

        ``file``: ``arch.identify`` of the file (keys, shapes, metadata); ``model``: the model's
        Identity (``arch.identify_model`` in ComfyUI, ``arch.identify`` of its tensors standalone).
        The first line always starts "NAME: N of M keys match this model" (the UI parses it).
        """
        head = f"{self.file}: {self.n_matched_keys} of {self.n_file_keys} keys match this model " \
               f"({_share(self.n_matched_keys, self.n_file_keys)}"
        head += f", {len(self.targets)} tensors patched)" if self.targets else ")"
        verdict, advice = _diagnose(self, file, model)
        lines = [head + (f": {verdict}" if verdict else "")] + advice
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} module(s) not in this model: {describe(self.unmatched)}")
        if self.unknown and not (file is not None and file.kind == "weights"):   # a checkpoint: said above
            lines.append(f"{len(self.unknown)} key(s) of no known format: {describe(self.unknown)}")
        return "\n".join(lines)


def _share(n: int, total: int) -> str:
    """'99%' (rounded down, so only a full match reads 100%), '<1%' for a few of very many."""
    if not total:
        return "0%"
    pct = 100 * n // total
    return "<1%" if n and not pct else f"{pct}%"


# where a file of plain weights belongs, by the parts it holds
_WEIGHTS_HOME = {
    ("diffusion model",): ("diffusion-model checkpoint", "models/diffusion_models (Load Diffusion Model)"),
    ("text encoder",): ("text-encoder checkpoint", "models/text_encoders (Load CLIP)"),
    ("VAE",): ("VAE checkpoint", "models/vae (Load VAE)"),
}


def mismatch(file: Identity | None, model: Identity | None) -> str | None:
    """"an SDXL LoRA on an SD1.5 model" when the file was made for another architecture, another
    variant (told by its keys) or another size than the model; None when nothing says so."""
    if file is None or model is None or file.arch is None or model.arch is None or file.kind == "weights":
        return None
    other_variant = (file.variant_by == "keys" and file.variant is not None and model.variant is not None
                     and file.variant is not model.variant and bool(file.variant.comfy))
    other_width = file.width is not None and model.width is not None and file.width != model.width
    if file.arch is model.arch and not other_variant and not other_width:
        return None
    return f"{a(file.name)} LoRA on {a(model.name)} model"


def _diagnose(m: Match, file: Identity | None, model: Identity | None) -> tuple[str | None, list[str]]:
    """(what is wrong, for the first line; lines saying why and what to do)."""
    if file is None:
        return None, []
    advice = []
    if file.kind == "weights":
        label, home = _WEIGHTS_HOME.get(file.parts, ("checkpoint", "models/checkpoints (Load Checkpoint)"))
        label = f"{file.name} {label}" if file.arch is not None else label
        held = " and ".join(filter(None, (", ".join(file.parts[:-1]), file.parts[-1]))) if file.parts else "model"
        advice.append(f"It holds plain {held} weights and no LoRA factors. It belongs in {home}, not in loras.")
        return f"this file is {a(label)}, not a LoRA", advice
    verdict = mismatch(file, model)
    if verdict is not None and file.confidence != "high" and m.n_file_keys and m.n_matched_keys == m.n_file_keys:
        # names several families share (Flux.1's and HunyuanVideo's diffusers blocks), every one of them
        # in this model: the guess was the other family, the file fits this one
        verdict = None
    if verdict is not None:
        if file.arch is not model.arch or file.variant_by != "keys" or file.variant is model.variant:
            advice.append(f"The file is {a(file.name)} LoRA ({file.why}). Load it on {a(file.name)} model.")
        else:   # same family, another variant told by the keys
            marked = [p for p in m.unmatched if flat_name(p) in set(file.marked)]
            if marked:   # listed by name in the "not in this model" line below
                advice.append(f"{len(marked)} of its modules are {file.variant.marks_are}; this model has no such "
                              "layers, so they are left out.")
            advice.append(f"Pick {a(file.variant.name)} model to use all of it.")
    elif not m.n_matched_keys and m.n_file_keys:
        if file.arch is None:
            verdict = "its keys are of no architecture LoRA Lab knows"
        elif model is None or model.arch is None:
            verdict = f"the file looks like {a(file.name)} LoRA"
        else:
            verdict = f"{a(file.name)} LoRA, like the model, but none of its key names are ones this model has"
            if file.naming not in (None, "native"):
                advice.append(f"It uses {file.naming} key names; convert them to this model's own names.")
    if file.named_text:
        if file.named_arch is not None and file.arch is not None and file.named_arch is not file.arch:
            advice.append(f"Its metadata names {file.named_text} as its base model, but its keys are those of "
                          f"{a(file.name)} LoRA.")
        else:
            advice.append(f"Base model named in its metadata: {file.named_text}.")
    return verdict, advice


def bias_key(key: Any) -> Any:
    """The bias beside a weight key, in the same form (a slice's rows of the bias for a fused weight)."""
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
        for adapter in adapters:
            k = key if adapter.target == "weight" else bias_key(key)
            if k is None:
                raise LoraError(f"{adapter.name} changes a bias but target {key!r} has none", file=file, key=prefix)
            m.targets.append(Target(k, adapter, prefix))
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


def split_target(key) -> tuple[str, tuple[int, int, int] | None, Any]:
    """(tensor name, (dim, start, length) or None, function or None) of a key in any form a key map
    gives: ``"a.weight"``; ``(key, dim, start, length)`` (sd_keys: OpenCLIP's q/k/v ``in_proj_weight``);
    ComfyUI's ``(key, (dim, start, length))`` and ``(key, offset, function)``, where ``function`` turns
    a ΔW in the file's layout into the model's (``dit_keys.swap_halves``)."""
    if isinstance(key, str):
        return key, None, None
    if len(key) == 4 and isinstance(key[1], int):
        return key[0], tuple(key[1:]), None
    offset = tuple(key[1]) if len(key) > 1 and key[1] is not None else None
    return key[0], offset, key[2] if len(key) > 2 else None


def target_view(tensors: Mapping[str, torch.Tensor], key) -> torch.Tensor:
    """The tensor a key names (see ``split_target``): the whole tensor, or the rows of its slice."""
    name, offset, _ = split_target(key)
    t = tensors.get(name)
    if t is None:
        return None
    return t if offset is None else t.narrow(*offset)


def _fusable(adapter: Adapter) -> bool:
    """A plain LoRA (no DoRA magnitude): ΔW = γ·up·down, additive and independent of W."""
    return adapter.name == "lora" and adapter.target == "weight" and not adapter.has_magnitude


Scratch = Callable[[torch.device, tuple[int, ...], str], torch.Tensor]


@torch.no_grad()
def accumulate_(work: torch.Tensor, items: Iterable[tuple[Adapter, float]], scratch: Scratch | None = None
                ) -> torch.Tensor:
    """``work`` (a float working copy) with every (adapter, strength) applied in order; returns it.

    Consecutive plain LoRAs (a stack's usual case) go in as ONE product, W += [s₁γ₁up₁ … sₙγₙupₙ]·[down₁; …;
    downₙ]: the same sum as n separate ``addmm``s (additive terms commute; only the float summation
    order differs), but W is read and written once instead of n times and the GEMM runs at rank Σr.
    Non-additive adapters (OFT, DoRA, …) keep their place in the order. ``scratch(device, shape,
    slot)`` may supply reusable buffers for the stacked factors (else they are allocated).
    """
    run: list[tuple[Adapter, float]] = []

    def flush(w: torch.Tensor) -> torch.Tensor:
        if len(run) == 1:
            w = run[0][0].apply_(w, run[0][1])
        elif run:
            w = _fused_(w, run, scratch)
        run.clear()
        return w

    for adapter, strength in items:
        if strength == 0.0:
            continue
        if _fusable(adapter):
            run.append((adapter, strength))
            continue
        work = flush(work)
        work = adapter.apply_(work, strength)
    return flush(work)


def _fused_(work: torch.Tensor, run: list[tuple[Adapter, float]], scratch: Scratch | None) -> torch.Tensor:
    out, cols = work.shape[0], work[0].numel() if work.dim() else 0
    mats = []
    for adapter, strength in run:
        if adapter.mid is None:
            up, down = adapter.up.flatten(1), adapter.down.flatten(1)
        else:   # Tucker: V = mid·down, built once here
            up, down = adapter.low_rank(work.device, work.dtype, scaled=False)
        if up.shape[0] != out or down.shape[1] != cols:
            for a, s in run:            # the per-adapter path names the adapter whose shape is wrong
                work = a.apply_(work, s)
            return work
        mats.append((up, down, strength * adapter.scale))
    rank = sum(u.shape[1] for u, _, _ in mats)
    get = scratch or (lambda device, shape, slot: torch.empty(shape, dtype=work.dtype, device=device))
    u_all, v_all = get(work.device, (out, rank), "up"), get(work.device, (rank, cols), "down")
    at = 0
    for up, down, scale in mats:
        r = up.shape[1]
        u_all[:, at:at + r].copy_(up).mul_(scale)
        v_all[at:at + r].copy_(down)
        at += r
    work.view(out, cols).addmm_(u_all, v_all)
    return work


@torch.no_grad()
def apply(obj: torch.nn.Module | Mapping[str, torch.Tensor],
          changes: Iterable[tuple[Any, Adapter, float]]) -> Patched:
    """Add every (key, adapter, strength) change in place; all or nothing.

    Changes to one tensor (whole, or row blocks of it) apply one after another, in order, as ComfyUI's
    ModelPatcher applies a weight's patches. All results are computed and checked before the first
    tensor is written, so a bad adapter (wrong shape, non-finite result) leaves the model exactly as it was.
    """
    tensors = tensors_of(obj)
    by_name: dict[str, list[tuple[Any, Adapter, float]]] = {}
    for key, adapter, strength in changes:
        view = target_view(tensors, key)
        if view is None:
            raise LoraError(f"model has no tensor {key!r}", file=adapter.file, key=adapter.prefix)
        adapter.check_target(view.shape, split_target(key)[0])
        by_name.setdefault(split_target(key)[0], []).append((key, adapter, strength))
    new: dict[str, torch.Tensor] = {}
    for name, items in by_name.items():
        work = tensors[name].detach().to(torch.float32, copy=True)
        i = 0
        while i < len(items):
            key = items[i][0]
            _, offset, function = split_target(key)
            if function is not None:
                # a function moves the adapter's ΔW from the file's layout into the model's
                view = target_view({name: work}, key)
                before = view.clone()
                after = items[i][1].apply_(view.clone(), items[i][2])
                view.copy_(before + function(after - before))
                i += 1
                continue
            j = i + 1                 # consecutive changes of the same target: one accumulate_
            while j < len(items) and items[j][0] == key:
                j += 1
            run = [(adapter, strength) for _, adapter, strength in items[i:j]]
            if offset is None:
                work = accumulate_(work, run)
            else:
                view = target_view({name: work}, key)
                view.copy_(accumulate_(view.clone(), run))
            i = j
        check_finite(work, what="patched weight", file=items[0][1].file, key=name)
        new[name] = work
    handle = Patched(tensors)
    for name, work in new.items():
        handle.backup[name] = tensors[name].detach().clone()
        tensors[name].copy_(work)
    return handle


def load_into(obj: torch.nn.Module | Mapping[str, torch.Tensor], path: str, strength: float = 1.0, *,
              key_map: Mapping[str, Any] | None = None, options: dict | None = None,
              arch: Arch | str | None = None) -> tuple[Patched, Match]:
    """Standalone one-call use: read ``path``, match it to ``obj`` and patch in place.

    Without a ``key_map`` the model's family (``arch``, an id such as "wan"; by default what
    ``arch.identify`` makes of the model's weights) decides the map: SD1.x/SD2.x/SDXL names in any
    naming through ``sd_keys.model_key_map``; every other family through ``dit_keys.comfy_targets``
    (its own module names in any wrapper or separator, and the diffusers / XLabs / original names
    dit_keys knows). Returns the restore handle and the match report; raises LoraError when nothing
    matches.
    """
    from .adapters import parse
    from .arch import SD_KEYS, get, identify
    from .dit_keys import comfy_targets
    from .io import read
    from .sd_keys import model_key_map

    tensors = tensors_of(obj)
    f = read(path)
    model = identify(tensors)
    family = get(arch) if isinstance(arch, str) else arch if arch is not None else model.arch
    parsed = parse(f.tensors, file=f.name, options={**(options or {}), "metadata": f.metadata})
    shapes = {k: t.shape for k, t in tensors.items()}
    if key_map is not None:
        km = key_map
    elif family is None or family.key_map == SD_KEYS:
        km = model_key_map(list(tensors), shapes)
    else:
        km = comfy_targets(family, parsed.modules, shapes)
    m = match(parsed, km, file=f.name, n_file_keys=len(f.tensors))
    if not m.targets:
        raise LoraError(m.summary(identify(f.tensors, f.metadata), model), file=f.name)
    return apply(tensors, [(t.key, t.adapter, strength) for t in m.targets]), m
