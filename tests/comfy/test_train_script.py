"""scripts/train.py, as users run it: one process, and data-parallel under torchrun on the CPU (gloo).

The model is the tiny SD3 as a diffusion-model file and the dataset a manifest of random encodings
(testkit/loralab_testkit/datasets.encoded_dataset), so each run is a few seconds of ComfyUI import and a few
steps; one test encodes a real image folder with the tiny SD1.5 checkpoint. Checked:
- 2 processes give the 1-process LoRA (tolerances: distributed_*); only process 0 writes files;
- a file saved every N steps resumes under another number of processes, to the straight run's LoRA;
- a process killed mid-run stops the others with a clear error and leaves no partial file;
- bad input (a batch that does not divide, a missing or empty dataset folder) fails before training.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from loralab_testkit import datasets
from loralab_testkit import families as F
from loralab_testkit.comfy_env import REPO_ROOT, comfy_dir
from tolerances import TOL, rel_err

pytestmark = pytest.mark.comfy
SCRIPT = os.path.join(REPO_ROOT, "scripts", "train.py")
DIE = os.path.join(REPO_ROOT, "tests", "support", "train_and_die.py")
BASE = ["--cpu", "--training-dtype", "fp32", "--lora-dtype", "fp32", "--rank", "4", "--batch-size", "2",
        "--grad-accumulation-steps", "2", "--seed", "5"]


def torchrun() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.isfile(exe) else [sys.executable, "-m", "torch.distributed.run"]


def run(args: list[str], nproc: int = 1, script: str = SCRIPT, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, script] if nproc == 1 else
           [*torchrun(), "--standalone", "--nproc_per_node", str(nproc), script])
    env = {**os.environ, "COMFYUI_PATH": comfy_dir(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(rel_err(a[k], b[k]) for k in a if not k.endswith(".alpha"))


@pytest.fixture(scope="module")
def sd3(comfy, tmp_path_factory):
    """(diffusion-model file, dataset manifest) of the tiny SD3."""
    folder = tmp_path_factory.mktemp("sd3")
    fam = F.family("sd3")
    model = F.write_diffusion_model(fam, str(folder))
    manifest = datasets.encoded_dataset(str(folder / "data"), fam.latent, fam.context, pooled=fam.pooled, n=5)
    return model, manifest


@pytest.fixture(scope="module")
def sgd_runs(sd3, tmp_path_factory):
    """The same SGD run on 1 and on 2 processes, each saving every 2 steps."""
    model, manifest = sd3
    out = {}
    for n in (1, 2):
        folder = tmp_path_factory.mktemp(f"sgd{n}")
        args = [*BASE, "--checkpoint", model, "--dataset", manifest, "--steps", "3", "--optimizer", "SGD",
                "--learning-rate", "0.05", "--save-every-n-steps", "2", "--output", str(folder / "lora.safetensors")]
        out[n] = (folder, ok(run(args, nproc=n)))
    return out


def test_two_processes_train_the_one_process_lora_and_only_process_0_writes(sgd_runs):
    (f1, _), (f2, p2) = sgd_runs[1], sgd_runs[2]
    one, two = tensors(f1 / "lora.safetensors"), tensors(f2 / "lora.safetensors")
    assert worst(two, one) <= TOL["distributed_sgd_fp32"]
    assert not all(torch.equal(two[k], one[k]) for k in one)          # two reductions did happen
    # process 0 alone writes: each file once (a second writer would have made _00002), no temporary left
    assert sorted(os.listdir(f2)) == ["lora.safetensors", "lora_step000002_00001.safetensors"]
    assert "on 2 process(es) (gloo)" in p2.stdout + p2.stderr
    assert (p2.stdout + p2.stderr).count("step 3/3") == 1              # and logs once


def test_a_saved_file_resumes_under_another_number_of_processes(sd3, sgd_runs, tmp_path):
    """2 processes -> 1 (SGD) and 1 -> 2 (AdamW, whose state travels in the file): the resumed run
    ends where the uninterrupted one did."""
    model, manifest = sd3
    f2, _ = sgd_runs[2]
    args = [*BASE, "--checkpoint", model, "--dataset", manifest, "--optimizer", "SGD", "--learning-rate", "0.05"]
    ok(run([*args, "--steps", "1", "--existing-lora", str(f2 / "lora_step000002_00001.safetensors"),
            "--output", str(tmp_path / "resumed1.safetensors")]))
    assert worst(tensors(tmp_path / "resumed1.safetensors"), tensors(f2 / "lora.safetensors")) \
        <= TOL["distributed_sgd_fp32"]

    p = run([*args, "--steps", "1", "--algorithm", "LoHa", "--existing-lora",
             str(f2 / "lora_step000002_00001.safetensors"), "--output", str(tmp_path / "loha.safetensors")])
    assert p.returncode == 1 and "the algorithm chosen is 'LoHa'" in p.stderr      # another algorithm: refused
    assert not (tmp_path / "loha.safetensors").exists()

    adamw = [*BASE, "--checkpoint", model, "--dataset", manifest, "--optimizer", "AdamW", "--learning-rate", "0.01"]
    ok(run([*adamw, "--steps", "4", "--save-every-n-steps", "2", "--output", str(tmp_path / "straight.safetensors")]))
    ok(run([*adamw, "--steps", "2", "--existing-lora", str(tmp_path / "straight_step000002_00001.safetensors"),
            "--output", str(tmp_path / "resumed2.safetensors")], nproc=2))
    from loralab.lora.io import read

    resumed = read(str(tmp_path / "resumed2.safetensors"))
    assert resumed.metadata["ss_steps"] == "4"
    assert worst(resumed.tensors, tensors(tmp_path / "straight.safetensors")) <= TOL["distributed_adamw_fp32"]


def test_a_killed_process_stops_the_run_with_a_clear_error_and_no_partial_file(sd3, tmp_path):
    model, manifest = sd3
    out = tmp_path / "lora.safetensors"
    p = run(["1", "2", *BASE, "--checkpoint", model, "--dataset", manifest, "--steps", "4", "--save-every-n-steps", "1",
             "--output", str(out)], nproc=2, script=DIE)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert "process 0 of 2 lost the other processes at step 3" in text or "SIGTERM" in text, text[-4000:]
    assert not out.exists()
    # what was written is whole: the save-every-N files up to the last completed step, nothing temporary
    assert sorted(os.listdir(tmp_path)) == ["lora_step000001_00001.safetensors", "lora_step000002_00001.safetensors"]
    assert tensors(tmp_path / "lora_step000002_00001.safetensors")


def test_a_batch_that_does_not_divide_by_the_processes_is_refused(sd3, tmp_path):
    model, manifest = sd3
    p = run([*BASE, "--checkpoint", model, "--dataset", manifest, "--batch-size", "3", "--output",
             str(tmp_path / "x.safetensors")], nproc=2)
    assert p.returncode != 0 and "batch_size = 3 does not divide by the 2 processes" in p.stderr
    assert not os.listdir(tmp_path)


def test_missing_or_empty_dataset_folders_and_bad_outputs_are_refused(sd3, tmp_path):
    model, _ = sd3
    out = str(tmp_path / "x.safetensors")
    p = run(["--cpu", "--checkpoint", model, "--dataset", str(tmp_path / "nope"), "--output", out])
    assert p.returncode == 1 and "the dataset folder does not exist" in p.stderr and "nope" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run(["--cpu", "--checkpoint", model, "--dataset", str(tmp_path / "empty"), "--output", out])
    assert p.returncode == 1 and "no images in the dataset folder" in p.stderr
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    p = run(["--cpu", "--checkpoint", model, "--dataset", str(tmp_path / "empty"), "--output",
             str(tmp_path / "taken.safetensors")])
    assert p.returncode == 1 and "exists already" in p.stderr
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["empty", "taken.safetensors"]


def test_an_image_folder_trains_from_a_checkpoint_and_loads_in_core(comfy, tiny_sd15_file, tmp_path, caplog):
    """The issue's command: --checkpoint --dataset DIR --output --resolution (the folder encoded with the
    checkpoint's VAE and CLIP, cached beside the images); core's LoraLoaderModelOnly loads every key."""
    import nodes as core_nodes

    datasets.kohya_folder(str(tmp_path / "data"), sizes=((64, 64), (64, 96)))
    out = tmp_path / "folder.safetensors"
    ok(run(["--cpu", "--checkpoint", tiny_sd15_file, "--dataset", str(tmp_path / "data"), "--output", str(out),
            "--resolution", "64", "--steps", "2", "--training-dtype", "fp32", "--rank", "2"]))
    assert os.path.isdir(tmp_path / "data" / ".loralab_cache")
    os.replace(out, os.path.join(comfy.loras_dir, "script_folder.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    lora = tensors(os.path.join(comfy.loras_dir, "script_folder.safetensors"))
    sd15 = core_nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(tiny_sd15_file))[0]
    with caplog.at_level(logging.WARNING):
        (patched,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(sd15, "script_folder.safetensors", 1.0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len({k.split(".")[0] for k in lora}) > 0
