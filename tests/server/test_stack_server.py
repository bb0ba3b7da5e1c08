"""LoRA Stack and prompt tags on a real ComfyUI server, over HTTP only (issue 7): the example workflows
queued through POST /prompt, a hand-written API prompt in the README's rows form, the issue's bad
inputs (each an error naming its row or tag, the server serving the next prompt), and the routes the
UI uses (POST /loralab/resolve for tag highlighting, GET /loralab/blocks)."""
from __future__ import annotations

import json
import os
import re

import pytest
import requests

from loralab_testkit import server

EXAMPLES = ("Stack several LoRAs and sample.json", "Prompt with LoRA tags and sample.json",
            "LoRA block weights and sample.json")
INK, DETAIL = server.DEMO_STACK_LORAS


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def example(srv, name: str) -> dict:
    with open(os.path.join(server.REPO_ROOT, "example_workflows", name)) as fh:
        return srv.to_api(json.load(fh))


def ours(prompt: dict, node_type: str) -> str:
    return next(nid for nid, n in prompt.items() if n["class_type"] == node_type)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflows_through_post_prompt(srv, name):
    prompt = example(srv, name)
    entry = srv.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    nid = ours(prompt, "LoraLabPromptLoRA" if "tags" in name else "LoraLabLoraStack")
    out = entry["outputs"][nid]
    report = "\n".join(out["text"])
    assert report.startswith("3 LoRA(s) on one clone, merged"), report
    assert len(re.findall(r"570 of 570 keys match", report)) == 3, report
    assert out["loralab_triggers"] == ["inkwash style, sumi-e, fine detail, sharp focus"]
    if "block" in name or "tags" in name:
        assert "block weights OUTALL: BASE 1, IN00–OUT02 0, OUT03–OUT11 1" in report, report
    assert len(server.images(entry)) == 1


def _preview(node_inputs: dict, class_type: str, slot: int) -> dict:
    """Checkpoint -> our node -> Preview Any of one output: runs the node without sampling."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.DEMO_CHECKPOINT}},
            "2": {"class_type": class_type, "inputs": {"model": ["1", 0], "clip": ["1", 1], **node_inputs}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", slot]}}}


def test_hand_written_api_prompt_with_rows_and_lora_stack(srv):
    """The README's API form: `rows` is a JSON string; a LORA_STACK comes from another node's output."""
    rows = [{"lora": server.DEMO_LORA, "strength": 0.8},
            {"on": False, "lora": INK, "strength": 1},
            {"lora": DETAIL, "strength_model": 1.0, "strength_clip": 0.5, "blocks": "MIDD", "dyn_rank": 0}]
    prompt = _preview({"rows": json.dumps(rows)}, "LoraLabLoraStack", 4)
    prompt["4"] = {"class_type": "LoraLabLoraStack",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_stack": ["2", 2], "rows": "[]"}}
    prompt["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 4]}}
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", server.error_text(entry)
    first, second = "\n".join(entry["outputs"]["2"]["text"]), "\n".join(entry["outputs"]["4"]["text"])
    assert "row 1: tiny_sd15_demo_lora" in first and "row 3: tiny_sd15_fine_detail" in first, first
    assert "tiny_sd15_inkwash_style" not in first and "block weights MIDD" in first, first
    # the second node took the first's LORA_STACK: the same two files, at the same strengths
    assert "lora_stack item 1 (loralab_demo/tiny_sd15_demo_lora.safetensors)" in second, second
    assert "at strength 1, 72 text-encoder tensor(s) at strength 0.5" in second, second
    words = [entry["outputs"][n]["loralab_triggers"] for n in ("2", "4")]
    assert words == [["fine detail, sharp focus"]] * 2, words


BAD = [   # (class_type, inputs, what the error must say)
    ("LoraLabLoraStack", {"rows": json.dumps([{"lora": server.DEMO_LORA}, {"lora": "shared/from_elsewhere.safetensors"}])},
     r"row 2: no LoRA named 'shared/from_elsewhere.safetensors'"),
    ("LoraLabLoraStack", {"rows": json.dumps([{"lora": server.DEMO_LORA, "blocks": "1,0,1"}])},
     r"row 1: block weights '1,0,1' give 3 values; SD1.5 takes 17"),
    ("LoraLabLoraStack", {"rows": "[{not json"}, r"rows is not valid JSON"),
    ("LoraLabPromptLoRA", {"text": "a cat <lora:>"}, r"tag <lora:> names no LoRA"),
    ("LoraLabPromptLoRA", {"text": "a cat <lora:tiny_sd15_demo_lora:abc>"}, r"'abc' is not a number"),
    ("LoraLabPromptLoRA", {"text": "a cat <lora:tiny_sd15_demo_lora:1"}, r"is not closed"),
    ("LoraLabPromptLoRA", {"text": "<lora:tiny_sd15_demo_lora:1:lbw=NOPE>"}, r"preset 'NOPE' is not one SD1.5 has"),
    ("LoraLabPromptLoRA", {"text": "<lora:tiny_sd15_demo_lor:1>"},
     r"no LoRA named 'tiny_sd15_demo_lor' in the loras folders; closest: loralab_demo/tiny_sd15_demo_lora"),
]


@pytest.mark.parametrize("class_type, inputs, message", BAD, ids=[m for *_, m in BAD])
def test_bad_rows_and_tags_fail_by_name_and_the_server_keeps_serving(srv, class_type, inputs, message):
    entry = srv.run(_preview(inputs, class_type, 0 if class_type == "LoraLabLoraStack" else 3))
    assert entry["status"]["status_str"] == "error"
    text = server.error_text(entry)
    assert re.search(message, text) and class_type in text, text
    ok = srv.run(_preview({"rows": json.dumps([{"lora": server.DEMO_LORA, "strength": 0.123}])}, "LoraLabLoraStack", 4))
    assert ok["status"]["status_str"] == "success", server.error_text(ok)


def test_resolve_route_reads_tags_as_the_node_does(srv):
    text = ("x <lora:tiny_sd15_demo_lora:0.8> <lora:Inkwash Style:1> <lora:nope_nope:1> <lora:tiny_sd15_demo_lora:abc> "
            "<lora:tiny_sd15_demo_lora:1:lbw=1,0> <lora:tiny_sd15_demo_lora:1:lbw=SDXL-OUTALL> <lora:open")
    r = requests.post(srv.url + "/loralab/resolve", json={"text": text}, timeout=60)
    assert r.status_code == 200, r.text
    tags = r.json()["tags"]
    assert [t["text"] for t in tags] == [text[t["start"]:t["end"]] for t in tags]
    assert [t["name"] for t in tags[:3]] == [server.DEMO_LORA, INK, None]
    errors = [t["error"] for t in tags]
    assert errors[0] is None and errors[1] is None and errors[5] is None      # SDXL-OUTALL fits an SDXL model
    assert "no LoRA named 'nope_nope'" in errors[2] and "'abc' is not a number" in errors[3], errors
    assert "give 2 values" in errors[4] and "is not closed" in errors[6], errors
    assert requests.post(srv.url + "/loralab/resolve", data="nope", timeout=60).status_code == 400
    assert srv.get("/loralab/resolve?tag=Inkwash%20Style") == {"Inkwash Style": INK}   # the file's alias
    layouts = srv.get("/loralab/blocks")["layouts"]
    assert set(layouts) == {"sd1", "sd2", "sdxl", "flux"} and layouts["sd1"]["presets"]["OUTALL"].startswith("1,0,0")
    assert len(layouts["flux"]["forms"]["58"]) == 58
