"""The frontend's HTTP routes (nodes/routes.py) on a real ComfyUI server, and the loader inputs the
UI changed (`mode`, `on_no_match`, the legacy `bypass` of old API prompts), through POST /prompt.

    GET /loralab/info?name=     header-only summary; 400 outside the loras folders, 404 missing, 422 corrupt
    GET /loralab/preview?name=  the sidecar image; 404 when there is none (or it is not an image)
    GET /loralab/loras, /loralab/resolve?tag=   names and <lora:…> tags
"""
from __future__ import annotations

import json
import os
import re
import struct
import urllib.parse

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from loralab_testkit import server

SUB = "routes_test"
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0\x90wS\xde\0\0\0\x0cIDATx\x9cc\xf8\x0f\0\0\x01\x01\0\x05\x18\xd8N\0\0\0\0IEND\xaeB`\x82"


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def loras(srv) -> str:
    return os.path.join(srv.base, "models", "loras")


def get(srv, path: str, **params) -> requests.Response:
    return requests.get(srv.url + path, params=params, timeout=60)


def demo_tensors(srv) -> dict:
    return load_file(os.path.join(loras(srv), *server.DEMO_LORA.split("/")))


@pytest.fixture(scope="module")
def files(srv):
    """A few LoRAs in loras/routes_test/ (and one outside the loras folders), written once."""
    folder = os.path.join(loras(srv), SUB)
    os.makedirs(folder, exist_ok=True)
    sd = {k: v for k, v in list(demo_tensors(srv).items())[:30]}
    meta = {"ss_network_module": "networks.lora", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1",
            "modelspec.trigger_phrase": "ohwx, watercolor", "ss_steps": "1500", "ss_learning_rate": "1e-4",
            "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 10, "paper": 3}})}
    out = {}
    out["meta"] = f"{SUB}/with_meta.safetensors"
    save_file(sd, os.path.join(folder, "with_meta.safetensors"), metadata=meta)
    with open(os.path.join(folder, "with_meta.preview.png"), "wb") as fh:
        fh.write(PNG)
    # the preview sidecar is a text file: no preview, the rest of the panel as usual
    out["bad_preview"] = f"{SUB}/bad_preview.safetensors"
    save_file(sd, os.path.join(folder, "bad_preview.safetensors"), metadata=meta)
    with open(os.path.join(folder, "bad_preview.png"), "w") as fh:
        fh.write("<html>not an image</html>")
    # header intact, every tensor byte cut off: loading fails, describing must not
    out["header_only"] = f"{SUB}/header_only.safetensors"
    path = os.path.join(folder, "header_only.safetensors")
    save_file(sd, path, metadata=meta)
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: 8 + struct.unpack("<Q", data[:8])[0]])
    out["corrupt"] = f"{SUB}/corrupt_header.safetensors"
    with open(os.path.join(folder, "corrupt_header.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", 16) + b"{this is not js}" + b"\0" * 32)
    out["big_tags"] = f"{SUB}/big_tags.safetensors"
    table = {f"tag_{i:06d}": 200_000 - i for i in range(200_000)}
    save_file(sd, os.path.join(folder, "big_tags.safetensors"), metadata={"ss_tag_frequency": json.dumps({"d": table})})
    with open(os.path.join(folder, "notes.txt"), "w") as fh:
        fh.write("not a model")
    # a valid LoRA outside the loras folders: the routes must never describe it
    outside = os.path.join(srv.base, "models", "outside_lora.safetensors")
    save_file(sd, outside, metadata=meta)
    out["outside"] = outside
    return out


def test_loras_lists_names_and_tags(srv, files):
    body = get(srv, "/loralab/loras").json()
    by_name = {e["name"]: e["tag"] for e in body["loras"]}
    assert by_name[server.DEMO_LORA] == "tiny_sd15_demo_lora"
    assert by_name[files["meta"]] == "with_meta"
    # the same list ComfyUI gives its loaders
    assert list(by_name) == srv.object_info(refresh=True)["LoraLabLoadLoRA"]["input"]["required"]["lora_name"][0]
    resolved = get(srv, "/loralab/resolve", tag=["with_meta", "routes_test/with_meta", "nope"]).json()
    assert resolved == {"with_meta": files["meta"], "routes_test/with_meta": files["meta"], "nope": None}


def test_info_of_the_demo_lora(srv):
    for prefix in ("", "/api"):   # ComfyUI serves custom routes at both
        r = get(srv, prefix + "/loralab/info", name=server.DEMO_LORA)
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["name"] == server.DEMO_LORA and info["file"] == "tiny_sd15_demo_lora.safetensors"
        assert info["algorithm"] == "LoCon" and info["rank"] == 4 and isinstance(info["rank"], int)
        assert info["base_model"] == "SD1.5" and info["base_model_from"] == "keys"
        assert info["alpha"] is None and info["trigger_words"] == [] and info["preview"] is None
        assert info["tensors"] == len(demo_tensors(srv))


def test_info_with_metadata_trigger_words_and_preview(srv, files):
    info = get(srv, "/loralab/info", name=files["meta"]).json()
    assert (info["base_model"], info["algorithm"], info["rank"], info["alpha"]) == ("SD1.5", "LoRA", 4, 2.0)
    assert info["trigger_words"] == ["ohwx", "watercolor"]
    assert info["training"]["steps"] == "1500" and info["tags"] == [["ohwx", 10], ["paper", 3]]
    assert info["preview"].startswith("/loralab/preview?")
    for prefix in ("", "/api"):
        r = requests.get(srv.url + prefix + info["preview"], timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/png" and r.content == PNG


def test_a_preview_that_is_not_an_image_is_no_preview(srv, files):
    info = get(srv, "/loralab/info", name=files["bad_preview"]).json()
    assert info["preview"] is None and info["trigger_words"] == ["ohwx", "watercolor"]
    r = get(srv, "/loralab/preview", name=files["bad_preview"])
    assert r.status_code == 404 and "no preview" in r.json()["error"]


def test_info_reads_only_the_header(srv, files):
    """The file's tensor bytes are cut off: loading it fails, its info is complete."""
    info = get(srv, "/loralab/info", name=files["header_only"])
    assert info.status_code == 200, info.text
    assert info.json()["rank"] == 4 and info.json()["tensors"] == 30
    entry = srv.run(srv.example_prompt(lora_name=files["header_only"]))
    assert entry["status"]["status_str"] == "error" and "header_only" in server.error_text(entry)


def test_a_huge_tag_table_is_truncated_with_a_count(srv, files):
    r = get(srv, "/loralab/info", name=files["big_tags"])
    body = r.json()
    assert r.status_code == 200 and body["tags_total"] == 200_000 and len(body["tags"]) == 40
    assert len(r.content) < 20_000, len(r.content)


@pytest.mark.parametrize("name", [
    "../outside_lora.safetensors", "../../models/outside_lora.safetensors", "routes_test/../../outside_lora.safetensors",
    "..\\outside_lora.safetensors", "/etc/hostname", "C:/Windows/win.ini",
])
def test_names_outside_the_loras_folders_are_refused(srv, files, name):
    r = get(srv, "/loralab/info", name=name)
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert "must stay inside the loras folders" in r.json()["error"]
    assert get(srv, "/loralab/preview", name=name).status_code == 400


def test_an_absolute_path_to_a_real_lora_is_refused(srv, files):
    r = get(srv, "/loralab/info", name=files["outside"])
    assert r.status_code == 400 and "must stay inside" in r.json()["error"]
    # the same file inside the loras folders would have answered: the refusal is the path's
    assert get(srv, "/loralab/info", name=files["meta"]).status_code == 200


def test_missing_corrupt_and_unnamed(srv, files):
    r = get(srv, "/loralab/info", name=f"{SUB}/no_such.safetensors")
    assert r.status_code == 404 and "no_such.safetensors" in r.json()["error"] and "not found" in r.json()["error"]
    r = get(srv, "/loralab/info", name=files["corrupt"])
    assert r.status_code == 422 and "corrupt_header.safetensors" in r.json()["error"]
    assert "not JSON" in r.json()["error"]
    r = get(srv, "/loralab/info", name=f"{SUB}/notes.txt")
    assert r.status_code == 400 and "not a model file" in r.json()["error"]
    r = get(srv, "/loralab/info")
    assert r.status_code == 400 and "missing ?name=" in r.json()["error"]
    # the server is fine afterwards
    assert get(srv, "/loralab/info", name=server.DEMO_LORA).status_code == 200 and srv.alive()


def test_url_encoding_cannot_smuggle_a_path(srv, files):
    raw = srv.url + "/loralab/info?name=" + urllib.parse.quote("../outside_lora.safetensors", safe="")
    assert requests.get(raw, timeout=30).status_code == 400
    raw = srv.url + "/loralab/info?name=%2e%2e%2foutside_lora.safetensors"
    assert requests.get(raw, timeout=30).status_code == 400


# ---- loader inputs through POST /prompt -----------------------------------------------------------------
def _report(srv, **inputs) -> str:
    prompt = srv.example_prompt(**inputs)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    entry = srv.run(prompt)
    assert entry["status"]["status_str"] == "success", server.error_text(entry)
    return server.reports(entry, prompt)["2"]


def test_mode_and_the_old_bypass_input_through_the_api(srv):
    """New prompts send `mode`; API prompts written before it send `"bypass": true` and still get
    the forward pass (the UI's widgets never show `bypass`)."""
    info = srv.object_info(refresh=True)["LoraLabLoadLoRA"]["input"]
    assert info["optional"]["mode"][0] == ["merge weights", "forward pass"] and "bypass" not in info["optional"]
    assert re.search(r"\nbypassed \(applied in the forward pass\) \d+ model", _report(srv, mode="forward pass"))
    assert re.search(r"\npatched \d+ model", _report(srv, mode="merge weights", strength_model=0.9))
    old = srv.example_prompt(strength_model=0.8)
    for node in old.values():
        if node["class_type"] == "LoraLabLoadLoRA":
            node["inputs"].pop("mode", None)
            node["inputs"].pop("on_no_match", None)
            node["inputs"]["bypass"] = True
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    entry = srv.run(old)
    assert entry["status"]["status_str"] == "success", server.error_text(entry)
    assert "\nbypassed (applied in the forward pass)" in server.reports(entry, old)["2"]
    with pytest.raises(server.PromptRejected) as e:
        srv.queue(srv.example_prompt(mode="bypass"))
    assert e.value.status == 400 and "mode" in json.dumps(e.value.body)


def test_on_no_match_stops_the_run(srv):
    name = f"{SUB}/other_model.safetensors"
    path = os.path.join(loras(srv), *name.split("/"))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({f"lora_unet_label_emb_0_0.lora_{d}.weight": torch.zeros(4, 4) for d in ("up", "down")}, path)
    assert "0 of 2 keys match" in _report(srv, lora_name=name, on_no_match="warn")
    entry = srv.run(srv.example_prompt(lora_name=name, on_no_match="stop the run"))
    msg = server.error_text(entry)
    assert entry["status"]["status_str"] == "error" and "other_model.safetensors: 0 of 2 keys match" in msg, msg
    assert "stop the run" in msg
