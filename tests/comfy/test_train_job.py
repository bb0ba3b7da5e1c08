"""Train LoRA's job_name (in-process): the node writes a job folder instead of training, naming the
checkpoint its model input comes from in the queued prompt, and blocks the nodes after it; what it
cannot make a job of is refused with a clear error. The server test (tests/server/test_train_job.py)
runs such a job with scripts/train.py and loads the result."""
from __future__ import annotations

import json
import os

import pytest
import torch

from loralab_testkit import datasets
from loralab_testkit import families as F

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    fam = F.family("sd3")
    return datasets.encoded_dataset(str(tmp_path_factory.mktemp("jobdata")), fam.latent, fam.context,
                                    pooled=fam.pooled, n=2)


def positive(manifest: str) -> list:
    """The dataset node's conditioning as far as the job is concerned: each entry names the manifest."""
    from loralab.nodes.dataset import DATASET_KEY

    return [[[torch.zeros(1, 8, 64), {DATASET_KEY: {"manifest": manifest}}]] for _ in range(2)]


def prompt_with(loader: str, inputs: dict) -> dict:
    return {"1": {"class_type": loader, "inputs": inputs},
            "9": {"class_type": "LoraLabTrainLoraNode", "inputs": {"model": ["1", 0]}}}


def write(pack, tiny_sd3, manifest, prompt, **settings):
    args = dict(model=tiny_sd3.model, existing_lora="[None]", job_name="unit_job", steps=3, batch_size=2,
                text_encoder_lr=0.0)
    args.update(settings)
    node = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]()
    return node.train(latents=[{"samples": torch.zeros(1, 16, 8, 8)}] * 2, positive=positive(manifest),
                      unique_id=["9"], prompt=[prompt], **{k: [v] for k, v in args.items()})


def test_job_name_writes_a_job_and_blocks_the_nodes_after(pack, comfy, tiny_sd3, manifest):
    from comfy_execution.graph_utils import ExecutionBlocker
    from loralab.training import job

    name = os.path.basename(tiny_sd3.path)
    out = write(pack, tiny_sd3, manifest, prompt_with("UNETLoader", {"unet_name": name, "weight_dtype": "default"}))
    assert all(isinstance(r, ExecutionBlocker) and r.message is None for r in out["result"])
    first = out["ui"]["text"][0]
    assert first.startswith("job written: ") and "scripts/train.py --job" in out["ui"]["text"][1]
    path = first.removeprefix("job written: ")
    assert path.startswith(os.path.join(comfy.output_dir, "LoRA-Lab", "jobs", "unit_job_"))
    j = job.read_job(path)
    assert j.checkpoint == {"folder": "diffusion_models", "name": name, "path": tiny_sd3.path,
                            "weight_dtype": "default"}
    assert j.settings["steps"] == 3 and j.settings["batch_size"] == 2 and "job_name" not in j.settings
    from loralab.nodes import train as T
    assert set(j.settings) == set(T.setting_specs()) - {"job_name"}
    with open(j.dataset) as fh:
        assert len(json.load(fh)["samples"]) == 2


@pytest.mark.parametrize("prompt,settings,message", [
    (prompt_with("LoraLoaderModelOnly", {"model": ["0", 0], "lora_name": "x", "strength_model": 1.0}), {},
     "needs the model straight from Load Checkpoint or Load Diffusion Model; it comes from LoraLoaderModelOnly"),
    (None, {}, "needs the queued prompt"),
    (prompt_with("UNETLoader", {"unet_name": "x.safetensors", "weight_dtype": "default"}), {"text_encoder_lr": 1e-4},
     "no text encoder or VAE: text_encoder_lr and sample_every_n_steps need a checkpoint"),
    (prompt_with("CheckpointLoaderSimple", {"ckpt_name": "x.safetensors"}), {"job_name": "../escape"},
     "must be a name inside the jobs folder"),
    (prompt_with("CheckpointLoaderSimple", {"ckpt_name": "x.safetensors"}), {"learning_rate": 5.0},
     "learning_rate = 5.0 is outside"),
])
def test_what_cannot_make_a_job_is_refused(pack, comfy, tiny_sd3, manifest, prompt, settings, message):
    from loralab.lora.errors import LoraError

    jobs = os.path.join(comfy.output_dir, "LoRA-Lab", "jobs")
    before = sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []
    with pytest.raises(LoraError, match=message):
        write(pack, tiny_sd3, manifest, prompt, **settings)
    assert (sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []) == before


def test_conditioning_without_the_dataset_node_is_refused(pack, tiny_sd3):
    from loralab.lora.errors import LoraError

    node = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]()
    with pytest.raises(LoraError, match="needs the latents and conditioning from Training Dataset from Folder"):
        node.train(model=[tiny_sd3.model], latents=[{"samples": torch.zeros(1, 16, 8, 8)}],
                   positive=[[[torch.zeros(1, 8, 64), {}]]], existing_lora=["[None]"], job_name=["j"], unique_id=["9"],
                   prompt=[prompt_with("UNETLoader", {"unet_name": "x", "weight_dtype": "default"})])
