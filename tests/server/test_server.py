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

from loralab_testkit import server

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


def test_web_extension_help_pages_and_templates_served(srv):
    import glob

    import requests

    ext = srv.get("/extensions")
    assert f"/extensions/{server.PACK_DIR_NAME}/loralab.js" in ext
    ours = [k for k, d in srv.object_info(refresh=True).items() if d["python_module"].endswith(server.PACK_DIR_NAME)]
    for path in ["loralab.js"] + [f"docs/{node}.md" for node in ours]:   # a help page for every node
        r = requests.get(f"{srv.url}/extensions/{server.PACK_DIR_NAME}/{path}", timeout=30)
        assert r.status_code == 200 and r.text.strip(), path
    # example_workflows/ is offered in the UI's template browser under the pack's folder name, each
    # with its thumbnail (<name>.jpg, the only image name the frontend asks for)
    names = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(server.REPO_ROOT, "example_workflows", "*.json")))
    assert sorted(srv.get("/api/workflow_templates").get(server.PACK_DIR_NAME, [])) == names
    for name in names:
        r = requests.get(f"{srv.url}/api/workflow_templates/{server.PACK_DIR_NAME}/{name}.jpg", timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff", name


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


def test_diffusers_named_wan_lora_through_post_prompt(srv, comfy):
    """A Wan LoRA whose keys ComfyUI core drops (diffusers / PEFT names, and a kohya name with the
    mixed separators files in the wild have) queued as a workflow: Load Diffusion Model (the tiny
    Wan 2.1 T2V) -> Load LoRA, model only -> core's ModelSave. The saved weights are the base plus
    strength · ΔW computed from the file, on the layers the file names (diffusers -> ComfyUI by hand)."""
    from loralab_testkit import families as F

    models = os.path.join(srv.base, "models", "diffusion_models")
    unet = F.write_diffusion_model("wan21_t2v", models)
    base = load_file(unet)
    layers = {"transformer.blocks.0.attn1.to_q": "blocks.0.self_attn.q", "transformer.blocks.1.attn2.to_out.0":
              "blocks.1.cross_attn.o", "transformer.blocks.0.ffn.net.0.proj": "blocks.0.ffn.0",
              "transformer.proj_out": "head.head", "lora_unet_blocks_1.self_attn.v": "blocks.1.self_attn.v"}
    g = torch.Generator().manual_seed(0)
    sd, deltas = {}, {}
    for name, layer in layers.items():
        out_f, in_f = base[layer + ".weight"].shape
        down, up = torch.randn(2, in_f, generator=g) * 0.1, torch.randn(out_f, 2, generator=g) * 0.1
        if name.startswith("lora_unet_"):        # kohya: alpha / rank
            sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
            deltas[layer] = up @ down * 0.5
        else:                                    # PEFT without metadata: scale 1
            sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
            deltas[layer] = up @ down
    os.makedirs(os.path.join(loras_dir(srv), "loralab_dit"), exist_ok=True)
    save_file(sd, os.path.join(loras_dir(srv), "loralab_dit", "wan_diffusers_names.safetensors"))
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": os.path.basename(unet), "weight_dtype": "default"}},
        "2": {"class_type": "LoraLabLoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "loralab_dit/wan_diffusers_names.safetensors",
                         "strength_model": 0.5}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "loralab_dit/wan_lora"}},
    }
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    report = server.reports(entry, prompt)["2"]
    assert f"{len(sd)} of {len(sd)} keys match this model (100%, 5 tensors patched)" in report, report
    saved_dir = os.path.join(srv.base, "output", "loralab_dit")
    (saved,) = [f for f in os.listdir(saved_dir) if f.startswith("wan_lora")]
    after = {k.split("diffusion_model.", 1)[-1]: v for k, v in load_file(os.path.join(saved_dir, saved)).items()}
    for layer, d in deltas.items():
        got = after[layer + ".weight"].float() - base[layer + ".weight"]
        assert torch.allclose(got, 0.5 * d, rtol=0, atol=1e-6 * base[layer + ".weight"].abs().max()), layer
    untouched = [k for k in base if k[:-len(".weight")] not in deltas]
    assert all(torch.equal(after[k].float(), base[k]) for k in untouched)
