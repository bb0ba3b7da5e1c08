"""The core used on its own, no ComfyUI: a LoRA file onto a plain torch module or state dict with
SD1.x / SD2.x / SDXL names, or another family's through lora.dit_keys (`lora.patch.load_into`), exact
to a closed form, exact restore."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from loralab.lora import LoraError
from loralab.lora.patch import load_into
from tolerances import TOL, rel_err

from .test_sd_keys import COMMON, UNETS, clip, hf_to_openclip, to_ldm


def _lora(tmp_path, modules: dict[str, tuple[int, int]], *, naming, rank=3, alpha=1.5, seed=0):
    """Write a LoRA for {module name as written in the file: (out, in)}; return path and factors."""
    g = torch.Generator().manual_seed(seed)
    sd, factors = {}, {}
    for name, (out, inp) in modules.items():
        up, down = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
        factors[name] = (up, down)
        if naming == "kohya":
            sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                       f"{name}.alpha": torch.tensor(alpha)})
        else:  # peft: scale 1 when no alpha is stored
            sd.update({f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down})
    path = tmp_path / f"{naming}.safetensors"
    save_file(sd, str(path))
    return str(path), factors


def test_kohya_lora_onto_plain_module_with_ldm_names(tmp_path):
    """A torch.nn.Module whose parameters carry ldm checkpoint names (here: a module dict)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    diff_sd = UNet2DConditionModel(**COMMON, **UNETS["sd-like"]).state_dict()
    ldm = {k: v.clone() for k, v in to_ldm(diff_sd).items()}
    module = torch.nn.Module()
    for i, v in enumerate(ldm.values()):
        module.register_parameter(f"p{i}", torch.nn.Parameter(v))
    names = {k: f"p{i}" for i, k in enumerate(ldm)}
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w_key = next(k for k in ldm if k.endswith("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"))
    out, inp = ldm[w_key].shape
    path, f = _lora(tmp_path, {"lora_unet_" + target.replace(".", "_"): (out, inp)}, naming="kohya")
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    # the module's own names are p0…; give the key map in terms of those
    from loralab.lora.sd_keys import model_key_map
    km = {n: names[k] for n, k in model_key_map(list(ldm), {k: v.shape for k, v in ldm.items()}).items()
          if isinstance(k, str) and k in names}
    handle, m = load_into(module, path, 0.8, key_map=km)
    (up, down), = f.values()
    got = module.state_dict()[names[w_key]] - before[names[w_key]]
    assert rel_err(got, 0.8 * (1.5 / 3) * up @ down) <= TOL["fp32"]
    assert sum(not torch.equal(v, before[k]) for k, v in module.state_dict().items()) == 1
    handle.restore()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_peft_lora_onto_diffusers_state_dict(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in UNet2DConditionModel(**COMMON, **UNETS["sdxl-like"]).state_dict().items()}
    mods = ["up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.1.resnets.0.conv1"]
    shapes = {"unet." + m: tuple(sd[m + ".weight"].flatten(1).shape) for m in mods if sd[m + ".weight"].dim() == 2}
    path, f = _lora(tmp_path, shapes, naming="peft")
    before = {k: v.clone() for k, v in sd.items()}
    handle, m = load_into(sd, path, -1.0)
    (name, (up, down)), = f.items()
    key = name.removeprefix("unet.") + ".weight"
    assert rel_err(sd[key] - before[key], -(up @ down)) <= TOL["fp32"]
    handle.restore()
    assert all(torch.equal(sd[k], before[k]) for k in sd)


def test_sd2_openclip_fused_qkv_slice_is_patched_alone(tmp_path):
    hf = clip(16)
    sd = {k: v.clone() for k, v in hf_to_openclip(hf, "cond_stage_model.model.").items()}
    path, f = _lora(tmp_path, {"lora_te_text_model_encoder_layers_1_self_attn_k_proj": (16, 16)}, naming="kohya")
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    before = sd[key].clone()
    handle, _ = load_into(sd, path, 1.0)
    (up, down), = f.values()
    assert torch.equal(sd[key][:16], before[:16]) and torch.equal(sd[key][32:], before[32:])
    assert rel_err(sd[key][16:32] - before[16:32], 0.5 * up @ down) <= TOL["fp32"]
    handle.restore()
    assert torch.equal(sd[key], before)


def test_nothing_matches_names_the_architectures(tmp_path):
    hf = clip(12)
    sd = {"cond_stage_model.transformer." + k: v for k, v in hf.items()}
    g = torch.Generator().manual_seed(0)
    lora = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2, generator=g),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8, generator=g)}
    save_file(lora, str(tmp_path / "xl.safetensors"))
    # the model: a 12-wide CLIP no real model has, so only the file's architecture can be named
    with pytest.raises(LoraError, match=r"0 of 2 keys match this model \(0%\): the file looks like an SDXL LoRA"):
        load_into(sd, str(tmp_path / "xl.safetensors"))


def test_other_families_map_through_dit_keys_by_what_the_model_is(tmp_path):
    """No key_map, no arch: the model's weights say Flux.1 (its qkv's 3072 width, on the meta device: no
    memory), so its kohya-named file goes through lora.dit_keys (tests/unit/test_dit_keys.py has the rest)."""
    g = torch.Generator().manual_seed(0)
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.empty(9216, 3072, device="meta"),
            "double_blocks.0.img_mod.lin.weight": torch.randn(18, 6, generator=g)}
    before = flux["double_blocks.0.img_mod.lin.weight"].clone()
    up, down = torch.randn(18, 2, generator=g), torch.randn(2, 6, generator=g)
    save_file({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": up}, str(tmp_path / "f.safetensors"))
    handle, m = load_into(flux, str(tmp_path / "f.safetensors"), 0.5)
    assert rel_err(flux["double_blocks.0.img_mod.lin.weight"] - before, 0.5 * up @ down) <= TOL["fp32"]
    handle.restore()
    assert torch.equal(flux["double_blocks.0.img_mod.lin.weight"], before)
