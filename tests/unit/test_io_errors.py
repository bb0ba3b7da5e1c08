"""Every bad input to ``lora.io.read`` / ``lora.parse`` is refused with a LoraError whose message
names the file and the problem; ``lora.io.write`` is atomic. No ComfyUI here."""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from loralab.lora import LoraError, parse, read, write
from loralab_testkit.comfy_env import REPO_ROOT


def _lora(rank=4, out=8, inp=6):
    g = torch.Generator().manual_seed(0)
    return {"m.lora_up.weight": torch.randn(out, rank, generator=g),
            "m.lora_down.weight": torch.randn(rank, inp, generator=g),
            "m.alpha": torch.tensor(2.0)}


def _raw_safetensors(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file built by hand, so its header can say anything."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _refused(path, match: str) -> LoraError:
    with pytest.raises(LoraError, match=match) as e:
        read(str(path))
    assert os.path.basename(str(path)) in str(e.value), f"message does not name the file: {e.value}"
    return e.value


# ---- safetensors that cannot be read -------------------------------------------------------------
@pytest.mark.parametrize("keep", [5, 30, -20], ids=["inside-length-prefix", "inside-header", "inside-data"])
def test_truncated_file(tmp_path, keep):
    good = tmp_path / "good.safetensors"
    save_file(_lora(), str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:keep])
    _refused(cut, r"(?i)truncat|incomplete|too short")


def test_header_offsets_past_end_of_file(tmp_path):
    # the header promises 64 bytes of data for the tensor; the file holds 16
    p = tmp_path / "lying.safetensors"
    p.write_bytes(_raw_safetensors({"m.diff": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 16))
    _refused(p, r"(?i)offset|truncat|incomplete|not fully covered")


def test_header_offsets_disagree_with_shape(tmp_path):
    p = tmp_path / "shape.safetensors"
    p.write_bytes(_raw_safetensors({"m.diff": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}, b"\0" * 64))
    _refused(p, r"(?i)offset|shape")


@pytest.mark.parametrize("header", [b'{"m.diff": {"dtype": "F3', b"\xff\xfe not json at all", b"[1, 2, 3]"],
                         ids=["cut-json", "binary", "not-an-object"])
def test_corrupt_json_header(tmp_path, header):
    p = tmp_path / "badjson.safetensors"
    p.write_bytes(_raw_safetensors(header, b"\0" * 16))
    _refused(p, r"(?i)json|header|not a valid safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_factor_names_the_key(tmp_path, bad):
    sd = _lora()
    sd["m.lora_down.weight"][1, 2] = bad
    p = tmp_path / "nonfinite.safetensors"
    save_file(sd, str(p))
    err = _refused(p, r"(?i)non-finite|nan|inf")
    assert "m.lora_down.weight" in str(err)


def test_missing_file(tmp_path):
    _refused(tmp_path / "absent.safetensors", r"(?i)no such file|not found|does not exist")


# ---- pickle files ---------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code in a .ckpt."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "EXECUTED"
    p = tmp_path / "evil.ckpt"
    torch.save({"m.lora_up.weight": torch.ones(2, 1), "x": _Payload(str(marker))}, str(p))
    _refused(p, r"(?i)pickle|refus")
    assert not marker.exists(), "reading the file ran code from it"


def test_pickle_with_non_tensor_value_is_refused(tmp_path):
    p = tmp_path / "mixed.pt"
    torch.save({"m.lora_up.weight": torch.ones(2, 1), "step": 3, "name": "x"}, str(p))
    _refused(p, r"(?i)tensor")


@pytest.mark.parametrize("suffix,wrap", [(".pt", False), (".ckpt", True), (".bin", False), (".pth", False)])
def test_pickle_of_plain_tensors_is_accepted(tmp_path, suffix, wrap):
    sd = _lora()
    p = tmp_path / f"plain{suffix}"
    torch.save({"state_dict": sd} if wrap else sd, str(p))
    f = read(str(p))
    assert sorted(f.tensors) == sorted(sd)
    for k, t in sd.items():
        assert torch.equal(f.tensors[k], t)


# ---- files that read but do not parse -------------------------------------------------------------
def test_up_down_ranks_disagree():
    sd = _lora()
    sd["m.lora_down.weight"] = torch.randn(3, 6)
    with pytest.raises(LoraError, match=r"(?i)rank") as e:
        parse(sd, file="ranks.safetensors")
    assert "ranks.safetensors" in str(e.value) and "'m'" in str(e.value)
    assert "(8, 4)" in str(e.value) and "(3, 6)" in str(e.value), "message should show both shapes"


def test_two_algorithms_on_one_module():
    # lora_up/lora_down and .diff both change m.weight: applying both is ambiguous, so refuse
    sd = _lora()
    sd["m.diff"] = torch.randn(8, 6)
    with pytest.raises(LoraError, match=r"(?i)algorithm") as e:
        parse(sd, file="two.safetensors")
    msg = str(e.value)
    assert "two.safetensors" in msg and "lora" in msg and "diff" in msg and "m.diff" in msg


def test_lora_and_bias_diff_on_one_module_is_fine():
    # .diff_b changes the bias, not the weight: no conflict (guards against over-eager refusal)
    sd = _lora()
    sd["m.diff_b"] = torch.randn(8)
    parsed = parse(sd, file="ok.safetensors")
    assert sorted(a.name for a in parsed.modules["m"]) == ["diff_b", "lora"]


# ---- atomic write ---------------------------------------------------------------------------------
@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder no file can be created in. root ignores mode bits, so root gets /proc/self."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        yield "/proc/self"
        return
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    yield str(d)
    d.chmod(0o755)


def test_write_into_unwritable_dir(unwritable_dir):
    before = set(os.listdir(unwritable_dir))
    path = os.path.join(unwritable_dir, "out.safetensors")
    with pytest.raises(LoraError, match=r"(?i)writ|permission|denied") as e:
        write(path, _lora())
    assert "out.safetensors" in str(e.value)
    assert set(os.listdir(unwritable_dir)) == before, "a file was left behind"


def test_write_into_missing_dir(tmp_path):
    path = tmp_path / "nope" / "out.safetensors"
    with pytest.raises(LoraError, match=r"(?i)exist|folder|director"):
        write(str(path), _lora())
    assert not (tmp_path / "nope").exists()


def test_write_replaces_existing_file_whole(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    write(path, {**_lora(), "old.only": torch.ones(100)}, {"version": "1", "old": "yes"})
    new = {"n.lora_up.weight": torch.full((3, 2), 2.0), "n.lora_down.weight": torch.full((2, 5), 3.0)}
    write(path, new, {"version": "2"})
    f = read(path)
    assert sorted(f.tensors) == sorted(new)
    assert all(torch.equal(f.tensors[k], v) for k, v in new.items())
    assert f.metadata.get("version") == "2" and "old" not in f.metadata
    assert os.listdir(tmp_path) == ["lora.safetensors"], "temporary files left behind"


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    """Disk full half-way through: the old file stays intact, no partial file or temp is left."""
    import safetensors.torch as st

    path = tmp_path / "lora.safetensors"
    write(str(path), _lora())
    old = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(LoraError, match=r"(?i)space|could not write") as e:
        write(str(path), {"x": torch.ones(4)})
    assert "lora.safetensors" in str(e.value)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["lora.safetensors"], "temporary files left behind"


# ---- the core stands alone ------------------------------------------------------------------------
def test_core_imports_without_comfyui():
    """Every module of lora/ and training/ imports in a fresh interpreter with no ComfyUI on the path."""
    code = f"""
import importlib, importlib.util, os, pkgutil, sys
root = {REPO_ROOT!r}
spec = importlib.util.spec_from_file_location("loralab", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
sys.modules["loralab"] = importlib.util.module_from_spec(spec)
failed = []
def load(name):
    try:
        return importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
for pkg in ("lora", "training"):
    if os.path.isdir(os.path.join(root, pkg)):
        mod = load("loralab." + pkg)
        if mod is not None:
            for m in pkgutil.walk_packages(mod.__path__, mod.__name__ + ".", onerror=load):
                load(m.name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "server", "nodes", "comfy_api"))
print("\\n".join(failed + ["imported " + m for m in leaked]))
sys.exit(1 if failed or leaked else 0)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd="/", env=env,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_write_without_overwrite_refuses_an_existing_name(tmp_path):
    """The LoRA tools write with overwrite=False: an existing file is never replaced, and no
    temporary is left behind."""
    path = str(tmp_path / "out.safetensors")
    write(path, {"a": torch.ones(2)}, overwrite=False)
    before = open(path, "rb").read()
    with pytest.raises(LoraError, match="exists already"):
        write(path, {"a": torch.zeros(3)}, overwrite=False)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
