"""pytest fixtures for the tiny family models (``families``) and their LoRA files (``family_loras``).

tests/comfy/conftest.py imports them; other test folders can do the same
(``from support.family_fixtures import *``).

Session scope (each built once per run, SHARED: clone a MODEL before patching it, as ComfyUI's
nodes do; after every test the shared weights are checked, and restored if a test changed them):
    tiny_sd3, tiny_flux, tiny_flux_schnell, tiny_wan21_t2v (= tiny_wan_t2v), tiny_wan21_i2v
    (= tiny_wan_i2v), tiny_wan22_ti2v, tiny_hunyuan_video, tiny_lumina2, tiny_z_image,
    tiny_qwen_image, tiny_hidream
                    families.Tiny(model, family, path); ``path`` is the diffusion-model file in the
                    diffusion_models folder for detected families (the MODEL was loaded from it,
                    through comfy.sd.load_diffusion_model), None for config-built ones
    tiny_family     tiny_family("flux") -> the same shared Tiny, for parametrized tests
    tiny_sdxl       families.SDXL(model, clip, vae, path) from the cached SDXL checkpoint placed in
                    the checkpoints folder (CheckpointLoaderSimple lists it)
Per module:
    one_torch_thread  torch.set_num_threads(1) for the module (``pytest.mark.usefixtures``)
Per test:
    family_lora     family_lora(tiny, producer="peft" | "lycoris" | "kohya" | "kohya_mixed" | "onetrainer"
                    | "xlabs" | "oft_flux", **writer kwargs) ->
                    family_loras.LoraFile written into the loras folder, named after the test
"""
from __future__ import annotations

import os

import pytest

from loralab_testkit import families as F

__all__ = ["tiny_family", "tiny_sdxl", "family_lora", "family_models_left_as_found", "one_torch_thread",
           *(f"tiny_{n}" for n in F.FAMILIES), "tiny_wan_t2v", "tiny_wan_i2v"]

_SHARED: dict[str, tuple[object, dict]] = {}   # name -> (Tiny | SDXL, fingerprint)
_USED: set[str] = set()                        # shared models the running test asked for


def _params(shared) -> dict:
    out = dict(shared.model.model.state_dict())
    if getattr(shared, "clip", None) is not None:
        out.update({"clip." + k: v for k, v in shared.clip.cond_stage_model.state_dict().items()})
    return out


def _fingerprint(shared) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for k, t in _params(shared).items():
            flat = t.reshape(-1)
            out[k] = float(torch.sum(flat[:: max(1, flat.numel() // 4096)], dtype=torch.float64))
    return out


def _restore(name: str, shared, keys) -> None:
    """Put the built weights back into the shared model (families: regenerated; SDXL: from its file)."""
    import comfy.utils
    import torch

    params = _params(shared)
    if isinstance(shared, F.Tiny):
        sd = {F.UNET + k: v for k, v in F.state_dict(shared.family).items()}
    else:
        raw = comfy.utils.load_torch_file(shared.path)
        sd = {k[len("model."):]: v for k, v in raw.items() if k.startswith("model.")}
        clip = shared.model.model.model_config.process_clip_state_dict(raw)
        sd.update({"clip." + k: v for k, v in clip.items()})
    with torch.no_grad():
        for k in keys:
            if k in sd:
                params[k].copy_(sd[k].to(params[k].dtype))


def _share(name: str, value):
    _SHARED[name] = (value, _fingerprint(value))
    return value


def _get(name: str, comfy):
    if name not in _SHARED:
        fam = F.family(name)
        path = None
        if fam.loader == "detect":
            path = F.write_diffusion_model(fam, os.path.join(comfy.models_dir, "diffusion_models"))
            comfy.folder_paths.filename_list_cache.clear()
        _share(name, F.Tiny(F.build(fam, path=path), fam, path))
    _USED.add(name)
    return _SHARED[name][0]


@pytest.fixture(scope="session")
def tiny_family(comfy):
    """tiny_family(name) -> the shared families.Tiny of that family (built on first use)."""
    return lambda name: _get(F.family(name).name, comfy)


def _family_fixture(name: str):
    def fixture(tiny_family):
        return tiny_family(name)
    fixture.__doc__ = f"The shared tiny {name} (families.Tiny(model, family, path))."
    return pytest.fixture(scope="session")(fixture)


for _name in F.FAMILIES:
    globals()[f"tiny_{_name}"] = _family_fixture(_name)
tiny_wan_t2v = _family_fixture("wan21_t2v")   # the short names: the same shared models
tiny_wan_i2v = _family_fixture("wan21_i2v")


@pytest.fixture(scope="session")
def tiny_sdxl(comfy):
    """The shared SDXL(model, clip, vae, path); the ~2.2 GB file is built once and cached in .cache/."""
    if "sdxl" not in _SHARED:
        _share("sdxl", F.tiny_sdxl(comfy.checkpoints_dir))
        comfy.folder_paths.filename_list_cache.clear()
    return _SHARED["sdxl"][0]


def _used_by(request) -> set[str]:
    names = {n[len("tiny_"):] for n in request.fixturenames if n.startswith("tiny_")}
    names = {{"wan_t2v": "wan21_t2v", "wan_i2v": "wan21_i2v"}.get(n, n) for n in names}
    return (names | _USED) & set(_SHARED)


@pytest.fixture(autouse=True)
def family_models_left_as_found(request):
    """A test that leaves a shared family model's weights changed errors (in teardown); the weights
    are restored so later tests are unaffected. Only the models the test used are checked."""
    _USED.clear()
    yield
    used = _used_by(request)
    if not used:
        return
    import comfy.model_management as mm

    mm.unload_all_models()   # unpatches every loaded clone
    for name in sorted(used):
        shared, fp = _SHARED[name]
        # NaN == NaN here: a weight no file sets (SDXL's unused clip_l text_projection) is ComfyUI's
        # uninitialised memory, which may hold NaNs and is no change
        changed = [k for k, v in _fingerprint(shared).items() if v != fp.get(k) and not (v != v and fp.get(k) != fp.get(k))]
        if changed:
            _restore(name, shared, changed)
            pytest.fail(f"this test left {len(changed)} weight(s) of the shared tiny {name} changed "
                        f"(e.g. {changed[:3]}); clone a MODEL before patching it. Restored.")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests (``pytest.mark.usefixtures``): on a busy
    2-core box a second thread's synchronisation costs 100x the math of a 128x128 matmul."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def family_lora(request, comfy):
    """family_lora(tiny, producer="peft", name=None, subfolder="", **kwargs) -> LoraFile in loras/."""
    from loralab_testkit import family_loras as L

    writers = {"peft": L.write_peft, "lycoris": L.write_lycoris, "kohya": L.write_kohya,
               "kohya_mixed": L.write_kohya_mixed, "onetrainer": L.write_onetrainer, "xlabs": L.write_xlabs,
               "oft_flux": L.write_kohya_flux_oft}
    counter = iter(range(10**6))

    def make(tiny, producer: str = "peft", *, name: str | None = None, subfolder: str = "", **kwargs):
        if producer not in writers:
            raise KeyError(f"producer {producer!r}: use one of {sorted(writers)}")
        if name is None:
            test = "".join(c if c.isalnum() else "_" for c in request.node.name)[:80]
            name = f"{test}_{producer}_{next(counter)}.safetensors"
        f = writers[producer](tiny, os.path.join(comfy.loras_dir, subfolder, name), **kwargs)
        comfy.folder_paths.filename_list_cache.clear()
        return f

    return make
