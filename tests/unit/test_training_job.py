"""training/job.py: the job folder Train LoRA writes for scripts/train.py (no ComfyUI)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from loralab.training import dataset, job
from loralab.training.errors import TrainingError
from loralab_testkit.datasets import encoded_dataset

SETTINGS = {"steps": 3, "batch_size": 2, "learning_rate": 0.01}
CKPT = {"folder": "checkpoints", "name": "model.safetensors", "path": "/elsewhere/model.safetensors",
        "weight_dtype": "default"}


@pytest.fixture
def manifest(tmp_path):
    return encoded_dataset(str(tmp_path / "data"), (4, 2, 2), (3, 8), pooled=8, n=3)


def test_a_job_carries_the_dataset_settings_and_checkpoint_and_reads_back(tmp_path, manifest):
    lora = tmp_path / "old.safetensors"
    lora.write_bytes(b"lora bytes")
    path = job.write_job(str(tmp_path / "jobs"), "my_dog", settings=SETTINGS, checkpoint=CKPT, manifest=manifest,
                         existing_lora=str(lora))
    assert path == str(tmp_path / "jobs" / "my_dog_00001")
    j = job.read_job(path)
    assert j.settings == SETTINGS and j.checkpoint == CKPT and j.output == "my_dog.safetensors"
    assert open(j.existing_lora, "rb").read() == b"lora bytes"
    # the dataset is a copy: it loads from the job alone, with the same tensors
    moved = tmp_path / "moved"
    os.rename(path, moved)
    import shutil
    shutil.rmtree(tmp_path / "data")
    here = dataset.load_manifest(job.read_job(str(moved / "job.json")).dataset)
    assert len(here.samples) == 3 and all(s.latent.shape == (4, 2, 2) for s in here.samples)
    assert all(torch.is_tensor(s.cond[0]) and "pooled_output" in s.cond[1] for s in here.samples)


def test_jobs_are_never_overwritten_and_half_jobs_never_left(tmp_path, manifest, monkeypatch):
    jobs = tmp_path / "jobs"
    first = job.write_job(str(jobs), "run", settings=SETTINGS, checkpoint=CKPT, manifest=manifest)
    second = job.write_job(str(jobs), "run", settings=SETTINGS, checkpoint=CKPT, manifest=manifest)
    assert (os.path.basename(first), os.path.basename(second)) == ("run_00001", "run_00002")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job.shutil, "copyfile", broken)
    with pytest.raises(OSError, match="No space left"):
        job.write_job(str(jobs), "run", settings=SETTINGS, checkpoint=CKPT, manifest=manifest)
    assert sorted(os.listdir(jobs)) == ["run_00001", "run_00002"]


@pytest.mark.parametrize("field,value,message", [
    ("dataset", "../../etc/passwd", "must be a path inside the job folder"),
    ("dataset", "/abs/dataset.json", "must be a path inside the job folder"),
    ("existing_lora", "../other.safetensors", "must be a path inside the job folder"),
    ("dataset", "dataset/missing.json", "dataset manifest 'dataset/missing.json' is missing"),
    ("output", "../out.safetensors", "must be a file name"),
    ("format", "something/2", "not a loralab-job/1 job"),
    ("checkpoint", {"name": "x", "folder": "loras"}, "expected one of checkpoints, diffusion_models"),
])
def test_a_job_that_points_outside_itself_or_is_incomplete_is_refused(tmp_path, manifest, field, value, message):
    path = job.write_job(str(tmp_path), "j", settings=SETTINGS, checkpoint=CKPT, manifest=manifest)
    file = os.path.join(path, "job.json")
    data = json.load(open(file))
    data[field] = value
    json.dump(data, open(file, "w"))
    with pytest.raises(TrainingError, match=message):
        job.read_job(path)


def test_missing_job_and_damaged_dataset_are_named(tmp_path, manifest):
    with pytest.raises(TrainingError, match="no job.json in the job folder"):
        job.read_job(str(tmp_path))
    entry = json.load(open(manifest))["samples"][1]["latent"]
    os.remove(os.path.join(os.path.dirname(manifest), entry))
    with pytest.raises(TrainingError, match="the cache entry of img1.png is missing"):
        job.write_job(str(tmp_path / "jobs"), "j", settings=SETTINGS, checkpoint=CKPT, manifest=manifest)
    assert os.listdir(tmp_path / "jobs") == []
