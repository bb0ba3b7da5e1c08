"""ComfyUI in-process, on the CPU, the way the tests need it.

``setup(models_dir)`` puts ComfyUI on ``sys.path``, makes its command line ``--cpu`` before
``comfy.model_management`` exists (that module reads the arguments once, at import), and points
``folder_paths`` at a temporary models folder and temporary input/output/temp/user folders, so
nothing a test does touches the ComfyUI tree. ``import_pack`` then executes the pack's root
``__init__.py`` exactly as ComfyUI's ``load_custom_node`` does.

Where ComfyUI lives: ``$COMFYUI_PATH`` if set, else the path ``scripts/bootstrap.sh`` wrote to
``.comfyui/path``, else ``.comfyui/ComfyUI``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "loralab"  # the package name tests import the pack under (ComfyUI uses the folder path)
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "embeddings")


def comfy_dir() -> str:
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path:
        stamp = os.path.join(REPO_ROOT, ".comfyui", "path")
        if os.path.isfile(stamp):
            with open(stamp) as fh:
                path = fh.read().strip()
    path = path or os.path.join(REPO_ROOT, ".comfyui", "ComfyUI")
    return os.path.abspath(path)


def comfy_available() -> str | None:
    """None when ComfyUI can be set up, else why not (for a skip/fail message)."""
    d = comfy_dir()
    if not os.path.isfile(os.path.join(d, "comfy", "model_management.py")):
        return f"ComfyUI not found at {d!r} (run scripts/bootstrap.sh or set COMFYUI_PATH)"
    return None


def pack_spec(name: str = PACK_NAME) -> importlib.machinery.ModuleSpec:
    """The spec ComfyUI builds for a custom-node folder: the root __init__.py, as a package."""
    return importlib.util.spec_from_file_location(
        name, os.path.join(REPO_ROOT, "__init__.py"), submodule_search_locations=[REPO_ROOT])


def register_pack(name: str = PACK_NAME) -> types.ModuleType:
    """Make ``import <name>.lora`` work WITHOUT running the root __init__.py (unit tests).

    The package module is created from the same spec ``import_pack`` later executes, so the
    submodules unit tests imported are the very ones the full pack uses (one LoraError class).
    """
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.util.module_from_spec(pack_spec(name))
        sys.modules[name] = mod
    return mod


def _set_cpu_args() -> None:
    import comfy.cli_args as cli

    if "comfy.model_management" in sys.modules:
        if not sys.modules["comfy.model_management"].cpu_state.name == "CPU":
            raise RuntimeError("comfy.model_management was imported before the test setup made "
                               "ComfyUI's arguments --cpu; import ComfyUI only through the `comfy` fixture")
        return
    default, wanted = cli.parser.parse_args([]), cli.parser.parse_args(["--cpu"])
    for k, v in vars(wanted).items():
        if getattr(default, k) != v:        # change only what "--cpu" changes; keep the rest as cli_args post-processed it
            setattr(cli.args, k, v)


def setup(models_dir: str, work_dir: str | None = None) -> types.ModuleType:
    """Import ComfyUI (CPU) with its folders under ``models_dir`` / ``work_dir``; returns folder_paths.

    Idempotent: a second call re-points the folders.
    """
    why = comfy_available()
    if why:
        raise RuntimeError(why)
    d = comfy_dir()
    # The repo root must not be importable as a top-level folder: its nodes/ would shadow
    # ComfyUI's nodes.py, and lora/ would load a second copy of the core beside loralab.lora.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]
    if d in sys.path:
        sys.path.remove(d)
    sys.path.insert(0, d)

    _set_cpu_args()
    import comfy.model_management as mm  # noqa: F401  (reads args.cpu now)
    import folder_paths

    exts = folder_paths.supported_pt_extensions
    for name in MODEL_FOLDERS:
        p = os.path.join(models_dir, name)
        os.makedirs(p, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([p], exts)
    folder_paths.models_dir = models_dir
    work_dir = work_dir or os.path.join(os.path.dirname(models_dir), "comfy-work")
    for what in ("output", "input", "temp", "user"):
        p = os.path.join(work_dir, what)
        os.makedirs(p, exist_ok=True)
        getattr(folder_paths, f"set_{what}_directory")(p)
    folder_paths.filename_list_cache.clear()
    return folder_paths


def import_pack(name: str = PACK_NAME) -> types.ModuleType:
    """Execute the root __init__.py as package ``name``, as ComfyUI's load_custom_node does."""
    init = os.path.join(REPO_ROOT, "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(init)
    mod = register_pack(name)
    if not getattr(mod, "__loralab_executed__", False):
        mod.__spec__.loader.exec_module(mod)
        mod.__loralab_executed__ = True
    return mod


def patched_weights(patcher_or_clip) -> dict:
    """The weights a MODEL / CLIP would run with: patch, copy every tensor, unpatch (in place)."""
    p = getattr(patcher_or_clip, "patcher", patcher_or_clip)
    p.patch_model()
    try:
        return {k: v.detach().clone() for k, v in p.model.state_dict().items()}
    finally:
        p.unpatch_model()


def unet_out(patcher, seed: int = 0):
    """One denoiser forward of a patched tiny SD1.x MODEL (ComfyUI loads / injects it as it would for
    sampling): a random 8x8 latent, a random 77x768 context, t = 500."""
    import comfy.model_management as mm
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([500.0]), c_crossattn=ctx).clone()
