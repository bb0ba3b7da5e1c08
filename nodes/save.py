"""LoraLabSaveLoRA: write a trained LoRA into the loras folder, atomically, with kohya / modelspec
metadata, so it shows up in every loader's list at once."""
from __future__ import annotations

import logging

import folder_paths

from ..training.save import save

log = logging.getLogger("LoRA Lab")


class _AnyCombo(str):
    """Output type that links into a combo input (e.g. a loader's lora_name): ComfyUI compares
    link types with ``!=``, and a combo's type is its list of options, so a plain name can't match."""

    def __ne__(self, other):
        return False

    __hash__ = str.__hash__


class LoraLabSaveLoRA:
    DESCRIPTION = ("Save a trained LoRA (from Train LoRA) as .safetensors in the loras folder, with kohya ss_* and "
                   "modelspec metadata (step count, hyperparameters, trigger words) and what resuming needs. "
                   "Never overwrites: a number is appended to the name.")
    CATEGORY = "training/LoRA Lab"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = (_AnyCombo("COMBO"),)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name as loader nodes list it (link it into a loader's lora_name).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": ("LORA_MODEL", {"tooltip": "The trained LoRA (the lora output of Train LoRA)."}),
                "subfolder": ("STRING", {"default": "LoRA-Lab", "tooltip": "Folder inside the loras folder to save "
                                         "into (created if missing); empty for the loras folder itself."}),
                "filename_prefix": ("STRING", {"default": "trained_lora", "tooltip": "File name before the number: "
                                               "<prefix>_00001.safetensors."}),
                "trigger_words": ("STRING", {"default": "", "tooltip": "Comma-separated words the LoRA was trained "
                                             "with, stored as modelspec.trigger_phrase and ss_tag_frequency."}),
            },
            "optional": {
                "save_optimizer_state": ("BOOLEAN", {"default": True, "tooltip": "Store the optimizer's state in the "
                                                     "header so training can continue exactly (makes the file "
                                                     "larger; loaders ignore it)."}),
            },
        }

    def save(self, lora, subfolder, filename_prefix, trigger_words, save_optimizer_state=True):
        folder = folder_paths.get_folder_paths("loras")[0]
        path, name = save(lora, folder, subfolder=subfolder, filename_prefix=filename_prefix,
                          trigger_words=trigger_words, optimizer_state=save_optimizer_state)
        folder_paths.filename_list_cache.pop("loras", None)   # list it at once
        log.info("LoRA Lab: saved %s", path)
        # the node shows the text; web/saved.js refreshes every loader's list when it sees loralab_saved
        return {"ui": {"text": [f"saved {name}", f"file: {path}"], "loralab_saved": [name]}, "result": (name,)}


NODES = {"LoraLabSaveLoRA": (LoraLabSaveLoRA, "Save LoRA (LoRA Lab)")}
