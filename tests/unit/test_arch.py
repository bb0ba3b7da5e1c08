"""lora.arch without ComfyUI: the table's lookups, ``identify`` on LoRA files of every family in every
naming they come in (hand-written from the formats' real names, and generated with diffusers + PEFT
from the real diffusers classes at their real widths, built on the meta device: shapes, no memory),
metadata-based detection, checkpoints, and the report's wording.

The ComfyUI side (every model class ComfyUI has is in the table; names of ComfyUI's own model
classes; reports through the loader nodes) is in tests/comfy/test_arch_comfy.py.
"""
from __future__ import annotations

import re

import pytest
import torch

from loralab.lora import arch
from loralab.lora.patch import Match, mismatch


def lora(modules: dict[str, tuple[int, int]], rank: int = 4, naming: str = "kohya") -> dict[str, tuple[int, ...]]:
    """File key -> shape for LoRA factors of ``modules`` (module name -> (out, in) of its weight)."""
    up, down = {"kohya": (".lora_up.weight", ".lora_down.weight"), "peft": (".lora_B.weight", ".lora_A.weight"),
                "xlabs": (".up.weight", ".down.weight")}[naming]
    out = {}
    for m, (o, i) in modules.items():
        out[m + down] = (rank, i)
        out[m + up] = (o, rank)
        if naming == "kohya":
            out[m + ".alpha"] = ()
    return out


def blocks(pattern: str, n: int, shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """``pattern`` with {i} = 0..n-1 -> shape, for each module name of a list of them ('a|b')."""
    return {p.format(i=i): shape for i in range(n) for p in pattern.split("|")}


def flat(modules: dict[str, tuple[int, int]], prefix: str) -> dict[str, tuple[int, int]]:
    """kohya's flattened names: prefix + the module path with '.' -> '_'."""
    return {prefix + m.replace(".", "_"): s for m, s in modules.items()}


# ---- the table itself ---------------------------------------------------------------------------------
def test_ids_are_unique_and_every_variant_knows_its_arch():
    for ids in ([a.id for a in arch.ARCHS], [v.id for a in arch.ARCHS for v in a.variants]):   # two namespaces
        assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    for a in arch.ARCHS:
        assert a.variants and all(v.arch is a for v in a.variants)
        assert a.key_map in (arch.SD_KEYS, arch.COMFY)
        assert a.names and all(a.names.values())
        for p in [p for ps in a.names.values() for p in ps] + list(a.marks) + list(a.excludes):
            re.compile(p)
        for v in a.variants:
            assert v.name and "_" not in v.name, v      # display names, never class names like WAN21_T2V
            assert not v.widths or (a.probes and v.widths <= a.probes[0].widths), v
            assert not v.marks or v.marks_are, v


def test_comfy_classes_belong_to_one_variant_unless_config_tells_them_apart():
    seen: dict[str, list] = {}
    for a in arch.ARCHS:
        for v in a.variants:
            for c in v.comfy:
                seen.setdefault(c, []).append(v)
    for c, vs in seen.items():
        defaults = [v for v in vs if not v.config and v.prediction is None]
        assert len(defaults) <= 1, (c, vs)


def test_lookups():
    assert arch.get("flux").name == "Flux.1"
    assert arch.variant("wan21-i2v").arch is arch.get("wan")
    with pytest.raises(KeyError, match="no architecture 'nope'; known: sd1, sd2"):
        arch.get("nope")
    with pytest.raises(KeyError, match="no variant 'nope'"):
        arch.variant("nope")
    assert arch.by_comfy_class("SD15").id == "sd15"
    assert arch.by_comfy_class("SD15", prediction="v").id == "sd15-v"
    assert arch.by_comfy_class("SD20", {}, "v").id == "sd2-v"
    assert arch.by_comfy_class("SD20", {}, "eps").id == "sd2"
    # ComfyUI files Wan 2.2 I2V A14B (no CLIP-image layers) under WAN21_T2V: its in_dim tells it
    assert arch.by_comfy_class("WAN21_T2V", {"in_dim": 36, "dim": 5120}).name == "Wan 2.2 I2V"
    assert arch.by_comfy_class("WAN21_T2V", {"in_dim": 16}).name == "Wan 2.1/2.2 T2V"
    assert arch.by_comfy_class("SD3", {"depth": 24}).id == "sd3-medium"
    assert arch.by_comfy_class("SD3", {"depth": 24, "qk_norm": "rms"}).id == "sd35-medium"
    assert arch.by_comfy_class("SD3", {"depth": 38, "qk_norm": "rms"}).id == "sd35-large"
    assert arch.by_comfy_class("Flux", {"guidance_embed": True}).id == "flux-dev"
    assert arch.by_comfy_class("NotAModel") is None


def test_metadata_ids_follow_kohya_and_the_model_spec():
    """What kohya sd-scripts / musubi-tuner write (library/sai_model_spec.py, *_train_network.py)."""
    assert arch.variant("sd15").metadata_ids() == ("sd_v1", "stable-diffusion-v1", "diffusers")
    assert arch.variant("sd15-v").metadata_ids()[0] == "sd_v1_v"        # get_model_version_str_for_sd1_sd2
    assert arch.variant("sd2-v").metadata_ids()[:2] == ("sd_v2_v", "stable-diffusion-v2-768-v")
    assert arch.variant("sdxl").metadata_ids() == ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", arch.IMPL_SGM)
    assert arch.variant("sd35-large").metadata_ids()[:2] == ("5-large", "stable-diffusion-3-5-large")
    assert arch.variant("flux-schnell").metadata_ids() == ("flux1", "flux-1-schnell", arch.IMPL_FLUX)
    assert arch.variant("chroma").metadata_ids()[:2] == ("chroma", "chroma")
    assert arch.variant("lumina2").metadata_ids()[:2] == ("lumina2", "lumina-2")
    assert arch.variant("wan21-i2v").metadata_ids()[:2] == ("wan", "wan2.1")
    # no trainer has ids for it: our variant id, ComfyUI as the implementation
    assert arch.variant("hidream-i1").metadata_ids() == ("hidream-i1", "hidream-i1", arch.IMPL_COMFY_UI)


def test_articles():
    assert [arch.a(n) for n in ("SDXL", "SD1.5", "Wan 2.1 I2V", "HunyuanVideo", "AuraFlow", "LTX-Video", "Flux.1",
                                "Z-Image", "SSD-1B", "HiDream-I1", "OmniGen2")] == [
        "an SDXL", "an SD1.5", "a Wan 2.1 I2V", "a HunyuanVideo", "an AuraFlow", "an LTX-Video", "a Flux.1",
        "a Z-Image", "an SSD-1B", "a HiDream-I1", "an OmniGen2"]


# ---- identify: hand-written files of every family, in the names real files use ------------------------
SD_ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
LDM_ATTN = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
FLUX_DOUBLE = "double_blocks.{i}.img_attn.qkv|double_blocks.{i}.img_mlp.0|double_blocks.{i}.txt_mod.lin"
FLUX_SINGLE = "single_blocks.{i}.linear1|single_blocks.{i}.linear2|single_blocks.{i}.modulation.lin"
HV_DOUBLE = "double_blocks.{i}.img_attn_qkv|double_blocks.{i}.img_mlp.fc1|double_blocks.{i}.img_mod.linear"
WAN = "blocks.{i}.self_attn.q|blocks.{i}.cross_attn.k|blocks.{i}.ffn.0"
WAN_I2V = "blocks.{i}.cross_attn.k_img|blocks.{i}.cross_attn.v_img"

CASES = {   # name: (file keys -> shapes, arch id, variant id or None, width)
    "sd15 kohya diffusers-path": (lora(flat({SD_ATTN: (640, 768)}, "lora_unet_")
                                       | flat({"text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, "lora_te_")),
                                  "sd1", None, 768),
    "sd15 kohya ldm-path": (lora(flat({LDM_ATTN: (640, 768)}, "lora_unet_")), "sd1", None, 768),
    "sd15 peft": (lora({"unet." + SD_ATTN: (640, 768)}, naming="peft"), "sd1", None, 768),
    "sd15 text encoder only": (lora(flat({"text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, "lora_te_")),
                               "sd1", None, None),
    "sd2 kohya": (lora(flat({LDM_ATTN: (640, 1024)}, "lora_unet_")
                       | flat({"text_model.encoder.layers.0.self_attn.q_proj": (1024, 1024)}, "lora_te_")),
                  "sd2", None, 1024),
    "sdxl kohya": (lora(flat({"input_blocks.4.1.transformer_blocks.1.attn2.to_k": (640, 2048)}, "lora_unet_")
                        | flat({"text_model.encoder.layers.0.mlp.fc1": (5120, 1280)}, "lora_te2_")),
                   "sdxl", None, 2048),
    "sdxl text encoders only": (lora(flat({"text_model.encoder.layers.0.mlp.fc1": (5120, 1280)}, "lora_te2_")),
                                "sdxl", None, None),
    "sdxl peft": (lora({"unet." + SD_ATTN: (640, 2048)}, naming="peft"), "sdxl", None, 2048),
    "sdxl refiner": (lora(flat({LDM_ATTN: (768, 1280)}, "lora_unet_")), "sdxl", "sdxl-refiner", 1280),
    "svd": (lora(flat({"input_blocks.1.1.time_stack.0.attn1.to_q": (320, 320), LDM_ATTN: (640, 1024)}, "lora_unet_")),
            "svd", None, 1024),
    "stable cascade kohya": (lora(flat(blocks("down_blocks.0.{i}.attention.attn.out_proj", 2, (2048, 2048)),
                                       "lora_prior_unet_")), "stable-cascade", None, None),
    "sd3 kohya": (lora(flat(blocks("joint_blocks.{i}.x_block.attn.qkv|joint_blocks.{i}.context_block.mlp.fc1", 24,
                                   (4608, 1536)), "lora_unet_")), "sd3", None, 1536),
    "sd3.5 medium kohya": (lora(flat(blocks("joint_blocks.{i}.x_block.attn.qkv|joint_blocks.{i}.x_block.attn2.qkv", 13,
                                            (4608, 1536)), "lora_unet_")), "sd3", "sd35-medium", 1536),
    "sd3.5 large diffusers": (lora(blocks("transformer.transformer_blocks.{i}.attn.to_q|"
                                          "transformer.transformer_blocks.{i}.attn.add_q_proj", 38, (2432, 2432)),
                                   naming="peft"), "sd3", "sd35-large", 2432),
    "flux kohya": (lora(flat(blocks(FLUX_DOUBLE, 19, (9216, 3072)) | blocks(FLUX_SINGLE, 38, (21504, 3072)),
                             "lora_unet_")), "flux", None, 3072),
    "flux comfy dev": (lora({"diffusion_model." + k: v for k, v in
                             (blocks(FLUX_DOUBLE, 19, (9216, 3072)) | {"guidance_in.in_layer": (3072, 256)}).items()}),
                       "flux", "flux-dev", 3072),
    "flux diffusers": (lora(blocks("transformer.transformer_blocks.{i}.attn.to_q|transformer.transformer_blocks.{i}.ff.net.0.proj",
                                   19, (3072, 3072))
                            | blocks("transformer.single_transformer_blocks.{i}.proj_mlp", 38, (12288, 3072)),
                            naming="peft"), "flux", None, 3072),
    "flux xlabs": (lora(blocks("double_blocks.{i}.processor.qkv_lora1|double_blocks.{i}.processor.proj_lora2", 19,
                               (3072, 3072)), rank=16, naming="xlabs"), "flux", None, None),
    "flux xlabs single blocks": (lora(blocks("single_blocks.{i}.processor.qkv_lora", 38, (9216, 3072))
                                      | blocks("single_blocks.{i}.processor.proj_lora", 38, (3072, 15360)),
                                      naming="xlabs"), "flux", None, None),
    "flux kohya oft": ({f"oft_unet_{m.replace('.', '_')}.oft_blocks.0": (4, 768, 768)
                        for m in blocks("double_blocks.{i}.img_mod.lin|single_blocks.{i}.linear2", 19, ())}
                       | {f"oft_unet_single_blocks_{i}_linear1.oft_blocks.{j}": (4, 768, 768)
                          for i in range(38) for j in range(3)}, "flux", None, None),
    "chroma": (lora({"diffusion_model." + k: v for k, v in (blocks("double_blocks.{i}.img_attn.qkv", 19, (9216, 3072))
                     | {"distilled_guidance_layer.in_proj": (5120, 64)}).items()}), "flux", "chroma", 3072),
    "flux.2": (lora(flat(blocks("double_blocks.{i}.img_attn.qkv", 8, (18432, 6144))
                         | {"double_stream_modulation_img.lin": (36864, 6144)}, "lora_unet_")), "flux2", "flux2-dev", 6144),
    "hunyuan video musubi": (lora(flat(blocks(HV_DOUBLE, 20, (9216, 3072)), "lora_unet_")), "hunyuan-video", None, 3072),
    "hunyuan video diffusion-pipe": (lora({"transformer." + k: v for k, v in (blocks(HV_DOUBLE, 20, (9216, 3072))
                                           | blocks("single_blocks.{i}.linear1", 40, (21504, 3072))).items()},
                                          naming="peft"), "hunyuan-video", None, 3072),
    "hunyuan video diffusers": (lora(blocks("transformer.transformer_blocks.{i}.attn.to_q", 20, (3072, 3072))
                                     | {"transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q": (3072, 3072)},
                                     naming="peft"), "hunyuan-video", None, 3072),
    "hunyuan video simpletuner lycoris": (lora(flat(blocks("transformer_blocks.{i}.attn.to_q", 20, (3072, 3072))
                                                    | {"context_embedder.token_refiner.refiner_blocks.0.attn.to_q":
                                                       (3072, 3072)}, "lycoris_")), "hunyuan-video", None, 3072),
    "hunyuan video 1.5": (lora(flat(blocks(HV_DOUBLE, 54, (6144, 2048)), "lora_unet_")),
                          "hunyuan-video", "hunyuan-video-1.5", 2048),
    "wan t2v 14B comfy": (lora({"diffusion_model." + k: v for k, v in blocks(WAN, 40, (5120, 5120)).items()}),
                          "wan", None, 5120),
    "wan t2v 1.3B musubi": (lora(flat(blocks(WAN, 30, (1536, 1536)), "lora_unet_")), "wan", None, 1536),
    "wan fun (lora_unet__)": (lora(flat(blocks(WAN, 30, (1536, 1536)), "lora_unet__")), "wan", None, 1536),
    "wan mixed separators": (lora({f"lora_unet_blocks_{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v
                                   for k, v in blocks(WAN, 30, (1536, 1536)).items()}), "wan", None, 1536),
    "wan simpletuner lycoris": (lora(flat(blocks("blocks.{i}.attn1.to_q|blocks.{i}.ffn.net.0.proj", 40, (5120, 5120)),
                                          "lycoris_")), "wan", None, 5120),
    "wan i2v comfy": (lora({"diffusion_model." + k: v for k, v in blocks(WAN + "|" + WAN_I2V, 40, (5120, 5120)).items()}),
                      "wan", "wan21-i2v", 5120),
    "wan i2v diffusers": (lora(blocks("transformer.blocks.{i}.attn1.to_q|transformer.blocks.{i}.attn2.add_k_proj", 40,
                                      (5120, 5120)), naming="peft"), "wan", "wan21-i2v", 5120),
    "wan 2.2 ti2v 5b": (lora(flat(blocks(WAN, 30, (3072, 3072)), "lora_unet_")), "wan", "wan22-ti2v-5b", 3072),
    "wan vace": (lora({"diffusion_model." + k: v for k, v in (blocks(WAN, 4, (5120, 5120))
                       | blocks("vace_blocks.{i}.self_attn.q", 2, (5120, 5120))).items()}), "wan", "wan21-vace", 5120),
    "lumina2 comfy": (lora({"diffusion_model." + k: v for k, v in
                            blocks("layers.{i}.attention.qkv|layers.{i}.feed_forward.w1", 26, (6912, 2304)).items()}),
                      "lumina2", "lumina2", 2304),
    "lumina2 diffusers": (lora(blocks("transformer.layers.{i}.attn.to_q|transformer.context_refiner.{i}.attn.to_q", 2,
                                      (2304, 2304)), naming="peft"), "lumina2", "lumina2", 2304),
    "z-image": (lora({"diffusion_model." + k: v for k, v in
                      blocks("layers.{i}.attention.to_q|layers.{i}.feed_forward.w1", 30, (3840, 3840)).items()}),
                "lumina2", "z-image", 3840),
    "z-image diffusers": (lora(blocks("transformer.layers.{i}.attention.to_q", 30, (3840, 3840)), naming="peft"),
                          "lumina2", "z-image", 3840),
    "lumina2 simpletuner lycoris": (lora(flat(blocks("layers.{i}.attn.to_q", 26, (2304, 2304)), "lycoris_")),
                                    "lumina2", "lumina2", 2304),
    "omnigen2": (lora(blocks("transformer.layers.{i}.attn.to_q|transformer.ref_image_refiner.{i}.attn.to_q", 2,
                             (2520, 2520)), naming="peft"), "omnigen2", "omnigen2", 2520),
    "qwen-image": (lora(blocks("transformer_blocks.{i}.attn.to_q|transformer_blocks.{i}.attn.add_q_proj|"
                               "transformer_blocks.{i}.img_mlp.net.0.proj|transformer_blocks.{i}.txt_mlp.net.2", 60,
                               (3072, 3072))), "qwen-image", None, 3072),
    "qwen-image attention only": (lora(blocks("transformer.transformer_blocks.{i}.attn.to_q", 60, (3072, 3072)),
                                       naming="peft"), "qwen-image", None, 3072),
    "qwen-image onetrainer": (lora(flat(blocks("transformer_blocks.{i}.attn.to_q|"
                                               "transformer_blocks.{i}.img_mlp.net.0.proj", 60, (3072, 3072)),
                                        "lora_transformer_")), "qwen-image", None, 3072),
    "hidream diffusers": (lora(blocks("transformer.double_stream_blocks.{i}.block.attn1.to_q", 16, (2560, 2560)),
                               naming="peft"), "hidream", "hidream-i1", None),
    "hidream": (lora(flat(blocks("double_stream_blocks.{i}.block.attn1.to_q|single_stream_blocks.{i}.block.attn1.to_q",
                                 16, (2560, 2560)), "lycoris_")), "hidream", "hidream-i1", None),
    "auraflow comfy": (lora({"diffusion_model." + k: v for k, v in
                             blocks("double_layers.{i}.attn.w2q|single_layers.{i}.attn.w1q", 4, (3072, 3072)).items()}),
                       "auraflow", "auraflow", None),
    "pixart comfy": (lora({"diffusion_model." + k: v for k, v in
                           blocks("blocks.{i}.attn.qkv|blocks.{i}.cross_attn.q_linear", 28, (3456, 1152)).items()}),
                     "pixart", None, 1152),
    "hunyuan-dit official": (lora({"base_model.model." + k: v for k, v in
                                   blocks("blocks.{i}.attn1.Wqkv|blocks.{i}.attn2.kv_proj", 40, (4224, 1408)).items()},
                                  naming="peft"), "hunyuan-dit", None, 1408),
    "ltx-video": (lora(blocks("transformer.transformer_blocks.{i}.attn1.to_q|transformer.transformer_blocks.{i}.attn2.to_k",
                              28, (2048, 2048)), naming="peft"), "ltxv", "ltxv", 2048),
    "mochi": (lora(blocks("blocks.{i}.attn.qkv_x|blocks.{i}.mod_y", 48, (9216, 3072)), naming="peft"), "mochi", "mochi", None),
    "cosmos 1": (lora(flat(blocks("blocks.block{i}.blocks.0.block.attn.to_q.0", 28, (4096, 4096)), "lora_unet_")),
                 "cosmos", None, None),
    "cosmos predict2": (lora({"diffusion_model." + k: v for k, v in
                              blocks("blocks.{i}.self_attn.q_proj|blocks.{i}.mlp.layer1", 28, (2048, 2048)).items()}),
                        "cosmos-predict2", None, None),
    "ace-step": (lora(blocks("transformer_blocks.{i}.attn.to_q|transformer_blocks.{i}.cross_attn.to_q", 24, (2560, 2560)),
                      naming="peft"), "ace-step", "ace-step", None),
    "stable audio": (lora(blocks("transformer.layers.{i}.self_attn.to_qkv|transformer.layers.{i}.cross_attn.to_kv", 24,
                                 (4608, 1536)), naming="peft"), "stable-audio", "stable-audio-open", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_identify_every_family(case):
    keys, arch_id, variant_id, width = CASES[case]
    ident = arch.identify(keys)
    assert ident.kind == "lora"
    assert (ident.arch.id if ident.arch else None, ident.variant.id if ident.variant else None, ident.width) == \
        (arch_id, variant_id, width), ident.why
    assert ident.confidence in ("high", "medium") and ident.why


def test_variant_found_by_its_own_layers_names_them():
    keys = lora({"diffusion_model." + k: v for k, v in blocks(WAN + "|" + WAN_I2V, 2, (5120, 5120)).items()})
    ident = arch.identify(keys)
    assert ident.name == "Wan 2.1 I2V 14B" and ident.variant_by == "keys"
    assert set(ident.marked) == {f"blocks_{i}_cross_attn_{k}_img" for i in range(2) for k in "kv"}


def test_names_several_families_share_are_said_to_be_shared():
    """Flux.1's and HunyuanVideo's double-block attention have the same flattened names and width;
    without a layer only one of them has, Flux.1 (listed first) is a medium-confidence guess."""
    ident = arch.identify(lora(flat(blocks("double_blocks.{i}.img_attn.qkv", 19, (9216, 3072)), "lora_unet_")))
    assert ident.arch.id == "flux" and ident.confidence == "medium"
    assert "names HunyuanVideo files have too" in ident.why


def test_width_rules_out_a_family():
    """The same SD names at SD2's context width are SD2, not SD1.5; a Wan width no model has is no Wan."""
    assert arch.identify(lora(flat({LDM_ATTN: (640, 1024)}, "lora_unet_"))).arch.id == "sd2"
    odd = arch.identify(lora(flat(blocks(WAN, 2, (999, 999)), "lora_unet_")))
    assert odd.arch is None and odd.why == "no key names of a known architecture"


# ---- identify: files generated by diffusers + PEFT, at the real widths ------------------------------
DIFFUSERS = {   # diffusers class, config (real widths, 1-2 blocks), arch id, variant id or None
    "flux": ("FluxTransformer2DModel", dict(num_layers=1, num_single_layers=1, guidance_embeds=True), "flux", "flux-dev"),
    "sd3": ("SD3Transformer2DModel", dict(num_layers=1, attention_head_dim=64, num_attention_heads=24,
                                          joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                                          out_channels=16, in_channels=16, pos_embed_max_size=96), "sd3", None),
    "sd3.5 medium": ("SD3Transformer2DModel", dict(num_layers=2, attention_head_dim=64, num_attention_heads=24,
                                                   joint_attention_dim=4096, caption_projection_dim=1536,
                                                   pooled_projection_dim=2048, out_channels=16, in_channels=16,
                                                   pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm"),
                     "sd3", "sd35-medium"),
    "wan t2v": ("WanTransformer3DModel", dict(num_layers=1, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
                "wan", None),
    "wan i2v": ("WanTransformer3DModel", dict(num_layers=1, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                              image_dim=1280, added_kv_proj_dim=5120, in_channels=36), "wan", "wan21-i2v"),
    "hunyuan video": ("HunyuanVideoTransformer3DModel", dict(num_layers=1, num_single_layers=1, num_refiner_layers=1),
                      "hunyuan-video", None),
    "hunyuan video 1.5": ("HunyuanVideo15Transformer3DModel", dict(num_layers=1), "hunyuan-video", "hunyuan-video-1.5"),
    "lumina2": ("Lumina2Transformer2DModel", dict(num_layers=1, num_refiner_layers=1), "lumina2", "lumina2"),
    "z-image": ("ZImageTransformer2DModel", dict(n_layers=1, n_refiner_layers=1), "lumina2", "z-image"),
    "qwen-image": ("QwenImageTransformer2DModel", dict(num_layers=1), "qwen-image", None),
    "auraflow": ("AuraFlowTransformer2DModel", dict(num_mmdit_layers=1, num_single_dit_layers=1), "auraflow", "auraflow"),
    "pixart": ("PixArtTransformer2DModel", dict(num_layers=1), "pixart", None),
    "hunyuan-dit": ("HunyuanDiT2DModel", dict(num_layers=2, in_channels=4, patch_size=2, hidden_size=1408,
                                              num_attention_heads=16), "hunyuan-dit", None),
    "hidream": ("HiDreamImageTransformer2DModel", dict(num_layers=1, num_single_layers=1, patch_size=2,
                                                       caption_channels=[4096, 4096], llama_layers=list(range(32))),
                "hidream", "hidream-i1"),
    "ltx-video": ("LTXVideoTransformer3DModel", dict(num_layers=1), "ltxv", "ltxv"),
    "mochi": ("MochiTransformer3DModel", dict(num_layers=1), "mochi", "mochi"),
    "chroma": ("ChromaTransformer2DModel", dict(num_layers=1, num_single_layers=1), "flux", "chroma"),
    "flux.2": ("Flux2Transformer2DModel", dict(num_layers=1, num_single_layers=1), "flux2", "flux2-dev"),
    "cosmos": ("CosmosTransformer3DModel", dict(num_layers=1), "cosmos-predict2", None),
}


def peft_file(model: torch.nn.Module, prefix: str = "transformer.") -> dict[str, tuple[int, ...]]:
    """The keys and shapes diffusers' save_lora_weights writes for a PEFT LoRA on every Linear."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=names), model)
    return {prefix + k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.filterwarnings("ignore::FutureWarning")     # diffusers' own deprecations inside its classes
@pytest.mark.parametrize("case", list(DIFFUSERS))
def test_identify_diffusers_peft_files(case):
    import diffusers

    cls, config, arch_id, variant_id = DIFFUSERS[case]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    ident = arch.identify(peft_file(model))
    assert ident.arch is not None and ident.arch.id == arch_id, ident.why
    assert (ident.variant.id if ident.variant else None) == variant_id, ident.why
    assert ident.naming in ("diffusers", "native") and ident.confidence == "high"


def test_identify_sdxl_unet_peft_file():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20])
    ident = arch.identify(peft_file(unet, "unet."))
    assert (ident.name, ident.naming, ident.width) == ("SDXL", "diffusers", 2048)


# ---- metadata -------------------------------------------------------------------------------------------
def test_metadata_names_the_base_model():
    a, v, text = arch.by_metadata({"ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    assert (a.id, v, text) == ("sdxl", None, "SDXL (ss_base_model_version 'sdxl_base_v1-0', trained on "
                                              "'sd_xl_base_1.0.safetensors')")
    # the model spec names the variant where kohya's version string is shared ("flux1")
    a, v, text = arch.by_metadata({"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-schnell/lora"})
    assert v.id == "flux-schnell" and text == "Flux.1 schnell (modelspec.architecture 'flux-1-schnell/lora')"
    assert arch.by_metadata({"lora_lab.architecture": "wan21-i2v"})[1].id == "wan21-i2v"
    assert arch.by_metadata({"lora_lab.architecture": "stable-diffusion-v1"})[0].id == "sd1"    # older LoRA Lab files
    assert arch.by_metadata({"ss_base_model_version": "wan"})[:2] == (arch.get("wan"), None)     # musubi: all Wan
    assert arch.by_metadata({"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"})[1] \
        is arch.variant("sd15")
    assert arch.by_metadata({"ss_base_model_version": "unknown"}) == (None, None, None)
    # a value no entry knows is still shown
    assert arch.by_metadata({"ss_base_model_version": "pony_v6"}) == (None, None, "ss_base_model_version 'pony_v6'")


def test_metadata_fills_what_keys_leave_open_and_never_overrides_them():
    flux = lora(flat(blocks("double_blocks.{i}.img_attn.qkv", 19, (9216, 3072)), "lora_unet_"))
    ident = arch.identify(flux, {"modelspec.architecture": "flux-1-schnell/lora"})
    assert (ident.name, ident.variant_by, ident.confidence) == ("Flux.1 schnell", "metadata", "high")
    sd15 = lora(flat({LDM_ATTN: (640, 768)}, "lora_unet_"))
    ident = arch.identify(sd15, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert ident.name == "SD1.5" and ident.named_arch.id == "sdxl"
    assert "its metadata names SDXL instead" in ident.why
    # keys of no known family: the metadata is all there is
    ident = arch.identify(lora({"some.custom.layer": (8, 8)}), {"modelspec.architecture": "stable-diffusion-3-5-large/lora"})
    assert (ident.name, ident.confidence, ident.variant_by) == ("SD3.5 Large", "medium", "metadata")


# ---- checkpoints and other non-LoRA files ----------------------------------------------------------------
def test_checkpoints_are_not_loras():
    sd15 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.bias": (320,),
            "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    ident = arch.identify(sd15)
    assert (ident.kind, ident.name, ident.parts) == ("weights", "SD1.5", ("diffusion model", "text encoder", "VAE"))
    flux = {f"double_blocks.{i}.img_attn.qkv.weight": (9216, 3072) for i in range(19)}
    ident = arch.identify(flux)
    assert (ident.kind, ident.name, ident.parts) == ("weights", "Flux.1", ("diffusion model",))
    t5 = {f"encoder.block.{i}.layer.0.SelfAttention.q.weight": (4096, 4096) for i in range(4)}
    assert arch.identify(t5).parts == ("text encoder",) and arch.identify(t5).arch is None
    vae = {"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3)}
    assert arch.identify(vae).parts == ("VAE",)
    assert arch.identify({}).kind == "unknown"


# ---- the report ------------------------------------------------------------------------------------------
def _match(n_matched: int, n_keys: int, unmatched=()) -> Match:
    return Match(file="x.safetensors", unmatched=list(unmatched), n_file_keys=n_keys, n_matched_keys=n_matched)


def test_report_first_line_keeps_its_form_and_gives_the_share():
    assert _match(612, 616).summary().startswith("x.safetensors: 612 of 616 keys match this model (99%)")
    assert _match(616, 616).summary().startswith("x.safetensors: 616 of 616 keys match this model (100%)")
    assert _match(1, 1000).summary().startswith("x.safetensors: 1 of 1000 keys match this model (<1%)")


def test_report_names_the_variant_and_the_layers_only_it_has():
    """A Wan 2.1 I2V LoRA on a Wan 2.2 I2V model: most keys match, the k_img/v_img ones cannot."""
    keys = lora({"diffusion_model." + k: v for k, v in blocks(WAN + "|" + WAN_I2V, 2, (5120, 5120)).items()})
    file = arch.identify(keys)
    model = arch.identify_model("WAN21_T2V", {"in_dim": 36})
    unmatched = [f"diffusion_model.blocks.{i}.cross_attn.{k}_img" for i in range(2) for k in "kv"]
    text = _match(18, 30, unmatched).summary(file, model)
    first, *rest = text.splitlines()
    assert first == "x.safetensors: 18 of 30 keys match this model (60%): a Wan 2.1 I2V 14B LoRA on a Wan 2.2 I2V model"
    assert rest[0].startswith("4 of its modules are the image cross-attention (k_img, v_img) and image embedding "
                              "that only Wan 2.1 I2V models have; this model has no such layers")
    assert rest[1] == "Pick a Wan 2.1 I2V model to use all of it."


def test_mismatch_needs_evidence():
    """Metadata alone, or a variant ComfyUI cannot tell apart, is no mismatch; a size difference is."""
    model = arch.identify_model("Flux", {"guidance_embed": True})
    kontext = arch.identify(lora(flat(blocks("double_blocks.{i}.img_attn.qkv", 2, (9216, 3072)), "lora_unet_")),
                            {"ss_base_model_version": "flux_kontext"})
    assert kontext.name == "Flux.1 Kontext" and mismatch(kontext, model) is None
    small = arch.identify(lora(flat(blocks(WAN, 30, (1536, 1536)), "lora_unet_")))
    big = arch.identify_model("WAN21_T2V", {}, shapes={"blocks.0.self_attn.q.weight": (5120, 5120)})
    assert big.name == "Wan 2.1/2.2 T2V 14B"
    assert mismatch(small, big) == "a Wan 1.3B LoRA on a Wan 2.1/2.2 T2V 14B model"


def test_a_guess_between_families_the_model_fits_whole_is_no_mismatch():
    """A diffusers attention LoRA on a few of the blocks Flux.1 and HunyuanVideo share: identify guesses
    Flux.1 (medium). On a HunyuanVideo model that matches every key the report must not call it a Flux.1
    LoRA; with keys left over, or a guess that is not shared, it still does."""
    file = arch.identify(lora(blocks("transformer.transformer_blocks.{i}.attn.to_q", 2, (3072, 3072)), naming="peft"))
    assert (file.arch.id, file.confidence) == ("flux", "medium")
    model = arch.identify_model("HunyuanVideo", {})
    assert "LoRA on a" not in _match(4, 4).summary(file, model)
    assert "a Flux.1 LoRA on a HunyuanVideo model" in _match(2, 4).summary(file, model)
    wan = arch.identify(lora(flat(blocks(WAN, 30, (1536, 1536)), "lora_unet_")))
    assert wan.confidence == "high" and "LoRA on a" in _match(4, 4).summary(wan, model)


def test_readme_lists_every_family_and_variant():
    """README's "Model families" table is the users' view of the table: keep them in step."""
    import os

    from loralab_testkit.comfy_env import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    rows = {line.split(" | ")[0].strip("| "): line for line in readme.split("### Model families")[1].splitlines()
            if line.startswith("| ") and " | " in line}
    for a in arch.ARCHS:
        assert a.name in rows, a
        assert all(v.name in rows[a.name] for v in a.variants), a
