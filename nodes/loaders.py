"""Loader nodes: LoRA files from ComfyUI's loras folders onto MODEL / CLIP."""
from __future__ import annotations

import folder_paths

from ..lora.io import resolve_in
from . import comfy_model

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
MODEL_IN = ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."})
STRENGTH_MODEL_IN = ("FLOAT", {**STRENGTH, "tooltip": "How strongly to change the diffusion model. "
                               "Negative values invert the LoRA; 0 leaves the model as it is."})
MODEL_OUT_TOOLTIP = "The diffusion model with the LoRA applied (a patched clone; the input is untouched)."
REPORT_TOOLTIP = ("What was loaded: how many of the file's keys matched this model, which did not, "
                  "and how many tensors were patched.")


def _lora_name_in() -> tuple:
    return (folder_paths.get_filename_list("loras"),
            {"tooltip": "A file from ComfyUI's loras folders (subfolders included)."})


MERGE, FORWARD = "merge weights", "forward pass"
MODES = [MERGE, FORWARD]
WARN, FAIL = "warn", "stop the run"
MODE_IN = (MODES, {"default": MERGE, "advanced": True,
                   "tooltip": "merge weights: write the LoRA into the model's weights (fastest sampling). "
                              "forward pass: add the LoRA's change in each layer's forward pass (y = W·x + Δ(x)) "
                              "without touching the weights: for fp8 / quantised models, and strength changes "
                              "that never re-patch the model; slightly slower per step."})
ON_NO_MATCH_IN = ([WARN, FAIL], {"default": WARN, "advanced": True,
                                 "tooltip": "When none of the file's keys match this model (a LoRA for another "
                                            "base model, or not a LoRA): warn (the node turns red, the model passes "
                                            "through unchanged) or stop the run with an error."})
# Workflows and API prompts from before `mode` had a boolean `bypass` (True = forward pass). Declared
# hidden so an old prompt's value still reaches the node (ComfyUI drops undeclared inputs) and no
# widget is drawn; the frontend migrates old workflows' widget values (web/migrate.js).
LEGACY_HIDDEN = {"bypass": ("BOOLEAN", {"tooltip": "Deprecated: use mode."})}


def _optional() -> dict:
    return {
        "dyn_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "advanced": True,
                             "tooltip": "DyLoRA files only: the rank to use (like A1111's dyn=). "
                                        "0 uses every rank stored in the file."}),
        "mode": MODE_IN,
        "on_no_match": ON_NO_MATCH_IN,
    }


def forward_pass(mode: str | None, bypass: bool | None) -> bool:
    """True to apply in the forward pass. ``bypass`` is the pre-``mode`` input of old API prompts."""
    if mode is None:
        return bool(bypass)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    return mode == FORWARD


def _load(node, model, clip, lora_name, strength_model, strength_clip, dyn_rank=0, mode=None, on_no_match=WARN,
          bypass=None):
    if strength_model == 0 and strength_clip == 0:
        text = f"{lora_name}: strengths are 0, model and CLIP passed through unchanged"
        return model, clip, text
    path = resolve_in(folder_paths.get_folder_paths("loras"), lora_name)
    options = {"dyn_rank": dyn_rank} if dyn_rank else {}
    model, clip, report = comfy_model.load_lora(model, clip, path, strength_model, strength_clip,
                                                options=options, cache=node._cache,
                                                bypass=forward_pass(mode, bypass), require_match=on_no_match == FAIL)
    return model, clip, report.text


class LoraLabLoadLoRA:
    DESCRIPTION = ("Apply a LoRA-family file (LoRA, LoCon, LoHa, LoKr, IA3, GLoRA, OFT, BOFT, DyLoRA, DoRA, "
                   "full diffs; kohya, diffusers, PEFT, LyCORIS, OneTrainer, XLabs or ComfyUI naming) to the "
                   "diffusion model and the text encoder. Reports how many of the file's keys matched. For many "
                   "LoRAs on one clone, use LoRA Stack.")
    CATEGORY = "loaders/LoRA Lab"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    OUTPUT_TOOLTIPS = (MODEL_OUT_TOOLTIP,
                       "The text encoder with the LoRA applied (a patched clone; the input is untouched).",
                       REPORT_TOOLTIP)

    def __init__(self):
        self._cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN,
                "clip": ("CLIP", {"tooltip": "The text encoder (CLIP) the LoRA will be applied to."}),
                "lora_name": _lora_name_in(),
                "strength_model": STRENGTH_MODEL_IN,
                "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": "How strongly to change the text encoder. "
                                            "Negative values invert the LoRA; 0 leaves CLIP as it is."}),
            },
            "optional": _optional(),
            "hidden": LEGACY_HIDDEN,
        }

    def load(self, model, clip, lora_name, strength_model, strength_clip, dyn_rank=0, mode=None, on_no_match=WARN,
             bypass=None):
        model, clip, text = _load(self, model, clip, lora_name, strength_model, strength_clip, dyn_rank, mode,
                                  on_no_match, bypass)
        return {"ui": {"text": [text]}, "result": (model, clip, text)}


class LoraLabLoraLoaderModelOnly:
    DESCRIPTION = "Apply a LoRA-family file to the diffusion model only (text-encoder keys are ignored)."
    CATEGORY = "loaders/LoRA Lab"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = (MODEL_OUT_TOOLTIP,
                       REPORT_TOOLTIP)

    def __init__(self):
        self._cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN,
                "lora_name": _lora_name_in(),
                "strength_model": STRENGTH_MODEL_IN,
            },
            "optional": _optional(),
            "hidden": LEGACY_HIDDEN,
        }

    def load(self, model, lora_name, strength_model, dyn_rank=0, mode=None, on_no_match=WARN, bypass=None):
        model, _, text = _load(self, model, None, lora_name, strength_model, 0.0, dyn_rank, mode, on_no_match, bypass)
        return {"ui": {"text": [text]}, "result": (model, text)}


class LoraLabLoraModelLoader:
    DESCRIPTION = ("Apply a LORA_MODEL (the `lora` output of a training node: ours or ComfyUI's TrainLoraNode) "
                   "to a diffusion model, without saving it to a file first.")
    CATEGORY = "loaders/LoRA Lab"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = (MODEL_OUT_TOOLTIP,
                       REPORT_TOOLTIP)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN,
                "lora": ("LORA_MODEL", {"tooltip": "A LoRA state dict from a training node (LoRA Lab's or core's)."}),
                "strength_model": STRENGTH_MODEL_IN,
            },
            "optional": {"mode": MODE_IN, "on_no_match": ON_NO_MATCH_IN},
            "hidden": LEGACY_HIDDEN,
        }

    def load(self, model, lora, strength_model, mode=None, on_no_match=WARN, bypass=None):
        if strength_model == 0:
            return {"ui": {"text": ["strength is 0: model passed through unchanged"]},
                    "result": (model, "strength is 0: model passed through unchanged")}
        model, _, report = comfy_model.load_lora(model, None, lora, strength_model, 0.0,
                                                 bypass=forward_pass(mode, bypass), require_match=on_no_match == FAIL)
        return {"ui": {"text": [report.text]}, "result": (model, report.text)}


NODES = {
    "LoraLabLoraModelLoader": (LoraLabLoraModelLoader, "Load LoRA model (LoRA Lab)"),
    "LoraLabLoadLoRA": (LoraLabLoadLoRA, "Load LoRA (LoRA Lab)"),
    "LoraLabLoraLoaderModelOnly": (LoraLabLoraLoaderModelOnly, "Load LoRA, model only (LoRA Lab)"),
}
