"""lora.arch against ComfyUI itself (in-process, CPU): every model class ComfyUI has is in the table;
LoRA files named the way ComfyUI's own model classes name their layers (and kohya's flattened form)
are identified as the family ComfyUI's class is; the loader's report on the tiny SD1.5 and on a
Wan model says what is wrong and what to do.

Models are built on the meta device at their real widths with one or two blocks: names and shapes
are ComfyUI's own, no memory is used.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.lora import arch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def supported(comfy):
    del comfy          # only its set-up matters
    import comfy.supported_models
    return comfy.supported_models


def test_every_comfyui_model_class_has_an_entry(supported):
    """A ComfyUI that adds a model class fails here until the table names it (display name, family)."""
    classes = {c.__name__ for c in supported.models}
    assert classes - arch.comfy_classes() == set()
    assert arch.comfy_classes() - classes == set(), "the table names classes this ComfyUI does not have"
    for name in classes:    # users see display names, never class names (except where they are the same)
        v = arch.by_comfy_class(name)
        assert v.name != name or name in ("SDXL", "AuraFlow", "Chroma", "HunyuanVideo"), v


# ComfyUI unet_config of each class at its real width, with few blocks (what model_detection would
# derive from a real checkpoint, less the depth)
_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
             mlp_ratio=4.0, num_heads=24, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
             qkv_bias=True, guidance_embed=True, patch_size=2)
_WAN = dict(image_model="wan2.1", model_type="t2v", dim=5120, out_dim=16, num_heads=40, ffn_dim=13824, num_layers=2,
            patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
            in_dim=16)
_LUMINA = dict(image_model="lumina2", patch_size=2, in_channels=16, n_layers=2, qk_norm=True)
COMFY_MODELS = {
    "Flux": _FLUX,
    "FluxSchnell": {**_FLUX, "guidance_embed": False},
    "Chroma": dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072,
                   mlp_ratio=4.0, num_heads=24, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
                   qkv_bias=True, patch_size=2, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5),
    "HunyuanVideo": dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                         vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=2,
                         depth_single_blocks=2, axes_dim=[16, 56, 56], theta=256, qkv_bias=True, guidance_embed=True,
                         byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None),
    "WAN21_T2V": _WAN,
    "WAN21_I2V": {**_WAN, "model_type": "i2v", "in_dim": 36},
    "WAN22_T2V": {**_WAN, "dim": 3072, "num_heads": 24, "ffn_dim": 14336, "out_dim": 48, "in_dim": 48},
    "Lumina2": dict(_LUMINA, dim=2304, cap_feat_dim=2304, n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32],
                    axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0),
    "ZImage": dict(_LUMINA, dim=3840, cap_feat_dim=2560, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                   axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
                   time_scale=1000.0),
    "QwenImage": dict(image_model="qwen_image", in_channels=64, num_layers=2),
    "HiDream": dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32],
                    caption_channels=[4096, 4096], max_resolution=[128, 128], in_channels=16,
                    llama_layers=list(range(32)) + [31] * 16, num_attention_heads=20, num_routed_experts=4,
                    num_activated_experts=2, num_layers=1, num_single_layers=1, out_channels=16, patch_size=2,
                    text_emb_dim=2048),
    "SD3": dict(in_channels=16, patch_size=2, out_channels=16, depth=24, input_size=None, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
                num_patches=36864, pos_embed_max_size=192, pos_embed_scaling_factor=None, x_block_self_attn_layers=[]),
}


def meta_model(supported, name: str):
    """ComfyUI's BaseModel for config class ``name`` on the meta device."""
    config = getattr(supported, name)(dict(COMFY_MODELS[name]))
    with torch.device("meta"):
        return config.get_model({}, device="meta")


def lora_of(linears: dict[str, torch.Size], prefix: str, flatten: bool) -> dict[str, tuple[int, ...]]:
    out = {}
    for module, (o, i) in linears.items():
        name = prefix + (module.replace(".", "_") if flatten else module)
        out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = (4, i), (o, 4)
    return out


@pytest.mark.parametrize("name", list(COMFY_MODELS))
def test_comfyui_model_names_identify_the_family(supported, name):
    """A LoRA on every Linear of ComfyUI's own model, named as ComfyUI's trainer and LoRA Lab's write
    them (diffusion_model.<path>) and as kohya/musubi do (lora_unet_<path with _>), is identified
    as the family ComfyUI's class belongs to; so are the model's own weights."""
    model = meta_model(supported, name)
    want = arch.by_comfy_class(name, model.model_config.unet_config)
    assert want is not None
    sd = model.diffusion_model.state_dict()
    linears = {k[: -len(".weight")]: v.shape for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2}
    for keys in (lora_of(linears, "diffusion_model.", False), lora_of(linears, "lora_unet_", True)):
        ident = arch.identify(keys)
        assert ident.arch is want.arch and ident.confidence == "high", ident.why
        assert ident.variant in (None, want), ident
    weights = arch.identify({k: v.shape for k, v in sd.items()})
    assert (weights.kind, weights.arch) == ("weights", want.arch), weights.why


# ---- the loader's report ---------------------------------------------------------------------------------
def run_loader(pack, sd15, lora_name, model_only=False):
    if model_only:
        out = pack.NODE_CLASS_MAPPINGS["LoraLabLoraLoaderModelOnly"]().load(sd15.model, lora_name, 1.0)
        return out["result"][1]
    out = pack.NODE_CLASS_MAPPINGS["LoraLabLoadLoRA"]().load(sd15.model, sd15.clip, lora_name, 1.0, 1.0)
    return out["result"][2]


def test_report_a_checkpoint_in_loras(pack, tiny_sd15, tiny_sd15_file, comfy, monkeypatch):
    """A checkpoint dropped into loras/ is named for what it is, from its header alone (a real one is
    gigabytes: reading its tensors to say "0 keys match" is what core does)."""
    from loralab.nodes import comfy_model

    link = os.path.join(comfy.loras_dir, "dropped_checkpoint.safetensors")
    if not os.path.exists(link):
        os.symlink(tiny_sd15_file, link)
    comfy.folder_paths.filename_list_cache.clear()
    monkeypatch.setattr(comfy_model, "read", lambda *a, **k: pytest.fail("read the checkpoint's tensors"))
    report = run_loader(pack, tiny_sd15, "dropped_checkpoint.safetensors")
    first, *rest = report.splitlines()
    assert first.startswith("dropped_checkpoint.safetensors: 0 of ")
    assert first.endswith("keys match this model (0%): this file is an SD1.5 checkpoint, not a LoRA"), first
    assert rest[0] == ("It holds plain diffusion model, text encoder and VAE weights and no LoRA factors. "
                       "It belongs in models/checkpoints (Load Checkpoint), not in loras.")
    assert "of no known format" not in report


def test_report_partial_match_gives_the_share(pack, tiny_sd15, lora_file, comfy):
    spec = lora_file("kohya", few=True)
    sd = load_file(spec.path)
    g = torch.Generator().manual_seed(0)
    for i in range(2):   # layers the tiny SD1.5 does not have (it has two levels, no input_blocks.7)
        p = f"lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q_{i}"
        sd[p + ".lora_down.weight"], sd[p + ".lora_up.weight"] = torch.randn(4, 320, generator=g), torch.randn(320, 4, generator=g)
    save_file(sd, os.path.join(comfy.loras_dir, "partial.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    report = run_loader(pack, tiny_sd15, "partial.safetensors")
    n, total = len(spec.keys), len(spec.keys) + 4
    assert report.startswith(f"partial.safetensors: {n} of {total} keys match this model ({100 * n // total}%, "), report
    assert "2 module(s) not in this model: lora_unet_input_blocks_7_1" in report
    assert ": an" not in report.splitlines()[0]     # same architecture: nothing to diagnose


def test_report_metadata_naming_another_base_model(pack, tiny_sd15, lora_file, comfy):
    """An SD1.5 LoRA whose header says SDXL (mislabelled, or trained on a merge): keys decide, and the
    report says what the header claims."""
    spec = lora_file("kohya", few=True)
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "sd_xl_base_1.0.safetensors"}
    save_file(load_file(spec.path), os.path.join(comfy.loras_dir, "labelled_sdxl.safetensors"), metadata=meta)
    comfy.folder_paths.filename_list_cache.clear()
    report = run_loader(pack, tiny_sd15, "labelled_sdxl.safetensors")
    n = len(spec.keys)
    assert report.startswith(f"labelled_sdxl.safetensors: {n} of {n} keys match this model (100%, ")
    assert ("Its metadata names SDXL (ss_base_model_version 'sdxl_base_v1-0', trained on "
            "'sd_xl_base_1.0.safetensors') as its base model, but its keys are those of an SD1.5 LoRA.") in report


def test_report_metadata_of_a_file_for_another_model(pack, tiny_sd15, comfy):
    """Keys of no known family (a custom network), but the header names Flux.1 dev: the report goes by it."""
    sd = {"custom_block.proj.lora_down.weight": torch.ones(4, 8), "custom_block.proj.lora_up.weight": torch.ones(8, 4)}
    save_file(sd, os.path.join(comfy.loras_dir, "flux_by_header.safetensors"),
              metadata={"modelspec.architecture": "flux-1-dev/lora"})
    comfy.folder_paths.filename_list_cache.clear()
    report = run_loader(pack, tiny_sd15, "flux_by_header.safetensors", model_only=True)
    assert report.startswith("flux_by_header.safetensors: 0 of 2 keys match this model (0%): "
                             "a Flux.1 dev LoRA on an SD1.5 model\n"), report
    assert "The file is a Flux.1 dev LoRA (by its metadata; its keys fit no known family). " \
           "Load it on a Flux.1 dev model." in report


@pytest.fixture(scope="module")
def wan_t2v(supported):
    """A Wan 2.1 T2V 14B-wide ModelPatcher (two blocks, meta device): ComfyUI's own key map and names."""
    import comfy.model_patcher

    model = meta_model(supported, "WAN21_T2V")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_report_wan_i2v_lora_on_a_t2v_model(wan_t2v, tmp_path):
    """Most keys match (the blocks are the same), so the variant mismatch must still be called out,
    with the keys that do not match and why."""
    from loralab.nodes import comfy_model

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        for sub in ("self_attn.q", "self_attn.k", "cross_attn.q", "cross_attn.k", "cross_attn.k_img", "cross_attn.v_img"):
            p = f"diffusion_model.blocks.{i}.{sub}"
            sd[p + ".lora_down.weight"] = torch.randn(4, 5120, generator=g)
            sd[p + ".lora_up.weight"] = torch.zeros(5120, 4)
    path = str(tmp_path / "wan_i2v_style.safetensors")
    save_file(sd, path)
    _, _, report = comfy_model.load_lora(wan_t2v, None, path, 1.0, 0.0)
    first, *rest = report.text.splitlines()
    assert first == ("wan_i2v_style.safetensors: 16 of 24 keys match this model (66%, 8 tensors patched): "
                     "a Wan 2.1 I2V 14B LoRA on a Wan 2.1/2.2 T2V 14B model")
    assert rest[0] == ("4 of its modules are the image cross-attention (k_img, v_img) and image embedding that only "
                       "Wan 2.1 I2V models have; this model has no such layers, so they are left out.")
    assert rest[1] == "Pick a Wan 2.1 I2V model to use all of it."
    assert rest[2] == ("4 module(s) not in this model: diffusion_model.blocks.0.cross_attn.k_img, "
                       "diffusion_model.blocks.0.cross_attn.v_img, diffusion_model.blocks.1.cross_attn.k_img, "
                       "diffusion_model.blocks.1.cross_attn.v_img")


def test_shape_error_says_which_size_the_file_is_for(wan_t2v, tmp_path):
    """A Wan 1.3B LoRA on a 14B model fails on its first shape; the error says why in users' words."""
    from loralab.lora import LoraError
    from loralab.nodes import comfy_model

    sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.ones(4, 1536),
          "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.ones(1536, 4)}
    path = str(tmp_path / "wan_small.safetensors")
    save_file(sd, path)
    with pytest.raises(LoraError) as e:
        comfy_model.load_lora(wan_t2v, None, path, 1.0, 0.0)
    msg = str(e.value)
    assert "lora_unet_blocks_0_self_attn_q" in msg and "down (4, 1536)" in msg and "(5120, 5120)" in msg, msg
    assert "The file is a Wan 1.3B LoRA on a Wan 2.1/2.2 T2V 14B model (hidden width 1536; " in msg, msg
    assert msg.endswith("load it on a Wan 1.3B model"), msg
