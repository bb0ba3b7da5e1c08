"""example_workflows/Train a LoRA, save it, load it and sample.json through a real ComfyUI server: POST /prompt, then
/history. Train on two latents -> Save LoRA -> (its lora_name linked into) Load LoRA -> sample."""
from __future__ import annotations

import json
import os

import pytest

from loralab_testkit import server

pytestmark = pytest.mark.server

WORKFLOW = os.path.join(server.REPO_ROOT, "example_workflows", "Train a LoRA, save it, load it and sample.json")


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def prompt_of(srv, steps: int = 3) -> dict:
    with open(WORKFLOW) as fh:
        prompt = srv.to_api(json.load(fh))
    for node in prompt.values():          # keep the run short on a CPU
        if node["class_type"] == "LoraLabTrainLoraNode":
            node["inputs"]["steps"] = steps
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    return prompt


def test_nodes_are_listed_with_tooltips(srv):
    info = srv.object_info(refresh=True)
    for node in ("LoraLabTrainLoraNode", "LoraLabSaveLoRA"):
        spec = info[node]
        assert all(opts.get("tooltip") for _, (_, opts, *rest) in spec["input"]["required"].items()), node
        assert len(spec["output_tooltips"]) == len(spec["output"]) and all(spec["output_tooltips"])


def test_train_save_load_sample(srv):
    prompt = prompt_of(srv)
    kinds = {n["class_type"] for n in prompt.values()}
    assert {"LoraLabTrainLoraNode", "LoraLabSaveLoRA", "LoraLabLoadLoRA", "KSampler"} <= kinds
    entry = srv.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    saved = next(n["text"][0] for nid, n in entry["outputs"].items()
                 if prompt[nid]["class_type"] == "LoraLabSaveLoRA")
    name = saved.removeprefix("saved ")
    assert os.path.isfile(os.path.join(srv.base, "models", "loras", *name.split("/")))
    report = next(t for nid, t in server.reports(entry, prompt).items() if prompt[nid]["class_type"] == "LoraLabLoadLoRA")
    matched, total = map(int, report.split(" keys match")[0].split(": ")[-1].split(" of "))
    assert matched == total > 0, report
    assert server.images(entry), "the sampler's image was saved"
