"""Train LoRA's ``algorithm`` through a real server: core TrainLoraNode's names (LoRA, LoHa, LoKr,
OFT) are the options, and API prompts from workflows saved with the earlier lowercase names still
validate and run (issue 8.5). The example workflow, which uses "LoRA", runs in test_train_workflow.py."""
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


def train_prompt(srv, algorithm) -> dict:
    """The example workflow (train -> save -> load -> sample), one training and one sampling step."""
    with open(WORKFLOW) as fh:
        prompt = srv.to_api(json.load(fh))
    for node in prompt.values():
        if node["class_type"] == "LoraLabTrainLoraNode":
            node["inputs"].update(steps=1, algorithm=algorithm)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    return prompt


def test_the_options_are_core_names(srv):
    spec = srv.object_info(refresh=True)["LoraLabTrainLoraNode"]["input"]["required"]["algorithm"]
    assert spec[0] == ["LoRA", "LoHa", "LoKr", "OFT"] and spec[1]["default"] == "LoRA"


def test_a_prompt_saved_with_a_lowercase_algorithm_runs(srv):
    entry = srv.run(train_prompt(srv, "lora"), timeout=900)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    assert server.images(entry)


def test_an_unknown_algorithm_is_refused_before_anything_runs(srv):
    with pytest.raises(server.PromptRejected) as e:
        srv.queue(train_prompt(srv, "glora"))
    text = json.dumps(e.value.body)
    assert "algorithm" in text and "LoRA, LoHa, LoKr, OFT" in text, text
