"""LoRA tool nodes: convert, merge, resize, extract and inspect LoRA files (lora/tools/), each
writing into the loras folder (atomically, never over a file) and returning the new file's name,
which links straight into a loader's lora_name, plus a report shown on the node.

The glue that needs ComfyUI lives here: file names from the loras folders, ComfyUI's key maps and
model identity (comfy_model), and reading a MODEL / CLIP's weights with the patches ComfyUI
computes (``PatcherWeights``, for extract)."""
from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths

from ..lora.errors import LoraError
from ..lora.io import resolve_in
from ..lora.tools import common, convert, extract, inspect, merge, resize
from ..lora.tools.naming import STYLES
from ..lora.tools.extract import Weights
from ..lora.tools.svd import METHODS
from . import comfy_model
from .save import _AnyCombo

log = logging.getLogger("LoRA Lab")
CATEGORY = "loaders/LoRA Lab/tools"
NONE = "None"

LORA_NAME_OUT = ("The new file's name as loaders list it: link it into a loader's lora_name (or another tool's).")
REPORT_OUT = "What the tool did, layer by layer (also shown on the node)."
PREFIX_TIP = ("Where to write, inside the loras folder: <prefix>_00001.safetensors (the next free number; "
              "folders in the prefix are created). Never overwrites.")
DTYPE_IN = (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "advanced": True,
                                               "tooltip": "Precision of the written factors; auto: the inputs' own."})
CLAMP_IN = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "advanced": True,
                      "tooltip": "kohya's clamp: limit the factors to this quantile of their values (kohya uses "
                                 "0.99). 0 = off: the result is the best approximation of that rank."})
DYNAMIC_IN = (["none", *METHODS], {"default": "none", "tooltip": "Choose each layer's rank from its singular values "
                                   "(kohya's rules; rank becomes the largest allowed): sv_ratio keeps values ≥ the "
                                   "largest / param; sv_fro keeps the fewest ranks holding param of the Frobenius norm; "
                                   "sv_cumulative of the sum of singular values. none: the fixed rank."})
PARAM_IN = ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01,
                      "tooltip": "The dynamic rule's parameter: a ratio ≥ 1 for sv_ratio, a share in (0, 1] for "
                                 "sv_fro and sv_cumulative."})


def _loras() -> list[str]:
    return folder_paths.get_filename_list("loras")


def _lora_in(tooltip: str, optional: bool = False) -> tuple:
    return ([NONE, *_loras()] if optional else _loras(), {"tooltip": tooltip, **({"default": NONE} if optional else {})})


def _path(name: str) -> str:
    return resolve_in(folder_paths.get_folder_paths("loras"), name)


def _write(result: common.Result, filename_prefix: str) -> dict:
    """Write the result into the first loras folder; the node's return value."""
    path, name = common.save_in(result, folder_paths.get_folder_paths("loras")[0], filename_prefix)
    folder_paths.filename_list_cache.pop("loras", None)          # listed at once
    text = result.report(name) + f"\nfile: {path}"
    log.info("LoRA Lab: %s wrote %s", result.tool, path)
    return {"ui": {"text": [text], "loralab_saved": [name]}, "result": (name, text)}


def _device():
    return comfy.model_management.get_torch_device()


def _key_map(model, clip):
    """The model's key map as the loaders build it for a file (comfy_model.key_map: ComfyUI's maps plus
    the DiT names core drops, for the file's modules), as the tools take it; None without a model."""
    if model is None and clip is None:
        return None
    return lambda modules: comfy_model.key_map(model, clip, modules)


def _method(value: str):
    return None if value == "none" else value


# ---- reading a ComfyUI model's weights ----------------------------------------------------------------
class PatcherWeights(Weights):
    """The weights a MODEL / CLIP runs with, one tensor at a time: its stored weight with its patches
    (LoRAs loaded in merge mode, ours or core's) computed by ComfyUI's ``calculate_weight`` in float32."""

    def __init__(self, patcher, name: str):
        if patcher.get_injections(comfy_model.BYPASS_KEY):
            raise LoraError(f"{name} has a LoRA applied in the forward pass (mode 'forward pass'), which is not in its "
                            "weights: load it in 'merge weights' mode to extract it")
        self.patcher, self.name, self.metadata = patcher, name, {}
        self._patches = patcher.get_key_patches()

    def shapes(self):
        return {k: tuple(v[0][0].shape) for k, v in self._patches.items()}

    def dtype(self):
        found = {v[0][0].dtype for v in self._patches.values()}
        return next((d for d in (torch.float32, torch.bfloat16, torch.float16) if d in found), torch.float32)

    @torch.no_grad()
    def get(self, key):
        (weight, convert_func), *patches = self._patches[key]
        w = convert_func(weight.detach().to(torch.float32, copy=True), inplace=True)
        return comfy.lora.calculate_weight(patches, w, key) if patches else w


class _Both(Weights):
    """A MODEL's and a CLIP's weights as one (their keys never overlap)."""

    def __init__(self, *parts: Weights):
        self.parts = [p for p in parts if p is not None]
        self.name, self.metadata = self.parts[0].name, {}
        self._owner = {k: p for p in self.parts for k in p.shapes()}

    def shapes(self):
        return {k: s for p in self.parts for k, s in p.shapes().items()}

    def dtype(self):
        return self.parts[0].dtype()

    def get(self, key):
        return self._owner[key].get(key)


def _weights(model, clip, what: str) -> Weights:
    return _Both(PatcherWeights(model, f"{what} model"),
                 PatcherWeights(clip.patcher, f"{what} CLIP") if clip is not None else None)


# ---- the nodes ------------------------------------------------------------------------------------------
class _Tool:
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = (_AnyCombo("COMBO"), "STRING")
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = (LORA_NAME_OUT, REPORT_OUT)
    FUNCTION = "run"


class LoraLabResizeLoRA(_Tool):
    DESCRIPTION = ("Resize a LoRA to a lower rank (kohya's resize_lora): each layer's change becomes its best "
                   "approximation of that rank (truncated SVD), or of a rank chosen per layer by a dynamic rule. "
                   "The report gives each layer's kept share of its change.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": _lora_in("The LoRA to resize (LoRA/LoCon; LoHa and LoKr are rewritten as LoRA)."),
                "rank": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "The new rank (with a dynamic "
                                 "rule: the largest rank a layer may keep). Above the file's own rank is an error."}),
                "dynamic_method": DYNAMIC_IN,
                "dynamic_param": PARAM_IN,
                "filename_prefix": ("STRING", {"default": "LoRA-Lab/resized", "tooltip": PREFIX_TIP}),
            },
            "optional": {
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "advanced": True,
                                      "tooltip": "Rank of conv layers with kernels > 1×1; 0 = the same as rank."}),
                "clamp_quantile": CLAMP_IN,
                "dtype": DTYPE_IN,
            },
        }

    def run(self, lora_name, rank, dynamic_method, dynamic_param, filename_prefix, conv_rank=0, clamp_quantile=0.0,
            dtype="auto"):
        result = resize.resize(_path(lora_name), rank, conv_rank=conv_rank or None, method=_method(dynamic_method),
                               param=dynamic_param, clamp_quantile=clamp_quantile, dtype=dtype, device=_device())
        return _write(result, filename_prefix)


class LoraLabMergeLoRA(_Tool):
    DESCRIPTION = ("Merge up to four LoRAs, each with its ratio, into one file. rank 0 concatenates their ranks: "
                   "exact (LoRA/LoCon). A rank merges the summed change by SVD into a LoRA of that rank (kohya's "
                   "svd_merge_lora; also takes LoHa/LoKr). Files for different models or layers are refused. "
                   "Chain two nodes for more files.")

    @classmethod
    def INPUT_TYPES(cls):
        ratio = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
        blocks = ("STRING", {"default": "", "advanced": True,
                             "tooltip": "Per-block weights for this LoRA: a preset (OUTALL, SDXL-INALL, …) or a vector, as in LoRA Stack's rows; empty: none."})
        return {
            "required": {
                "lora_1": _lora_in("The first LoRA."),
                "ratio_1": ("FLOAT", {**ratio, "tooltip": "Ratio of the first LoRA's change (negative subtracts it)."}),
                "lora_2": _lora_in("The second LoRA."),
                "ratio_2": ("FLOAT", {**ratio, "tooltip": "Ratio of the second LoRA's change."}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "0: concatenate the ranks (exact, "
                                 "LoRA/LoCon only). Else the rank of the merged LoRA, by SVD of the summed change."}),
                "filename_prefix": ("STRING", {"default": "LoRA-Lab/merged", "tooltip": PREFIX_TIP}),
            },
            "optional": {
                "lora_3": _lora_in("A third LoRA (None: no third).", optional=True),
                "ratio_3": ("FLOAT", {**ratio, "tooltip": "Ratio of the third LoRA's change."}),
                "lora_4": _lora_in("A fourth LoRA (None: no fourth).", optional=True),
                "ratio_4": ("FLOAT", {**ratio, "tooltip": "Ratio of the fourth LoRA's change."}),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "advanced": True,
                                      "tooltip": "SVD merge: rank of conv layers with kernels > 1×1; 0 = rank."}),
                "clamp_quantile": CLAMP_IN,
                "dtype": DTYPE_IN,
                **{f"block_weights_{i}": blocks for i in range(1, 5)},
                "model": ("MODEL", {"tooltip": "Optional: the model the LoRAs are for. Layers are then matched by "
                                    "the weight they change, so files that name the same layers differently "
                                    "(kohya ldm / diffusers / PEFT names) merge."}),
                "clip": ("CLIP", {"tooltip": "Optional: its text encoder, likewise for text-encoder layers."}),
            },
        }

    def run(self, lora_1, ratio_1, lora_2, ratio_2, rank, filename_prefix, lora_3=NONE, ratio_3=1.0, lora_4=NONE,
            ratio_4=1.0, conv_rank=0, clamp_quantile=0.0, dtype="auto", block_weights_1="", block_weights_2="",
            block_weights_3="", block_weights_4="", model=None, clip=None):
        picked = [(lora_1, ratio_1, block_weights_1), (lora_2, ratio_2, block_weights_2),
                  (lora_3, ratio_3, block_weights_3), (lora_4, ratio_4, block_weights_4)]
        inputs = [merge.MergeInput(_path(n), r, b or None) for n, r, b in picked if n and n != NONE]
        km = _key_map(model, clip)
        result = merge.merge(inputs, rank=rank or None, conv_rank=conv_rank or None, clamp_quantile=clamp_quantile,
                             dtype=dtype, device=_device(), key_map=km)
        return _write(result, filename_prefix)


class LoraLabExtractLoRA(_Tool):
    DESCRIPTION = ("Extract a LoRA from two models: the difference tuned − base per layer, as its best "
                   "approximation of the rank (kohya's extract_lora_from_models). The models may be two "
                   "checkpoints, or a model and itself with LoRAs loaded (merge mode): the weights are the "
                   "ones ComfyUI computes. Connect the CLIPs to extract the text encoder too.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_base": ("MODEL", {"tooltip": "The model the LoRA is relative to."}),
                "model_tuned": ("MODEL", {"tooltip": "The changed model (a fine-tune, or the base with LoRAs)."}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 4096, "tooltip": "Rank of each layer (with a "
                                 "dynamic rule: the largest allowed)."}),
                "dynamic_method": DYNAMIC_IN,
                "dynamic_param": PARAM_IN,
                "filename_prefix": ("STRING", {"default": "LoRA-Lab/extracted", "tooltip": PREFIX_TIP}),
            },
            "optional": {
                "clip_base": ("CLIP", {"tooltip": "The base text encoder (extract its attention/MLP layers too)."}),
                "clip_tuned": ("CLIP", {"tooltip": "The changed text encoder."}),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "advanced": True,
                                      "tooltip": "Rank of conv layers with kernels > 1×1; 0 = the same as rank."}),
                "min_diff": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001, "advanced": True,
                                       "tooltip": "Leave out layers that differ by at most this anywhere "
                                                  "(0: only identical layers)."}),
                "svd": (["exact", "lowrank"], {"default": "exact", "advanced": True,
                                               "tooltip": "exact: the best approximation of each layer. lowrank: "
                                                          "torch.svd_lowrank, many times faster on big conv layers, "
                                                          "about 0.1% above the best error (fixed rank only)."}),
                "naming": (list(STYLES), {"default": "kohya", "advanced": True,
                                                 "tooltip": "Key names: kohya's (lora_unet_…, lora_te_…) or "
                                                            "ComfyUI's (diffusion_model.…, text_encoders.…)."}),
                "clamp_quantile": CLAMP_IN,
                "dtype": DTYPE_IN,
            },
        }

    def run(self, model_base, model_tuned, rank, dynamic_method, dynamic_param, filename_prefix, clip_base=None,
            clip_tuned=None, conv_rank=0, min_diff=0.0, svd="exact", naming="kohya", clamp_quantile=0.0, dtype="auto"):
        if (clip_base is None) != (clip_tuned is None):
            raise LoraError("connect both clip_base and clip_tuned (or neither)")
        ident = comfy_model.model_arch(model_base)
        other = comfy_model.model_arch(model_tuned)
        if ident.arch is not None and other.arch is not None and ident.arch is not other.arch:
            raise LoraError(f"the models are of different architectures ({ident.name}, {other.name}): a LoRA is "
                            "their difference, so they must be the same kind of model")
        base, tuned = _weights(model_base, clip_base, "base"), _weights(model_tuned, clip_tuned, "tuned")
        bar = comfy.utils.ProgressBar(1)
        result = extract.extract(base, tuned, rank, conv_rank=conv_rank or None, method=_method(dynamic_method),
                                 param=dynamic_param, clamp_quantile=clamp_quantile, min_diff=min_diff, style=naming,
                                 key_map=comfy_model.key_map(model_base, clip_base), identity=ident, dtype=dtype,
                                 device=_device(), svd_method=svd, progress=lambda i, n: bar.update_absolute(i, n))
        return _write(result, filename_prefix)


class LoraLabConvertLoRA(_Tool):
    DESCRIPTION = ("Rewrite a LoRA with kohya's or ComfyUI's key names for the connected model, keeping its "
                   "algorithm (a LoKr stays a LoKr) and its metadata: a file in diffusers/PEFT or another naming "
                   "becomes one every loader reads. The file must fit the model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": _lora_in("The LoRA to rewrite."),
                "model": ("MODEL", {"tooltip": "The model the LoRA is for: its key names are the ones written."}),
                "to": (list(STYLES), {"default": "kohya", "tooltip": "kohya: lora_unet_… / lora_te_… (A1111, "
                                             "Forge, kohya's tools read them); comfy: diffusion_model.… / "
                                             "text_encoders.… (ComfyUI's own)."}),
                "filename_prefix": ("STRING", {"default": "LoRA-Lab/converted", "tooltip": PREFIX_TIP}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder, to convert the file's text-encoder layers."}),
            },
        }

    def run(self, lora_name, model, to, filename_prefix, clip=None):
        shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
        if clip is not None:
            shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
        result = convert.convert(_path(lora_name), _key_map(model, clip), to,
                                 model=comfy_model.model_arch(model), shapes=shapes, text_encoder=clip is not None)
        return _write(result, filename_prefix)


class LoraLabInspectLoRA:
    DESCRIPTION = ("Describe a LoRA file: architecture it fits, algorithm, ranks, modules per block, the size of "
                   "its changes (‖ΔW‖), trigger words, training settings and all its metadata. With a model "
                   "connected, also how its keys match that model.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The description (also shown on the node).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"lora_name": _lora_in("The LoRA to describe.")},
            "optional": {"model": ("MODEL", {"tooltip": "A model to match the file against, as a loader would."}),
                         "clip": ("CLIP", {"tooltip": "The model's text encoder, for the match."})},
        }

    def run(self, lora_name, model=None, clip=None):
        data = inspect.inspect(_path(lora_name), key_map=_key_map(model, clip), model=comfy_model.model_arch(model))
        text = inspect.report(data)
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = {
    "LoraLabConvertLoRA": (LoraLabConvertLoRA, "Convert LoRA (LoRA Lab)"),
    "LoraLabMergeLoRA": (LoraLabMergeLoRA, "Merge LoRAs (LoRA Lab)"),
    "LoraLabResizeLoRA": (LoraLabResizeLoRA, "Resize LoRA (LoRA Lab)"),
    "LoraLabExtractLoRA": (LoraLabExtractLoRA, "Extract LoRA (LoRA Lab)"),
    "LoraLabInspectLoRA": (LoraLabInspectLoRA, "Inspect LoRA (LoRA Lab)"),
}
