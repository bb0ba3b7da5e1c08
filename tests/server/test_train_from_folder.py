"""example_workflows/train_from_folder.json through a real ComfyUI server (POST /prompt, /history):
a folder of captioned images under the server's input/ -> the dataset node -> Train LoRA with the
recipe (text-encoder LoRA, scheduler, min-SNR, noise offset, save and sample every N steps) ->
Save LoRA -> Load LoRA -> sample."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from loralab_testkit import server
from loralab_testkit.datasets import kohya_folder

pytestmark = pytest.mark.server

WORKFLOW = os.path.join(server.REPO_ROOT, "example_workflows", "train_from_folder.json")


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def prompt_of(srv, folder: str) -> dict:
    with open(WORKFLOW) as fh:
        prompt = srv.to_api(json.load(fh))
    for node in prompt.values():          # keep the run short on a CPU
        inputs = node["inputs"]
        if node["class_type"] == "LoraLabTrainingDataset":
            inputs["folder"] = folder
        if node["class_type"] == "LoraLabTrainLoraNode":
            inputs.update(steps=2, save_every_n_steps=1, sample_every_n_steps=2, checkpoint_prefix="srv_ck/folder",
                          sample_prompt="sks, white square --s 2 --w 64 --h 64")
        if node["class_type"] == "KSampler":
            inputs["steps"] = 2
    return prompt


def by_type(entry, prompt, kind) -> dict:
    return next(out for nid, out in entry["outputs"].items() if prompt[nid]["class_type"] == kind)


def test_offered_as_a_template(srv):
    assert "train_from_folder" in srv.get("/api/workflow_templates").get(server.PACK_DIR_NAME, [])


def test_train_from_folder_workflow(srv):
    folder = "srv_test_dataset"
    root = os.path.join(srv.base, "input", folder)
    shutil.rmtree(root, ignore_errors=True)
    kohya_folder(root)
    prompt = prompt_of(srv, folder)
    kinds = {n["class_type"] for n in prompt.values()}
    assert {"LoraLabTrainingDataset", "LoraLabTrainLoraNode", "LoraLabSaveLoRA", "LoraLabLoadLoRA", "KSampler"} <= kinds
    entry = srv.run(prompt, timeout=1200)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()

    report = by_type(entry, prompt, "LoraLabTrainingDataset")["text"][0]
    assert "4 images, 7 samples with repeats" in report and "latents: 4 encoded" in report
    train = by_type(entry, prompt, "LoraLabTrainLoraNode")
    assert train["text"] == ["saved srv_ck/folder_step000001_00001.safetensors, srv_ck/folder_step000002_00001.safetensors"]
    (sample,) = train["images"]                       # sample_every_n_steps=2 of 2 steps: one image, in /history
    assert sample["type"] == "output" and sample["filename"].startswith("folder_step000002")
    assert os.path.getsize(os.path.join(srv.base, "output", sample["subfolder"], sample["filename"])) > 0
    loras = os.path.join(srv.base, "models", "loras")
    assert sorted(os.listdir(os.path.join(loras, "srv_ck"))) == ["folder_step000001_00001.safetensors",
                                                                 "folder_step000002_00001.safetensors"]
    name = by_type(entry, prompt, "LoraLabSaveLoRA")["text"][0].removeprefix("saved ")
    assert os.path.isfile(os.path.join(loras, *name.split("/")))
    load = by_type(entry, prompt, "LoraLabLoadLoRA")["text"][0]
    matched, total = map(int, load.split(" keys match")[0].split(": ")[-1].split(" of "))
    assert matched == total > 0 and "72 text-encoder tensor(s)" in load, load
    assert server.images(entry), "the sampler's image was saved"

    # queued again unchanged: ComfyUI's cache serves the dataset node (its files did not change)
    again = srv.run(prompt, timeout=1200)
    assert again["status"]["status_str"] == "success", server.error_text(again)
    cached = {n for m in server.messages(again, "execution_cached") for n in m.get("nodes", [])}
    ds_id = next(nid for nid, n in prompt.items() if n["class_type"] == "LoraLabTrainingDataset")
    assert ds_id in cached
