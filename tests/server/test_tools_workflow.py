"""example_workflows/merge_and_resize.json through a real ComfyUI server (POST /prompt, /history):
two LoRAs merged (concatenated, exact) -> resized to rank 4 -> inspected -> loaded -> sampled; and a
bad tool input fails the prompt with a clear error while the server keeps serving."""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from loralab_testkit import server

pytestmark = pytest.mark.server

WORKFLOW = os.path.join(server.REPO_ROOT, "example_workflows", "merge_and_resize.json")


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def prompt_of(srv, **changes) -> dict:
    with open(WORKFLOW) as fh:
        prompt = srv.to_api(json.load(fh))
    for node in prompt.values():
        node["inputs"].update(changes.get(node["class_type"], {}))
    return prompt


def out_of(entry, prompt, kind) -> dict:
    return next(out for nid, out in entry["outputs"].items() if prompt[nid]["class_type"] == kind)


def test_offered_as_a_template(srv):
    assert "merge_and_resize" in srv.get("/api/workflow_templates").get(server.PACK_DIR_NAME, [])


def test_merge_and_resize_workflow(srv):
    prompt = prompt_of(srv, KSampler={"steps": 2}, LoraLabMergeLoRA={"filename_prefix": "srv_tools/merged"},
                       LoraLabResizeLoRA={"filename_prefix": "srv_tools/resized"})
    entry = srv.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    loras = os.path.join(srv.base, "models", "loras")
    merged = out_of(entry, prompt, "LoraLabMergeLoRA")
    resized = out_of(entry, prompt, "LoraLabResizeLoRA")
    (m_name,), (r_name,) = merged["loralab_saved"], resized["loralab_saved"]
    assert m_name.startswith("srv_tools/merged_") and r_name.startswith("srv_tools/resized_")
    a = load_file(os.path.join(loras, *server.DEMO_LORA.split("/")))
    m = load_file(os.path.join(loras, *m_name.split("/")))
    r = load_file(os.path.join(loras, *r_name.split("/")))
    assert set(m) == set(r) == set(a)                                  # same modules, kohya names
    downs = [k for k in a if k.endswith("lora_down.weight")]
    assert all(m[k].shape[0] == 2 * a[k].shape[0] for k in downs)     # rank 4 + 4 concatenated
    assert all(r[k].shape[0] == 4 for k in downs)                      # resized to 4
    assert "ranks concatenated (exact)" in merged["text"][0] and "keeps" in resized["text"][0]
    inspect = out_of(entry, prompt, "LoraLabInspectLoRA")["text"][0]
    assert "architecture: SD1.5" in inspect and "lora_lab.tool: resize" in inspect
    load_report = server.reports(entry, prompt)[next(n for n, v in prompt.items() if v["class_type"] == "LoraLabLoadLoRA")]
    assert f"{len(r)} of {len(r)} keys match" in load_report
    assert len(server.images(entry)) == 1


def test_a_bad_tool_input_fails_the_prompt_and_the_server_goes_on(srv):
    loras = os.path.join(srv.base, "models", "loras")
    before = {d: set(f) for d, _, f in os.walk(loras)}
    prompt = prompt_of(srv, LoraLabMergeLoRA={"filename_prefix": "../escaped/merged"})
    entry = srv.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert "must stay inside the loras folders" in server.error_text(entry)
    assert {d: set(f) for d, _, f in os.walk(loras)} == before
    prompt = prompt_of(srv, LoraLabResizeLoRA={"rank": 64, "filename_prefix": "srv_tools/too_big"},
                       LoraLabMergeLoRA={"filename_prefix": "srv_tools/merged_again"})
    entry = srv.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert "rank 64 is above the rank the file stores" in server.error_text(entry)
    assert not any(f.startswith("too_big") for f in os.listdir(os.path.join(loras, "srv_tools")))
    assert srv.alive() and srv.object_info(refresh=True)
