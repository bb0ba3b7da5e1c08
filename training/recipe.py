"""kohya's training recipe, as the loop applies it (train_network.py, library/train_util.py).

Every option is off by default, which leaves a run exactly as it was without them.

network alpha           the factors' scale is alpha / rank (kohya's --network_alpha, default 1)
lr scheduler            schedule.py: warm-up then constant / linear / cosine / cosine with restarts,
                        one factor for every parameter group, a pure function of the global step
                        over a run ending at (steps already trained + steps)
text-encoder LoRA       ``te_targets`` (the CLIP's attention and MLP Linear layers, kohya's
                        lora_te_ / lora_te1_ / lora_te2_ names) train with ``text_encoder_lr`` in a
                        second parameter group; captions are then encoded through the adapted text
                        encoder at every step (kohya: train_text_encoder). 0 = no text-encoder LoRA
caption variants        captions.py: shuffle / keep_tokens / dropout per step, when the data carries
                        captions (our dataset node) and the denoiser can encode text
min-SNR-γ, noise offset objective.py
EMA                     ema.py; the LoRA returned and saved is the average, the live factors go
                        along for resume, the metadata says so (lora_lab.ema_decay)
save / sample every N   callbacks the caller provides (the node saves numbered files into loras/
                        and samples with ComfyUI's own sampler), called after global steps that
                        are multiples of N, with the EMA weights in place when EMA is on
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from . import adapters as ad
from .captions import process
from .ema import EMA
from .errors import TrainingError
from .schedule import Schedule


def schedule_of(config) -> Schedule:
    return Schedule(config.lr_scheduler, config.lr_warmup_steps, config.lr_scheduler_num_cycles)


def check(config) -> None:
    """Refuse recipe values that make no sense, naming the value and what is expected."""
    schedule_of(config).check()
    if not (isinstance(config.alpha, (int, float)) and math.isfinite(config.alpha) and config.alpha >= 0):
        raise TrainingError(f"network_alpha = {config.alpha} must be ≥ 0 (kohya: 0 means alpha = rank)")
    if not (math.isfinite(config.text_encoder_lr) and 0.0 <= config.text_encoder_lr <= 1.0):
        raise TrainingError(f"text_encoder_lr = {config.text_encoder_lr} must be between 0 (no text-encoder LoRA) "
                            "and 1")
    if not (math.isfinite(config.ema_decay) and (config.ema_decay == 0.0 or 0.0 < config.ema_decay < 1.0)):
        raise TrainingError(f"ema_decay = {config.ema_decay} must be between 0 and 1 (e.g. 0.999), or 0 for off")
    for name in ("save_every_n_steps", "sample_every_n_steps"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 0:
            raise TrainingError(f"{name} = {v} must be a whole number ≥ 0 (0 for off)")


# ---- learning rates ------------------------------------------------------------------------------
def groups(params: Mapping[str, nn.Parameter], te_params: Mapping[str, nn.Parameter], config):
    """Optimizer parameter groups: None (one group, as without a text-encoder LoRA) or
    [(UNet names, learning_rate), (text-encoder names, text_encoder_lr)]."""
    if not te_params:
        return None
    return [(list(params), config.learning_rate), (list(te_params), config.text_encoder_lr)]


def set_lr(opt: torch.optim.Optimizer, base: Sequence[float], schedule: Schedule, step: int, total: int) -> float:
    """Set every group's learning rate for the optimizer step after ``step`` steps; returns the factor."""
    f = schedule.factor(step, total)
    for g, lr in zip(opt.param_groups, base):
        g["lr"] = lr * f
    return f


# ---- the text encoder -----------------------------------------------------------------------------
def build_text_encoder(te_targets: Mapping[str, nn.Module] | None, config, resume,
                       notes: list[str]) -> dict[str, ad.TrainableAdapter]:
    """Adapters for the text encoder's layers (none when text_encoder_lr is 0 or nothing is given);
    continued from ``resume`` when it holds them, fresh otherwise."""
    if not te_targets or not config.text_encoder_lr:
        return {}
    held_adapters = None
    if resume is not None:
        held = {k: v for k, v in resume.adapters.items() if k in te_targets}
        if held and len(held) != len(te_targets):
            raise TrainingError(f"existing_lora holds {len(held)} of the text encoder's {len(te_targets)} trained "
                                "layers: it cannot be continued with this text encoder")
        if held:
            held_adapters = held
        else:
            notes.append("existing_lora has no text-encoder LoRA: the text encoder's starts fresh")
    return ad.create_adapters(dict(te_targets), config.algorithm, config.rank, config.alpha, config.seed,
                              config.lora_dtype, held_adapters)


# ---- EMA ----------------------------------------------------------------------------------------------
def make_ema(params: Mapping[str, nn.Parameter], config, resume, notes: list[str]) -> EMA | None:
    if not config.ema_decay:
        return None
    start = resume.ema if resume is not None and getattr(resume, "ema", None) else None
    if start is not None:
        missing = [n for n in params if n not in start]
        if missing:
            notes.append(f"existing_lora's EMA lacks {len(missing)} factor(s): they start from the live ones")
    return EMA(params, config.ema_decay, start)


@contextlib.contextmanager
def ema_weights(ema: EMA | None, params: Mapping[str, nn.Parameter]):
    """The EMA in the parameters while the block runs (what is saved or sampled), then the live
    factors back exactly."""
    if ema is None:
        yield
        return
    live = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ema.shadow[n])
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(live[n])


# ---- captions per step ------------------------------------------------------------------------------------
class StepCaption(NamedTuple):
    """What ``denoise`` gets for a sample whose caption is encoded at this step: its conditioning
    index (for whatever else that conditioning carries) and this step's caption text."""
    index: int
    text: str


class StepTexts:
    """Turns a micro-batch's conditioning indices into the caption each sample sees at this step,
    when captions vary per step or the text encoder trains; otherwise leaves the indices alone."""

    def __init__(self, dataset, config, te_training: bool, can_encode: bool):
        caps = dataset.captions
        self.captions = caps
        self.seed = config.seed
        varies = bool(caps) and any(c is not None and c[1].varies for c in caps)
        if te_training and (not caps or any(c is None for c in caps)):
            raise TrainingError("training the text encoder needs the captions: feed the train node from the LoRA Lab "
                                "training dataset node (its conditioning carries them)")
        self.active = te_training or (varies and can_encode)
        self.skipped = varies and not can_encode

    def __call__(self, conds: list[int], step: int, micro: int, positions=None) -> list:
        """``positions``: each sample's place in the global batch (default 0, 1, …), so a caption
        variant is the same whichever process computes the sample."""
        if not self.active:
            return conds
        out = []
        for pos, c in zip(positions if positions is not None else range(len(conds)), conds):
            text, options = self.captions[c]
            rng = random.Random(ad.mix(self.seed, step, micro, pos, 0xCA9))
            out.append(StepCaption(c, process(text, options, rng)))
        return out


# ---- metadata ------------------------------------------------------------------------------------------
def info(config, objective, te_adapters: Mapping, ema: EMA | None, texts: StepTexts) -> dict:
    """What the metadata records about the recipe (metadata.build turns it into ss_* keys)."""
    return {
        "lr_scheduler": config.lr_scheduler, "lr_warmup_steps": config.lr_warmup_steps,
        "lr_scheduler_num_cycles": config.lr_scheduler_num_cycles,
        "text_encoder_lr": config.text_encoder_lr if te_adapters else None, "train_text_encoder": bool(te_adapters),
        "min_snr_gamma": objective.min_snr_gamma or None, "noise_offset": objective.noise_offset or None,
        "adaptive_noise_scale": objective.adaptive_noise_scale or None,
        "ema_decay": ema.decay if ema is not None else None,
        "save_every_n_steps": config.save_every_n_steps or None,
        "sample_every_n_steps": config.sample_every_n_steps or None,
        "caption_variants_per_step": texts.active,
    }


__all__ = ["StepCaption", "StepTexts", "build_text_encoder", "check", "ema_weights", "groups", "info", "make_ema",
           "schedule_of", "set_lr"]
