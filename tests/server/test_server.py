"""A real ComfyUI process with the pack installed, driven over HTTP only (issue 2, "a server test").

One server per test session (shared with tests/browser), CPU, one torch thread, its own base
directory: the tiny SD1.5 checkpoint and a kohya LoRA for it in loras/loralab_demo/.
"""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from support import server

COUNTS = re.compile(r"(\d+) of (\d+) keys match")


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def loras_dir(srv) -> str:
    return os.path.join(srv.base, "models", "loras")


def with_steps(prompt: dict, steps: int) -> dict:
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return prompt


def snapshot(folder: str) -> dict:
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_every_pack_node_has_tooltips(srv):
    info = srv.object_info(refresh=True)
    ours = {k: d for k, d in info.items() if d["python_module"].endswith(server.PACK_DIR_NAME)}
    assert set(ours) >= set(server.LORA_NODES), f"server log:\n{srv.log_tail()}"
    for node_id, d in ours.items():
        assert node_id.startswith("LoraLab") and d["display_name"] and d["description"], node_id
        inputs = {**d["input"]["required"], **d["input"].get("optional", {})}
        for name, spec in inputs.items():
            tip = spec[1].get("tooltip") if len(spec) > 1 else None
            assert isinstance(tip, str) and tip.strip(), f"{node_id}.{name} has no tooltip"
        tips = d.get("output_tooltips") or []
        assert len(tips) == len(d["output"]) and all(isinstance(t, str) and t.strip() for t in tips), \
            f"{node_id}: output_tooltips {tips!r} for outputs {d['output']!r}"


def test_loaders_in_object_info(srv):
    info = srv.object_info(refresh=True)
    expected = {"LoraLabLoadLoRA": ("Load LoRA (LoRA Lab)", ["MODEL", "CLIP"]),
                "LoraLabLoraLoaderModelOnly": ("Load LoRA, model only (LoRA Lab)", ["MODEL"])}
    for node_id, (display, first_outputs) in expected.items():
        assert node_id in info, f"{node_id} missing from /object_info; server log:\n{srv.log_tail()}"
        d = info[node_id]
        assert d["display_name"] == display
        assert d["python_module"].endswith(server.PACK_DIR_NAME)
        assert d["output"][:len(first_outputs)] == first_outputs
        assert list(d["input"]["required"])[:len(first_outputs) + 2] == \
            [o.lower() for o in first_outputs] + ["lora_name", "strength_model"]
        # lora_name lists every file in the loras folders, subfolders included, with '/' separators
        assert server.DEMO_LORA in d["input"]["required"]["lora_name"][0]
        for name in ("strength_model",) + (("strength_clip",) if node_id == "LoraLabLoadLoRA" else ()):
            opts = d["input"]["required"][name][1]
            assert (opts["min"], opts["max"], opts["step"], opts["default"]) == (-100.0, 100.0, 0.01, 1.0)


def test_web_extension_and_help_pages_served(srv):
    import requests

    # example_workflows/ is offered in the UI's template browser under the pack's folder name
    assert "load_lora_basic" in srv.get("/api/workflow_templates").get(server.PACK_DIR_NAME, [])
    ext = srv.get("/extensions")
    assert f"/extensions/{server.PACK_DIR_NAME}/loralab.js" in ext
    for path in ("loralab.js", "docs/LoraLabLoadLoRA.md", "docs/LoraLabLoraLoaderModelOnly.md",
                 "docs/LoraLabTrainingDataset.md", "docs/LoraLabTrainLoraNode.md"):
        r = requests.get(f"{srv.url}/extensions/{server.PACK_DIR_NAME}/{path}", timeout=30)
        assert r.status_code == 200 and r.text.strip(), path


def test_example_workflow_through_post_prompt(srv):
    prompt = srv.example_prompt()
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    report = server.reports(entry, prompt)
    assert list(report) == ["2"], entry["outputs"]
    m = COUNTS.search(report["2"])
    n_file_keys = len(load_file(os.path.join(loras_dir(srv), *server.DEMO_LORA.split("/"))))
    assert m and int(m[1]) == int(m[2]) == n_file_keys, report["2"]
    assert "text-encoder tensor(s) at strength 1" in report["2"]
    imgs = server.images(entry)
    assert len(imgs) == 1
    path = os.path.join(srv.base, "output", imgs[0]["subfolder"], imgs[0]["filename"])
    assert os.path.getsize(path) > 0


def _write_bad_files(folder: str, good: str) -> dict[str, str]:
    """name -> regex the error must contain (besides the name). Each pins one way a file is bad."""
    os.makedirs(os.path.join(folder, "bad"), exist_ok=True)
    cases = {}
    # header length fine, header not JSON
    with open(os.path.join(folder, "bad", "corrupt_header.safetensors"), "wb") as fh:
        fh.write((40).to_bytes(8, "little") + b"{this is not json" + b" " * 23 + b"\0" * 64)
    cases["bad/corrupt_header.safetensors"] = r"not a valid safetensors"
    # a real LoRA cut in half: header intact, tensor data missing
    data = open(good, "rb").read()
    with open(os.path.join(folder, "bad", "truncated.safetensors"), "wb") as fh:
        fh.write(data[: len(data) // 2])
    cases["bad/truncated.safetensors"] = r"safetensors|truncated"
    # header offsets that lie: claims more header bytes than the file has
    with open(os.path.join(folder, "bad", "lying_header.safetensors"), "wb") as fh:
        fh.write((10**6).to_bytes(8, "little") + b"{}")
    cases["bad/lying_header.safetensors"] = r"header claims"
    # a NaN in one factor
    sd = load_file(good)
    k = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, os.path.join(folder, "bad", "nan_factor.safetensors"))
    cases["bad/nan_factor.safetensors"] = r"non-finite"
    # a pickle that is not plain tensors (a global reference; torch.load(weights_only=True) refuses it)
    with open(os.path.join(folder, "bad", "not_tensors.pt"), "wb") as fh:
        fh.write(pickle.dumps({"x": print}))
    cases["bad/not_tensors.pt"] = r"pickle"
    # up/down factors whose shapes do not fit the target weight
    sd = load_file(good)
    k = sorted(k for k in sd if k.endswith("lora_up.weight") and sd[k].dim() == 2)[0]
    sd[k] = torch.zeros(sd[k].shape[0] + 3, sd[k].shape[1])
    save_file(sd, os.path.join(folder, "bad", "wrong_shape.safetensors"))
    cases["bad/wrong_shape.safetensors"] = r"shape|fit"
    return cases


def test_bad_inputs_error_and_server_keeps_serving(srv):
    folder = loras_dir(srv)
    good = os.path.join(folder, *server.DEMO_LORA.split("/"))
    cases = _write_bad_files(folder, good)
    before = snapshot(folder)

    for name, problem in cases.items():
        entry = srv.run(srv.example_prompt(lora_name=name))
        msg = server.error_text(entry)
        assert entry["status"]["status_str"] == "error", (name, entry["status"])
        assert os.path.basename(name) in msg and re.search(problem, msg, re.I), (name, msg)
        assert "LoraLabLoadLoRA" in msg

    # names that try to leave the loras folders never reach the node: validation refuses them
    for name in ("../x.safetensors", "../../models/checkpoints/" + server.DEMO_CHECKPOINT, "/etc/hostname"):
        with pytest.raises(server.PromptRejected) as e:
            srv.queue(srv.example_prompt(lora_name=name))
        text = json.dumps(e.value.body)
        assert e.value.status == 400 and "lora_name" in text and json.dumps(name)[1:-1] in text, text

    # the server still serves: a good prompt right after succeeds and our node ran again
    prompt = with_steps(srv.example_prompt(strength_model=0.5), 1)
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", server.error_text(entry)
    assert "model tensor(s) at strength 0.5" in server.reports(entry, prompt)["2"]
    assert srv.alive()
    assert snapshot(folder) == before, "something was written into the loras folder"
