"""A training job on disk: what the train node prepared (its settings, the dataset's encodings and the
checkpoint's name), for ``scripts/train.py --job`` to run elsewhere, e.g. on a cluster with torchrun.

    <jobs folder>/<name>_00001/
        job.json                    settings, checkpoint, dataset and output (below)
        dataset/dataset-<id>.json   the dataset's manifest (training/dataset.py), and the cache
        dataset/latents/.., text/.. entries it lists: the encoded latents and captions
        existing_lora.safetensors   the LoRA to continue, when one was chosen

job.json::

    {"format": "loralab-job/1", "created": "2025-…",
     "settings": {"steps": 16, "batch_size": 1, …},          the train node's inputs, by name
     "checkpoint": {"folder": "checkpoints", "name": "sd_xl_base_1.0.safetensors",
                    "path": "/…/models/checkpoints/sd_xl_base_1.0.safetensors", "weight_dtype": "default"},
     "dataset": "dataset/dataset-<id>.json", "existing_lora": null, "output": "<name>.safetensors"}

The checkpoint is referred to, not copied: the script looks for ``name`` in ComfyUI's ``folder``
(checkpoints or diffusion_models) on the machine that runs it, then at ``path``; ``--checkpoint``
overrides both. Every path inside the job is relative to the job folder and must stay inside it.
Nothing here imports ComfyUI.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from ..lora.errors import LoraError
from ..lora.io import relative_parts
from .dataset import read_manifest
from .errors import TrainingError

FORMAT = "loralab-job/1"
JOB_FILE = "job.json"
FOLDERS = ("checkpoints", "diffusion_models")


@dataclass
class Job:
    root: str                        # the job folder
    settings: dict                   # train node input name -> value
    checkpoint: dict                 # folder, name, path, weight_dtype
    dataset: str                     # the manifest's full path
    existing_lora: str | None        # full path of the LoRA to continue
    output: str                      # file name for the result


def _inside(root: str, rel: str, what: str, file: str) -> str:
    """``root``/``rel`` for a path a job file names; refuses one that leaves the job folder."""
    try:
        parts = relative_parts(rel, what)
    except LoraError:
        raise TrainingError(f"{what} {rel!r} must be a path inside the job folder (no absolute path, no '..')",
                            file=file) from None
    if not parts:
        raise TrainingError(f"{what} is empty", file=file)
    return os.path.join(root, *parts)


def read_job(path: str) -> Job:
    """The job in folder ``path`` (or its job.json); TrainingError names what is missing or wrong."""
    root = os.path.dirname(path) if os.path.basename(path) == JOB_FILE else path
    file = os.path.join(root, JOB_FILE)
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise TrainingError(f"no {JOB_FILE} in the job folder (write one with Train LoRA's job_name)", file=root) from None
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot read the job: {e}", file=file) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TrainingError(f"not a {FORMAT} job (format {data.get('format') if isinstance(data, dict) else None!r})",
                            file=file)
    settings, ckpt = data.get("settings"), data.get("checkpoint")
    if not isinstance(settings, dict) or not isinstance(ckpt, dict) or not ckpt.get("name"):
        raise TrainingError("the job has no settings or no checkpoint name", file=file)
    if ckpt.get("folder", "checkpoints") not in FOLDERS:
        raise TrainingError(f"checkpoint folder {ckpt.get('folder')!r}: expected one of {', '.join(FOLDERS)}", file=file)
    dataset = _inside(root, str(data.get("dataset") or ""), "dataset", file)
    if not os.path.isfile(dataset):
        raise TrainingError(f"the job's dataset manifest {data.get('dataset')!r} is missing", file=file)
    existing = data.get("existing_lora")
    existing = _inside(root, str(existing), "existing_lora", file) if existing else None
    if existing and not os.path.isfile(existing):
        raise TrainingError(f"the job's existing_lora {data.get('existing_lora')!r} is missing", file=file)
    output = str(data.get("output") or "lora.safetensors")
    if os.path.basename(output) != output or output in (".", ".."):
        raise TrainingError(f"output {output!r} must be a file name", file=file)
    return Job(root, settings, {"folder": "checkpoints", "weight_dtype": "default", **ckpt}, dataset, existing, output)


def copy_dataset(manifest: str, dest: str) -> str:
    """Copy a dataset manifest and the cache entries it lists into ``dest``; returns the copy's path."""
    data = read_manifest(manifest)
    src_root = os.path.dirname(manifest)
    for s in data.get("samples", []):
        for kind in ("latent", "text"):
            rel = s[kind]
            src = _inside(src_root, rel, f"the manifest's {kind} entry", manifest)
            if not os.path.isfile(src):
                raise TrainingError(f"the cache entry of {s.get('image')} is missing; run the dataset node again",
                                    file=src)
            dst = _inside(dest, rel, kind, manifest)
            if not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
    out = os.path.join(dest, os.path.basename(manifest))
    shutil.copyfile(manifest, out)
    return out


def write_job(parent: str, name: str, *, settings: dict, checkpoint: dict, manifest: str,
              existing_lora: str | None = None) -> str:
    """Write a job folder ``<parent>/<name>_NNNNN`` (the first free number; never over another job) and
    return its path. Built in a temporary folder beside it and renamed at the end: a job folder is
    whole or absent."""
    try:
        parts = relative_parts(name.strip(), "job_name")
    except LoraError:
        raise TrainingError(f"job_name {name!r} must be a name inside the jobs folder {parent} (no absolute path, "
                            "no '..')") from None
    if not parts:
        raise TrainingError("job_name is empty")
    folder = os.path.join(parent, *parts[:-1])
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-job-", dir=folder)
    try:
        rel_manifest = os.path.relpath(copy_dataset(manifest, os.path.join(tmp, "dataset")), tmp)
        existing = None
        if existing_lora:
            existing = "existing_lora.safetensors"
            shutil.copyfile(existing_lora, os.path.join(tmp, existing))
        data = {"format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "settings": settings, "checkpoint": checkpoint, "dataset": rel_manifest.replace(os.sep, "/"),
                "existing_lora": existing, "output": f"{parts[-1]}.safetensors"}
        with open(os.path.join(tmp, JOB_FILE), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, ensure_ascii=False)
        n = 1
        while True:
            path = os.path.join(folder, f"{parts[-1]}_{n:05d}")
            try:
                os.rename(tmp, path)        # fails when the folder exists: the next number then
                return path
            except OSError:
                if not os.path.exists(path):
                    raise
                n += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["FOLDERS", "FORMAT", "JOB_FILE", "Job", "copy_dataset", "read_job", "write_job"]
