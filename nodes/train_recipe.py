"""Glue for the train node's recipe options (training/recipe.py): the text encoder's layers and
caption encoding, save-every-N files in loras/, and sample images with ComfyUI's own sampler.

Kept apart from nodes/train.py so the node's inputs and the glue each stay small.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths

from ..lora.errors import LoraError
from ..lora.io import relative_parts
from ..training import prompts
from ..training.captions import CaptionOptions
from ..training.errors import TrainingError
from ..training.save import save as save_lora
from .dataset import CAPTION_KEY, DATASET_KEY

log = logging.getLogger("LoRA Lab")
TEXT_CACHE = 256          # caption encodings kept in memory while captions vary per step
CHECKPOINT_PREFIX = "LoRA-Lab/checkpoints/lora"


@dataclass
class RecipeInputs:
    """The train node's recipe inputs that are ComfyUI objects or node-side settings (the rest are
    in loop.TrainConfig and the Objective)."""
    clip: object = None
    vae: object = None
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    adaptive_noise_scale: float = 0.0
    checkpoint_prefix: str = CHECKPOINT_PREFIX
    sample_prompt: str = ""


# ---- the text encoder ------------------------------------------------------------------------------
def te_layer_names(clip):
    """Module path inside ``clip.cond_stage_model`` -> kohya name (lora_te_ / lora_te1_ / lora_te2_),
    for the Linear layers of the CLIP encoders' attention and MLP blocks (the layers kohya's LoRA
    trains: CLIPAttention, CLIPMLP); None for everything else (T5 is not trained, as in kohya)."""
    km = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    by_weight = {}
    for name, key in km.items():
        if isinstance(key, str) and name.startswith(("lora_te_", "lora_te1_", "lora_te2_")) \
                and "_encoder_layers_" in name and key.endswith(".weight"):
            by_weight.setdefault(key[: -len(".weight")], name)

    def name_of(path):
        return by_weight.get(path)
    return name_of


def text_encoder_targets(clip, thaw) -> dict:
    """{kohya name: Linear layer} of the CLIP to train; ``thaw`` makes its weights usable in a graph."""
    from ..training import adapters

    thaw(clip.cond_stage_model)
    targets = adapters.find_targets(clip.cond_stage_model, te_layer_names(clip))
    if not targets:
        raise TrainingError(f"this text encoder ({type(clip.cond_stage_model).__name__}) has no CLIP encoder layers "
                            "to train (kohya trains CLIP-L / CLIP-G; T5 is not trained): set text_encoder_lr to 0")
    return targets


def captions_of(conditioning: list) -> tuple[list, dict | None]:
    """(caption and options per conditioning entry, or None where an entry carries none; the
    dataset description of the first entry that has one)."""
    caps, info = [], None
    for entry in conditioning:
        extra = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
        c = extra.get(CAPTION_KEY)
        caps.append((c["text"], CaptionOptions.from_dict(c.get("options"))) if c else None)
        if info is None and extra.get(DATASET_KEY):
            info = extra[DATASET_KEY]
    return caps, info


class TextEncoder:
    """caption -> conditioning entry [cond, {..}] through ``clip`` (with the text encoder's LoRA hooks
    in place while it trains). Frozen: no graph, and the last TEXT_CACHE encodings are kept."""

    def __init__(self, clip, training: bool):
        self.clip = clip
        self.training = training
        self.cache: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, text: str) -> list:
        if self.training:
            return self._encode(text)
        hit = self.cache.get(text)
        if hit is not None:
            self.cache.move_to_end(text)
            return hit
        with torch.no_grad():
            out = self._encode(text)
        self.cache[text] = out
        if len(self.cache) > TEXT_CACHE:
            self.cache.popitem(last=False)
        return out

    def _encode(self, text: str) -> list:
        cond, extra = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), show_pbar=False)[0]
        return [cond, {k: v for k, v in extra.items() if k not in (CAPTION_KEY, DATASET_KEY)}]


# ---- save every N steps -----------------------------------------------------------------------------
class CheckpointSaver:
    """Writes ``<prefix>_step<N>_NNNNN.safetensors`` into the loras folder at every call: atomic, never
    overwriting, with the metadata and resume state of a saved LoRA; lists the names written."""

    def __init__(self, prefix: str, trigger_words: str = ""):
        prefix = prefix.strip()
        if not prefix:
            raise TrainingError("checkpoint_prefix is empty: name where the save-every-N files go (e.g. "
                                "LoRA-Lab/checkpoints/my_lora)")
        try:
            parts = relative_parts(prefix, "checkpoint_prefix")
        except LoraError as e:
            raise TrainingError(str(e)) from None
        self.folder, self.name = "/".join(parts[:-1]), parts[-1]
        self.trigger_words = trigger_words
        self.saved: list[str] = []

    def __call__(self, result) -> None:
        _, name = save_lora(result.lora, folder_paths.get_folder_paths("loras")[0], subfolder=self.folder,
                            filename_prefix=f"{self.name}_step{result.steps:06d}", trigger_words=self.trigger_words)
        folder_paths.filename_list_cache.pop("loras", None)
        self.saved.append(name)
        log.info("LoRA Lab: saved %s (step %d)", name, result.steps)


# ---- sample images ---------------------------------------------------------------------------------------
class SampleMaker:
    """Samples ``prompts`` with ComfyUI's own sampler from the model being trained (its LoRA hooks in
    place), decodes them with ``vae`` and saves them to the output folder; the images are listed for
    the node's ui and shown as the progress bar's preview while training runs."""

    def __init__(self, model, clip, vae, text: str, size: tuple[int, int], seed: int, node_id=None,
                 prefix: str = "LoRA-Lab/samples/sample", text_encoder_trains: bool = False):
        if clip is None or vae is None:
            raise TrainingError("sample_every_n_steps needs the clip and vae inputs of Train LoRA connected")
        self.prompts = prompts.parse(text, comfy.samplers.KSampler.SAMPLERS)
        if not self.prompts:
            raise TrainingError("sample_every_n_steps is set but sample_prompt is empty")
        self.model, self.clip, self.vae = model, clip, vae
        self.size, self.seed, self.node_id, self.prefix = size, seed, node_id, prefix
        self.images: list[dict] = []
        self._encoded: dict | None = None if text_encoder_trains else {}    # prompts encode once unless the TE trains

    def _encode(self, text: str) -> list:
        if self._encoded is not None and text in self._encoded:
            return self._encoded[text]
        out = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), show_pbar=False)
        if self._encoded is not None:
            self._encoded[text] = out
        return out

    def __call__(self, step: int) -> None:
        import nodes as comfy_nodes

        for i, p in enumerate(self.prompts):
            w, h = p.width or self.size[0], p.height or self.size[1]
            fmt = self.model.model.latent_format
            latent = torch.zeros(1, fmt.latent_channels, h // 8, w // 8)
            seed = self.seed if p.seed is None else p.seed
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(self.model, noise, p.steps, p.cfg, p.sampler, "normal", self._encode(p.text),
                                          self._encode(p.negative), latent, disable_pbar=True, seed=seed)
            image = self.vae.decode(samples)
            if image.dim() == 5:
                image = image.reshape(-1, *image.shape[-3:])
            saved = comfy_nodes.SaveImage().save_images(image, f"{self.prefix}_step{step:06d}_{i + 1}")
            self.images.extend(saved["ui"]["images"])
            self._preview(image[0], step)
        log.info("LoRA Lab: sample images at step %d", step)

    def _preview(self, image: torch.Tensor, step: int) -> None:
        """Show the sample on the node while training goes on (the progress bar's preview)."""
        try:
            from PIL import Image

            arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            size = min(512, max(arr.shape[:2]))           # ComfyUI fits the preview into size²: never enlarge
            comfy.utils.ProgressBar(1, node_id=self.node_id).update_absolute(1, 1, ("JPEG", Image.fromarray(arr), size))
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception:        # a preview is a nicety; the saved image is the record
            log.debug("LoRA Lab: sample preview failed", exc_info=True)


def largest_bucket(latents: list) -> tuple[int, int]:
    """(w, h) in pixels of the most common latent size (the size samples are drawn at by default)."""
    sizes = collections.Counter()
    for lat in latents:
        t = lat["samples"]
        sizes[(t.shape[-1] * 8, t.shape[-2] * 8)] += t.shape[0] if t.dim() >= 4 else 1
    return sizes.most_common(1)[0][0] if sizes else (512, 512)


def sample_prefix(checkpoint_prefix: str) -> str:
    """Sample images go to output/<the checkpoints' folder>/samples/<name>_step..."""
    folder, _, name = checkpoint_prefix.strip().replace("\\", "/").rpartition("/")
    return "/".join(p for p in (folder, "samples", name or "sample") if p)


__all__ = ["CHECKPOINT_PREFIX", "CheckpointSaver", "RecipeInputs", "SampleMaker", "TextEncoder", "captions_of",
           "largest_bucket", "sample_prefix", "te_layer_names"]
