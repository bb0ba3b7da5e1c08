"""Which layers a LoRA trains, per model family, as the family's reference trainer selects them.

The selection and the saved names are what kohya sd-scripts / musubi-tuner write for the family, so
their tools and ComfyUI core read our files (core loads every ``lora_unet_<module path>`` name of a
model's own modules, and the diffusers names of SD UNets):

    family            trained by default (module names as in the file, without ``lora_unet_``)
    SD1.x/SD2.x/SDXL  the Linear and 1x1-conv layers of the attention blocks (kohya networks/lora.py:
                      Transformer2DModel): proj_in/out, attn1/attn2 q/k/v/out, ff; with conv_dim (LoCon)
                      also the ResNet blocks and up/down samplers (ResnetBlock2D, Down/Upsample2D):
                      3x3 convs at conv_dim, their Linear/1x1 layers at the rank. Diffusers module names.
    SD3               every Linear of the joint blocks' context and x blocks (kohya lora_sd3.py:
                      SingleDiTBlock; attention, MLP, adaLN modulation)
    Flux.1            every Linear of the double and single blocks (kohya lora_flux.py: DoubleStreamBlock,
                      SingleStreamBlock; attention, MLP, modulation)
    HunyuanVideo      double and single blocks, without the modulation (musubi-tuner networks/lora.py)
    Wan               the attention and FFN Linears of the blocks (musubi-tuner lora_wan.py:
                      WanAttentionBlock, without embeddings, norms and head)
    Lumina 2          layers, noise/context refiners and the final layer (kohya lora_lumina.py:
                      JointTransformerBlock, FinalLayer)
    Z-Image           the main layers' attention and feed-forward (musubi-tuner lora_zimage.py: no
                      modulation, no refiners)
    Qwen-Image        the transformer blocks without img_mod/txt_mod (musubi-tuner lora_qwen_image.py)
    HiDream           every Linear of the double and single stream blocks (diffusion-pipe)
    any other family  the Linear layers of the model's repeated blocks (its top-level ModuleLists)

Patterns match a module's *flat* name (its path with ``.`` turned into ``_``), anchored at the start
(``re.match``); ``exclude`` patterns anywhere in it (``re.search``, as musubi-tuner's regexes).
Nothing here imports ComfyUI: the nodes layer hands in the model and, for SD UNets, the map from
ComfyUI's module paths to diffusers' (``comfy.utils.unet_to_diffusers``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn

from .adapters import layer_op
from .errors import TrainingError

PREFIX = "lora_unet_"


@dataclass(frozen=True)
class Layers:
    """A family's layer selection (see the module docstring)."""
    blocks: tuple[str, ...]              # flat-name patterns of the layers trained by default
    exclude: tuple[str, ...] = ()        # never trained (re.search)
    conv_blocks: tuple[str, ...] = ()    # added with conv_dim > 0 (kohya's LoCon)
    source: str = ""                     # the trainer this follows, for docs and messages

    def kind(self, flat: str, module: nn.Module, conv: bool) -> str | None:
        """"rank" (trained at the rank), "conv" (a kxk conv, trained at conv_dim) or None (not trained).
        In the blocks, Linear and 1x1 convs train at the rank and kxk convs only with ``conv``; in
        the conv blocks (``conv`` only), kxk convs at conv_dim and the rest at the rank (kohya)."""
        op = layer_op(module)
        if op is None or any(re.search(p, flat) for p in self.exclude):
            return None
        kxk = op.conv_dims > 0 and any(k != 1 for k in op.shape[2:])
        if _matches(self.blocks, flat) or (conv and _matches(self.conv_blocks, flat)):
            if not kxk:
                return "rank"
            return "conv" if conv else None
        return None


def _matches(patterns, flat: str) -> bool:
    return any(re.match(p, flat) for p in patterns)


_SD_UNET = Layers(
    blocks=(r"(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_\d+_",),
    conv_blocks=(r"(down_blocks_\d+|up_blocks_\d+|mid_block)_resnets_\d+_",
                 r"(down_blocks_\d+_downsamplers|up_blocks_\d+_upsamplers)_0_conv$"),
    source="kohya sd-scripts networks/lora.py (Transformer2DModel; with conv_dim also ResnetBlock2D, "
           "Downsample2D, Upsample2D)")
_DOUBLE_SINGLE = r"(double|single)_blocks_\d+_"

# by lora.arch variant id first, then by arch id
RULES: dict[str, Layers] = {
    "sd1": _SD_UNET, "sd2": _SD_UNET, "sdxl": _SD_UNET,
    "sd3": Layers((r"joint_blocks_\d+_(context_block|x_block)_",),
                  source="kohya sd-scripts networks/lora_sd3.py (SingleDiTBlock)"),
    "flux": Layers((_DOUBLE_SINGLE,), source="kohya sd-scripts networks/lora_flux.py (DoubleStreamBlock, "
                                             "SingleStreamBlock)"),
    "hunyuan-video": Layers((_DOUBLE_SINGLE,), exclude=(r"(img_mod|txt_mod|modulation)",),
                            source="musubi-tuner networks/lora.py (MMDoubleStreamBlock, MMSingleStreamBlock; "
                                   "modulation excluded)"),
    "wan": Layers((r"blocks_\d+_",),
                  exclude=(r"(patch_embedding|text_embedding|time_embedding|time_projection|norm|head)",),
                  source="musubi-tuner networks/lora_wan.py (WanAttentionBlock)"),
    "lumina2": Layers((r"(layers|noise_refiner|context_refiner)_\d+_", r"final_layer_"),
                      source="kohya sd-scripts networks/lora_lumina.py (JointTransformerBlock, FinalLayer)"),
    "z-image": Layers((r"layers_\d+_",), exclude=(r"(_modulation|_refiner)",),
                      source="musubi-tuner networks/lora_zimage.py (ZImageTransformerBlock; modulation and "
                             "refiners excluded)"),
    "qwen-image": Layers((r"transformer_blocks_\d+_",), exclude=(r"_mod_",),
                         source="musubi-tuner networks/lora_qwen_image.py (QwenImageTransformerBlock; img_mod / "
                                "txt_mod excluded)"),
    "hidream": Layers((r"(double|single)_stream_blocks_\d+_",),
                      source="diffusion-pipe (HiDreamImageTransformerBlock, HiDreamImageSingleTransformerBlock)"),
}


def rule_for(variant_id: str | None, arch_id: str | None) -> Layers | None:
    """The family's selection, or None (then: the Linear layers of the model's repeated blocks)."""
    for key in (variant_id, arch_id):
        if key in RULES:
            return RULES[key]
    return None


def repeated_blocks(root: nn.Module) -> Layers:
    """The fallback: the Linear (and 1x1 conv) layers inside the model's top-level ModuleLists."""
    lists = [n for n, m in root.named_children() if isinstance(m, nn.ModuleList)]
    return Layers(tuple(rf"{re.escape(n)}_\d+_" for n in lists), source="the model's repeated blocks")


def find_layers(root: nn.Module, rule: Layers | None, *, conv: bool = False,
                rename: Mapping[str, str] | Callable[[str], str | None] | None = None) -> dict[str, tuple[nn.Module, str]]:
    """{file module name ("lora_unet_<flat>"): (layer, "rank" | "conv")} of the layers ``rule``
    trains in ``root`` (a diffusion model), in model order.

    ``rename``: module path -> the path the file names it by (SD UNets: diffusers'); a path it
    does not know is not trained. ``conv``: include the conv blocks (kohya's conv_dim > 0).
    """
    rule = rule or repeated_blocks(root)
    to_name = rename.get if isinstance(rename, Mapping) else rename
    out: dict[str, tuple[nn.Module, str]] = {}
    for path, module in root.named_modules():
        if not path or layer_op(module) is None:
            continue
        named = to_name(path) if to_name is not None else path
        if named is None:
            continue
        flat = named.replace(".", "_")
        kind = rule.kind(flat, module, conv)
        if kind is None:
            continue
        name = PREFIX + flat
        if name in out:
            raise TrainingError(f"two layers map to the same file name {name!r}")
        out[name] = (module, kind)
    return out


__all__ = ["Layers", "PREFIX", "RULES", "find_layers", "repeated_blocks", "rule_for"]
