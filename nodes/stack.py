"""Many LoRAs in one node: the LoRA stack (rows of its own after a LORA_STACK input) and the prompt
with A1111 ``<lora:…>`` tags. Both turn their input into rows (lora/stack.py), resolve every name
(lora/names.py), and apply all rows to ONE clone of MODEL and CLIP (comfy_model.load_loras), with
block weights (lora/blocks.py) and trigger words (lora/info.py)."""
from __future__ import annotations

import folder_paths

from ..lora import info, names, stack, tags
from ..lora.errors import LoraError
from ..lora.io import resolve_in
from . import comfy_model
from .loaders import MODE_IN, MODEL_IN, ON_NO_MATCH_IN, FAIL, MERGE, WARN, forward_pass
from .routes import alias_table

FOLDER = "loras"
CLIP_IN = ("CLIP", {"tooltip": "The text encoder (CLIP) the LoRAs will be applied to."})
MODEL_OUT = "The diffusion model with every LoRA applied (one patched clone; the input is untouched)."
CLIP_OUT = "The text encoder with every LoRA applied (one patched clone; the input is untouched)."
TRIGGERS_OUT = ("The trigger words of the LoRAs applied, in stack order, comma-separated: each file's "
                "modelspec.trigger_phrase, its NAME.txt sidecar, else its most frequent training tags.")
REPORT_OUT = ("What was loaded, LoRA by LoRA: how many of each file's keys matched this model, the block "
              "weights, and how many tensors were patched.")
ROWS_DOC = ('JSON list of rows, applied after lora_stack, e.g. [{"on": true, "lora": "styles/ink.safetensors", '
            '"strength": 0.8}, {"lora": "detail.safetensors", "strength_model": 1, "strength_clip": 0.5, '
            '"blocks": "OUTALL", "dyn_rank": 0}]. The node\'s rows editor writes it; see the README.')


def _resolve(rows: list[stack.Row]) -> list[tuple[stack.Row, str]]:
    """Each row that is on, with its name resolved to a listed file and that file's path."""
    listed = folder_paths.get_filename_list(FOLDER)
    folders = folder_paths.get_folder_paths(FOLDER)
    out = []
    for row in rows:
        if not row.on:
            continue
        name = names.lookup(row.lora, listed, alias_table, what=row.where)
        try:
            path = resolve_in(folders, name)
        except LoraError as e:
            raise LoraError(f"{row.where}: {e}") from None
        out.append((stack.Row(name, row.strength_model, row.strength_clip, row.blocks, row.dyn_rank, True,
                              row.where), path))
    return out


def apply_rows(node, model, clip, rows: list[stack.Row], mode=None, on_no_match=WARN):
    """(MODEL, CLIP, the rows applied, trigger words, report) for rows in order, on one clone."""
    resolved = _resolve(rows)
    items, words, skipped = [], [], []
    for row, path in resolved:
        if row.strength_model == 0 and row.strength_clip == 0:
            skipped.append(f"{row.where}: {row.lora}: strengths are 0, skipped")
            continue
        items.append(comfy_model.Item(path, row.strength_model, row.strength_clip, row.options(), row.blocks,
                                      label=row.where))
        words.append(info.file_trigger_words(path))
    bypass = forward_pass(mode, None)
    new_model, new_clip, report = comfy_model.load_loras(model, clip, items, cache=node._cache, bypass=bypass,
                                                         require_match=on_no_match == FAIL)
    head = (f"{len(items)} LoRA(s) on one clone, {'in the forward pass' if bypass else 'merged'}"
            if items else "no LoRAs to apply: MODEL and CLIP passed through unchanged")
    text = "\n\n".join([head, *([report.text] if items else []), *skipped])
    return new_model, new_clip, [r for r, _ in resolved], stack.join_words(words), text


def _ui(report: str, trigger_words: str) -> dict:
    return {"text": [report], "loralab_triggers": [trigger_words]}


class LoraLabLoraStack:
    DESCRIPTION = ("Apply many LoRAs at once: the rows of a LORA_STACK input (Efficiency Nodes, Comfyroll, "
                   "another stack), then this node's own rows, each on/off with its strengths, optional block "
                   "weights and DyLoRA rank. All of them go onto one clone of the model and the text encoder. "
                   "Outputs the rows it applied as a LORA_STACK and their trigger words.")
    CATEGORY = "loaders/LoRA Lab"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP", "LORA_STACK", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "LORA_STACK", "trigger_words", "report")
    OUTPUT_TOOLTIPS = (MODEL_OUT, CLIP_OUT,
                       "The rows this node applied, in order, as (lora_name, strength_model, strength_clip) "
                       "tuples: the lora_stack input's, then its own rows that are on.",
                       TRIGGERS_OUT, REPORT_OUT)

    def __init__(self):
        self._cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": MODEL_IN, "clip": CLIP_IN},
            "optional": {
                "lora_stack": ("LORA_STACK", {"tooltip": "LoRAs to apply first: a list of (lora_name, "
                                              "strength_model, strength_clip), as Efficiency Nodes, Comfyroll "
                                              "and this node's LORA_STACK output give it."}),
                "rows": ("STRING", {"default": "[]", "tooltip": ROWS_DOC}),
                "mode": MODE_IN,
                "on_no_match": ON_NO_MATCH_IN,
            },
        }

    def apply(self, model, clip, lora_stack=None, rows="[]", mode=MERGE, on_no_match=WARN):
        all_rows = stack.rows_from_stack(lora_stack) + stack.rows_from_json(rows)
        m, c, applied, words, report = apply_rows(self, model, clip, all_rows, mode, on_no_match)
        return {"ui": _ui(report, words), "result": (m, c, stack.as_stack(applied), words, report)}


class LoraLabPromptLoRA:
    DESCRIPTION = ("A prompt with A1111 LoRA tags: <lora:NAME:TE:UNET:DYN>, te=/unet=/dyn= and lbw= (block "
                   "weights), <lyco:…> too. Applies every tagged LoRA to one clone of the model and the text "
                   "encoder, and encodes the prompt without its tags with the patched text encoder, exactly as "
                   "CLIP Text Encode does. NAME is a file's stem, its path without extension, or its "
                   "ss_output_name.")
    CATEGORY = "loaders/LoRA Lab"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP", "CONDITIONING", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "CONDITIONING", "text", "trigger_words", "report")
    OUTPUT_TOOLTIPS = (MODEL_OUT, CLIP_OUT,
                       "The prompt without its <lora:…> tags, encoded with the patched text encoder "
                       "(the same as CLIP Text Encode of the text output on the CLIP output).",
                       "The prompt with its <lora:…> tags removed (exactly their characters, as A1111 does).",
                       TRIGGERS_OUT, REPORT_OUT)

    def __init__(self):
        self._cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_IN,
                "clip": CLIP_IN,
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt, with <lora:NAME:weight> tags anywhere in it "
                                               "(<lora:NAME:TE:UNET>, te=, unet=, dyn=, lbw=PRESET or a vector)."}),
            },
            "optional": {"mode": MODE_IN, "on_no_match": ON_NO_MATCH_IN},
        }

    def apply(self, model, clip, text, mode=MERGE, on_no_match=WARN):
        import nodes as comfy_nodes

        found, clean = tags.parse(text)
        m, c, _, words, report = apply_rows(self, model, clip, stack.rows_from_tags(found), mode, on_no_match)
        conditioning = comfy_nodes.CLIPTextEncode().encode(c, clean)[0]
        return {"ui": _ui(report, words), "result": (m, c, conditioning, clean, words, report)}


NODES = {
    "LoraLabLoraStack": (LoraLabLoraStack, "LoRA Stack (LoRA Lab)"),
    "LoraLabPromptLoRA": (LoraLabPromptLoRA, "Prompt with LoRA tags (LoRA Lab)"),
}
