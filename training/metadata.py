"""What a trained file says about itself: kohya ``ss_*`` keys, SAI ``modelspec.*`` keys, and the
``lora_lab.*`` keys resume needs (step count, algorithm, architecture, optimizer state).

Every value is a string, as the safetensors header requires. The step count and
hyperparameters live here, never in the file name, so a renamed file still resumes.
Optimizer state (e.g. AdamW's moments), and the live factors when the tensors are an EMA, are
stored as base64 safetensors bytes in the header, not as tensors, so that no loader meets keys
it does not know; they are left out, with a note, when they would make the header too large.
"""
from __future__ import annotations

import base64
import datetime
import json
from typing import Mapping

import torch

from .errors import TrainingError

VERSION = "1"
MAX_OPTIMIZER_STATE = 64 * 1024 * 1024   # encoded bytes; safetensors refuses headers over 100 MB

_NETWORK_MODULE = {"lora": "networks.lora"}           # everything else is trained as LyCORIS does it
_KOHYA_LOSS = {"MSE": "l2", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}
_OPTIMIZER_CLASS = {"AdamW": "torch.optim.AdamW", "Adam": "torch.optim.Adam", "SGD": "torch.optim.SGD",
                    "RMSprop": "torch.optim.RMSprop"}
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAME.get(dtype, str(dtype).replace("torch.", ""))


def trigger_list(trigger_words: str | list[str] | None) -> list[str]:
    """'ohwx person, red hat' -> ['ohwx person', 'red hat'] (comma separated, blanks dropped)."""
    if not trigger_words:
        return []
    if isinstance(trigger_words, str):
        trigger_words = trigger_words.split(",")
    return [w.strip() for w in trigger_words if w and w.strip()]


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def _kohya(v) -> str:
    """A value as kohya writes it into the header: str(), None as 'None'."""
    return str(v)


def build(info: Mapping, *, output_name: str, trigger_words: str | list[str] | None = None,
          optimizer_state: str | None = None, online_weights: str | None = None) -> dict[str, str]:
    """Header metadata for a trained file. ``info`` is ``TrainedLoRA.info`` (see loop.train)."""
    algo = info.get("algorithm", "lora")
    rank, alpha = info.get("rank"), info.get("alpha")
    conv = bool(info.get("has_conv"))
    args = {"algo": algo} if algo != "lora" else {}
    if conv:      # kohya's conv_dim / conv_alpha: the kxk convs' own, or (older runs) the rank's
        conv_dim = info.get("conv_dim")
        args.update(conv_dim=str(conv_dim or rank), conv_alpha=str(info.get("conv_alpha") if conv_dim else alpha))
    if algo == "lokr":
        args["factor"] = "-1"
    finished = float(info.get("finished_at") or 0)
    triggers = trigger_list(trigger_words)
    arch = info.get("modelspec_architecture") or "unknown"
    meta: dict[str, str] = {
        # kohya sd-scripts
        "ss_network_module": _NETWORK_MODULE.get(algo, "lycoris.kohya"),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not info.get("train_text_encoder")),
        "ss_base_model_version": info.get("base_model_version") or "unknown",
        "ss_v2": str(info.get("base_model_version", "").startswith("sd_v2")),
        "ss_steps": str(info.get("steps", 0)),
        "ss_max_train_steps": str(info.get("max_train_steps") or info.get("steps", 0)),
        "ss_learning_rate": str(info.get("learning_rate")),
        "ss_unet_lr": str(info.get("learning_rate")),
        "ss_text_encoder_lr": _kohya(info.get("text_encoder_lr")),
        "ss_lr_scheduler": str(info.get("lr_scheduler") or "constant"),
        "ss_lr_warmup_steps": str(info.get("lr_warmup_steps") or 0),
        "ss_min_snr_gamma": _kohya(info.get("min_snr_gamma")),
        "ss_noise_offset": _kohya(info.get("noise_offset")),
        "ss_adaptive_noise_scale": _kohya(info.get("adaptive_noise_scale")),
        "ss_optimizer": _OPTIMIZER_CLASS.get(info.get("optimizer"), str(info.get("optimizer"))),
        "ss_loss_type": _KOHYA_LOSS.get(info.get("loss"), str(info.get("loss"))),
        "ss_seed": str(info.get("seed")),
        "ss_batch_size_per_device": str(info.get("batch_size")),
        "ss_gradient_accumulation_steps": str(info.get("grad_accumulation_steps")),
        "ss_gradient_checkpointing": str(bool(info.get("gradient_checkpointing"))),
        "ss_mixed_precision": "bf16" if info.get("training_dtype") == "bf16" else "no",
        "ss_num_train_images": str(info.get("num_samples", 0)),
        "ss_training_started_at": str(info.get("started_at")),
        "ss_training_finished_at": str(info.get("finished_at")),
        "ss_output_name": output_name,
        "ss_training_comment": "trained in ComfyUI with LoRA Lab" + (
            f"; the weights are an EMA of the training weights (decay {info['ema_decay']})"
            if info.get("ema_decay") else ""),
        # SAI model spec
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/{'lora' if algo == 'lora' else 'lycoris'}",
        "modelspec.implementation": info.get("modelspec_implementation") or "https://github.com/comfyanonymous/ComfyUI",
        "modelspec.title": output_name,
        "modelspec.date": _iso(finished) if finished else "",
        # resume
        "lora_lab.version": VERSION,
        "lora_lab.algorithm": algo,
        "lora_lab.rank": str(rank),
        "lora_lab.alpha": str(alpha),
        "lora_lab.steps": str(info.get("steps", 0)),
        "lora_lab.seed": str(info.get("seed")),
        "lora_lab.lora_dtype": str(info.get("lora_dtype")),
        "lora_lab.optimizer": str(info.get("optimizer")),
        "lora_lab.prediction": str(info.get("prediction")),
        "lora_lab.architecture": info.get("architecture") or arch,   # lora.arch variant id
    }
    if info.get("resolution"):
        meta["modelspec.resolution"] = info["resolution"]
        meta["ss_resolution"] = str(tuple(int(v) for v in info["resolution"].split("x")))
    if info.get("prediction") in ("eps", "v"):
        meta["modelspec.prediction_type"] = {"eps": "epsilon", "v": "v"}[info["prediction"]]
    if info.get("existing_lora"):
        meta["lora_lab.resumed_from"] = info["existing_lora"]
    tag_frequency = dict((info.get("dataset") or {}).get("tag_frequency") or {})
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
        n = int(info.get("num_samples", 0)) or 1
        tag_frequency["lora_lab"] = {w: n for w in triggers}
    if tag_frequency:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    meta.update(_recipe(info))
    meta.update(_dataset(info.get("dataset")))
    if optimizer_state:
        meta["lora_lab.optimizer_state"] = optimizer_state
    if online_weights:
        meta["lora_lab.online_weights"] = online_weights
    return meta


def _recipe(info: Mapping) -> dict[str, str]:
    """The recipe's own keys (kohya has none for these): what resume and readers need."""
    out = {"lora_lab.lr_scheduler": str(info.get("lr_scheduler") or "constant"),
           "lora_lab.lr_warmup_steps": str(info.get("lr_warmup_steps") or 0),
           "lora_lab.lr_scheduler_num_cycles": str(info.get("lr_scheduler_num_cycles") or 1),
           "lora_lab.max_train_steps": str(info.get("max_train_steps") or info.get("steps", 0))}
    if info.get("ema_decay"):
        out["lora_lab.ema_decay"] = str(info["ema_decay"])
        out["lora_lab.weights"] = "ema"
    if info.get("train_text_encoder"):
        out["lora_lab.text_encoder_lr"] = str(info.get("text_encoder_lr"))
    return out


def _dataset(ds: Mapping | None) -> dict[str, str]:
    """kohya's dataset keys, from the dataset node's description of the data."""
    if not ds:
        return {}
    b, c = ds.get("buckets") or {}, ds.get("captions") or {}
    out = {"ss_dataset_dirs": json.dumps(ds.get("dataset_dirs") or {}),
           "ss_bucket_info": json.dumps(ds.get("bucket_info") or {}),
           "ss_num_train_images": str(ds.get("num_train_images", 0)),
           "ss_shuffle_caption": str(bool(c.get("shuffle"))), "ss_keep_tokens": str(c.get("keep_tokens", 0)),
           "ss_caption_dropout_rate": str(c.get("dropout_rate", 0.0)),
           "ss_caption_tag_dropout_rate": str(c.get("tag_dropout_rate", 0.0))}
    if b:
        out.update(ss_enable_bucket=str(bool(b.get("enabled"))), ss_bucket_no_upscale=str(bool(b.get("no_upscale"))),
                   ss_min_bucket_reso=str(b.get("min_size")), ss_max_bucket_reso=str(b.get("max_size")),
                   ss_resolution=str(tuple(b.get("resolution") or ())))
    return out


def from_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """Best-effort info for a LORA_MODEL that carries none (e.g. one trained by core ComfyUI)."""
    downs = [t for k, t in sd.items() if k.endswith((".lora_down.weight", ".hada_w1_b", ".lokr_w2_b"))]
    algo = "lora"
    if any(k.endswith(".hada_w1_a") for k in sd):
        algo = "loha"
    elif any(k.endswith(".lokr_w1") for k in sd):
        algo = "lokr"
    elif any(k.endswith(".oft_blocks") for k in sd):
        algo = "oft"
    rank = max((t.shape[0] for t in downs), default=0)
    alphas = [float(t) for k, t in sd.items() if k.endswith(".alpha") and t.numel() == 1]
    return {"algorithm": algo, "rank": rank, "alpha": alphas[0] if alphas else rank,
            "has_conv": any(t.dim() == 4 for t in downs)}


# ---- tensors in the header (optimizer state, the live factors under an EMA) -----------------------
def encode_tensors(tensors: Mapping[str, torch.Tensor] | None, budget: int = MAX_OPTIMIZER_STATE) -> str | None:
    """base64 of safetensors bytes, or None when empty or larger than ``budget`` bytes encoded."""
    if not tensors:
        return None
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    if (len(raw) + 2) // 3 * 4 > budget:
        return None
    return base64.b64encode(raw).decode("ascii")


def decode_tensors(text: str, key: str, file: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return dict(load(base64.b64decode(text.encode("ascii"), validate=True)))
    except Exception as e:
        raise TrainingError(f"{key} in the header is damaged ({type(e).__name__}: {e})", file=file) from None



def read_steps(metadata: Mapping[str, str]) -> int:
    """Steps already trained, from our key or kohya's (never from the file name)."""
    for key in ("lora_lab.steps", "ss_steps"):
        v = metadata.get(key)
        if v not in (None, "", "None"):
            try:
                return int(float(v))
            except ValueError:
                continue
    return 0
