"""Train LoRA's ``job_name``: instead of training in the graph, write a job folder (training/job.py)
that ``scripts/train.py --job`` runs elsewhere: on this machine's GPUs or a cluster's, with torchrun.

What the graph gives the job: the settings (the node's inputs), the dataset (the cache of Training
Dataset from Folder, copied: its manifest rides in the conditioning), the LoRA to continue (copied),
and the checkpoint's name, read from the loader node the ``model`` input is linked to in the queued
prompt (Load Checkpoint or Load Diffusion Model): a MODEL does not know its file.
"""
from __future__ import annotations

import logging
import os

import folder_paths

from ..training import job
from ..training.errors import TrainingError
from .dataset import DATASET_KEY

log = logging.getLogger("LoRA Lab")
JOBS_FOLDER = ("LoRA-Lab", "jobs")          # inside ComfyUI's output folder
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# loader node -> (models folder, its input naming the file, its dtype input)
LOADERS = {"CheckpointLoaderSimple": ("checkpoints", "ckpt_name", None),
           "CheckpointLoader": ("checkpoints", "ckpt_name", None),
           "UNETLoader": ("diffusion_models", "unet_name", "weight_dtype")}


def checkpoint_of(prompt: dict | None, node_id) -> dict:
    """The file the train node's ``model`` comes from, as the job records it."""
    me = (prompt or {}).get(str(node_id)) if node_id is not None else None
    link = me.get("inputs", {}).get("model") if me else None
    if not (isinstance(link, list) and len(link) == 2):
        raise TrainingError("writing a job needs the queued prompt, to find which checkpoint the model input comes "
                            "from: queue the graph from ComfyUI")
    src = prompt.get(str(link[0]), {})
    kind = src.get("class_type")
    if kind not in LOADERS:
        raise TrainingError(f"writing a job needs the model straight from Load Checkpoint or Load Diffusion Model; it "
                            f"comes from {kind or 'an unknown node'}: connect the loader to Train LoRA directly (the "
                            "job can only name a file)")
    folder, key, dtype_key = LOADERS[kind]
    name = src.get("inputs", {}).get(key)
    if not isinstance(name, str):
        raise TrainingError(f"the {kind} node's {key} is linked from another node; choose the file on the loader")
    return {"folder": folder, "name": name, "path": folder_paths.get_full_path(folder, name),
            "weight_dtype": src.get("inputs", {}).get(dtype_key, "default") if dtype_key else "default"}


def manifest_of(positive: list) -> str:
    """The dataset manifest the conditioning carries (Training Dataset from Folder writes it)."""
    for c in positive:
        for entry in c if isinstance(c, list) else [c]:
            extra = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
            path = (extra.get(DATASET_KEY) or {}).get("manifest")
            if path:
                if not os.path.isfile(path):
                    raise TrainingError("the dataset's manifest is gone; run Training Dataset from Folder again",
                                        file=path)
                return path
    raise TrainingError("writing a job needs the latents and conditioning from Training Dataset from Folder (LoRA "
                        "Lab): its encoded dataset is what the job carries")


def write(settings: dict, positive: list, existing: str | None, prompt: dict | None, node_id) -> list[str]:
    """Write the job; the lines the node shows (where it is, how to run it)."""
    from .train import _existing_path

    ckpt = checkpoint_of(prompt, node_id)
    if ckpt["folder"] == "diffusion_models" and (settings["text_encoder_lr"] > 0 or settings["sample_every_n_steps"]):
        raise TrainingError("a job from Load Diffusion Model has no text encoder or VAE: text_encoder_lr and "
                            "sample_every_n_steps need a checkpoint from Load Checkpoint")
    values = {k: v for k, v in settings.items() if k != "job_name"}
    parent = os.path.join(folder_paths.get_output_directory(), *JOBS_FOLDER)
    path = job.write_job(parent, settings["job_name"], settings=values, checkpoint=ckpt, manifest=manifest_of(positive),
                         existing_lora=_existing_path(existing) if existing else None)
    script = os.path.join(PACK_ROOT, "scripts", "train.py")
    log.info("LoRA Lab: training job written to %s", path)
    return [f"job written: {path}", f"run it: python {script} --job {path}",
            f"on N GPUs: torchrun --standalone --nproc_per_node N {script} --job {path}"]


__all__ = ["JOBS_FOLDER", "LOADERS", "checkpoint_of", "manifest_of", "write"]
