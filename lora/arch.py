"""The one table of model architectures: what each is called, which ComfyUI model classes it covers,
how to recognise a LoRA (or a checkpoint) made for it, its key maps, block layout and metadata ids.

Two levels, because LoRA compatibility has two levels:

- an :class:`Arch` is a family whose files share layer names and shapes (SD1.x, SDXL, Flux.1, Wan,
  ...): a LoRA for one arch does not fit another. Key patterns, key maps and blocks live here.
- a :class:`Variant` is one concrete model of a family (Wan 2.1 T2V vs I2V, Flux.1 dev vs schnell,
  SDXL vs its refiner): mostly the same layers, a few that only it has. ComfyUI model-config class
  names and the metadata ids (kohya ``ss_base_model_version``, SAI ``modelspec.architecture``) live
  here, since they name concrete models.

Lookups (all pure, no ComfyUI import)::

    from lora import arch
    arch.get("flux")                                  # Arch by id
    arch.variant("wan21-i2v")                         # Variant by id
    arch.by_comfy_class("WAN21_T2V", {"in_dim": 36})  # -> Variant "Wan 2.2 I2V"
    ident = arch.identify(shapes, metadata)           # what a file is: Identity(kind, arch, variant, ...)
    ident.name                                        # "Wan 2.1 I2V 14B"

Key patterns are regular expressions matched (``re.match``, so anchored at the start) against a
module's *flat* name: the key without its factor suffix (``.lora_down.weight``...), without the
wrappers files put around model paths (``lora_unet_``, ``diffusion_model.``, ``transformer.``,
``base_model.model.``, ``lycoris_``...) and with every ``.`` turned into ``_``. So one pattern such as
``double_blocks_\\d+_img_attn_qkv$`` covers ``lora_unet_double_blocks_0_img_attn_qkv`` (kohya),
``diffusion_model.double_blocks.0.img_attn.qkv`` (ComfyUI) and ``transformer.double_blocks.0...``.
Text-encoder modules become ``te_`` / ``te1_`` / ``te2_`` / ``te3_`` + their path.

Adding an architecture is one :class:`Arch` entry in ``ARCHS`` (with at least one Variant); a test
under tests/comfy fails when ComfyUI gains a model class no entry lists.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .blocks import FLUX_DIT, SD_UNET, SDXL_UNET, Blocks   # block layouts for per-block weights (lora/blocks.py)

# ---- constants the entries use --------------------------------------------------------------------
SD_KEYS = "sd_keys"     # key map: lora.sd_keys.model_key_map works without ComfyUI (SD1.x, SD2.x, SDXL)
COMFY = "comfy"         # key map: only ComfyUI's comfy.lora.model_lora_keys_unet/clip know this arch

IMPL_COMFY_UI = "https://github.com/comfyanonymous/ComfyUI"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"


@dataclass(frozen=True)
class Probe:
    """A module whose input width tells architectures (or sizes) apart.

    ``pattern`` matches flat module names; the width is the module's input features (the LoRA
    ``down``/``lora_A`` factor's ``shape[1]``, or a model weight's ``shape[1]``). An arch with
    ``widths`` is ruled out by a file whose probe module has another width.
    """
    pattern: str
    widths: frozenset[int] = frozenset()
    what: str = "width"        # how messages call the width ("context width", "hidden width")


@dataclass(frozen=True, eq=False, repr=False)   # entries are singletons: compared and hashed by identity
class Variant:
    """One concrete model of an architecture.

    ``comfy``    ComfyUI model-config class names (``comfy.supported_models``) that are this model;
                 empty for a model ComfyUI does not tell apart (found from file metadata only).
    ``config``   entries of ComfyUI's ``unet_config`` that pick this variant among those sharing a
                 class (None matches an absent entry); ``prediction`` likewise ("v" / "eps").
    ``marks``    flat-name patterns only files for this variant have (e.g. Wan I2V's ``k_img``), and
                 ``marks_are`` what those layers are, for messages.
    ``widths``   widths of the arch's first probe only this variant has (Z-Image's 3840).
    Metadata ids: ``ss_base_model_version`` (kohya / musubi-tuner), ``modelspec`` (SAI model spec
    ``modelspec.architecture`` without the ``/lora`` suffix), ``implementation``; None where no trainer
    has an established value: :meth:`metadata_ids` then uses the variant id. ``aliases``: other values
    files write for it (older ids, other trainers).
    """
    id: str
    name: str
    comfy: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    prediction: str | None = None
    ss_base_model_version: str | None = None
    modelspec: str | None = None
    implementation: str | None = None
    marks: tuple[str, ...] = ()
    marks_are: str = ""
    widths: frozenset[int] = frozenset()
    aliases: tuple[str, ...] = ()
    arch: Arch = field(default=None, compare=False, repr=False)   # set by the Arch holding it

    def __repr__(self):
        return f"Variant({self.id!r})"

    def metadata_ids(self) -> tuple[str, str, str]:
        """(ss_base_model_version, modelspec architecture, implementation) to write into a file."""
        return (self.ss_base_model_version or self.id, self.modelspec or self.id,
                self.implementation or self.arch.implementation)


@dataclass(frozen=True, eq=False, repr=False)
class Arch:
    """A family of models whose LoRA files share layer names and shapes.

    ``names``     naming scheme ("native", "diffusers", ...) -> flat-name patterns of modules files
                  of this family use; "native" is the original code's naming (ComfyUI's own, and
                  kohya's flattened ``lora_unet_`` form of it).
    ``marks``     patterns only this family's files have (one hit is strong evidence);
    ``excludes``  patterns this family's files never have (one hit rules it out);
    ``probes``    widths that must fit; the first is "the" width ``sizes`` and variant widths refer to;
    ``sizes``     width -> size label users know ("14B").
    ``key_map``   SD_KEYS (our standalone map, ``lora.sd_keys.model_key_map``) or COMFY (ComfyUI's
                  ``comfy.lora.model_lora_keys_unet/clip``; only the nodes layer may call it).
    ``blocks``    the block layout for per-block weights (``lora.blocks.Blocks``); None: none defined.
    """
    id: str
    name: str
    variants: tuple[Variant, ...]
    names: Mapping[str, tuple[str, ...]]
    marks: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    probes: tuple[Probe, ...] = ()
    sizes: Mapping[int, str] = field(default_factory=dict)
    key_map: str = COMFY
    blocks: Blocks | None = None
    implementation: str = IMPL_COMFY_UI

    def __post_init__(self):
        if not self.variants:
            raise ValueError(f"architecture {self.id!r} has no variant")
        for v in self.variants:
            object.__setattr__(v, "arch", self)

    def __repr__(self):
        return f"Arch({self.id!r})"

    def naming(self, flat: str) -> str | None:
        """Which of this family's naming schemes a flat module name uses (None: none)."""
        for scheme, patterns in self.names.items():
            if any(re.match(p, flat) for p in patterns):
                return scheme
        return None

    def width_of(self, shapes: Mapping[str, Any]) -> int | None:
        """The family's width (first probe) read from a file's or a model's keys and shapes."""
        if not self.probes:
            return None
        return _probe_width(self.probes[0], _modules(shapes))


def _v(id, name, comfy=(), **kw) -> Variant:
    return Variant(id, name, (comfy,) if isinstance(comfy, str) else tuple(comfy), **kw)


# ---- the table --------------------------------------------------------------------------------------
# SD-family UNets: ldm (original / ComfyUI) and diffusers module names; text encoders in
# transformers naming. The three families differ in the width of the text context that
# cross-attention reads (attn2 to_k/to_v input): 768, 1024, 2048 (1280 for the SDXL refiner).
_CLIP = (r"te[12]?_(text_model_)?(encoder_layers|embeddings|final_layer_norm)", r"te[12]?_transformer_resblocks_",
         r"te[12]?_text_projection$")    # text encoders (transformers / OpenCLIP names): every naming has them
_LDM = (r"(input_blocks|output_blocks)_\d+_\d+_", r"middle_block_\d+_", r"(time_embed|label_emb_0)_\d+$", r"out_[02]$")
_UNET = {
    "native": _LDM + _CLIP,
    "diffusers": (r"(down_blocks|up_blocks)_\d+_(resnets|attentions|downsamplers|upsamplers)_\d+_",
                  r"mid_block_(resnets|attentions)_\d+_",
                  r"(conv_in|conv_out|conv_norm_out|time_embedding_linear_[12]|add_embedding_linear_[12])$"),
}
_ATTN2 = r".*_attn2_to_[kv]$"
_TE_Q = r"te1?_(text_model_)?encoder_layers_\d+_self_attn_q_proj$"      # the first (or only) text encoder
_SDXL_DEPTH = (r"((input_blocks_\d+|output_blocks_\d+|middle_block)_1|(down_blocks|up_blocks)_\d+_attentions_\d+"
               r"|mid_block_attentions_0)_transformer_blocks_[1-9]")   # >1 transformer per attention: SDXL-only
_TEMPORAL = r"(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_(time_stack|time_mixer|time_pos_embed)"

# diffusers names of a double-stream (MMDiT) block and of Flux's single-stream block
_MMDIT_DIFFUSERS = (r"transformer_blocks_\d+_(attn2?_(to_[qkv]|to_out_0|add_[qkv]_proj|to_add_out)"
                    r"|ff(_context)?_net_(0_proj|2)|norm1(_context)?_linear)$")
_SINGLE_DIFFUSERS = r"single_transformer_blocks_\d+_(attn_to_[qkv]|proj_mlp|proj_out|norm_linear)$"
_FLUX_NATIVE = (r"double_blocks_\d+_(img|txt)_(attn_(qkv|proj)|mlp_[02]|mod_lin)$",
                r"single_blocks_\d+_(linear1(_qkv)?|linear2|modulation_lin)$",
                r"(img_in|txt_in|final_layer_linear|final_layer_adaLN_modulation_1)$",
                r"(time_in|vector_in|guidance_in)_(in|out)_layer$", r"distilled_guidance_layer_")
_HUNYUAN_ONLY = (r".*token_refiner_", r"double_blocks_\d+_(img|txt)_(mlp_fc[12]|mod_linear)$",
                 r"single_blocks_\d+_modulation_linear$", r"double_blocks_(19|[2-9]\d)_",
                 r"single_blocks_(3[89]|[4-9]\d)_", r"txt_in_(input_embedder|t_embedder|c_embedder|individual)")
# Flux.1 has 19 double and 38 single blocks; AuraFlow shares diffusers single-block names and width
_NOT_FLUX1 = _HUNYUAN_ONLY + (r"transformer_blocks_(19|[2-9]\d)_", r"single_transformer_blocks_(3[89]|[4-9]\d)_",
                              r"single_transformer_blocks_\d+_attn_to_qkv_mlp_proj$",
                              r"(double_stream_modulation|single_stream_modulation)_",
                              r"joint_transformer_blocks_", r"single_transformer_blocks_\d+_ff_", r"(double|single)_layers_")
_DIT_WIDTH = r"(double_blocks_\d+_img_attn_qkv|transformer_blocks_\d+_attn_to_q|single_transformer_blocks_\d+_attn_to_q)$"

ARCHS: tuple[Arch, ...] = (
    Arch("sd1", "SD1.5", names=_UNET, key_map=SD_KEYS, implementation=IMPL_DIFFUSERS, blocks=SD_UNET,
         probes=(Probe(_ATTN2, frozenset({768}), "text-context width"),
                 Probe(_TE_Q, frozenset({768}), "text-encoder width")),
         excludes=(_SDXL_DEPTH, _TEMPORAL, r"te2_"),
         variants=(
             _v("sd15", "SD1.5", "SD15", ss_base_model_version="sd_v1", modelspec="stable-diffusion-v1",
                aliases=("sd_v1", "sd1", "sd15", "stable-diffusion-v1-5")),
             _v("sd15-v", "SD1.5 (v-prediction)", "SD15", prediction="v", ss_base_model_version="sd_v1_v",
                modelspec="stable-diffusion-v1"),
             _v("sd15-ip2p", "SD1.5 InstructPix2Pix", "SD15_instructpix2pix"),
             _v("stable-zero123", "Stable Zero123", "Stable_Zero123"),
         )),
    Arch("sd2", "SD2.x", names=_UNET, key_map=SD_KEYS, implementation=IMPL_DIFFUSERS, blocks=SD_UNET,
         probes=(Probe(_ATTN2, frozenset({1024}), "text-context width"),
                 Probe(_TE_Q, frozenset({1024}), "text-encoder width")),
         excludes=(_SDXL_DEPTH, _TEMPORAL, r"te[12]_"),
         variants=(
             _v("sd2", "SD2.x", "SD20", ss_base_model_version="sd_v2", modelspec="stable-diffusion-v2-512",
                aliases=("sd_v2", "stable-diffusion-v2")),
             _v("sd2-v", "SD2.x 768-v", "SD20", prediction="v", ss_base_model_version="sd_v2_v",
                modelspec="stable-diffusion-v2-768-v"),
             _v("sd21-unclip-l", "SD2.1 unCLIP-L", "SD21UnclipL", ss_base_model_version="sd_v2",
                modelspec="stable-diffusion-v2-unclip-l"),
             _v("sd21-unclip-h", "SD2.1 unCLIP-H", "SD21UnclipH", ss_base_model_version="sd_v2",
                modelspec="stable-diffusion-v2-unclip-h"),
             _v("sd-x4-upscaler", "SD x4 Upscaler", "SD_X4Upscaler"),
             _v("lotus-d", "Lotus-D", "LotusD"),
         )),
    Arch("sdxl", "SDXL", names=_UNET, key_map=SD_KEYS, implementation=IMPL_SGM, blocks=SDXL_UNET,
         probes=(Probe(_ATTN2, frozenset({2048, 1280}), "text-context width"),
                 Probe(_TE_Q, frozenset({768}), "text-encoder width")),
         marks=(_SDXL_DEPTH, r"te[12]_"), excludes=(_TEMPORAL,),
         variants=(
             _v("sdxl", "SDXL", "SDXL", ss_base_model_version="sdxl_base_v1-0",
                modelspec="stable-diffusion-xl-v1-base", widths=frozenset({2048}), aliases=("sdxl", "sdxl_base")),
             _v("sdxl-refiner", "SDXL Refiner", "SDXLRefiner", ss_base_model_version="sdxl_refiner_v1-0",
                modelspec="stable-diffusion-xl-v1-refiner", widths=frozenset({1280})),
             _v("ssd-1b", "SSD-1B", "SSD1B", ss_base_model_version="sdxl_base_v1-0",
                modelspec="stable-diffusion-xl-v1-base", widths=frozenset({2048})),
             _v("segmind-vega", "Segmind Vega", "Segmind_Vega", ss_base_model_version="sdxl_base_v1-0",
                modelspec="stable-diffusion-xl-v1-base", widths=frozenset({2048})),
             _v("koala-700m", "KOALA-700M", "KOALA_700M", ss_base_model_version="sdxl_base_v1-0",
                modelspec="stable-diffusion-xl-v1-base", widths=frozenset({2048})),
             _v("koala-1b", "KOALA-1B", "KOALA_1B", ss_base_model_version="sdxl_base_v1-0",
                modelspec="stable-diffusion-xl-v1-base", widths=frozenset({2048})),
             _v("sdxl-ip2p", "SDXL InstructPix2Pix", "SDXL_instructpix2pix", ss_base_model_version="sdxl_base_v1-0",
                modelspec="stable-diffusion-xl-v1-base", widths=frozenset({2048})),
         )),
    Arch("svd", "Stable Video Diffusion", names={"native": _LDM}, marks=(_TEMPORAL,),
         probes=(Probe(_ATTN2, frozenset({1024}), "conditioning width"),),
         variants=(_v("svd", "Stable Video Diffusion", "SVD_img2vid"), _v("sv3d-u", "SV3D-u", "SV3D_u"),
                   _v("sv3d-p", "SV3D-p", "SV3D_p"))),
    Arch("stable-cascade", "Stable Cascade",
         names={"native": (r"(prior_)?(down|up)_blocks_\d+_\d+_(attention_attn_(to_[qkv]|out_proj)|kv_mapper_1"
                           r"|channelwise_[04]|depthwise_0)$",
                           r"(prior_)?(clip_txt_mapper|clip_txt_pooled_mapper|clip_img_mapper|effnet_mapper_[02]"
                           r"|pixels_mapper_[02]|clf_1|embedding_1)$")},
         marks=(r"prior_", r"(down|up)_blocks_\d+_\d+_(attention_attn|kv_mapper|channelwise)"),
         variants=(_v("stable-cascade-c", "Stable Cascade Stage C", "Stable_Cascade_C",
                      marks=(r"(prior_)?clip_(txt|img)_",), marks_are="the CLIP mappers of Stage C"),
                   _v("stable-cascade-b", "Stable Cascade Stage B", "Stable_Cascade_B",
                      marks=(r"(effnet|pixels)_mapper_",), marks_are="the EfficientNet / pixel mappers of Stage B"))),
    Arch("sd3", "SD3", implementation=IMPL_DIFFUSERS,
         names={"native": (r"joint_blocks_\d+_(x_block|context_block)_(attn2?_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1)$",
                           r"(x_embedder_proj|context_embedder|t_embedder_mlp_[02]|y_embedder_mlp_[02]"
                           r"|final_layer_(linear|adaLN_modulation_1))$"),
                "diffusers": (_MMDIT_DIFFUSERS, r"(pos_embed_proj|context_embedder|time_text_embed_\w+|norm_out_linear"
                                                r"|proj_out)$")},
         marks=(r"joint_blocks_",), excludes=(r"single_transformer_blocks_", r"(double|single)_blocks_"),
         probes=(Probe(r"(joint_blocks_\d+_x_block_attn_qkv|transformer_blocks_\d+_attn_to_q)$",
                       frozenset({1536, 2432}), "hidden width"),),
         variants=(
             _v("sd3-medium", "SD3 Medium", "SD3", config={"depth": 24, "qk_norm": None},
                ss_base_model_version="medium", modelspec="stable-diffusion-3-medium", widths=frozenset({1536}),
                aliases=("sd3", "sd3m", "stable-diffusion-3")),
             _v("sd35-medium", "SD3.5 Medium", "SD3", config={"depth": 24, "qk_norm": "rms"},
                ss_base_model_version="5-medium", modelspec="stable-diffusion-3-5-medium", widths=frozenset({1536}),
                marks=(r"(joint_blocks_\d+_x_block|transformer_blocks_\d+)_attn2_",),
                marks_are="the second self-attention (attn2) of SD3.5 Medium's MMDiT-X blocks"),
             _v("sd35-large", "SD3.5 Large", "SD3", config={"depth": 38}, ss_base_model_version="5-large",
                modelspec="stable-diffusion-3-5-large", widths=frozenset({2432})),
         )),
    Arch("flux", "Flux.1", implementation=IMPL_FLUX, blocks=FLUX_DIT,
         names={"native": _FLUX_NATIVE,
                "diffusers": (_MMDIT_DIFFUSERS, _SINGLE_DIFFUSERS,
                              r"(x_embedder|context_embedder|time_text_embed_\w+|norm_out_linear|proj_out)$"),
                "xlabs": (r"(double|single)_blocks_\d+_processor_(qkv|proj)(_lora[12]?)?$",)},
         marks=(r"(double|single)_blocks_\d+_processor_", r"double_blocks_\d+_(img|txt)_mlp_[02]$",
                r"double_blocks_\d+_(img|txt)_mod_lin$", r"single_blocks_\d+_(modulation_lin|linear1_qkv)$",
                r"distilled_guidance_layer_", _SINGLE_DIFFUSERS),
         excludes=_NOT_FLUX1,
         probes=(Probe(_DIT_WIDTH, frozenset({3072}), "hidden width"),),
         variants=(
             _v("flux-dev", "Flux.1 dev", "Flux", config={"guidance_embed": True}, ss_base_model_version="flux1",
                modelspec="flux-1-dev", marks=(r"(guidance_in_|time_text_embed_guidance_embedder_)",),
                marks_are="the guidance embedding, which Flux.1 schnell does not have",
                aliases=("flux1", "flux-1", "flux")),
             _v("flux-schnell", "Flux.1 schnell", "FluxSchnell", ss_base_model_version="flux1",
                modelspec="flux-1-schnell"),
             _v("flux-fill", "Flux.1 Fill", "FluxInpaint", ss_base_model_version="flux1", modelspec="flux-1-dev-fill"),
             _v("flux-kontext", "Flux.1 Kontext", (), ss_base_model_version="flux_kontext",
                modelspec="flux-1-kontext-dev", aliases=("Flux.1-dev",)),   # musubi-tuner writes "Flux.1-dev" for Kontext
             _v("chroma", "Chroma", "Chroma", ss_base_model_version="chroma", modelspec="chroma",
                implementation="https://huggingface.co/lodestones/Chroma",
                marks=(r"distilled_guidance_layer_",), marks_are="Chroma's distilled guidance layer"),
             _v("chroma-radiance", "Chroma Radiance", "ChromaRadiance", marks=(r"nerf_",),
                marks_are="Chroma Radiance's NeRF pixel head",
                implementation="https://huggingface.co/lodestones/Chroma"),
         )),
    Arch("flux2", "Flux.2", implementation="https://github.com/black-forest-labs/flux2",
         names={"native": _FLUX_NATIVE + (r"(double_stream_modulation_(img|txt)|single_stream_modulation)_lin$",),
                "diffusers": (_MMDIT_DIFFUSERS, r"single_transformer_blocks_\d+_attn_(to_qkv_mlp_proj|to_out)$")},
         marks=(r"(double_stream_modulation|single_stream_modulation)_",
                r"single_transformer_blocks_\d+_attn_to_qkv_mlp_proj$"),
         probes=(Probe(_DIT_WIDTH, frozenset({6144}), "hidden width"),),
         variants=(_v("flux2-dev", "Flux.2 dev", "Flux2", ss_base_model_version="flux_2_dev", modelspec="Flux.2-dev"),)),
    Arch("qwen-image", "Qwen-Image", implementation="https://github.com/QwenLM/Qwen-Image",
         names={"native": (r"transformer_blocks_\d+_(attn_(to_[qkv]|to_out_0|add_[qkv]_proj|to_add_out)"
                           r"|(img|txt)_mlp_net_(0_proj|2)|(img|txt)_mod_1)$",
                           r"(img_in|txt_in|time_text_embed_timestep_embedder_linear_[12]|norm_out_linear|proj_out)$")},
         marks=(r"transformer_blocks_\d+_(img|txt)_(mlp|mod)_",),
         probes=(Probe(r"transformer_blocks_\d+_attn_to_q$", frozenset({3072}), "hidden width"),),
         variants=(
             _v("qwen-image", "Qwen-Image", "QwenImage", ss_base_model_version="qwen_image", modelspec="Qwen-Image"),
             _v("qwen-image-edit", "Qwen-Image-Edit", (), ss_base_model_version="qwen_image_edit",
                modelspec="Qwen-Image-Edit", aliases=("Qwen-Image-Edit-Plus", "Qwen-Image-Edit-2511")),
         )),
    Arch("hunyuan-video", "HunyuanVideo", implementation="https://github.com/Tencent/HunyuanVideo",
         names={"native": (r"double_blocks_\d+_(img|txt)_(attn_(qkv|proj)|mlp_(fc[12]|[02])|mod_(linear|lin))$",
                           r"single_blocks_\d+_(linear[12]|modulation_(linear|lin))$", r"txt_in_",
                           r"(img_in_proj|time_in_\w+|vector_in_\w+|guidance_in_\w+|final_layer_\w+|vision_in_\w+)$"),
                "diffusers": (_MMDIT_DIFFUSERS, _SINGLE_DIFFUSERS, r"context_embedder_",
                              r"(x_embedder_proj|time_text_embed_\w+|norm_out_linear|proj_out)$")},
         marks=_HUNYUAN_ONLY,
         probes=(Probe(_DIT_WIDTH, frozenset({3072, 2048, 3584}), "hidden width"),),
         variants=(
             _v("hunyuan-video", "HunyuanVideo", "HunyuanVideo", ss_base_model_version="hunyuan_video",
                modelspec="hunyuan-video", widths=frozenset({3072})),
             _v("hunyuan-video-i2v", "HunyuanVideo I2V", "HunyuanVideoI2V", ss_base_model_version="hunyuan_video",
                modelspec="hunyuan-video", widths=frozenset({3072})),
             _v("skyreels-i2v", "SkyReels V1 I2V", "HunyuanVideoSkyreelsI2V", ss_base_model_version="hunyuan_video",
                modelspec="hunyuan-video", widths=frozenset({3072})),
             _v("hunyuan-video-1.5", "HunyuanVideo 1.5", "HunyuanVideo15", ss_base_model_version="hunyuan_video_1_5",
                modelspec="hunyuan-video-1.5", implementation="https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5",
                widths=frozenset({2048})),
             _v("hunyuan-video-1.5-sr", "HunyuanVideo 1.5 SR", "HunyuanVideo15_SR_Distilled",
                implementation="https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5"),
             _v("hunyuan-image-2.1", "HunyuanImage 2.1", "HunyuanImage21", ss_base_model_version="hunyuan-image-2.1",
                modelspec="hunyuan-image-2.1", implementation="https://github.com/Tencent-Hunyuan/HunyuanImage-2.1",
                widths=frozenset({3584})),
             _v("hunyuan-image-2.1-refiner", "HunyuanImage 2.1 Refiner", "HunyuanImage21Refiner",
                implementation="https://github.com/Tencent-Hunyuan/HunyuanImage-2.1"),
         )),
    Arch("wan", "Wan", implementation="https://github.com/Wan-Video/Wan2.1",
         names={"native": (r"blocks_\d+_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img)$", r"blocks_\d+_ffn_[02]$",
                           r"(text_embedding|time_embedding)_[02]$", r"time_projection_1$", r"img_emb_proj_[1-4]$",
                           r"(head_head|patch_embedding)$", r"vace_(blocks_\d+_|patch_embedding)", r"control_adapter_"),
                "diffusers": (r"blocks_\d+_(attn[12]_(to_[qkv]|to_out_0|add_[kv]_proj)|ffn_net_(0_proj|2))$",
                              r"condition_embedder_", r"(patch_embedding|proj_out)$")},
         marks=(r"blocks_\d+_(self_attn|cross_attn)_(q|k|v|o)$", r"blocks_\d+_ffn_(net_)?",
                r"blocks_\d+_attn2_add_[kv]_proj$", r"condition_embedder_", r"time_projection_1$"),
         probes=(Probe(r"blocks_\d+_(self_attn_q|attn1_to_q)$", frozenset({1536, 5120, 3072}), "hidden width"),),
         sizes={1536: "1.3B", 5120: "14B", 3072: "5B"},
         variants=(
             _v("wan-t2v", "Wan 2.1/2.2 T2V", "WAN21_T2V", ss_base_model_version="wan", modelspec="wan2.1"),
             _v("wan22-i2v", "Wan 2.2 I2V", "WAN21_T2V", config={"in_dim": 36}, ss_base_model_version="wan",
                modelspec="wan2.1", implementation="https://github.com/Wan-Video/Wan2.2"),
             _v("wan21-i2v", "Wan 2.1 I2V", "WAN21_I2V", ss_base_model_version="wan", modelspec="wan2.1",
                marks=(r"blocks_\d+_cross_attn_[kv]_img$", r"img_emb_", r"blocks_\d+_attn2_add_[kv]_proj$",
                       r"condition_embedder_image_embedder_"),
                marks_are="the image cross-attention (k_img, v_img) and image embedding that only Wan 2.1 I2V "
                          "models have"),
             _v("wan21-fun-control", "Wan 2.1 Fun Control", "WAN21_FunControl2V", ss_base_model_version="wan",
                modelspec="wan2.1"),
             _v("wan21-vace", "Wan 2.1 VACE", "WAN21_Vace", ss_base_model_version="wan", modelspec="wan2.1",
                marks=(r"vace_",), marks_are="the VACE blocks"),
             _v("wan21-camera", "Wan 2.1 Fun Camera", "WAN21_Camera", ss_base_model_version="wan", modelspec="wan2.1"),
             _v("wan22-camera", "Wan 2.2 Fun Camera", "WAN22_Camera", ss_base_model_version="wan", modelspec="wan2.1",
                implementation="https://github.com/Wan-Video/Wan2.2"),
             _v("humo", "HuMo", "WAN21_HuMo", marks=(r"audio_proj_",), marks_are="HuMo's audio projection"),
             _v("wan22-s2v", "Wan 2.2 S2V", "WAN22_S2V", implementation="https://github.com/Wan-Video/Wan2.2",
                marks=(r"(casual_audio_encoder|audio_injector)_",), marks_are="the audio layers of Wan 2.2 S2V"),
             _v("wan22-animate", "Wan 2.2 Animate", "WAN22_Animate", implementation="https://github.com/Wan-Video/Wan2.2",
                marks=(r"(face_adapter|motion_encoder|face_encoder)_",), marks_are="the face/motion layers of Wan 2.2 Animate"),
             _v("wan22-ti2v-5b", "Wan 2.2 TI2V 5B", "WAN22_T2V", ss_base_model_version="wan", modelspec="wan2.2-5b",
                implementation="https://github.com/Wan-Video/Wan2.2", widths=frozenset({3072})),
         )),
    Arch("lumina2", "Lumina 2", implementation="https://github.com/Alpha-VLLM/Lumina-Image-2.0",
         names={"native": (r"(layers|context_refiner|noise_refiner)_\d+_(attention_(qkv|out|to_[qkv]|to_out_0)"
                           r"|feed_forward_w[123]|adaLN_modulation_0)$",
                           r"(x_embedder|cap_embedder_1|t_embedder_mlp_[02]|final_layer_(linear|adaLN_modulation_1))$"),
                "diffusers": (r"(layers|context_refiner|noise_refiner)_\d+_(attn_(to_[qkv]|to_out_0)"
                              r"|feed_forward_linear_[123]|norm1_linear)$",
                              r"(time_caption_embed_\w+|norm_out_linear_[12])$")},
         marks=(r"(context_refiner|noise_refiner)_\d+_", r"layers_\d+_attention_(qkv|out)$",
                r"layers_\d+_feed_forward_w[123]$"),
         excludes=(r"ref_image_",),
         probes=(Probe(r"layers_\d+_(attention_qkv|attention_to_q|attn_to_q)$", frozenset({2304, 3840}),
                       "hidden width"),),
         variants=(
             _v("lumina2", "Lumina Image 2.0", "Lumina2", ss_base_model_version="lumina2", modelspec="lumina-2",
                widths=frozenset({2304})),
             _v("z-image", "Z-Image", "ZImage", ss_base_model_version="z_image", modelspec="Z-Image",
                implementation="https://github.com/Tongyi-MAI/Z-Image", widths=frozenset({3840})),
         )),
    Arch("omnigen2", "OmniGen2",
         names={"diffusers": (r"(layers|context_refiner|noise_refiner|ref_image_refiner)_\d+_(attn_(to_[qkv]|to_out_0)"
                              r"|feed_forward_linear_[123]|norm1_linear)$",
                              r"(x_embedder|ref_image_patch_embedder|time_caption_embed_\w+|norm_out_linear_[12])$")},
         marks=(r"ref_image_(refiner|patch_embedder)",),
         probes=(Probe(r"layers_\d+_attn_to_q$", frozenset({2520}), "hidden width"),),
         variants=(_v("omnigen2", "OmniGen2", "Omnigen2"),)),
    Arch("hidream", "HiDream",
         names={"native": (r"(double_stream_blocks|single_stream_blocks)_\d+_block_",
                           r"(t_embedder_\w+|p_embedder_\w+|x_embedder_proj|final_layer_\w+|caption_projection_\d+_\w+)$")},
         marks=(r"(double|single)_stream_blocks_",),
         variants=(_v("hidream-i1", "HiDream-I1", "HiDream"),)),
    Arch("auraflow", "AuraFlow",
         names={"native": (r"(double_layers|single_layers)_\d+_",
                           r"(cond_seq_linear|init_x_linear|t_embedder_mlp_[02]|modF_1|final_linear)$"),
                "diffusers": (r"joint_transformer_blocks_\d+_",
                              r"single_transformer_blocks_\d+_(attn_(to_[qkv]|to_out_0)|ff_(linear_[12]|out_projection)"
                              r"|norm1_linear)$",
                              r"(context_embedder|pos_embed_proj|time_step_proj_linear_[12]|norm_out_linear|proj_out)$")},
         marks=(r"(double|single)_layers_", r"joint_transformer_blocks_",
                r"single_transformer_blocks_\d+_ff_(linear_[12]|out_projection)$"),
         variants=(_v("auraflow", "AuraFlow", "AuraFlow"),)),
    Arch("pixart", "PixArt",
         names={"native": (r"blocks_\d+_(attn_(qkv|proj)|cross_attn_(q_linear|kv_linear|proj)|mlp_fc[12])$",
                           r"(x_embedder_proj|t_embedder_mlp_[02]|t_block_1|y_embedder_y_proj_fc[12]|final_layer_linear"
                           r"|csize_embedder_\w+|ar_embedder_\w+)$"),
                "diffusers": (r"transformer_blocks_\d+_(attn[12]_(to_[qkv]|to_out_0)|ff_net_(0_proj|2))$",
                              r"(adaln_single_\w+|caption_projection_linear_[12]|pos_embed_proj|proj_out)$")},
         marks=(r"blocks_\d+_cross_attn_(q|kv)_linear$", r"blocks_\d+_attn_qkv$", r"t_block_1$"),
         probes=(Probe(r"(blocks_\d+_attn_qkv|transformer_blocks_\d+_attn1_to_q)$", frozenset({1152}), "hidden width"),),
         variants=(_v("pixart-alpha", "PixArt-α", "PixArtAlpha"), _v("pixart-sigma", "PixArt-Σ", "PixArtSigma"))),
    Arch("hunyuan-dit", "Hunyuan-DiT",
         names={"native": (r"blocks_\d+_(attn1_(Wqkv|out_proj)|attn2_(q_proj|kv_proj|out_proj)|mlp_fc[12]"
                           r"|default_modulation_1|skip_linear)$",
                           r"(x_embedder_proj|t_embedder_mlp_[02]|mlp_t5_[02]|extra_embedder_[02]|final_layer_\w+)$"),
                "diffusers": (r"blocks_\d+_(attn[12]_(to_[qkv]|to_out_0)|ff_net_(0_proj|2)|norm1_linear|skip_linear)$",)},
         marks=(r"blocks_\d+_attn1_Wqkv$", r"blocks_\d+_attn2_kv_proj$", r"blocks_\d+_default_modulation_",
                r"blocks_\d+_skip_linear$", r"mlp_t5_"),
         probes=(Probe(r"blocks_\d+_(attn1_Wqkv|attn1_to_q)$", frozenset({1408}), "hidden width"),),
         variants=(_v("hunyuan-dit", "Hunyuan-DiT 1.1/1.2", "HunyuanDiT"),
                   _v("hunyuan-dit-1.0", "Hunyuan-DiT 1.0", "HunyuanDiT1"))),
    Arch("ltxv", "LTX-Video",
         names={"native": (r"transformer_blocks_\d+_(attn[12]_(to_[qkv]|to_out_0)|ff_net_(0_proj|2))$",
                           r"(patchify_proj|proj_in|adaln_single_\w+|time_embed_emb_\w+|time_embed_linear"
                           r"|caption_projection_linear_[12]|proj_out)$")},
         excludes=(r"transformer_blocks_\d+_norm[123]_linear_[12]$", r"time_embed_(t_embedder|pooler)_",
                   r"transformer_blocks_\d+_attn1_add_"),
         probes=(Probe(r"transformer_blocks_\d+_attn1_to_q$", frozenset({2048, 4096}), "hidden width"),),
         sizes={2048: "2B", 4096: "13B"},
         variants=(_v("ltxv", "LTX-Video", "LTXV"),)),
    Arch("mochi", "Mochi",
         names={"native": (r"blocks_\d+_(attn_(qkv_[xy]|proj_[xy])|mlp_[xy]_w[12]|mod_[xy])$",
                           r"(t_embedder_\w+|t5_y_embedder_\w+|t5_yproj|x_embedder_proj|final_layer_\w+)$"),
                "diffusers": (r"transformer_blocks_\d+_(attn1_(to_[qkv]|to_out_0|add_[qkv]_proj|to_add_out)"
                              r"|ff(_context)?_net_(0_proj|2)|norm1_linear|norm1_context_linear(_1)?)$",
                              r"(time_embed_\w+|patch_embed_proj|norm_out_linear|proj_out)$")},
         marks=(r"blocks_\d+_(attn_(qkv|proj)_[xy]|mod_[xy]|mlp_[xy]_)", r"time_embed_pooler_",
                r"transformer_blocks_\d+_attn1_(add_[qkv]_proj|to_add_out)$"),
         variants=(_v("mochi", "Mochi 1 preview", "GenmoMochi"),)),
    Arch("cosmos", "Cosmos 1",
         names={"native": (r"blocks_block\d+_blocks_\d+_block_", r"(x_embedder_proj_1|t_embedder_1_\w+|final_layer_\w+)$")},
         marks=(r"blocks_block\d+_",),
         variants=(_v("cosmos-t2v", "Cosmos-1 Text2World", "CosmosT2V"),
                   _v("cosmos-i2v", "Cosmos-1 Video2World", "CosmosI2V"))),
    Arch("cosmos-predict2", "Cosmos Predict2",
         names={"native": (r"blocks_\d+_(self_attn|cross_attn)_(q_proj|k_proj|v_proj|output_proj)$",
                           r"blocks_\d+_mlp_layer[12]$", r"blocks_\d+_adaln_modulation_(self_attn|cross_attn|mlp)_[12]$"),
                "diffusers": (r"transformer_blocks_\d+_(attn[12]_(to_[qkv]|to_out_0)|ff_net_(0_proj|2)"
                              r"|norm[123]_linear_[12])$", r"(time_embed_t_embedder_\w+|patch_embed_proj|norm_out_linear_[12]"
                                                          r"|proj_out)$")},
         marks=(r"blocks_\d+_adaln_modulation_", r"blocks_\d+_mlp_layer[12]$", r"transformer_blocks_\d+_norm[123]_linear_[12]$",
                r"time_embed_t_embedder_"),
         variants=(_v("cosmos-predict2-t2i", "Cosmos Predict2 Text2Image", "CosmosT2IPredict2"),
                   _v("cosmos-predict2-i2v", "Cosmos Predict2 Video2World", "CosmosI2VPredict2"))),
    Arch("hunyuan3d", "Hunyuan3D",
         names={"native": (r"(double_blocks|single_blocks)_\d+_", r"(latent_in|cond_in)$")},
         marks=(r"(latent_in|cond_in)$",),
         probes=(Probe(r"double_blocks_\d+_img_attn_qkv$", frozenset({1024}), "hidden width"),),
         variants=(_v("hunyuan3d-2", "Hunyuan3D 2.0", "Hunyuan3Dv2"), _v("hunyuan3d-2-mini", "Hunyuan3D 2.0 mini",
                   "Hunyuan3Dv2mini"), _v("hunyuan3d-2.1", "Hunyuan3D 2.1", "Hunyuan3Dv2_1"))),
    Arch("ace-step", "ACE-Step",
         names={"native": (r"transformer_blocks_\d+_(attn|cross_attn)_(to_[qkv]|to_out_0|add_[qkv]_proj|to_add_out)$",
                           r"transformer_blocks_\d+_ff_(inverted_conv|depthwise_conv|point_wise_conv)_",
                           r"(lyric_encoder|lyric_proj|speaker_embedder|genre_embedder|t_block|final_layer)_")},
         marks=(r"transformer_blocks_\d+_cross_attn_", r"lyric_(encoder|proj)", r"transformer_blocks_\d+_ff_inverted_conv"),
         variants=(_v("ace-step", "ACE-Step", "ACEStep"),)),
    Arch("stable-audio", "Stable Audio",
         names={"native": (r"layers_\d+_(self_attn_(to_qkv|to_out)|cross_attn_(to_q|to_kv|to_out)|ff_ff_(0_proj|2))$",)},
         marks=(r"layers_\d+_(self_attn_to_qkv|cross_attn_to_kv)$",),
         variants=(_v("stable-audio-open", "Stable Audio Open 1.0", "StableAudio"),)),
)


# ---- lookups ----------------------------------------------------------------------------------------
_BY_ID = {a.id: a for a in ARCHS}
_VARIANTS = {v.id: v for a in ARCHS for v in a.variants}


def get(arch_id: str) -> Arch:
    """The architecture with this id; KeyError names the known ids."""
    try:
        return _BY_ID[arch_id]
    except KeyError:
        raise KeyError(f"no architecture {arch_id!r}; known: {', '.join(_BY_ID)}") from None


def variant(variant_id: str) -> Variant:
    """The variant with this id; KeyError names the known ids."""
    try:
        return _VARIANTS[variant_id]
    except KeyError:
        raise KeyError(f"no variant {variant_id!r}; known: {', '.join(_VARIANTS)}") from None


def comfy_classes() -> set[str]:
    """Every ComfyUI model-config class name some variant lists."""
    return {c for a in ARCHS for v in a.variants for c in v.comfy}


def by_comfy_class(name: str, config: Mapping[str, Any] | None = None,
                   prediction: str | None = None) -> Variant | None:
    """The variant a ComfyUI model-config class is (``type(model.model.model_config).__name__``).

    Where several variants share a class, ``config`` (the model's ``unet_config``) and ``prediction``
    ("eps", "v", "flow") pick the one whose ``config`` / ``prediction`` entries all match, the most
    specific first; a variant without such entries is the default, and when none fits (no config
    given) the first variant listing the class. None for a class no entry lists.
    """
    config = config or {}
    listing = [v for a in ARCHS for v in a.variants if name in v.comfy]
    best, best_n = None, -1
    for v in listing:
        if any(config.get(k) != want for k, want in v.config.items()):
            continue
        if v.prediction is not None and v.prediction != prediction:
            continue
        n = len(v.config) + (v.prediction is not None)
        if n > best_n:
            best, best_n = v, n
    return best or (listing[0] if listing else None)


def by_metadata(metadata: Mapping[str, str] | None) -> tuple[Arch | None, Variant | None, str | None]:
    """(arch, variant, description) from what a file's header says about its base model.

    Reads ``lora_lab.architecture`` (our variant id; a modelspec id in older files),
    ``modelspec.architecture`` (its ``/lora`` suffix ignored) and kohya's ``ss_base_model_version``,
    compared case-insensitively with every variant's id, metadata ids and aliases. A value several
    variants write (kohya's "flux1", musubi's "wan") names only the arch: variant None.
    ``ss_sd_model_name`` (the base model's file name) only goes into the description, e.g.
    ``"SDXL (ss_base_model_version 'sdxl_base_v1-0', trained on 'sd_xl_base_1.0.safetensors')"``.
    """
    metadata = metadata or {}
    best = None          # (arch, variant or None, "key 'value'")
    unknown = None       # a value no entry knows, to show the user anyway
    for key in ("lora_lab.architecture", "modelspec.architecture", "ss_base_model_version"):
        raw = (metadata.get(key) or "").strip()
        if not raw or raw.lower() in ("unknown", "none"):
            continue
        value = raw if key == "ss_base_model_version" else raw.split("/")[0]
        owners = _metadata_index().get(value.lower(), [])
        if len({v.arch for v in owners}) != 1:
            unknown = unknown or f"{key} {raw!r}"
            continue
        found = (owners[0].arch, owners[0] if len(owners) == 1 else None, f"{key} {raw!r}")
        if best is None or (best[1] is None and found[1] is not None and found[0] is best[0]):
            best = found
    said = [best[2]] if best else [unknown] if unknown else []
    model_name = (metadata.get("ss_sd_model_name") or "").strip()
    if model_name:
        said.append(f"trained on {model_name!r}")
    if not said:
        return None, None, None
    arch, var = (best[0], best[1]) if best else (None, None)
    named = var.name if var is not None else arch.name if arch is not None else None
    return arch, var, f"{named} ({', '.join(said)})" if named else ", ".join(said)


_INDEX: dict[str, list[Variant]] = {}


def _metadata_index() -> dict[str, list[Variant]]:
    """lower-cased id / metadata value -> the variants that write it."""
    if not _INDEX:
        for a in ARCHS:
            for v in a.variants:
                for value in dict.fromkeys(x.lower() for x in (v.id, v.modelspec, v.ss_base_model_version, *v.aliases)
                                           if x):
                    _INDEX.setdefault(value, []).append(v)
    return _INDEX


# ---- what a file (or a model) is --------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """What :func:`identify` found.

    ``kind``        "lora" (adapter factors), "weights" (plain model weights: a checkpoint, a bare
                    diffusion model, text encoder or VAE; not a LoRA), "model" (a loaded model, from
                    :func:`identify_model`) or "unknown" (no keys to go by).
    ``arch``/``variant``  None when unknown; ``variant`` is None when the keys fit several variants.
    ``confidence``  "high" (keys only this family has, or a width that tells it apart, or metadata
                    agreeing with the keys), "medium" (names several families share, or metadata
                    alone), "low" (only a few modules fit), "none".
    ``why``         the evidence, for messages.
    ``variant_by``  how the variant was found: "keys", "width", "only", "metadata", "config" or None.
    ``width``       the first probe's width, when seen; ``naming`` the arch naming scheme the keys use.
    ``parts``       for kind "weights": which parts the file holds ("diffusion model", "text encoder", "VAE").
    ``named_arch``/``named_variant``/``named_text``  what the file's metadata names (see :func:`by_metadata`).
    ``marked``      flat module names that hit ``variant.marks`` (the layers only that variant has).
    """
    kind: str
    arch: Arch | None = None
    variant: Variant | None = None
    confidence: str = "none"
    why: str = ""
    variant_by: str | None = None
    width: int | None = None
    naming: str | None = None
    parts: tuple[str, ...] = ()
    named_arch: Arch | None = None
    named_variant: Variant | None = None
    named_text: str | None = None
    marked: tuple[str, ...] = ()

    @property
    def name(self) -> str | None:
        """Display name: the variant's (else the arch's), with the size label when the width gives one."""
        if self.arch is None:
            return None
        base = self.variant.name if self.variant is not None else self.arch.name
        size = self.arch.sizes.get(self.width) if self.width is not None else None
        return f"{base} {size}" if size and size not in base else base


def a(name: str) -> str:
    """'an SDXL', 'a Wan 2.1 I2V': the article as the name is read aloud (acronyms by letter)."""
    spoken_vowel = name[:1] in "AEIO" or (len(name) > 1 and name[0] in "FHLMNRSX" and name[1].isupper())
    return f"{'an' if spoken_vowel else 'a'} {name}"


def identify(shapes: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Identity:
    """What a file is and which architecture (and variant) it was made for.

    ``shapes``: key -> shape (a tuple, ``torch.Size``) or tensor, for every tensor of the file (or
    of a model's state dict: a model's own weights identify as kind "weights"). ``metadata``: the
    safetensors header. Keys decide; metadata fills a variant the keys leave open and is reported
    (``named``) either way. Works on any naming identify understands; never raises on odd keys.
    """
    modules = _modules(shapes)
    kind = "unknown"
    if modules.n_factor:
        kind = "lora"
    elif modules.n_plain >= 2 and modules.n_plain * 2 >= len(shapes):
        kind = "weights"
    named_arch, named_variant, named_text = by_metadata(metadata)
    named = dict(named_arch=named_arch, named_variant=named_variant, named_text=named_text)
    found = _best_arch(modules) if modules else None
    parts = _parts(shapes, found is not None) if kind == "weights" else ()
    if found is None:
        if named_arch is not None:
            return Identity(kind, named_arch, named_variant, "medium", "by its metadata; its keys fit no known family",
                            "metadata" if named_variant else None, parts=parts, **named)
        return Identity(kind, parts=parts, why="no key names of a known architecture" if modules else "no keys",
                        **named)
    arch, evidence, confidence, width = found
    v, by, marked = _pick_variant(arch, modules, width)
    why = evidence
    if named_arch is arch:
        if v is None and named_variant is not None:
            v, by = named_variant, "metadata"
        if confidence == "medium":
            confidence = "high"
        why += "; its metadata agrees"
    elif named_arch is not None:
        why += f"; its metadata names {named_arch.name} instead"
    naming = Counter(n for n in (arch.naming(m) for m in modules) if n).most_common(1)
    return Identity(kind, arch, v, confidence, why, by, width, naming[0][0] if naming else None, parts,
                    marked=marked, **named)


def identify_model(comfy_class: str, config: Mapping[str, Any] | None = None, prediction: str | None = None,
                   shapes: Mapping[str, Any] | None = None) -> Identity:
    """A loaded ComfyUI model as an Identity (kind "model"): its variant from the model-config class
    (see :func:`by_comfy_class`), its width (for the size label) from ``shapes`` when given."""
    v = by_comfy_class(comfy_class, config, prediction)
    if v is None:
        return Identity("model", why=f"ComfyUI model class {comfy_class} is in no LoRA Lab architecture entry")
    width = v.arch.width_of(shapes) if shapes is not None else None
    return Identity("model", v.arch, v, "high", f"ComfyUI model class {comfy_class}", "config", width)


# ---- internals --------------------------------------------------------------------------------------
# file prefix -> flat text-encoder prefix (first match wins, so longer prefixes come first)
_TE_HEADS = (
    ("lora_te1_", "te1_"), ("lora_te2_", "te2_"), ("lora_te3_", "te3_"), ("lora_te_", "te_"),
    ("text_encoder_2.", "te2_"), ("text_encoder.", "te_"), ("te1.", "te1_"), ("te2.", "te2_"),
    ("cond_stage_model.transformer.", "te_"), ("cond_stage_model.model.", "te_"),
    ("conditioner.embedders.0.transformer.", "te1_"), ("conditioner.embedders.0.model.", "te2_"),
    ("conditioner.embedders.1.model.", "te2_"),
    ("text_encoders.clip_l.transformer.", "te1_"), ("text_encoders.clip_g.transformer.", "te2_"),
    ("text_encoders.", "te_"), ("clip_l.transformer.", "te1_"), ("clip_g.transformer.", "te2_"),
)
# wrappers around a diffusion model's module path; stripped repeatedly
_WRAPPERS = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
             "lora_unet_", "lora_transformer_", "lycoris_", "oft_unet_")
_FACTOR_LIKE = re.compile(r"lora|(^|[._])(up|down)\.weight$|\.alpha$|hada_|lokr_|oft_|\.diff(_b)?$|dora_scale")
_UNKNOWN_SUFFIX = re.compile(r"\.(up|down)\.weight$|\.(weight|bias)$")
_WIDTH_ROLES = {"down", "hada_w1_b", "hada_w2_b", "diff"}


def flat_name(module: str) -> str:
    """A module path from any file or model naming -> the flat name the table's patterns match."""
    if module.startswith("lora_prior_unet_"):
        return "prior_" + module[len("lora_prior_unet_"):].replace(".", "_")
    for head, te in _TE_HEADS:
        if module.startswith(head):
            return te + module[len(head):].replace(".", "_")
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if module.startswith(w):
                module, changed = module[len(w):], True
    return module.lstrip("_").replace(".", "_")


def _shape(value) -> tuple[int, ...]:
    """A tensor's, a torch.Size's or a tuple's shape; () for anything else (a state dict's extra state)."""
    try:
        return tuple(int(n) for n in getattr(value, "shape", value))
    except (TypeError, ValueError):
        return ()


class _Modules(dict):
    """flat module name -> input width (None if unknown), with ``original`` (flat -> the module name
    as the file spells it) and the counts of factor keys and plain weight/bias keys."""
    original: dict[str, str]
    n_factor: int
    n_plain: int


def _modules(shapes: Mapping[str, Any]) -> _Modules:
    from .adapters import split_key

    modules = _Modules()
    modules.original = {}
    n_factor = n_plain = 0
    for key, value in shapes.items():
        shape = _shape(value)
        hit = split_key(key)
        generic = hit is not None and any(hit[2] in owner.generic_roles for owner in hit[1])
        if hit is not None and not generic:
            module, role, factor = hit[0], hit[2], True
        else:
            factor = bool(_FACTOR_LIKE.search(key))
            module = _UNKNOWN_SUFFIX.sub("", key)
            role = "down" if factor and key.endswith(".down.weight") else ("plain" if not factor else "")
            if not factor and key.endswith((".weight", ".bias")):
                n_plain += 1
        n_factor += factor
        width = shape[1] if len(shape) >= 2 and (role in _WIDTH_ROLES or (role == "plain" and key.endswith(".weight"))) \
            else None
        flat = flat_name(module)
        if modules.get(flat) is None:
            modules[flat] = width
        modules.original.setdefault(flat, module)
    modules.n_factor, modules.n_plain = n_factor, n_plain
    return modules


def _probe_width(probe: Probe, modules: Mapping[str, int | None]) -> int | None:
    widths = Counter(w for m, w in modules.items() if w is not None and re.match(probe.pattern, m))
    return widths.most_common(1)[0][0] if widths else None


def _hits(patterns: Iterable[str], modules: Iterable[str]) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return [m for m in modules if any(c.match(m) for c in compiled)]


def _best_arch(modules: _Modules):
    """(arch, evidence text, confidence, width) of the family the modules fit best, or None."""
    scored = []
    for arch in ARCHS:
        hits = _hits([p for ps in arch.names.values() for p in ps], modules)
        marks = _hits(arch.marks, modules)
        if not hits and not marks:
            continue
        if _hits(arch.excludes, modules):
            continue
        probes_ok, width, ruled_out = 0, None, False
        for i, probe in enumerate(arch.probes):
            w = _probe_width(probe, modules)
            if w is None:
                continue
            if probe.widths and w not in probe.widths:
                ruled_out = True
                break
            probes_ok += 1
            if i == 0:
                width = w
        if ruled_out:
            continue
        scored.append(((len(set(hits) | set(marks)), len(marks), probes_ok), arch, marks, width))
    if not scored:
        return None
    # the family whose names explain most modules; then the one with more of its own marks, then
    # with more widths confirmed; ties go to the earlier (more common) entry
    scored.sort(key=lambda s: s[0], reverse=True)
    (n, n_marks, probes_ok), arch, marks, width = scored[0]
    runner_up = scored[1] if len(scored) > 1 else None
    parts = [f"{arch.probes[0].what} {width}"] if width is not None and arch.probes else []
    example = next((m for p in arch.marks for m in marks if re.match(p, m)), None) or \
        next(m for m in modules if arch.naming(m))
    parts.append(f"keys like {modules.original[example]}")
    if n < len(modules):
        parts.append(f"{n} of {len(modules)} modules fit")
    told_apart = runner_up is None or runner_up[0][0] < n or runner_up[0][1:] < (n_marks, probes_ok)
    if (n_marks or probes_ok) and told_apart:
        confidence = "high"
    elif n * 2 >= len(modules):
        confidence = "medium"
        if not told_apart:
            parts.append(f"names {runner_up[1].name} files have too")
    else:
        confidence = "low"
    return arch, "; ".join(parts), confidence, width


def _pick_variant(arch: Arch, modules: Mapping[str, int | None], width: int | None):
    """(variant, how it was found, the modules that showed it) for a file of ``arch``."""
    marked = [(v, _hits(v.marks, modules)) for v in arch.variants if v.marks]
    marked = [(v, m) for v, m in marked if m]
    if len(marked) == 1:
        return marked[0][0], "keys", tuple(marked[0][1])
    if width is not None:
        fit = [v for v in arch.variants if width in v.widths]
        if len(fit) == 1:
            return fit[0], "width", ()
    if len(arch.variants) == 1:
        return arch.variants[0], "only", ()
    return None, None, ()


_TE_PARTS = ("cond_stage_model.", "conditioner.", "text_encoders.", "text_model.", "text_encoder.",
             "text_encoder_2.", "clip_l.", "clip_g.", "t5xxl.", "encoder.block.", "encoder.final_layer_norm",
             "shared.", "model.embed_tokens", "model.layers.", "model.norm.", "embed_tokens", "lm_head")
_VAE_PARTS = ("first_stage_model.", "vae.", "encoder.", "decoder.", "post_quant_conv", "quant_conv")


def _parts(shapes: Mapping[str, Any], has_arch_modules: bool) -> tuple[str, ...]:
    """Which parts of a model a file of plain weights holds, from its key prefixes."""
    found = set()
    for k in shapes:
        if k.startswith(_TE_PARTS):
            found.add("text encoder")
        elif k.startswith(_VAE_PARTS):
            found.add("VAE")
        elif has_arch_modules:
            found.add("diffusion model")
    return tuple(p for p in ("diffusion model", "text encoder", "VAE") if p in found)
