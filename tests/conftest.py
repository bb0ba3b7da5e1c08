"""Shared fixtures. The pack is imported the way ComfyUI imports it: as a package (here named
``loralab``) whose submodules use relative imports; never as top-level ``lora`` / ``nodes``.

No ComfyUI needed (unit tests):
    ``from loralab.lora import parse`` works anywhere: this file registers the repo root as the
    package ``loralab`` without executing its ``__init__.py``.

In-process ComfyUI on the CPU (session scope; each is built once per test run):
    comfy                  ComfyEnv: folder_paths, models_dir, loras_dir (with loras/sub/),
                           checkpoints_dir, output_dir, comfy_dir
    pack                   the pack module with its root __init__.py executed (NODE_CLASS_MAPPINGS…);
                           (a test run without it fails)
    tiny_sd15_file         path of the fp32 tiny SD1.5 checkpoint in the checkpoints folder
    tiny_sd15_fp16_file    same, fp16
    tiny_sd15              SD15(model, clip, vae, path): fp32 file, fp32 in memory. SHARED: clone
                           before patching (ComfyUI's nodes do). After every test ComfyUI unloads
                           all models and the shared weights are checked (see below)
    tiny_sd15_fp16         SD15 from the fp16 file, ComfyUI's default dtypes
Per test:
    lora_file              factory writing a LoRA for the tiny SD1.5 into the loras folder; returns
                           a lorafiles.LoraSpec (.path, .name for lora_name, .deltas())
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

from loralab_testkit import comfy_env

# The repo root must not be a top-level import path (``python -m pytest`` adds the cwd): its
# nodes/ would shadow ComfyUI's nodes.py and lora/ would load a second copy of the core.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != comfy_env.REPO_ROOT]
comfy_env.register_pack()


class _RepoRootIsNotATestPackage:
    """pytest makes a folder with __init__.py a Package and imports that __init__.py before the
    first test (looking for setup_module). The repo root is the pack: importing it under a
    folder-derived name would load it a second time, before ComfyUI is set up, and fails outright
    when the folder name is not an identifier (a clone in /tmp/x.abc). Collect it as a plain Dir."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if str(path) == comfy_env.REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # registered as a plain plugin: conftest hooks do not apply to folders above this one
    config.pluginmanager.register(_RepoRootIsNotATestPackage(), "loralab-repo-root-dir")


def _failing_skips(reporter) -> list:
    """A skipped test is a failure: a missing test dependency (lycoris-lora, diffusers, chromium) or a
    fixture that cannot be built must not turn a check into silence. ``LORALAB_ALLOW_SKIPS=1`` lets
    a developer run a subset on a machine that lacks something, knowingly."""
    if reporter is None or os.environ.get("LORALAB_ALLOW_SKIPS") == "1":
        return []
    return reporter.stats.get("skipped", [])


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and _failing_skips(session.config.pluginmanager.get_plugin("terminalreporter")):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = _failing_skips(terminalreporter)
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} test(s) skipped: make test counts a skip as a failure "
                                        "(LORALAB_ALLOW_SKIPS=1 to allow)", red=True)
        for report in skipped[:20]:
            where, _, why = report.longrepr if isinstance(report.longrepr, tuple) else ("", "", str(report.longrepr))
            terminalreporter.write_line(f"  {report.nodeid}: {why} ({where})")


@pytest.fixture(autouse=True)
def _unit_tests_stay_comfy_free(request):
    """tests/unit must run without ComfyUI: fail a unit test that imports it."""
    is_unit = os.sep + "unit" + os.sep in str(request.node.path)
    before = "comfy" in sys.modules
    yield
    if is_unit and not before and "comfy" in sys.modules:
        pytest.fail("this unit test imported ComfyUI (comfy); unit tests must not - move it to tests/comfy")


@dataclass
class ComfyEnv:
    folder_paths: Any
    comfy_dir: str
    models_dir: str
    loras_dir: str
    checkpoints_dir: str
    output_dir: str


class SD15(NamedTuple):
    model: Any   # comfy.model_patcher.ModelPatcher
    clip: Any    # comfy.sd.CLIP
    vae: Any     # comfy.sd.VAE (TAESD)
    path: str


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyEnv:
    why = comfy_env.comfy_available()
    if why:
        pytest.fail(why + " - `make test` runs the bootstrap")
    base = tmp_path_factory.mktemp("comfy")
    models = str(base / "models")
    fp = comfy_env.setup(models, str(base / "work"))
    os.makedirs(os.path.join(models, "loras", "sub"), exist_ok=True)
    return ComfyEnv(fp, comfy_env.comfy_dir(), models, os.path.join(models, "loras"),
                    os.path.join(models, "checkpoints"), fp.get_output_directory())


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy_env.import_pack()


@pytest.fixture(scope="session")
def tiny_sd15_file(comfy) -> str:
    from loralab_testkit import checkpoints
    return checkpoints.tiny_sd15_path(comfy.checkpoints_dir, "fp32")


@pytest.fixture(scope="session")
def tiny_sd15_fp16_file(comfy) -> str:
    from loralab_testkit import checkpoints
    return checkpoints.tiny_sd15_path(comfy.checkpoints_dir, "fp16")


# Session models shared by many tests, with a fingerprint of their weights. ModelPatcher clones
# share one nn.Module, and ComfyUI leaves the last loaded clone's patches in its weights until
# something unloads it: so after every test all models are unloaded and the shared weights are
# checked; a test that leaves them changed errors (in teardown) and the weights are restored from
# the file, so one bad test cannot make later ones fail.
_SHARED: list[tuple[SD15, dict]] = []


def _shared_params(sd15: SD15) -> dict:
    return {**sd15.model.model.state_dict(), **sd15.clip.cond_stage_model.state_dict()}


def _fingerprint(sd15: SD15) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for k, t in _shared_params(sd15).items():
            flat = t.reshape(-1)
            out[k] = float(torch.sum(flat[:: max(1, flat.numel() // 4096)], dtype=torch.float64))
    return out


def _restore_from_file(sd15: SD15, keys) -> None:
    import comfy.utils
    import torch

    sd = comfy.utils.load_torch_file(sd15.path)
    params = _shared_params(sd15)
    with torch.no_grad():
        for k in keys:
            src = "model." + k if k.startswith("diffusion_model.") else \
                "cond_stage_model." + k[len("clip_l."):] if k.startswith("clip_l.") else None
            if src in sd:
                params[k].copy_(sd[src].to(params[k].dtype))


def _load_shared(path: str, dtype: str) -> SD15:
    from loralab_testkit import checkpoints

    sd15 = SD15(*checkpoints.load_tiny_sd15(path, dtype=dtype), path)
    _SHARED.append((sd15, _fingerprint(sd15)))
    return sd15


@pytest.fixture(autouse=True)
def _shared_models_left_as_found():
    yield
    if not _SHARED:
        return
    import comfy.model_management as mm

    mm.unload_all_models()  # unpatches every loaded clone: the shared weights are the base again
    for sd15, fp in _SHARED:
        changed = [k for k, v in _fingerprint(sd15).items() if v != fp.get(k)]
        if changed:
            _restore_from_file(sd15, changed)
            pytest.fail(f"this test left {len(changed)} weight(s) of the shared {os.path.basename(sd15.path)} "
                        f"changed (e.g. {changed[:3]}); clone a MODEL/CLIP before patching it. Restored from the file.")


def pytest_unconfigure(config):
    # Let ModelPatchers go while ComfyUI's modules still exist (their __del__ needs them).
    _SHARED.clear()
    if "comfy.model_management" in sys.modules:
        sys.modules["comfy.model_management"].unload_all_models()
    import gc
    gc.collect()


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sd15_file) -> SD15:
    return _load_shared(tiny_sd15_file, "fp32")


@pytest.fixture(scope="session")
def tiny_sd15_fp16(tiny_sd15_fp16_file) -> SD15:
    return _load_shared(tiny_sd15_fp16_file, "fp16")


@pytest.fixture
def lora_file(request, comfy):
    """lora_file(scheme="kohya", *, targets=None, parts=("unet", "te"), kinds=("linear", "conv"),
    rank=4, alpha="default", seed=0, conv="locon", flat_1x1=False, dtype=None, subfolder="",
    name=None, few=False) -> LoraSpec

    Without ``targets``, adapts the tiny SD1.5's ``parts`` (its Linear and Conv layers;
    ``few=True`` picks a small spread of them). ``alpha="default"``: rank/2 where the scheme can
    store alpha, else none (scale 1). The file lands in loras/<subfolder>/, named after the test.
    """
    from loralab_testkit import lorafiles

    counter = iter(range(10**6))

    def make(scheme="kohya", *, targets=None, parts=("unet", "te"), kinds=("linear", "conv"), rank=4,
             alpha="default", seed=0, conv="locon", flat_1x1=False, dtype=None, subfolder="", name=None,
             few=False):
        if targets is None:
            sd15 = request.getfixturevalue("tiny_sd15")
            targets = []
            if "unet" in parts:
                targets += lorafiles.unet_targets(sd15.model, kinds=kinds)
            if "te" in parts:
                targets += lorafiles.clip_targets(sd15.clip, kinds=tuple(k for k in kinds if k != "conv"))
            if few:
                targets = lorafiles.pick(targets)
        if alpha == "default":
            alpha = lorafiles.default_alpha(scheme, rank)
        adapters = lorafiles.make_lora(targets, rank=rank, alpha=alpha, seed=seed, conv=conv, flat_1x1=flat_1x1)
        if name is None:
            test = "".join(c if c.isalnum() else "_" for c in request.node.name)[:80]
            name = f"{test}_{scheme}_{next(counter)}.safetensors"
        path = os.path.join(comfy.loras_dir, subfolder, name)
        spec = lorafiles.write_lora(path, adapters, scheme, dtype=dtype, root=comfy.loras_dir)
        comfy.folder_paths.filename_list_cache.clear()
        return spec

    return make
