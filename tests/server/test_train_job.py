"""A graph made in ComfyUI trains elsewhere (issue 8, part 6), through a real server: the
train_from_folder.json workflow with Train LoRA's job_name set -> POST /prompt writes the job (the
dataset encoded once, the settings, the checkpoint's name) and runs nothing after the train node ->
``scripts/train.py --job`` trains it (as on a cluster) -> the LoRA loads in our loader and in core's
LoraLoader (UNet and text-encoder keys) inside a workflow queued on the same server, every key matched."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from loralab_testkit import server
from loralab_testkit.comfy_env import comfy_dir
from loralab_testkit.datasets import kohya_folder

pytestmark = pytest.mark.server

WORKFLOW = os.path.join(server.REPO_ROOT, "example_workflows", "train_from_folder.json")
SCRIPT = os.path.join(server.REPO_ROOT, "scripts", "train.py")


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


def workflow(srv) -> dict:
    with open(WORKFLOW) as fh:
        return srv.to_api(json.load(fh))


def of(prompt: dict, kind: str) -> str:
    return next(nid for nid, n in prompt.items() if n["class_type"] == kind)


def test_the_train_node_writes_a_job_the_script_trains_and_the_lora_loads(srv):
    folder = "srv_job_dataset"
    root = os.path.join(srv.base, "input", folder)
    shutil.rmtree(root, ignore_errors=True)
    kohya_folder(root)
    prompt = workflow(srv)
    prompt[of(prompt, "LoraLabTrainingDataset")]["inputs"]["folder"] = folder
    train = of(prompt, "LoraLabTrainLoraNode")
    prompt[train]["inputs"].update(job_name="srv_job", steps=2, sample_every_n_steps=0, save_every_n_steps=0)
    loras = os.path.join(srv.base, "models", "loras")
    before = {os.path.join(d, f) for d, _, fs in os.walk(loras) for f in fs}
    entry = srv.run(prompt, timeout=1200)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()

    text = entry["outputs"][train]["text"]
    assert text[0].startswith("job written: ") and "--job" in text[1] and "torchrun" in text[2]
    job = text[0].removeprefix("job written: ")
    assert job.startswith(os.path.join(srv.base, "output", "LoRA-Lab", "jobs", "srv_job_"))
    ran = set(entry["outputs"])
    for kind in ("LoraLabSaveLoRA", "LoraLabLoadLoRA", "SaveImage"):     # blocked: nothing trained here
        assert of(prompt, kind) not in ran, kind
    # no LoRA written (other tests on this shared server may have saved theirs before: compare)
    assert {os.path.join(d, f) for d, _, fs in os.walk(loras) for f in fs} == before

    # the job runs on its own (here one process on the CPU; on a cluster: torchrun … --job)
    env = {**os.environ, "COMFYUI_PATH": comfy_dir(), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, SCRIPT, "--job", job, "--cpu"], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    trained = os.path.join(job, "srv_job.safetensors")
    assert os.path.isfile(trained) and "step 2/2" in p.stdout

    name = "srv_job_trained.safetensors"
    shutil.copyfile(trained, os.path.join(srv.base, "models", "loras", name))
    load = workflow(srv)
    for kind in ("LoraLabTrainingDataset", "LoraLabTrainLoraNode", "LoraLabSaveLoRA"):
        del load[of(load, kind)]
    ours = of(load, "LoraLabLoadLoRA")
    load[ours]["inputs"]["lora_name"] = name
    load["core"] = {"class_type": "LoraLoader", "inputs": {"model": [ours, 0], "clip": [ours, 1], "lora_name": name,
                                                           "strength_model": 1.0, "strength_clip": 1.0}}
    sampler = of(load, "KSampler")
    load[sampler]["inputs"].update(model=["core", 0], steps=1)
    mark = os.path.getsize(srv.log_path)
    entry = srv.run(load, timeout=600)
    assert entry["status"]["status_str"] == "success", server.error_text(entry) + "\n" + srv.log_tail()
    report = entry["outputs"][ours]["text"][0]
    matched, total = map(int, report.split(" keys match")[0].split(": ")[-1].split(" of "))
    assert matched == total > 0 and "text-encoder tensor(s)" in report, report
    with open(srv.log_path, "rb") as fh:          # what the server logged while this prompt ran
        fh.seek(mark)
        log = fh.read().decode(errors="replace")
    assert "lora key not loaded" not in log and "Requested to load" in log
    assert server.images(entry)
