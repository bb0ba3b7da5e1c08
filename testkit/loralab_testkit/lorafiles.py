"""Write LoRA files for a model's real keys, in every plain-LoRA naming scheme, with known ΔW.

Three steps, each usable alone::

    ts = unet_targets(model) + clip_targets(clip)          # what can be adapted (needs ComfyUI)
    ads = make_lora(ts, rank=4, alpha=2.0, seed=1)          # seeded non-zero factors (no ComfyUI)
    spec = write_lora(path, ads, "kohya")                   # the file, in one naming scheme
    spec.delta("diffusion_model.input_blocks.1.1.proj_in.weight")   # ΔW at strength 1, fp32

``spec.deltas()`` gives {model state-dict key: ΔW} for every adapted tensor, computed here with
plain torch (an independent reference for the code under test). Model keys are those of
``model.model.state_dict()`` ("diffusion_model.…") and ``clip.cond_stage_model.state_dict()``
("clip_l.transformer.text_model.…"), i.e. what ComfyUI's key maps point to.

Schemes (``SCHEMES``) - file key of one module, Linear target to_q of the first attention:
    kohya           lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
                    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight  (+ .alpha)
    kohya_ldm       lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight
    diffusers_old   unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight
                    (attention; other unet layers: unet.<path>.lora.up.weight)
                    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight
    peft            unet.down_blocks.….attn1.to_q.lora_A.weight / lora_B.weight, text_encoder.text_model.…
    peft_te5        as peft, text encoder named as transformers >= 5: text_encoder.encoder.layers.0.…
    peft_metadata   as peft, alpha in __metadata__["lora_adapter_metadata"] (diffusers' JSON:
                    "unet.r", "unet.lora_alpha", "unet.alpha_pattern", … per part)
    peft_alpha      as peft, plus <prefix>.alpha tensors
    comfy           ComfyUI's own trained format: diffusion_model.<ldm path>.lora_up.weight /
                    lora_down.weight / alpha, .diff (norms), .diff_b (biases);
                    text encoder: text_encoders.clip_l.transformer.text_model.….lora_up.weight
Schemes without alpha storage (diffusers_old, peft, peft_te5) mean scale 1 (alpha = rank); giving
them another alpha raises. LoCon conv factors (with or without Tucker ``lora_mid``) are written in
any scheme that can hold them (kohya, kohya_ldm, comfy for ``mid``; every scheme for plain LoCon).
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

UNET_ROOT = "diffusion_model."
CLIP_ROOT = "clip_l.transformer."
# the Linear layers kohya / diffusers / ComfyUI target in each CLIP encoder layer
CLIP_LAYER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")


# ---- targets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One model tensor an adapter can change."""
    key: str                 # model state-dict key, e.g. "diffusion_model.out.2.weight"
    shape: tuple[int, ...]
    part: str                # "unet" | "te"
    hf: str | None = None    # module path in diffusers (unet) / transformers (te) naming, no ".weight"

    @property
    def module(self) -> str:
        """The key without ".weight"/".bias": ComfyUI's generic LoRA name for it."""
        return self.key.rsplit(".", 1)[0]

    @property
    def ldm(self) -> str:
        root = UNET_ROOT if self.part == "unet" else CLIP_ROOT
        return self.module[len(root):] if self.module.startswith(root) else self.module

    @property
    def param(self) -> str:
        return self.key.rsplit(".", 1)[1]

    @property
    def kind(self) -> str:
        if self.param == "bias":
            return "bias"
        return {1: "norm", 2: "linear", 4: "conv"}.get(len(self.shape), "other")

    @property
    def is_attention(self) -> bool:
        return self.hf is not None and any(self.hf.endswith(f".{p}") for p in ("to_q", "to_k", "to_v", "to_out.0"))


def unet_targets(model, kinds=("linear", "conv"), where=None) -> list[Target]:
    """Targets of a ComfyUI MODEL (ModelPatcher or BaseModel), with their diffusers names.

    ``kinds``: any of "linear", "conv", "norm", "bias". ``where``: optional predicate on Target.
    """
    import comfy.utils

    base = getattr(model, "model", model)
    hf_of = {v: k for k, v in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items()}
    out = []
    for k, t in base.state_dict().items():
        if not k.startswith(UNET_ROOT):
            continue
        hf = hf_of.get(k[len(UNET_ROOT):])
        tg = Target(k, tuple(t.shape), "unet", hf.rsplit(".", 1)[0] if hf else None)
        if tg.kind in kinds and (where is None or where(tg)):
            out.append(tg)
    return out


def clip_targets(clip, kinds=("linear",), where=None) -> list[Target]:
    """Targets of a ComfyUI CLIP (SD1.x clip_l) in the encoder layers, with transformers names."""
    sd = getattr(clip, "cond_stage_model", clip).state_dict()
    out = []
    for k, t in sd.items():
        if not k.startswith(CLIP_ROOT + "text_model.encoder.layers."):
            continue
        module = k[len(CLIP_ROOT):].rsplit(".", 1)[0]
        if len(t.shape) == 2 and not module.endswith(CLIP_LAYER_TARGETS):
            continue
        tg = Target(k, tuple(t.shape), "te", module)
        if tg.kind in kinds and (where is None or where(tg)):
            out.append(tg)
    return out


def pick(targets: list[Target], per_kind: int = 2) -> list[Target]:
    """A small spread: up to ``per_kind`` targets of each (part, kind, 1x1-or-not, attention-or-not)."""
    seen: Counter = Counter()
    out = []
    for t in targets:
        group = (t.part, t.kind, t.shape[2:] == (1, 1), t.is_attention)
        if seen[group] < per_kind:
            seen[group] += 1
            out.append(t)
    return out


# ---- factors ---------------------------------------------------------------------------------------
@dataclass
class Adapter:
    """The factors a file holds for one target. ``algo``: "lora" (up/down/mid/alpha) or "diff"."""
    target: Target
    algo: str = "lora"
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW at strength 1, float32, shaped like the target."""
        shape = self.target.shape
        if self.algo == "diff":
            return self.diff.float().reshape(shape)
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        if self.mid is not None:   # Tucker: ΔW[o, i, h, w] = Σ_mn mid[m, n, h, w] up[o, m] down[n, i]
            d = torch.einsum("mnhw,om,ni->oihw", self.mid.float(), up, down)
        else:
            d = up @ down
        return d.reshape(shape).mul_(self.scale)


def _gen(key: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(key.encode()) + 104729 * seed) & 0x7FFFFFFF)


def make_lora(targets: list[Target], *, rank: int = 4, alpha: float | None = None, seed: int = 0,
              conv: str = "locon", flat_1x1: bool = False, dtype: torch.dtype = torch.float32,
              gain: float = 0.5) -> list[Adapter]:
    """Seeded non-zero LoRA factors for every Linear/Conv target (others are skipped).

    conv: "locon" (down r×in×kh×kw, up out×r×1×1) or "tucker" (down r×in×1×1, mid r×r×kh×kw,
    up out×r×1×1; only for kernels > 1x1). flat_1x1: store 1x1-conv factors as 2-D matrices, as
    some trainers do. ΔW has about ``gain`` times the spread of a fan-in-scaled weight.
    """
    if conv not in ("locon", "tucker"):
        raise ValueError(f"conv={conv!r}: use 'locon' or 'tucker'")
    out = []
    for t in targets:
        if t.kind not in ("linear", "conv"):
            continue
        g = _gen(t.key, seed)
        o, i = t.shape[0], t.shape[1]
        k = tuple(t.shape[2:])
        r = min(rank, o, i)
        mid = None
        if t.kind == "linear" or (k == (1, 1) and flat_1x1):
            down = torch.randn(r, i, generator=g) / math.sqrt(i)
            up = torch.randn(o, r, generator=g) * (gain / math.sqrt(r))
        elif conv == "tucker" and k != (1, 1):
            down = torch.randn(r, i, 1, 1, generator=g) / math.sqrt(i)
            mid = torch.randn(r, r, *k, generator=g) / math.sqrt(r * math.prod(k))
            up = torch.randn(o, r, 1, 1, generator=g) * (gain / math.sqrt(r))
        else:
            down = torch.randn(r, i, *k, generator=g) / math.sqrt(i * math.prod(k))
            up = torch.randn(o, r, 1, 1, generator=g) * (gain / math.sqrt(r))
        out.append(Adapter(t, "lora", up.to(dtype), down.to(dtype), None if mid is None else mid.to(dtype),
                           alpha=alpha))
    return out


def make_diff(targets: list[Target], *, seed: int = 0, dtype: torch.dtype = torch.float32,
              gain: float = 0.1) -> list[Adapter]:
    """Seeded non-zero whole-tensor differences (written as .diff / .diff_b)."""
    out = []
    for t in targets:
        g = _gen("diff:" + t.key, seed)
        out.append(Adapter(t, "diff", diff=(torch.randn(t.shape, generator=g) * gain).to(dtype)))
    return out


# ---- naming schemes --------------------------------------------------------------------------------
def _flat(s: str) -> str:
    return s.replace(".", "_")


def _te5(hf: str) -> str:
    return hf[len("text_model."):] if hf.startswith("text_model.") else hf


def _need_hf(t: Target, scheme: str) -> str:
    if t.hf is None:
        raise ValueError(f"scheme {scheme!r} needs a diffusers/transformers name for {t.key!r}")
    return t.hf


def _prefix(scheme: str, t: Target) -> str:
    if scheme == "comfy":
        return t.module if t.part == "unet" else "text_encoders." + t.module
    if scheme in ("kohya", "kohya_ldm"):
        if t.part == "te":
            return "lora_te_" + _flat(_need_hf(t, scheme))
        return "lora_unet_" + _flat(t.ldm if scheme == "kohya_ldm" else _need_hf(t, scheme))
    hf = _need_hf(t, scheme)
    if t.part == "te":
        return "text_encoder." + (_te5(hf) if scheme == "peft_te5" else hf)
    return "unet." + hf


# role -> suffix per family; diffusers_old is special-cased per target below
_KOHYA = {"up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight", "alpha": ".alpha"}
_PEFT = {"up": ".lora_B.weight", "down": ".lora_A.weight", "alpha": ".alpha"}
SCHEMES = ("kohya", "kohya_ldm", "diffusers_old", "peft", "peft_te5", "peft_metadata", "peft_alpha", "comfy")
STORES_ALPHA = {"kohya": "keys", "kohya_ldm": "keys", "comfy": "keys", "peft_alpha": "keys",
                "peft_metadata": "metadata", "diffusers_old": None, "peft": None, "peft_te5": None}


def _lora_keys(scheme: str, a: Adapter) -> tuple[str, dict[str, str]]:
    t = a.target
    if scheme == "diffusers_old":
        hf = _need_hf(t, scheme)
        if t.part == "te":
            base = "text_encoder." + hf
            return base, {"up": ".lora_linear_layer.up.weight", "down": ".lora_linear_layer.down.weight"}
        if t.is_attention:  # attention processors: attn1.processor.to_q_lora.up.weight, to_out.0 -> to_out_lora
            head, proj = hf.rsplit(".to_", 1)
            proj = proj.split(".")[0]
            return f"unet.{head}.processor.to_{proj}", {"up": "_lora.up.weight", "down": "_lora.down.weight"}
        return "unet." + hf, {"up": ".lora.up.weight", "down": ".lora.down.weight"}
    suffixes = _KOHYA if scheme in ("kohya", "kohya_ldm", "comfy") else _PEFT
    return _prefix(scheme, t), suffixes


def state_dict(adapters: list[Adapter], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, str], list[Adapter]]:
    """(tensors, header metadata, adapters as the file states them: alpha as the reader will see it)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    sd: dict[str, torch.Tensor] = {}
    stated: list[Adapter] = []
    alpha_mode = STORES_ALPHA[scheme]
    for a in adapters:
        if a.algo == "diff":
            name = "diff_b" if a.target.param == "bias" else "diff"
            base = _prefix("peft" if scheme == "diffusers_old" else scheme, a.target)
            _put(sd, f"{base}.{name}", a.diff)
            stated.append(a)
            continue
        base, suf = _lora_keys(scheme, a)
        if a.mid is not None and "mid" not in suf:
            raise ValueError(f"scheme {scheme!r} has no key for a Tucker mid factor ({a.target.key})")
        if alpha_mode is None and a.alpha not in (None, float(a.rank)):
            raise ValueError(f"scheme {scheme!r} cannot store alpha={a.alpha} (rank {a.rank}): use alpha=None")
        _put(sd, base + suf["up"], a.up)
        _put(sd, base + suf["down"], a.down)
        if a.mid is not None:
            _put(sd, base + suf["mid"], a.mid)
        if alpha_mode == "keys" and a.alpha is not None:
            _put(sd, base + suf["alpha"], torch.tensor(float(a.alpha)))
        stated.append(a if alpha_mode else replace(a, alpha=None))
    meta = {"format": "pt"}
    if scheme == "peft_metadata":
        meta["lora_adapter_metadata"] = json.dumps(_peft_metadata(stated), indent=2, sort_keys=True)
        stated = [a if a.algo != "lora" or a.alpha is not None else replace(a, alpha=float(a.rank)) for a in stated]
    return sd, meta, stated


def _put(sd: dict, key: str, t: torch.Tensor) -> None:
    if key in sd:
        raise ValueError(f"two adapters write the same key {key!r}")
    sd[key] = t.contiguous()


def _peft_metadata(adapters: list[Adapter]) -> dict:
    """What diffusers writes: LoraConfig.to_dict() per part, keys prefixed "unet." / "text_encoder."."""
    out: dict = {}
    for part, prefix in (("unet", "unet"), ("te", "text_encoder")):
        ads = [a for a in adapters if a.algo == "lora" and a.target.part == part]
        if not ads:
            continue
        r = Counter(a.rank for a in ads).most_common(1)[0][0]
        alphas = [float(a.rank) if a.alpha is None else float(a.alpha) for a in ads]
        alpha = Counter(alphas).most_common(1)[0][0]
        names = [a.target.hf for a in ads]
        cfg = {
            "r": r, "lora_alpha": alpha, "peft_type": "LORA", "use_dora": False, "use_rslora": False,
            "target_modules": sorted({n.rsplit(".", 1)[-1] if not n.endswith(".0") else n.rsplit(".", 2)[-2] for n in names}),
            "rank_pattern": {n: a.rank for n, a in zip(names, ads) if a.rank != r},
            "alpha_pattern": {n: al for n, al in zip(names, alphas) if al != alpha},
            "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True, "fan_in_fan_out": False,
        }
        out.update({f"{prefix}.{k}": v for k, v in cfg.items()})
    return out


# ---- files -----------------------------------------------------------------------------------------
@dataclass
class LoraSpec:
    """A written LoRA file and the change it should make."""
    path: str
    scheme: str
    adapters: list[Adapter]
    keys: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    root: str | None = None

    @property
    def name(self) -> str:
        """The name ComfyUI's lora_name combo shows (relative to the loras folder, '/' separated)."""
        rel = os.path.relpath(self.path, self.root) if self.root else os.path.basename(self.path)
        return rel.replace(os.sep, "/")

    def changed_keys(self, part: str | None = None) -> list[str]:
        """Model keys the file changes, in file order (cheap: computes nothing)."""
        return list(dict.fromkeys(a.target.key for a in self.adapters if part is None or a.target.part == part))

    def delta(self, key: str) -> torch.Tensor:
        ds = [a.delta() for a in self.adapters if a.target.key == key]
        if not ds:
            raise KeyError(f"{self.name} does not change {key!r}")
        return sum(ds[1:], ds[0])

    def deltas(self, part: str | None = None) -> dict[str, torch.Tensor]:
        """{model key: ΔW} for every changed tensor. All at once: for a file over every layer of the
        tiny SD1.5 that is ~0.5 GB and a few seconds; iterate ``changed_keys`` + ``delta`` instead."""
        return {k: self.delta(k) for k in self.changed_keys(part)}


def write_lora(path: str, adapters: list[Adapter], scheme: str = "kohya", *, dtype: torch.dtype | None = None,
               metadata: dict[str, str] | None = None, root: str | None = None) -> LoraSpec:
    """Write ``adapters`` to ``path`` (safetensors) in ``scheme``; ``dtype`` casts every tensor.

    The returned spec's deltas use the values as stored (after the cast).
    """
    from safetensors.torch import save_file

    if dtype is not None:
        adapters = [replace(a, **{f: getattr(a, f).to(dtype) for f in ("up", "down", "mid", "diff")
                                  if getattr(a, f) is not None}) for a in adapters]
    sd, meta, stated = state_dict(adapters, scheme)
    meta.update(metadata or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata=meta)
    return LoraSpec(path, scheme, stated, sorted(sd), meta, root)


def default_alpha(scheme: str, rank: int) -> float | None:
    """rank/2 where the scheme can say so (a scale that is not 1 catches alpha mistakes), else None."""
    return rank / 2 if STORES_ALPHA[scheme] else None
