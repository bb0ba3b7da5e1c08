"""LoraLabTrainingDataset: a folder of captioned images (kohya's layout) -> latents and conditioning
for the train node, encoded once and cached on disk by content (training/dataset.py)."""
from __future__ import annotations

import hashlib
import logging
import os

import torch

import comfy.utils
import folder_paths

from ..training import dataset
from ..training.captions import CaptionOptions

log = logging.getLogger("LoRA Lab")

# keys this pack adds to each conditioning entry's dict (ComfyUI passes unknown keys through)
CAPTION_KEY = "loralab_caption"       # {"text": caption, "options": CaptionOptions as a dict}
DATASET_KEY = "loralab_dataset"       # EncodedDataset.info(): kohya's dataset metadata


# ---- glue: ComfyUI's VAE / CLIP -> the callables and identities the core takes ------------------------
def vae_encoder(vae):
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels)
    return encode


def vae_id(vae) -> str:
    return dataset.fingerprint(vae.first_stage_model.state_dict(),
                               extra=f"{type(vae.first_stage_model).__name__}|{getattr(vae, 'vae_dtype', '')}")


def text_encoder(clip):
    def encode(text: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]
    return encode


def clip_id(clip) -> str:
    """The text encoder's weights plus what else changes its output: the clip skip layer, tokenizer
    options, and LoRA patches on it (which make every run's encodings its own)."""
    patcher = clip.patcher
    patches = str(getattr(patcher, "patches_uuid", "")) if getattr(patcher, "patches", None) else ""
    extra = f"{type(clip.cond_stage_model).__name__}|{clip.layer_idx}|{sorted(clip.tokenizer_options.items())}|{patches}"
    return dataset.fingerprint(clip.cond_stage_model.state_dict(), extra=extra)


def cache_dir(root: str) -> str:
    """The dataset's own .loralab_cache (kohya also caches next to the images), or a folder in
    ComfyUI's user directory when the dataset folder is read-only."""
    if os.access(root, os.W_OK):
        return os.path.join(root, dataset.CACHE_FOLDER)
    ident = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(folder_paths.get_user_directory(), "loralab", "dataset_cache", ident)


def size_conditioning(s: dataset.Sample) -> dict:
    """SDXL's size and crop conditioning as kohya trains it (original size, crop top-left, target
    size), under the keys CLIPTextEncodeSDXL writes; models that do not use them ignore them."""
    left, top, _, _ = dataset.crop_ltrb(s.bucket, s.size)
    return {"width": s.size[0], "height": s.size[1], "crop_w": int(left), "crop_h": int(top),
            "target_width": s.bucket[0], "target_height": s.bucket[1]}


def outputs(ds: dataset.EncodedDataset) -> tuple[list, list]:
    """One LATENT and one CONDITIONING per sample, each image as often as its repeat count: the lists
    core's dataset nodes produce, with the caption, the size conditioning and the dataset description
    in each entry's dict."""
    info = ds.info()
    options = ds.captions.to_dict()
    latents, conds = [], []
    for s in ds.expanded():
        latents.append({"samples": s.latent[None]})
        cond, extra = s.cond
        conds.append([[cond, {**extra, **size_conditioning(s), CAPTION_KEY: {"text": s.caption, "options": options},
                              DATASET_KEY: info}]])
    return latents, conds


def build(folder, vae, clip, buckets: dataset.BucketSpec, captions: CaptionOptions, caption_extension: str,
          missing_caption: str, node_id=None) -> tuple[list, list, str]:
    root = dataset.dataset_path(folder_paths.get_input_directory(), folder)
    bar = comfy.utils.ProgressBar(1, node_id=node_id)

    def progress(done, total):
        bar.update_absolute(done, total)

    latents, conds, text = encode(root, vae, clip, buckets, captions, caption_extension, missing_caption, progress)
    log.info("LoRA Lab dataset %s: %s", folder, text.replace("\n", "; "))
    return latents, conds, text


def encode(root: str, vae, clip, buckets: dataset.BucketSpec, captions: CaptionOptions, caption_extension: str = ".txt",
           missing_caption: str = "error", on_progress=None) -> tuple[list, list, str]:
    """The dataset folder ``root`` (any path) through the model's VAE and CLIP, with the cache:
    (latents, conditionings, report) as the node outputs them. scripts/train.py calls it too."""
    with torch.inference_mode():
        ds = dataset.encode_folder(root, buckets=buckets, captions=captions, encode_images=vae_encoder(vae),
                                   image_encoder_id=vae_id(vae), encode_text=text_encoder(clip),
                                   text_encoder_id=clip_id(clip), caption_extension=caption_extension,
                                   missing_caption=missing_caption, cache_dir=cache_dir(root), on_progress=on_progress)
    latents, conds = outputs(ds)
    return latents, conds, dataset.summary(ds)


def options_of(values: dict) -> tuple[dataset.BucketSpec, CaptionOptions, str, str]:
    """(buckets, caption options, caption_extension, missing_caption) from the node's inputs by name;
    an input not given takes the node's default."""
    spec = LoraLabTrainingDataset.INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    v = {k: values.get(k, opts[1].get("default")) for k, opts in inputs.items() if k not in ("folder", "vae", "clip")}
    buckets = dataset.BucketSpec(v["enable_bucket"], (v["resolution"], v["resolution"]), v["min_bucket_reso"],
                                 v["max_bucket_reso"], v["bucket_reso_steps"], v["bucket_no_upscale"])
    captions = CaptionOptions(v["shuffle_caption"], v["keep_tokens"], v["caption_dropout_rate"],
                              v["caption_tag_dropout_rate"]).check()
    return buckets, captions, v["caption_extension"], v["missing_caption"]


def folder_state(folder: str) -> str:
    """Names, sizes and times of the folder's files: ComfyUI re-runs the node when they change."""
    try:
        root = dataset.dataset_path(folder_paths.get_input_directory(), folder)
    except Exception as e:       # let the node itself report the problem
        return f"error: {e}"
    h = hashlib.sha256()
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(x for x in subdirs if not x.startswith("."))
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(d, f))
            except OSError:
                continue
            h.update(f"{os.path.relpath(os.path.join(d, f), root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ---- the node -------------------------------------------------------------------------------------
class LoraLabTrainingDataset:
    DESCRIPTION = ("Turn a folder of captioned images (kohya's layout: 'N_name' subfolders repeat their images N "
                   "times; image.png with image.txt) into latents and conditioning for Train LoRA: images in "
                   "kohya's aspect-ratio buckets, captions with shuffle / keep_tokens / dropout. Encodings are "
                   "cached on disk by content: a second run encodes nothing that has not changed.")
    CATEGORY = "training/LoRA Lab"
    FUNCTION = "build"
    RETURN_TYPES = ("LATENT", "CONDITIONING", "STRING")
    RETURN_NAMES = ("latents", "conditioning", "report")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = (
        "One latent per training sample (each image as often as its folder's repeat count), in its bucket's size.",
        "One conditioning per latent, same order; it carries the caption, so Train LoRA can vary it per step "
        "(shuffle, dropout) and train the text encoder.",
        "What was read: images, repeats, buckets, and how much came from the cache.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": "The dataset folder, as a path inside ComfyUI's "
                                      "input directory (e.g. 'my_dog'). Images directly in it count once; a "
                                      "subfolder named 'N_name' repeats its images N times."}),
                "vae": ("VAE", {"tooltip": "Encodes the images into latents (use the model's own VAE)."}),
                "clip": ("CLIP", {"tooltip": "Encodes the captions into conditioning (use the model's own text "
                                  "encoder)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                       "tooltip": "Training resolution: the buckets keep width × height at most "
                                                  "resolution² (kohya's --resolution)."}),
            },
            "optional": {
                "enable_bucket": ("BOOLEAN", {"default": True, "tooltip": "Sort images into aspect-ratio buckets "
                                              "(kohya's bucketing). Off: images are used at their own size, which "
                                              "must be the same for all."}),
                "min_bucket_reso": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 8, "advanced": True,
                                            "tooltip": "Smallest bucket side in pixels."}),
                "max_bucket_reso": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8, "advanced": True,
                                            "tooltip": "Largest bucket side in pixels."}),
                "bucket_reso_steps": ("INT", {"default": 64, "min": 8, "max": 256, "step": 8, "advanced": True,
                                              "tooltip": "Bucket sides are multiples of this (kohya: 64)."}),
                "bucket_no_upscale": ("BOOLEAN", {"default": False, "advanced": True,
                                                  "tooltip": "Never enlarge an image: its bucket comes from its own "
                                                             "size (shrunk to the resolution's area if larger)."}),
                "caption_extension": (list(dataset.CAPTION_EXTENSIONS), {"default": ".txt",
                                      "tooltip": "The caption file beside each image: image.txt or image.caption."}),
                "missing_caption": (list(dataset.MISSING_CAPTION), {"default": "error",
                                    "tooltip": "An image without a caption file: stop with an error naming it, or "
                                               "use its folder's name after 'N_' (kohya's class tokens)."}),
                "shuffle_caption": ("BOOLEAN", {"default": False, "tooltip": "Shuffle the comma-separated tags of "
                                                "each caption at every step (needs the CLIP on Train LoRA)."}),
                "keep_tokens": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Keep the first N tags in "
                                        "place when shuffling (e.g. the trigger word)."}),
                "caption_dropout_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Chance that a sample trains with an empty caption at a step."}),
                "caption_tag_dropout_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "advanced": True, "tooltip": "Chance that each tag after the kept "
                                                                          "ones is left out at a step."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        return folder_state(folder)

    def build(self, folder, vae, clip, resolution, unique_id=None, **options):
        buckets, captions, caption_extension, missing_caption = options_of({"resolution": resolution, **options})
        latents, conds, text = build(folder, vae, clip, buckets, captions, caption_extension, missing_caption,
                                     unique_id)
        return {"ui": {"text": [text]}, "result": (latents, conds, text)}


NODES = {"LoraLabTrainingDataset": (LoraLabTrainingDataset, "Training Dataset from Folder (LoRA Lab)")}
