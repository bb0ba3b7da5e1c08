"""Train LoRA on every model family ComfyUI 0.3.75 runs (tiny random models from ComfyUI's own classes,
testkit/loralab_testkit/families.py): the layers kohya / musubi-tuner train for the family, under the names
they write; the file loads in core's LoraLoaderModelOnly with no key dropped; the run is bit-identical
on the CPU; and (SD1.5, SDXL, SD3, Flux, Wan) the loss on fixed draws falls.

The other families the test kit builds each get the quick checks (selection, core load, bit
identity): Flux schnell, Wan 2.1 I2V, Wan 2.2 TI2V, HunyuanVideo, Lumina 2, Z-Image, Qwen-Image and
HiDream; all of them predict flow velocity, which ComfyUI's model_sampling (CONST) covers.
"""
from __future__ import annotations

import logging
import os
import re

import pytest
import torch

from loralab_testkit import families as F

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_torch_thread")]

FULL = ["sd15", "sdxl", "sd3", "flux", "wan21_t2v"]
QUICK = ["flux_schnell", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "lumina2", "z_image", "qwen_image", "hidream"]

# What the reference trainer of each family trains, written against ComfyUI's module paths
# (independently of training/layers.py): (Linear/Conv paths it trains, paths it leaves out among those)
_DS = r"(double|single)_blocks\.\d+\."
SELECTION = {
    "sd3": (r"joint_blocks\.\d+\.(context_block|x_block)\.", None),            # kohya lora_sd3.py
    "flux": (_DS, None), "flux_schnell": (_DS, None),                            # kohya lora_flux.py
    "hunyuan_video": (_DS, r"(img_mod|txt_mod|modulation)\."),                   # musubi-tuner networks/lora.py
    "wan21_t2v": (r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.", None),          # musubi-tuner lora_wan.py
    "wan21_i2v": (r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.", None),
    "wan22_ti2v": (r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.", None),
    "lumina2": (r"((layers|noise_refiner|context_refiner)\.\d+|final_layer)\.", None),   # kohya lora_lumina.py
    "z_image": (r"layers\.\d+\.(attention|feed_forward)\.", None),              # musubi-tuner lora_zimage.py
    "qwen_image": (r"transformer_blocks\.\d+\.", r"_mod\."),                   # musubi-tuner lora_qwen_image.py
    "hidream": (r"(double|single)_stream_blocks\.\d+\.block\.", None),          # diffusion-pipe
}


class Case:
    """A family's MODEL, one latent and its conditioning (a CONDITIONING list)."""

    def __init__(self, model, latent: torch.Tensor, conditioning: list):
        self.model, self.latent, self.conditioning = model, latent, conditioning


@pytest.fixture
def case(request, tiny_family):
    name = request.param
    if name == "sd15":
        sd15 = request.getfixturevalue("tiny_sd15")
        import nodes as core_nodes

        with torch.inference_mode():
            cond = core_nodes.CLIPTextEncode().encode(sd15.clip, "a photo of sks")[0]
        return name, Case(sd15.model, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), cond)
    if name == "sdxl":
        sdxl = request.getfixturevalue("tiny_sdxl")
        inp = F.sdxl_inputs(sdxl.model)
        return name, Case(sdxl.model, inp.x, inp.conditioning())
    tiny = tiny_family(name)
    inp = F.inputs(tiny)
    return name, Case(tiny.model, inp.x, inp.conditioning())


def train(pack, c: Case, **kw) -> dict:
    """The node, as ComfyUI runs it (every input a list, under inference_mode)."""
    args = dict(model=c.model, batch_size=1, grad_accumulation_steps=1, steps=2, learning_rate=1e-3, rank=4,
                optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32",
                algorithm="LoRA", gradient_checkpointing=True, existing_lora="[None]")
    args.update(kw)
    listed = {k: [v] for k, v in args.items()}
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]().train(
            latents=[{"samples": c.latent.clone()}], positive=[c.conditioning], **listed)
    model, lora, loss, steps, _ = out["result"]
    return {"model": model, "lora": lora, "loss": loss["loss"], "steps": steps}


def modules(lora) -> set[str]:
    return {k.split(".")[0] for k in lora}


def expected_modules(name: str, model) -> set[str]:
    if name in ("sd15", "sdxl"):
        return set()      # checked by pattern below: the UNet's names are diffusers'
    keep, drop = SELECTION[name]
    out = set()
    for path, m in model.model.diffusion_model.named_modules():
        if isinstance(m, torch.nn.Linear) and re.match(keep, path) and not (drop and re.search(drop, path)):
            out.add("lora_unet_" + path.replace(".", "_"))
    return out


def check_selection(name: str, c: Case, lora) -> None:
    got = modules(lora)
    if name in ("sd15", "sdxl"):      # kohya networks/lora.py: Transformer2DModel only (no conv_dim)
        assert got and all(re.match(r"lora_unet_(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_\d+_", m)
                           for m in got), sorted(got)[:5]
        n_attn = sum(1 for p, m in c.model.model.diffusion_model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and re.search(
                         r"\.(transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))|proj_in|proj_out)$",
                         p))
        assert len(got) == n_attn
        return
    assert got == expected_modules(name, c.model), sorted(got ^ expected_modules(name, c.model))[:6]


def loads_in_core_completely(pack, comfy, c: Case, lora, caplog, tag: str) -> None:
    """Saved with Save LoRA, loaded by core's LoraLoaderModelOnly: every module patched, nothing dropped."""
    import nodes as core_nodes

    name = pack.NODE_CLASS_MAPPINGS["LoraLabSaveLoRA"]().save(lora, "families", tag, "")["result"][0]
    comfy.folder_paths.filename_list_cache.clear()
    with caplog.at_level(logging.WARNING):
        (patched,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(c.model, name, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(patched.patches) == len(modules(lora))
    os.remove(os.path.join(comfy.loras_dir, *name.split("/")))


def eval_loss(model, c: Case, draws: int = 12) -> float:
    """The training loss of the MODEL (its patches applied) on fixed (σ, noise) draws of the latent."""
    import comfy.model_management as mm
    from loralab.nodes import train as T
    from loralab.training import objective

    mm.load_models_gpu([model])
    obj = objective.Objective(model.get_model_object("model_sampling"), T.prediction(model))
    x0 = model.model.process_latent_in(c.latent).float()
    denoise = T.denoiser(model, c.conditioning)
    total = 0.0
    with torch.no_grad():
        for i in range(draws):
            x_t, sigma, target = obj.draw(x0, torch.Generator().manual_seed(1000 + i))
            total += float(obj.batch_loss(denoise(x_t, sigma, [0]).float(), target, sigma))
    return total / draws


@pytest.mark.parametrize("case", FULL, indirect=True)
def test_family_trains_its_reference_layers_loads_in_core_is_deterministic_and_learns(pack, comfy, case, caplog):
    name, c = case
    a = train(pack, c)
    check_selection(name, c, a["lora"])
    assert a["steps"] == 2 and all(torch.isfinite(torch.tensor(a["loss"])))
    b = train(pack, c)
    assert a["lora"].keys() == b["lora"].keys() and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    loads_in_core_completely(pack, comfy, c, a["lora"], caplog, name)

    before = eval_loss(c.model, c)
    learned = train(pack, c, steps=12, learning_rate=1e-2)
    after = eval_loss(learned["model"], c)
    assert after < before * 0.9, (name, before, after, learned["loss"])


@pytest.mark.parametrize("case", QUICK, indirect=True)
def test_other_families_train_their_reference_layers_and_load_in_core(pack, comfy, case, caplog):
    name, c = case
    a = train(pack, c)
    check_selection(name, c, a["lora"])
    assert all(torch.isfinite(torch.tensor(a["loss"])))
    b = train(pack, c)
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    loads_in_core_completely(pack, comfy, c, a["lora"], caplog, name)


def test_video_latents_train_as_5d_samples(pack, tiny_wan21_t2v):
    """Wan's latents are (B, C, T, H, W): a batch of two 2-frame latents trains two samples per step."""
    inp = F.inputs(tiny_wan21_t2v, batch=2)
    c = Case(tiny_wan21_t2v.model, inp.x, F.inputs(tiny_wan21_t2v).conditioning())
    out = train(pack, c, batch_size=2, steps=1)
    assert out["steps"] == 1 and out["lora"]


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_in_place_residual_blocks_train_with_and_without_checkpointing_alike(pack, tiny_family, name):
    """Flux's and HunyuanVideo's blocks add residuals in place (``img += ...``) after a LayerNorm saved
    img, and the block's input is what checkpointing keeps: both would break backward (regression:
    "modified by an inplace operation"). Checkpointing changes memory only, not the LoRA."""
    tiny = tiny_family(name)
    inp = F.inputs(tiny)
    c = Case(tiny.model, inp.x, inp.conditioning())
    on, off = train(pack, c, gradient_checkpointing=True), train(pack, c, gradient_checkpointing=False)
    assert all(torch.allclose(on["lora"][k], off["lora"][k], rtol=1e-5, atol=1e-7) for k in on["lora"])
