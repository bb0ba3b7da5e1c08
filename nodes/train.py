"""LoraLabTrainLoraNode: train a LoRA (LoRA, LoHa, LoKr, OFT) on a few latents inside the graph.

The node unpacks its inputs and calls ``training.loop.train``. What ComfyUI-specific the core
needs comes from here as plain callables: the model's own sampling and latent format, a
denoiser returning the network's raw output for a batch, kohya names for the UNet's layers
(from ComfyUI's ``unet_to_diffusers``), and a progress callback that honours ``/interrupt``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy_execution.graph_utils import ExecutionBlocker

from ..lora import arch
from ..lora.io import read, resolve_in
from ..training import adapters, layers, loop, objective, resume, schedule
from ..training.distributed import SINGLE, PeerLost, World
from ..training.errors import TrainingError
from ..training.recipe import StepCaption
from ..training.save import save as save_lora
from . import comfy_model, train_recipe

log = logging.getLogger("LoRA Lab")
NONE = "[None]"

# first match wins: EDM and X0 subclass V_PREDICTION / EPS but predict something else
_PREDICTION = [(comfy.model_sampling.EDM, None), (comfy.model_sampling.X0, None),
               (comfy.model_sampling.V_PREDICTION, "v"), (comfy.model_sampling.EPS, "eps"),
               (comfy.model_sampling.CONST, "flow")]


# ---- glue: ComfyUI objects -> plain callables ---------------------------------------------------
def model_info(model) -> dict:
    """Architecture ids for the metadata (from lora.arch's table), and the prediction type, of a MODEL."""
    cfg = model.model.model_config
    pred = prediction(model)
    variant = arch.by_comfy_class(type(cfg).__name__, cfg.unet_config, pred)
    if variant is None:   # a model class no table entry lists (a newer ComfyUI): say what it is, plainly
        name = type(cfg).__name__
        version, spec, impl, arch_id = name.lower(), name.lower(), arch.IMPL_COMFY_UI, name.lower()
    else:
        (version, spec, impl), arch_id = variant.metadata_ids(), variant.id
    return {"base_model_version": version, "modelspec_architecture": spec, "modelspec_implementation": impl,
            "architecture": arch_id, "comfy_model": type(cfg).__name__}


def prediction(model) -> str:
    ms = model.get_model_object("model_sampling")
    for cls, name in _PREDICTION:
        if isinstance(ms, cls):
            if name is None:
                break
            return name
    raise TrainingError(f"this model predicts with {type(ms).__mro__[1].__name__}; training supports ε, v "
                             "and flow-velocity models")


def variant_of(model):
    """The lora.arch Variant of a MODEL (None for a model class no table entry lists)."""
    cfg = model.model.model_config
    return arch.by_comfy_class(type(cfg).__name__, cfg.unet_config, prediction(model))


def _unet_paths(model) -> dict[str, str]:
    """ComfyUI module path -> diffusers module path, for UNets (SD1.x/2.x/XL); {} for other models."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {v[: -len(".weight")]: k[: -len(".weight")] for k, v in mapping.items() if k.endswith(".weight")}


def train_targets(model, conv: bool = False, superset: bool = False) -> dict[str, torch.nn.Module]:
    """{file name: layer} of the layers the family's reference trainer trains (training/layers.py):
    kohya names ``lora_unet_<module path>``, diffusers paths for UNets. ``conv``: also the conv
    blocks (kohya's conv_dim > 0). ``superset``: every layer a file for this model may hold (both
    of those, plus every Linear of the repeated blocks), to match an existing LoRA against."""
    v = variant_of(model)
    rule = layers.rule_for(v.id if v else None, v.arch.id if v else None)
    rename = _unet_paths(model)
    if rename and rule is None:       # a UNet the table has no entry for: kohya's SD selection
        rule = layers.RULES["sd1"]
    root = model.model.diffusion_model
    found = layers.find_layers(root, rule, conv=conv or superset, rename=rename or None)
    if superset and not rename:
        for name, hit in layers.find_layers(root, None).items():
            found.setdefault(name, hit)
    return {name: layer for name, (layer, _) in found.items()}


def thaw(module: torch.nn.Module) -> None:
    """Models loaded while ComfyUI executes hold inference tensors, which autograd cannot save for
    backward; give them ordinary copies (same values) once, so the frozen layers can sit in a graph."""
    with torch.inference_mode(False):
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is not None and t.is_inference():
                        copy = t.detach().clone()
                        store[k] = torch.nn.Parameter(copy, requires_grad=False) if k in m._parameters else copy


def denoiser(model, conditioning: list, encode_text=None):
    """(x_t, σ, conds) -> the diffusion model's raw output, through ComfyUI's apply_model (so
    every architecture's conditioning, timestep and input scaling are its own). ``conds`` are
    conditioning indices, or StepCaptions (per-step caption variants, a training text encoder)
    whose text ``encode_text`` turns into a conditioning entry."""
    base = model.model
    cache: dict = {}
    captured = {}
    transformer_options = dict(model.model_options.get("transformer_options", {}))

    def entry_for(c: StepCaption) -> list:
        """This step's caption through the text encoder, with the rest of its conditioning entry
        (e.g. SDXL's size conditioning) taken from the dataset."""
        cond, extra = encode_text(c.text)
        base = conditioning[c.index][1] if len(conditioning[c.index]) > 1 else {}
        return [cond, {**{k: v for k, v in base.items() if not isinstance(v, torch.Tensor)}, **extra}]

    def conds_for(i, x: torch.Tensor) -> dict:
        key = (i, tuple(x.shape[1:]))
        fixed = not isinstance(i, StepCaption)    # a text's encoding is cached (or not) by encode_text
        if not fixed or key not in cache:
            entry = conditioning[i] if fixed else entry_for(i)
            c = comfy.sampler_helpers.convert_cond([entry])
            c = comfy.samplers.encode_model_conds(base.extra_conds, c, x[:1], x.device, "positive",
                                                  latent_image=x[:1])
            out = {k: v.process_cond(batch_size=1, area=None) for k, v in c[0]["model_conds"].items()}
            if not fixed:
                return out
            cache[key] = out
        return cache[key]

    def grab(module, args, kwargs, output):
        captured["out"] = output

    def denoise(x_t, sigma, conds):
        kwargs = comfy.samplers.cond_cat([conds_for(i, x_t) for i in conds])
        handle = base.diffusion_model.register_forward_hook(grab, with_kwargs=True)
        try:
            base.apply_model(x_t, sigma, transformer_options=dict(transformer_options), **kwargs)
        finally:
            handle.remove()
        return captured.pop("out")

    return denoise


def progress(total: int, node_id):
    """ComfyUI progress bar + loss text + the live loss chart's data; returns True (stop) once
    /interrupt was asked for."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    server = _server()
    chart = LossStream(server, node_id)

    def on_step(step, total, loss):
        try:
            bar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:
            return _stop(step)
        if server is not None and node_id is not None:
            server.send_progress_text(f"step {step}/{total} · loss {loss:.4f}", node_id)
            chart.add(step, total, loss)
        if comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)
            return _stop(step)
        return False
    return on_step


LOSS_EVENT = "loralab.loss"      # websocket message web/loss_chart.js listens for
LOSS_POINTS = 500                # most points a chart receives at the end of a run


def _finite(v) -> float | None:
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None   # JSON has no NaN/inf


class LossStream:
    """Sends each step's loss to the UI (to the client that queued the prompt, as ComfyUI's own
    progress messages go), batched to at most ~10 messages a second for fast steps."""

    def __init__(self, server, node_id, interval: float = 0.1):
        self.server, self.node_id, self.interval = server, node_id, interval
        self.pending: list = []
        self.last = float("-inf")   # the first step goes out at once

    def add(self, step: int, total: int, loss) -> None:
        self.pending.append([step, _finite(loss)])
        now = time.monotonic()
        if step >= total or now - self.last >= self.interval:
            self.flush(total)
            self.last = now

    def flush(self, total: int) -> None:
        if not self.pending or getattr(self.server, "client_id", None) is None:
            return
        data = {"node": str(self.node_id), "prompt_id": getattr(self.server, "last_prompt_id", None),
                "total": total, "points": self.pending}
        self.pending = []
        try:
            self.server.send_sync(LOSS_EVENT, data, self.server.client_id)
        except Exception:   # the chart is a view: never let it stop a training run
            log.debug("LoRA Lab: could not send the loss to the UI", exc_info=True)


def loss_curve(losses: list, total: int, max_points: int = LOSS_POINTS) -> dict:
    """The run's losses for the node's chart: every step, or bucket means when there are more
    than ``max_points`` (each at its bucket's last step)."""
    n = len(losses)
    if n <= max_points:
        points = [[i + 1, _finite(v)] for i, v in enumerate(losses)]
    else:
        points = []
        for b in range(max_points):
            lo, hi = b * n // max_points, (b + 1) * n // max_points
            vals = [float(v) for v in losses[lo:hi] if _finite(v) is not None]
            points.append([hi, sum(vals) / len(vals) if vals else None])
    return {"total": total, "steps": n, "points": points}


def _stop(step):
    log.info("LoRA Lab: training interrupted after step %d; returning the LoRA as of that step", step)
    return True


def _server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except Exception:
        return None


def release(mp) -> None:
    """Unload the training clone (its compute-dtype patch and cast flags go with it), so the shared
    model is exactly as it was for whatever runs next."""
    loaded = comfy.model_management.current_loaded_models
    for i, lm in enumerate(loaded):
        if lm.model is mp:
            loaded.pop(i).model_unload()
            return


def flat_conditioning(positive: list) -> list:
    """INPUT_IS_LIST gives a list of CONDITIONING lists; flatten to one entry per sample."""
    out = []
    for c in positive:
        out.extend(c if isinstance(c, list) else [c])
    return out


def train_lora(model, latents: list, positive: list, config: loop.TrainConfig, existing_lora: str | None,
               node_id=None, extra: train_recipe.RecipeInputs | None = None, *, world: World = SINGLE,
               on_step=None, saver=None, recover=None, apply: bool = True) -> dict:
    """Everything the node does, with ComfyUI objects in and out; scripts/train.py calls it too.

    ``existing_lora``: a name in the loras folders, or a file path. ``world``: this process's place
    in a data-parallel run (every process calls this with the same inputs). Defaults are the node's:
    ``on_step`` the progress bar and loss chart, ``saver`` save-every-N files in loras/, ``recover``
    (TrainResult -> name) where the last good LoRA goes when a run stops on a NaN. ``apply``: also
    return the input model (and clip) with the LoRA applied."""
    extra = extra or train_recipe.RecipeInputs()
    conditioning = flat_conditioning(positive)
    captions, dataset_info = train_recipe.captions_of(conditioning)
    samples = [l["samples"] for l in latents if l is not None]
    clip = extra.clip
    te_training = clip is not None and config.text_encoder_lr > 0
    if config.text_encoder_lr > 0 and clip is None:
        log.warning("LoRA Lab: text_encoder_lr is set but no clip is connected to Train LoRA: training the "
                    "diffusion model only")
    if saver is None and config.save_every_n_steps and world.main:
        saver = train_recipe.CheckpointSaver(extra.checkpoint_prefix)
    mp = model.clone()
    mp.set_model_compute_dtype(config.training_dtype)
    comfy.model_management.load_models_gpu([mp] + ([clip.patcher] if te_training else []), memory_required=1e20,
                                           force_full_load=True)
    try:
        diffusion_model = mp.model.diffusion_model
        thaw(diffusion_model)
        te_targets = train_recipe.text_encoder_targets(clip, thaw) if te_training else {}
        info = model_info(mp)
        if dataset_info:
            info["dataset"] = dataset_info
        res = None
        if existing_lora:
            candidates = train_targets(mp, superset=True)
            res = resume.load(read(_existing_path(existing_lora)), {**candidates, **te_targets}, config.algorithm,
                              info["modelspec_architecture"])
            targets = {n: m for n, m in candidates.items() if n in res.adapters}
        else:
            targets = train_targets(mp, conv=config.conv_dim > 0)
        dataset = loop.make_dataset(samples, len(conditioning), mp.model.process_latent_in, captions)
        obj = objective.Objective(mp.get_model_object("model_sampling"), prediction(mp), config.loss,
                                  min_snr_gamma=extra.min_snr_gamma, noise_offset=extra.noise_offset,
                                  adaptive_noise_scale=extra.adaptive_noise_scale)
        encode = train_recipe.TextEncoder(clip, te_training) if clip is not None else None
        sampler = train_recipe.SampleMaker(
            mp, clip, extra.vae, extra.sample_prompt, train_recipe.largest_bucket(latents), config.seed, node_id,
            train_recipe.sample_prefix(extra.checkpoint_prefix), te_training) \
            if config.sample_every_n_steps and world.main else None
        with contextlib.ExitStack() as stack:
            if not _unet_paths(mp):      # Flux / HunyuanVideo blocks add residuals in place after a LayerNorm
                stack.enter_context(loop.copied_norm_inputs(diffusion_model))
            if te_training:
                stack.enter_context(loop.copied_norm_inputs(clip.cond_stage_model))
            try:
                result = loop.train(targets=targets, denoise=denoiser(mp, conditioning, encode), objective=obj,
                                    dataset=dataset, config=config, resume=res, root=diffusion_model,
                                    on_step=on_step or progress(config.steps, node_id), info=info,
                                    te_targets=te_targets, te_root=clip.cond_stage_model if te_training else None,
                                    on_save=saver, on_sample=sampler, can_encode_text=encode is not None, world=world)
            except TrainingError as e:
                raise _keep_last_good(e, recover if recover is not None else _recover_in_loras, world) from None
    finally:
        release(mp)
    for note in result.notes:
        log.info("LoRA Lab: %s", note)
    te_trained = any(k.startswith("lora_te") for k in result.lora)
    out = {"lora": result.lora, "loss": {"loss": list(result.losses)}, "steps": result.steps,
           "images": sampler.images if sampler else [], "saved": getattr(saver, "saved", []), "notes": result.notes,
           "model": model, "clip": clip}
    if apply:
        model_with_lora, clip_with_lora, _ = comfy_model.load_lora(model, clip if te_trained else None, result.lora,
                                                                   1.0, 1.0 if te_trained else 0.0)
        out.update(model=model_with_lora, clip=clip_with_lora if te_trained else clip)
    return out


def _existing_path(existing: str) -> str:
    """A LoRA to continue: a file path (scripts), else a name in the loras folders (the node's combo)."""
    if os.path.isabs(existing) and os.path.isfile(existing):
        return existing
    return resolve_in(folder_paths.get_folder_paths("loras"), existing)


def _recover_in_loras(result) -> str:
    _, name = save_lora(result.lora, folder_paths.get_folder_paths("loras")[0], subfolder="loralab_recovery",
                        filename_prefix=f"stopped_at_step_{result.steps}")
    return name


def _keep_last_good(e: TrainingError, recover, world: World = SINGLE) -> TrainingError:
    """A run that stopped after learning something (e.g. the loss turned NaN): save the LoRA as of
    its last good step where the user can load or resume it (``recover`` -> its name), and say where
    in the error. Not when the other processes of a distributed run were lost (PeerLost): only the
    save-every-N files count then, and only process 0 ever writes."""
    if e.result is None or not e.result.lora or not e.result.steps or isinstance(e, PeerLost) or not world.main:
        return e
    try:
        name = recover(e.result)
    except Exception as save_error:   # the original error matters more; say why nothing was kept
        return TrainingError(f"{e} (the last good state could not be saved: {save_error})", result=e.result)
    return TrainingError(f"{e}. The LoRA as of step {e.result.steps} was saved as {name!r}: load it, or "
                         "continue from it with existing_lora (a lower learning_rate usually helps)",
                         result=e.result)


# ---- the node -----------------------------------------------------------------------------------
def _first(v):
    return v[0] if isinstance(v, list) else v


class LoraLabTrainLoraNode:
    DESCRIPTION = ("Train a LoRA (LoRA, LoHa, LoKr or OFT) on a few latents, with the model's own noise schedule "
                   "and prediction target. Deterministic for a seed; continues an existing LoRA from its "
                   "metadata; Cancel stops after the current step and still returns the LoRA. Optional: kohya's "
                   "recipe (network alpha, LR scheduler, min-SNR-γ, noise offset, EMA, text-encoder LoRA, "
                   "save and sample every N steps).")
    CATEGORY = "training/LoRA Lab"
    FUNCTION = "train"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "CLIP")
    RETURN_NAMES = ("model_with_lora", "lora", "loss", "steps", "clip_with_lora")
    OUTPUT_TOOLTIPS = (
        "The input model with the trained LoRA applied (a patched clone; the input is untouched).",
        "The trained LoRA: a state dict with kohya key names. Save it with Save LoRA (LoRA Lab).",
        "The loss of every training step (for a loss graph).",
        "Total training steps of this LoRA, counting the steps of an existing LoRA it continued.",
        "The clip input with the trained text-encoder LoRA applied (the clip input itself when no text-encoder "
        "LoRA was trained; nothing when no clip is connected).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train the LoRA on."}),
                "latents": ("LATENT", {"tooltip": "The dataset: one latent, a batch, or a list of latents of "
                                                  "different sizes (bucketed by size)."}),
                "positive": ("CONDITIONING", {"tooltip": "The captions: one conditioning per latent (same order), "
                                                         "or a single one used for all."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 10000,
                                       "tooltip": "Samples per training step (taken from one size bucket)."}),
                "grad_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024,
                                                    "tooltip": "Batches whose gradients are summed before each "
                                                               "optimizer step."}),
                "steps": ("INT", {"default": 16, "min": 1, "max": 100000,
                                  "tooltip": "Optimizer steps to train for."}),
                "learning_rate": ("FLOAT", {"default": 0.0005, "min": 0.0000001, "max": 1.0, "step": 0.0000001,
                                            "tooltip": "The learning rate."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 128,
                                 "tooltip": "Rank of the LoRA factors (for OFT: the block size)."}),
                "optimizer": (list(loop.OPTIMIZERS), {"default": "AdamW", "tooltip": "The optimizer."}),
                "loss_function": (list(objective.LOSSES), {"default": "MSE",
                                  "tooltip": "How the prediction is compared with the model's own target "
                                             "(ε, v or flow velocity)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Drives the LoRA's initialisation, batch order, timesteps and noise: "
                                            "the same seed and inputs give the same LoRA."}),
                "training_dtype": (list(loop.DTYPES), {"default": "bf16",
                                   "tooltip": "Precision of the model's computation while training (on a GPU bf16 is "
                                              "fastest; on a CPU fp32 usually is)."}),
                "lora_dtype": (list(loop.DTYPES), {"default": "bf16",
                               "tooltip": "Precision the LoRA's factors are trained and stored in."}),
                "algorithm": (adapters.algorithms(), {"default": "LoRA",
                              "tooltip": "LoRA: low-rank (kohya LoRA/LoCon); LoHa: Hadamard product; LoKr: "
                                         "Kronecker product; OFT: orthogonal (block rotation) fine-tuning. "
                                         "Core's TrainLoraNode names; lora/loha/lokr/oft of older workflows "
                                         "are still accepted."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                           "tooltip": "Recompute activations in the backward pass: much less "
                                                      "memory, somewhat slower."}),
                "existing_lora": ([NONE] + folder_paths.get_filename_list("loras"), {"default": NONE,
                                  "tooltip": "Continue training this LoRA (its factors, step count and optimizer "
                                             "state are read from the file, whatever it is called), or [None] "
                                             "for a new one."}),
            },
            "optional": RECIPE_INPUTS,
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, algorithm=None):
        """``algorithm``: core's names, or the lowercase ones workflows saved before took. Naming it
        here makes ComfyUI skip its own combo check of this input, so the check is ours."""
        for value in algorithm if isinstance(algorithm, list) else [algorithm]:
            if value is None:        # linked from another node: checked when the node runs
                continue
            if not isinstance(value, str):
                return f"algorithm must be one of {', '.join(adapters.algorithms())}, not {value!r}"
            try:
                adapters.trainable(value)
            except TrainingError as e:
                return str(e)
        return True

    def train(self, model, latents, positive, existing_lora, unique_id=None, prompt=None, **inputs):
        settings = settings_of({k: _first(v) for k, v in inputs.items()})
        config, extra = make_config(settings)
        extra.clip, extra.vae = _first(inputs.get("clip")), _first(inputs.get("vae"))
        existing = _first(existing_lora)
        existing = None if existing == NONE else existing
        if settings["job_name"].strip():
            from . import train_job

            config.check()           # a job with settings the script would refuse is refused here

            text = train_job.write(settings, positive, existing, _first(prompt), _first(unique_id))
            # nothing is trained here: the nodes that take this node's outputs do not run
            return {"ui": {"text": text}, "result": tuple(ExecutionBlocker(None) for _ in self.RETURN_TYPES)}
        out = train_lora(_first(model), latents, positive, config, existing, _first(unique_id), extra)
        result = (out["model"], out["lora"], out["loss"], out["steps"], out["clip"])
        # the node's loss chart (web/loss_chart.js) keeps this after the run
        ui = {"loralab_loss": [loss_curve(out["loss"]["loss"], config.steps)]}
        if out["images"]:
            ui["images"] = out["images"]
        if out["saved"]:
            ui["text"] = ["saved " + ", ".join(out["saved"])]
        return {"ui": ui, "result": result}


# Optional inputs of the train node: kohya's recipe. Every default is today's behaviour.
RECIPE_INPUTS = {
    "clip": ("CLIP", {"tooltip": "The model's text encoder: needed to train a text-encoder LoRA, to vary captions "
                      "per step (shuffle / dropout from the dataset node) and to draw sample images."}),
    "vae": ("VAE", {"tooltip": "The model's VAE: needed to draw sample images."}),
    "network_alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                "tooltip": "LoRA alpha: the factors are scaled by alpha / rank (kohya's "
                                           "--network_alpha; 0 means alpha = rank, i.e. scale 1)."}),
    "lr_scheduler": (list(schedule.SCHEDULERS), {"default": "constant",
                     "tooltip": "How the learning rate changes over the run (kohya / diffusers schedulers): after "
                                "lr_warmup_steps of linear warm-up from 0, constant, linear decay to 0, cosine decay "
                                "to 0, or cosine restarting lr_scheduler_num_cycles times."}),
    "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                "tooltip": "Steps of linear warm-up from learning rate 0 (not with 'constant')."}),
    "lr_scheduler_num_cycles": ("INT", {"default": 1, "min": 1, "max": 1000, "advanced": True,
                                        "tooltip": "Restarts of cosine_with_restarts."}),
    "text_encoder_lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0000001,
                                  "tooltip": "Learning rate of a text-encoder LoRA (kohya names lora_te_...; needs "
                                             "clip and captions from the dataset node). 0: the text encoder is not "
                                             "trained."}),
    "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                "tooltip": "Min-SNR-γ loss weighting (kohya's --min_snr_gamma; 5 is the paper's "
                                           "value): low-noise steps count less. 0: off."}),
    "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                               "tooltip": "Noise offset (kohya's --noise_offset, e.g. 0.05): lets the LoRA learn "
                                          "very dark and very bright images. 0: off."}),
    "adaptive_noise_scale": ("FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0, "step": 0.001, "advanced": True,
                                       "tooltip": "Adds |mean of the latent| × this to the noise offset (kohya's "
                                                  "--adaptive_noise_scale; needs noise_offset). 0: off."}),
    "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99999, "step": 0.0001,
                            "tooltip": "Keep an exponential moving average of the LoRA (e.g. 0.999) and return / save "
                                       "the average (the file's metadata says so). 0: off."}),
    "save_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                   "tooltip": "Save a numbered, resumable LoRA into the loras folder every N steps "
                                              "(checkpoint_prefix_stepNNNNNN_00001.safetensors). 0: off."}),
    "checkpoint_prefix": ("STRING", {"default": "LoRA-Lab/checkpoints/lora",
                                     "tooltip": "Where save_every_n_steps writes, inside the loras folder; sample "
                                                "images go to the output folder under <folder>/samples/."}),
    "sample_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                     "tooltip": "Draw sample_prompt with the LoRA every N steps (ComfyUI's sampler; "
                                                "needs clip and vae); the images show on the node. 0: off."}),
    "sample_prompt": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "One prompt per line, kohya's options after it: --n negative, --w/--h "
                                            "size, --d seed, --l cfg (7.5), --s steps (30), --ss sampler (euler)."}),
}


# inputs added later go last: saved workflows list widget values by position
RECIPE_INPUTS.update({
    "conv_dim": ("INT", {"default": 0, "min": 0, "max": 128,
                         "tooltip": "kohya's conv_dim (LoCon): also train the 3x3 convs of SD/SDXL's ResNet blocks and "
                                    "up/down samplers, at this rank. 0: the attention and MLP layers only (kohya's "
                                    "default). Models without such convs (Flux, SD3, Wan, …) ignore it."}),
    "conv_alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.5, "advanced": True,
                             "tooltip": "kohya's conv_alpha: the conv factors' scale is conv_alpha / conv_dim (0 "
                                        "means conv_alpha = conv_dim)."}),
})
RECIPE_INPUTS["job_name"] = ("STRING", {
    "default": "", "tooltip": "Empty: train here. A name: train elsewhere instead: write the dataset (from Training "
    "Dataset from Folder), these settings and the checkpoint's name to output/LoRA-Lab/jobs/<name>_NNNNN/ for "
    "scripts/train.py --job (one GPU, or several and several machines with torchrun). Nothing trains here and the "
    "nodes after this one do not run."})

# the node's inputs that are settings (plain values, not ComfyUI objects or files): the job file
# holds them and scripts/train.py takes each as a flag of the same name
_OBJECTS = ("model", "latents", "positive", "existing_lora", "clip", "vae")


def setting_specs() -> dict[str, tuple]:
    """{input name: (type, options)} of every setting, in the node's order."""
    req = LoraLabTrainLoraNode.INPUT_TYPES()["required"]
    return {k: v for k, v in {**req, **RECIPE_INPUTS}.items() if k not in _OBJECTS}


def settings_of(values: dict) -> dict:
    """Every setting: the given values, the node's defaults for the rest; unknown names refused."""
    specs = setting_specs()
    unknown = [k for k in values if k not in specs and k not in _OBJECTS]
    if unknown:
        raise TrainingError(f"unknown training setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(specs)}")
    return {k: values.get(k, spec[1].get("default")) for k, spec in specs.items()}


def make_config(s: dict) -> tuple[loop.TrainConfig, train_recipe.RecipeInputs]:
    """The loop's config and the recipe's node-side inputs from settings (``settings_of``)."""
    for name in ("training_dtype", "lora_dtype"):
        if s[name] not in loop.DTYPES:
            raise TrainingError(f"{name} {s[name]!r}: choose one of {', '.join(loop.DTYPES)}")
    config = loop.TrainConfig(
        steps=s["steps"], batch_size=s["batch_size"], grad_accumulation_steps=s["grad_accumulation_steps"],
        learning_rate=s["learning_rate"], rank=s["rank"], optimizer=s["optimizer"], loss=s["loss_function"],
        seed=s["seed"], training_dtype=loop.DTYPES[s["training_dtype"]], lora_dtype=loop.DTYPES[s["lora_dtype"]],
        algorithm=s["algorithm"], gradient_checkpointing=s["gradient_checkpointing"], alpha=s["network_alpha"],
        conv_dim=s["conv_dim"], conv_alpha=s["conv_alpha"], lr_scheduler=s["lr_scheduler"],
        lr_warmup_steps=s["lr_warmup_steps"], lr_scheduler_num_cycles=s["lr_scheduler_num_cycles"],
        text_encoder_lr=s["text_encoder_lr"], ema_decay=s["ema_decay"], save_every_n_steps=s["save_every_n_steps"],
        sample_every_n_steps=s["sample_every_n_steps"])
    extra = train_recipe.RecipeInputs(
        min_snr_gamma=s["min_snr_gamma"], noise_offset=s["noise_offset"],
        adaptive_noise_scale=s["adaptive_noise_scale"], checkpoint_prefix=s["checkpoint_prefix"],
        sample_prompt=s["sample_prompt"])
    return config, extra


NODES = {"LoraLabTrainLoraNode": (LoraLabTrainLoraNode, "Train LoRA (LoRA Lab)")}
