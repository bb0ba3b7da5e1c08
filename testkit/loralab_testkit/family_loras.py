"""Real LoRA files for the tiny family models, written by the libraries that produce them.

Each writer returns a ``LoraFile``: the path, and ``deltas`` = {target: ΔW at strength 1}, an
independent reference computed with plain torch from the FILE's tensors (read back from disk) and
the producer's documented scale. A target is a ComfyUI state-dict key ("diffusion_model.…weight"),
or (key, (dim, start, length)) for a row block of a fused weight (q, k or v of a fused qkv), as
ComfyUI's key maps write it; ΔW is in ComfyUI's layout (row order included).

How to use (after the ``comfy`` fixture)::

    from loralab_testkit import families as F, family_loras as L

    m = F.build("flux")
    f = L.write_peft(m, path, rank=4, alpha=2.0)          # diffusers FluxPipeline.save_lora_weights
    f = L.write_peft(m, path, metadata=False)             # no lora_adapter_metadata: alpha = rank
    f = L.write_lycoris(m, path, algo="loha")             # LyCORIS save_weights ("lora", "loha", "lokr")
    f = L.write_kohya(m, path, rank=4, alpha=2.0)         # sd-scripts / musubi-tuner names
    f = L.write_kohya_mixed(m, path)                      # the same, "lora_unet_blocks_0.self_attn.q" (Wan in the wild)
    f = L.write_onetrainer(m, path, rank=4, alpha=2.0)    # PEFT's factors as "lora_transformer_<flat>" + .alpha
    f = L.write_xlabs(flux, path, rank=4)                 # x-flux processor LoRAs (Flux only)
    f = L.write_kohya_flux_oft(flux, path, alpha=1e-3)    # sd-scripts networks/oft_flux.py (Flux only)
    L.kohya_oft_weight(parts, alpha, W, multiplier)       # the weight OFTModule.forward runs
    f.deltas                                              # {target: ΔW}
    L.full_deltas(f, L.model_shapes(m))                   # {ComfyUI key: ΔW of the whole weight}
    L.core_deltas(m, f.path)                              # what ComfyUI core's LoraLoader applies
    L.core_deltas(m, f.path, convert=comfy.lora_convert.convert_uso_lora)   # ... after one of its converters
    L.with_deltas(m, f)                                   # a MODEL clone patched with the reference
    L.diffusers_load_deltas(m, f.path)                    # {twin module: ΔW} as diffusers + PEFT read it
    twin, net, _ = L.lycoris_twin(m, algo="loha")         # LyCORIS' own network on the twin ...
    L.lycoris_forward_deltas(twin, net)                   # ... and the ΔW its forward applies

What ComfyUI 0.3.75's LoraLoader does with these files (pinned in tests/comfy/test_families.py):
kohya files load exactly on every family; PEFT / LyCORIS files on the twin's names load exactly
where the key map has the names (see families' coverage table) and are dropped whole where it has
not (Wan, HunyuanVideo, Lumina 2; Z-Image's "transformer." files); a PEFT file whose alpha differs
from its rank loads at scale 1, because core ignores the lora_adapter_metadata header.

Producers and names, one module (Flux, first double block, image attention q):
    peft     transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight
             (diffusers' <Family>LoraLoaderMixin.save_lora_weights on the twin after add_adapter;
             scale lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, from the
             "lora_adapter_metadata" header; without it diffusers reads alpha = r)
    lycoris  lycoris_transformer_blocks_0_attn_to_q.lora_down.weight / .lora_up.weight / .alpha
             (LycorisNetwork on the twin, ``save_weights``; LoHa hada_w1_a…, LoKr lokr_w1, lokr_w2_a…;
             scale alpha / rank, LoKr with both factors full: 1)
    kohya    lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up.weight / .alpha
             (sd-scripts networks/lora_flux.py: "lora_unet" + the ComfyUI/BFL module path with "."
             -> "_"; the same rule in lora_sd3.py, lora_lumina.py and musubi-tuner's Wan and
             HunyuanVideo networks, whose module paths are ComfyUI's; scale alpha / rank)

Targets default to every Linear layer (of the twin for peft / lycoris, of the ComfyUI model for
kohya); pass ``targets`` (module names, or a predicate on the name) to choose.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import families as F

Target = Any   # str | tuple[str, tuple[int, int, int]]


@dataclass
class LoraFile:
    """A written LoRA file and its reference ΔW (see the module docstring)."""
    path: str
    producer: str                      # "peft", "lycoris:lora|loha|lokr", "kohya"
    family: str
    deltas: dict[Target, torch.Tensor]
    modules: dict[str, Target]         # the file's module prefix -> its target
    meta: dict = field(default_factory=dict)


def _seeded(name: str, shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Per-name deterministic factor values, fan-in scaled (non-zero: ΔW != 0)."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 7919 * seed) & 0x7FFFFFFF)
    fan_in = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
    return torch.randn(*shape, generator=g) * (scale / math.sqrt(fan_in))


def _select(names, targets) -> list[str]:
    names = list(names)
    if targets is None:
        return names
    if callable(targets):
        return [n for n in names if targets(n)]
    unknown = sorted(set(targets) - set(names))
    if unknown:
        raise KeyError(f"not LoRA-able layers of this model: {unknown[:5]}")
    return [n for n in names if n in set(targets)]


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename onto ``path``; an existing ``path`` is never overwritten."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; LoRA writers never overwrite")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"     # same extension: LyCORIS picks the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k).float() for k in fh.keys()}, dict(fh.metadata() or {})


# ---- PEFT / diffusers ------------------------------------------------------------------------------
def peft_twin(m, *, targets=None, rank: int = 4, alpha: float | None = None, rslora: bool = False,
              seed: int = 0, twin_model=None):
    """(twin with a seeded "default" LoRA adapter added the diffusers way, the LoraConfig)."""
    from peft import LoraConfig

    tw = twin_model if twin_model is not None else F.twin(m)
    names = _select(F.twin_linears(m), targets)
    if not names:
        raise ValueError("no target modules")
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"   # exact names, not suffixes
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=pattern,
                        use_rslora=rslora, init_lora_weights=True)
    tw.add_adapter(config)                      # diffusers' PeftAdapterMixin, as its training scripts do
    with torch.no_grad():
        for n, p in tw.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(_seeded(n, p.shape, seed, 0.5 if ".lora_B." in n else 1.0))   # B != 0
    return tw, config


def write_peft(m, path: str, *, targets=None, rank: int = 4, alpha: float | None = None, rslora: bool = False,
               metadata: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoraFile:
    """A diffusers LoRA file for the family's twin, written by ``<Pipeline>.save_lora_weights``.

    ``metadata=True`` stores the LoraConfig as diffusers' training scripts do
    (``lora_adapter_metadata`` header); without it the file cannot carry alpha, so ``alpha`` must
    be None or ``rank`` (scale 1, what diffusers then reads).
    """
    import diffusers.loaders
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    fam = F.family(m)
    if not metadata and alpha not in (None, rank):
        raise ValueError(f"a diffusers file without metadata means alpha = rank ({rank}); got alpha {alpha}")
    if rslora and not metadata:
        raise ValueError("use_rslora lives in the metadata: write it with metadata=True")
    tw, _config = peft_twin(m, targets=targets, rank=rank, alpha=alpha, rslora=rslora, seed=seed)
    layers = {k: v.to(dtype) for k, v in get_peft_model_state_dict(tw).items()}
    extra = _collate_lora_metadata({"transformer": tw}) if metadata else {}
    pipeline = getattr(diffusers.loaders, fam.pipeline)
    name = os.path.basename(path)

    def write(tmp):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as d:
            pipeline.save_lora_weights(d, transformer_lora_layers=layers, weight_name=name, **extra)
            shutil.move(os.path.join(d, name), tmp)

    _write_atomic(path, write)
    return _peft_reference(m, path, fam)


def _peft_reference(m, path: str, fam) -> LoraFile:
    """ΔW per twin module from the file: B @ A · lora_alpha / r (/ sqrt(r) with use_rslora), with
    r / lora_alpha / use_rslora from the lora_adapter_metadata header (rank_pattern / alpha_pattern:
    exact-name entries only; the writers here leave both empty)."""
    sd, header = _read(path)
    meta = json.loads(header["lora_adapter_metadata"]) if "lora_adapter_metadata" in header else {}
    cfg = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    places = F.twin_map(m)
    deltas, modules = {}, {}
    for k in sd:
        if not k.endswith(".lora_A.weight"):
            continue
        prefix = k[: -len(".lora_A.weight")]
        name = prefix[len("transformer."):]
        a, b = sd[k], sd[prefix + ".lora_B.weight"]
        r = a.shape[0]
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg.get("lora_alpha", r))
        r_cfg = cfg.get("rank_pattern", {}).get(name, cfg.get("r", r))
        if r_cfg != r:
            raise AssertionError(f"{path}: {prefix} has rank {r}, the metadata says {r_cfg}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        place = places[name]
        deltas[place.target] = place.to_comfy((b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * scale)
        modules[prefix] = place.target
    return LoraFile(path, "peft", fam.name, deltas, modules, meta)


def peft_merge_deltas(tw) -> dict[str, torch.Tensor]:
    """{twin module: ΔW} as PEFT's own merge gives it (merge, diff, unmerge) for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for n, mod in tw.named_modules():
            if isinstance(mod, LoraLayer):
                w0 = mod.get_base_layer().weight.detach().clone()
                mod.merge()
                out[n] = (mod.get_base_layer().weight.detach() - w0).float()
                mod.unmerge()
    return out


def diffusers_load_deltas(m, path: str) -> dict[str, torch.Tensor]:
    """{twin module: ΔW} when diffusers loads the FILE into a fresh twin (``load_lora_adapter``, which
    reads the metadata) and PEFT merges it: the producing library's reading of the file."""
    import diffusers.loaders

    pipeline = getattr(diffusers.loaders, F.family(m).pipeline)
    got = pipeline.lora_state_dict(path, return_lora_metadata=True)   # (sd[, network_alphas], metadata)
    tw = F.twin(m)
    tw.load_lora_adapter(got[0], prefix="transformer", metadata=got[-1], adapter_name="default")
    return peft_merge_deltas(tw)


# ---- LyCORIS ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _lycoris_preset(names: list[str]):
    """LycorisNetwork keeps its target preset in class attributes: set ours, restore after."""
    from lycoris import LycorisNetwork

    attrs = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
             "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {a: getattr(LycorisNetwork, a) for a in attrs}
    try:
        LycorisNetwork.apply_preset({"target_module": [], "target_name": list(names), "module_algo_map": {},
                                     "name_algo_map": {}, "use_fnmatch": False, "lora_prefix": "lycoris",
                                     "exclude_name": []})
        yield LycorisNetwork
    finally:
        for a, v in saved.items():
            setattr(LycorisNetwork, a, v)


def lycoris_twin(m, *, algo: str = "lora", targets=None, rank: int = 4, alpha: float = 2.0, factor: int = -1,
                 seed: int = 0, twin_model=None, **kwargs):
    """(twin, LycorisNetwork applied to it with seeded non-zero factors, {lycoris name: twin module})."""
    tw = twin_model if twin_model is not None else F.twin(m)
    names = _select(F.twin_linears(m), targets)
    with _lycoris_preset(names) as net_cls:
        net = net_cls(tw, multiplier=1.0, lora_dim=rank, alpha=alpha, network_module=algo, factor=factor,
                      warn_on_unmatched=False, **kwargs)
    by_name = {"lycoris_" + n.replace(".", "_"): n for n in names}
    made = {lora.lora_name for lora in net.loras}
    if made != set(by_name):
        raise AssertionError(f"LyCORIS adapted {sorted(made ^ set(by_name))[:5]} differently from the targets")
    net.apply_to()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(_seeded(n, p.shape, seed))
    return tw, net, by_name


def write_lycoris(m, path: str, *, algo: str = "lora", targets=None, rank: int = 4, alpha: float = 2.0,
                  factor: int = -1, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> LoraFile:
    """A LyCORIS file (LoRA / LoHa / LoKr) on the family's twin, written by ``save_weights``."""
    fam = F.family(m)
    tw, net, by_name = lycoris_twin(m, algo=algo, targets=targets, rank=rank, alpha=alpha, factor=factor,
                                    seed=seed, **kwargs)
    _write_atomic(path, lambda tmp: net.save_weights(tmp, dtype, {"loralab_test_lora": f"lycoris {algo} {fam.name}"}))
    return lycoris_reference(m, path, by_name, algo)


def lycoris_reference(m, path: str, by_name: dict[str, str], algo: str) -> LoraFile:
    """ΔW per module from the file, by LyCORIS' documented formulas (scale = alpha / rank):
    lora  up @ down;   loha  (w1a @ w1b) * (w2a @ w2b);
    lokr  kron(w1 | w1a @ w1b, w2 | w2a @ w2b), rank from w1b / w2b, scale 1 when neither exists."""
    fam = F.family(m)
    sd, header = _read(path)
    places = F.twin_map(m)
    deltas, modules = {}, {}
    for lname, name in by_name.items():
        place = places[name]
        out_shape = (len(place.rows) if place.rows else place.offset[2] if place.offset else place.shape[0],
                     *place.shape[1:])
        p = {k[len(lname) + 1:]: v for k, v in sd.items() if k.startswith(lname + ".")}
        alpha = float(p["alpha"])
        if "lora_down.weight" in p:
            rank = p["lora_down.weight"].shape[0]
            d = p["lora_up.weight"].flatten(1) @ p["lora_down.weight"].flatten(1) * (alpha / rank)
        elif "hada_w1_a" in p:
            rank = p["hada_w1_b"].shape[0]
            d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (alpha / rank)
        elif "lokr_w1" in p or "lokr_w1_a" in p:
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            low = p.get("lokr_w2_b", p.get("lokr_w1_b"))
            scale = alpha / low.shape[0] if low is not None else 1.0
            d = torch.kron(w1, w2) * scale
        else:
            raise KeyError(f"{path}: {lname} has no factors LyCORIS {algo} writes ({sorted(p)})")
        deltas[place.target] = place.to_comfy(d.reshape(out_shape))
        modules[lname] = place.target
    return LoraFile(path, f"lycoris:{algo}", fam.name, deltas, modules, header)


def lycoris_forward_deltas(tw, net) -> dict[str, torch.Tensor]:
    """{twin module: ΔW} as LyCORIS' own forward applies it (the model it trains): each adapted
    Linear run on the identity, minus its original forward, transposed.

    This, not ``merge_to``, is the reference: lycoris-lora 4.1.3's LoHa / LoKr ``get_diff_weight``
    (hence ``merge_to``) multiply by alpha / rank a second time (see tests/unit/test_adapters_reference.py).
    """
    mods = dict(tw.named_modules())
    by_lname = {lora.lora_name: lora for lora in net.loras}
    out = {}
    with torch.no_grad():
        for n, mod in mods.items():
            lora = by_lname.get("lycoris_" + n.replace(".", "_"))
            if lora is None or not isinstance(mod, torch.nn.Linear):
                continue
            eye = torch.eye(mod.in_features)
            out[n] = (mod(eye) - lora.org_forward(eye)).T.contiguous()
    return out


def lycoris_merge_deltas(tw, net) -> dict[str, torch.Tensor]:
    """{twin module: ΔW} from LyCORIS' own ``merge_to`` (weights after - before); see
    ``lycoris_forward_deltas`` for why it is not the reference for LoHa / LoKr."""
    mods = dict(tw.named_modules())
    names = [n for n, mod in mods.items() if isinstance(mod, torch.nn.Linear)]
    before = {n: mods[n].weight.detach().clone() for n in names}
    with torch.no_grad():
        net.merge_to(1.0)
    return {n: (mods[n].weight.detach() - before[n]).float() for n in names
            if not torch.equal(mods[n].weight, before[n])}


# ---- kohya (sd-scripts / musubi-tuner) -------------------------------------------------------------
KOHYA_NETWORK = {   # ss_network_module of the trainer that writes each family's LoRAs
    "SD3": "networks.lora_sd3", "Flux": "networks.lora_flux", "FluxSchnell": "networks.lora_flux",
    "Lumina2": "networks.lora_lumina", "ZImage": "networks.lora_lumina", "WAN21_T2V": "networks.lora_wan",
    "WAN21_I2V": "networks.lora_wan", "WAN22_T2V": "networks.lora_wan", "HunyuanVideo": "networks.lora",
    "QwenImage": "networks.lora_qwen_image", "HiDream": "networks.lora_hidream",
}


def comfy_linear_modules(m) -> list[str]:
    """The ComfyUI model's Linear layers, as module paths without "diffusion_model."."""
    dm = F._patcher(m).model.diffusion_model
    return [n for n, mod in dm.named_modules() if isinstance(mod, torch.nn.Linear)]


def kohya_name(module: str) -> str:
    """sd-scripts' name for a ComfyUI module path: "lora_unet_" + path with "." -> "_"."""
    return "lora_unet_" + module.replace(".", "_")


def write_kohya(m, path: str, *, targets=None, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> LoraFile:
    """A kohya-style LoRA named as sd-scripts names it from the ComfyUI (BFL / original) module paths."""
    from safetensors.torch import save_file

    fam = F.family(m)
    names = _select(comfy_linear_modules(m), targets)
    weights = F.comfy_weights(m)
    sd = {}
    for n in names:
        out_f, in_f = weights[n + ".weight"].shape
        k = kohya_name(n)
        sd[f"{k}.lora_down.weight"] = _seeded(f"{k}.lora_down.weight", (rank, in_f), seed).to(dtype)
        sd[f"{k}.lora_up.weight"] = _seeded(f"{k}.lora_up.weight", (out_f, rank), seed, 0.5).to(dtype)
        sd[f"{k}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    meta = {"ss_network_module": KOHYA_NETWORK.get(fam.config, "networks.lora"), "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "loralab_test_lora": f"kohya {fam.name}"}
    _write_atomic(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return kohya_reference(m, path, names)


def kohya_reference(m, path: str, names: list[str]) -> LoraFile:
    """ΔW per module from the file: up @ down · alpha / rank (rank = rows of lora_down)."""
    fam = F.family(m)
    sd, header = _read(path)
    deltas, modules = {}, {}
    for n in names:
        k = kohya_name(n)
        down, up = sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"]
        deltas[F.UNET + n + ".weight"] = up @ down * (float(sd[f"{k}.alpha"]) / down.shape[0])
        modules[k] = F.UNET + n + ".weight"
    return LoraFile(path, "kohya", fam.name, deltas, modules, header)


def write_kohya_mixed(m, path: str, **kwargs) -> LoraFile:
    """A kohya file whose module names keep their dots after the first block index, as Wan LoRAs in the
    wild have them (``lora_unet_blocks_26.cross_attn.o.lora_down.weight``): ComfyUI core drops them."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        f = write_kohya(m, os.path.join(d, "plain.safetensors"), **kwargs)
        sd, meta = _read(f.path)
    renamed = {_mixed(k): v for k, v in sd.items()}
    _write_atomic(path, lambda tmp: save_file(renamed, tmp, metadata=meta))
    return LoraFile(path, "kohya_mixed", f.family, f.deltas, {_mixed(k): t for k, t in f.modules.items()}, meta)


def _mixed(key: str) -> str:
    """lora_unet_blocks_0_self_attn_q.alpha -> lora_unet_blocks_0.self_attn.q.alpha (dots after the index)."""
    head, _, tail = key.partition(".")
    m = re.match(r"(lora_unet_[a-z_]+?_\d+)_(.*)", head)
    return f"{m.group(1)}.{_unflatten(m.group(2))}.{tail}" if m else key


def _unflatten(flat: str) -> str:
    """ComfyUI Wan module tails back to their dotted form (self_attn_q -> self_attn.q)."""
    for part in ("self_attn", "cross_attn", "ffn"):
        if flat.startswith(part + "_"):
            return part + "." + flat[len(part) + 1:]
    return flat


# ---- OneTrainer ------------------------------------------------------------------------------------
def write_onetrainer(m, path: str, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, targets=None) -> LoraFile:
    """The PEFT adapter of ``write_peft`` saved with OneTrainer's names: ``lora_transformer_`` + the flat
    diffusers path, kohya suffixes and an ``.alpha`` per module (scale alpha / rank)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    fam = F.family(m)
    tw, _ = peft_twin(m, targets=targets, rank=rank, alpha=alpha, seed=seed)
    sd = {}
    for k, v in get_peft_model_state_dict(tw).items():
        name, role = k.rsplit(".lora_", 1)
        flat = "lora_transformer_" + name.replace(".", "_")
        sd[f"{flat}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v.detach().float()
        sd[f"{flat}.alpha"] = torch.tensor(float(alpha))
    _write_atomic(path, lambda tmp: save_file(sd, tmp, metadata={"loralab_test_lora": f"onetrainer {fam.name}"}))
    places = F.twin_map(m)
    deltas, modules = {}, {}
    back, _ = _read(path)
    for k in back:
        if k.endswith(".lora_down.weight"):
            flat = k[: -len(".lora_down.weight")]
            name = next(n for n in places if "lora_transformer_" + n.replace(".", "_") == flat)
            d = back[flat + ".lora_up.weight"] @ back[k] * (float(back[flat + ".alpha"]) / back[k].shape[0])
            deltas[places[name].target] = places[name].to_comfy(d)
            modules[flat] = places[name].target
    return LoraFile(path, "onetrainer", fam.name, deltas, modules)


# ---- XLabs (x-flux) --------------------------------------------------------------------------------
def write_xlabs(m, path: str, *, rank: int = 4, seed: int = 0, prefix: str = "", single: bool = True,
                dtype: torch.dtype = torch.float32) -> LoraFile:
    """An XLabs Flux LoRA as x-flux's training saves its attention processors: per double block
    ``processor.qkv_lora1`` / ``proj_lora1`` (image stream), ``qkv_lora2`` / ``proj_lora2`` (text), per
    single block ``processor.qkv_lora`` / ``proj_lora``, each ``.down.weight`` / ``.up.weight``, no alpha.

    Reference (x-flux ``LoRALinearLayer.forward`` without network_alpha, as its pipeline loads the
    file): up @ down added to the output of ``img_attn.qkv`` / ``img_attn.proj`` / ``txt_attn.qkv`` /
    ``txt_attn.proj``; a single block's ``qkv_lora`` to the q, k, v part of ``linear1`` (its first 3·hidden
    rows), ``proj_lora`` to ``linear2`` (input: attention output and MLP activation)."""
    from safetensors.torch import save_file

    fam = F.family(m)
    w = F.comfy_weights(m)
    h = fam.unet_config["hidden_size"]
    layers = {}       # file module -> (out, in, target)
    for i in range(fam.unet_config["depth"]):
        for lora, layer in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                            ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            key = f"double_blocks.{i}.{layer}.weight"
            layers[f"double_blocks.{i}.processor.{lora}"] = (*w[key].shape, F.UNET + key)
    for i in range(fam.unet_config["depth_single_blocks"] if single else 0):
        layers[f"single_blocks.{i}.processor.qkv_lora"] = (3 * h, h, (F.UNET + f"single_blocks.{i}.linear1.weight",
                                                                     (0, 0, 3 * h)))
        key = f"single_blocks.{i}.linear2.weight"
        layers[f"single_blocks.{i}.processor.proj_lora"] = (*w[key].shape, F.UNET + key)
    sd = {}
    for name, (out_f, in_f, _) in layers.items():
        sd[f"{prefix}{name}.down.weight"] = _seeded(f"{name}.down", (rank, in_f), seed).to(dtype)
        sd[f"{prefix}{name}.up.weight"] = _seeded(f"{name}.up", (out_f, rank), seed, 0.5).to(dtype)
    _write_atomic(path, lambda tmp: save_file(sd, tmp, metadata={"loralab_test_lora": f"xlabs {fam.name}"}))
    back, header = _read(path)
    deltas = {t: back[f"{prefix}{n}.up.weight"] @ back[f"{prefix}{n}.down.weight"] for n, (_, _, t) in layers.items()}
    return LoraFile(path, "xlabs", fam.name, deltas, {prefix + n: t for n, (_, _, t) in layers.items()}, header)


# ---- kohya sd-scripts Flux OFT ---------------------------------------------------------------------
def kohya_oft_weight(parts: list[torch.Tensor], alpha: float, w: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """The weight sd-scripts' ``networks/oft_flux.py`` OFTModule.forward runs, written out from that file:
    per part of the output rows, Q = B − Bᵀ scaled by (min(‖Q‖, alpha·rows) + 1e-8) / (‖Q‖ + 1e-8),
    R = (I + Q)(I − Q)⁻¹, R_s = s·(R − I) + I, then einsum("k n m, k n p -> k m p", R_s, W_part as (k, n, in))."""
    out, row = [], 0
    for blocks in parts:
        blocks = blocks.float()
        k, n, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=alpha * k * n) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(n).unsqueeze(0).repeat(k, 1, 1)
        r = multiplier * (torch.matmul(eye + q, (eye - q).inverse()) - eye) + eye
        out.append(torch.einsum("knm,knp->kmp", r, w[row:row + k * n].reshape(k, n, -1)).reshape(k * n, -1))
        row += k * n
    return torch.cat(out, dim=0)


def kohya_oft_split(module: str, out: int, hidden: int) -> list[int]:
    """sd-scripts' split of a Flux layer's rows (its ``[3072] * 3`` and ``[3072] * 3 + [12288]`` at our width)."""
    if "double" in module and "qkv" in module:
        return [hidden] * 3
    if "single" in module and "linear1" in module:
        return [hidden] * 3 + [out - 3 * hidden]
    return [out]


def write_kohya_flux_oft(m, path: str, *, num_blocks: int = 4, alpha: float = 1e-3, all_linear: bool = True,
                         hidden: int | None = None, seed: int = 0) -> LoraFile:
    """A Flux OFT file as sd-scripts' ``networks/oft_flux.py`` saves it: ``oft_unet_`` + the module path
    with ``.`` -> ``_``, ``.oft_blocks.{i}`` (num_blocks, b_i, b_i) per part, ``.alpha``. Attention only
    (``SelfAttention``: the double blocks' qkv and proj) or every Linear of the double and single blocks.
    ``hidden``: split as if the model had this width (a file for another model: its split does not fit).
    Reference: ``kohya_oft_weight`` on the model's weights."""
    from safetensors.torch import save_file

    fam = F.family(m)
    w = F.comfy_weights(m)
    h = hidden or fam.unet_config["hidden_size"]
    pattern = r"(double|single)_blocks\.\d+\." if all_linear else r"double_blocks\.\d+\.(img|txt)_attn\."
    names = [n for n in comfy_linear_modules(m) if re.match(pattern, n)]
    sd, parts_of = {}, {}
    for n in names:
        name = "oft_unet_" + n.replace(".", "_")
        rows = kohya_oft_split(name, w[n + ".weight"].shape[0], h)
        # trained blocks are small; these are larger so that ΔW stands well above W's float32 rounding
        parts = [_seeded(f"{name}.{i}", (num_blocks, r // num_blocks, r // num_blocks), seed, 4.0)
                 for i, r in enumerate(rows)]
        sd.update({f"{name}.oft_blocks.{i}": p for i, p in enumerate(parts)})
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
        parts_of[name] = n
    meta = {"ss_network_module": "networks.oft_flux", "ss_network_dim": str(num_blocks), "ss_network_alpha": str(alpha),
            "loralab_test_lora": f"kohya flux oft {fam.name}"}
    _write_atomic(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    back, header = _read(path)
    deltas, modules = {}, {}
    for name, n in parts_of.items():
        parts = [back[f"{name}.oft_blocks.{i}"] for i in range(len([k for k in back if k.startswith(name + ".oft")]))]
        wt = w[n + ".weight"]
        if sum(p.shape[0] * p.shape[1] for p in parts) == wt.shape[0]:
            deltas[F.UNET + n + ".weight"] = kohya_oft_weight(parts, float(back[name + ".alpha"]), wt) - wt
        modules[name] = F.UNET + n + ".weight"
    return LoraFile(path, "oft_flux", fam.name, deltas, modules, header)


# ---- comparing with ComfyUI core -------------------------------------------------------------------
def full_deltas(f: LoraFile, shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """{ComfyUI key: ΔW of the whole weight}: slices of one fused weight summed into place."""
    out: dict[str, torch.Tensor] = {}
    for t, d in f.deltas.items():
        key, offset = (t, None) if isinstance(t, str) else t
        if offset is None:
            out[key] = out.get(key, 0) + d
            continue
        if key not in out:
            if shapes is None:
                raise ValueError(f"{key}: pass the model's shapes to place the slice {offset}")
            out[key] = torch.zeros(shapes[key])
        out[key].narrow(*offset).add_(d)
    return out


def with_deltas(m, f: LoraFile, strength: float = 1.0):
    """A clone of the MODEL with the file's REFERENCE ΔW added as plain "diff" patches: what a
    correct loader must produce (compare its forward, or ``forward_pair`` against a twin that runs
    the producer's own LoRA forward)."""
    patcher = F._patcher(m).clone()
    patcher.add_patches({k: (d,) for k, d in full_deltas(f, model_shapes(m)).items()}, strength)
    return patcher


def model_shapes(m) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in F._patcher(m).model.state_dict().items()}


def core_deltas(m, path: str, strength: float = 1.0, convert: Callable | None = None) -> dict[str, torch.Tensor]:
    """{ComfyUI key: ΔW} that ComfyUI core's LoraLoader (``comfy.sd.load_lora_for_models``) applies
    to the MODEL for the file: patched minus unpatched weights, keys it leaves alone omitted.
    ``convert``: one of core's ``comfy.lora_convert`` converters to run on the file first (core runs
    them itself only on files it recognises by full-size key names)."""
    import comfy.sd
    import comfy.utils

    patcher = F._patcher(m)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    lora = convert(lora) if convert is not None else lora
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    after = F.comfy_weights(patched)      # loaded as sampling loads it: core's patches applied
    before = F.comfy_weights(patcher)     # and the MODEL as it came (loaded last)
    return {F.UNET + k: after[k] - before[k] for k in after if not torch.equal(after[k], before[k])}
