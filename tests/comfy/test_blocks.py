"""Block weights on the real block layouts (issue 7, part 3).

Key -> block on the FULL-SIZE SD1.5 and SDXL layouts (every UNet and text-encoder weight, built on the
meta device) in every naming a file uses: each module's block is read off its ldm path here
(``input_blocks.N`` -> INnn), independently of lora/blocks.py, and the file names come from the
standalone key map (lora/sd_keys.py), which knows nothing of blocks. Then the numbers: a random
weight per block on the tiny SDXL (SDXL's own 9 + 1 + 9 blocks) and on the tiny Flux (kohya and
diffusers names): every tensor moves by strength × its block's weight × ΔW.
"""
from __future__ import annotations

import os
import random

import pytest

from tolerances import rel_err


def independent_block(key: str) -> str | None:
    """The block of a checkpoint / ComfyUI key (``model.diffusion_model.input_blocks.4.1…``,
    ``cond_stage_model…``, ``clip_l.…``), from its path alone."""
    if key.startswith(("cond_stage_model.", "conditioner.", "clip_l.", "clip_g.", "clip_h.", "t5xxl.")):
        return "BASE"
    path = key.split("diffusion_model.", 1)[-1].split(".")
    if path[0] in ("input_blocks", "output_blocks"):
        return f"{'IN' if path[0] == 'input_blocks' else 'OUT'}{int(path[1]):02d}"
    return "M00" if path[0] == "middle_block" else None


def _check_layout(family: str, shapes: dict, expect_blocks: set[str]):
    from loralab.lora import arch
    from loralab.lora.sd_keys import model_key_map

    layout = arch.get(family).blocks
    km = model_key_map(list(shapes), shapes)
    weights = [k for k in shapes if k.endswith(".weight") and len(shapes[k]) in (2, 4)]
    seen = set()
    for key in weights:
        want = independent_block(key)
        seen.add(want)
        assert layout.block(key) == want, key
    namings = {"kohya": 0, "diffusers": 0}
    for name, target in km.items():
        key = target if isinstance(target, str) else target[0]
        if key not in weights:
            continue
        assert layout.block(name) == independent_block(key), (name, key)
        namings["diffusers" if "down_blocks" in name or "up_blocks" in name or "mid_block" in name else "kohya"] += 1
    assert seen == expect_blocks, sorted(seen, key=str)
    assert all(namings.values()), namings            # both namings were checked
    return len(weights), len(km)


def test_full_sd15_layout_every_module_in_every_naming(comfy):
    from loralab.lora.blocks import SD_UNET
    from loralab_testkit import checkpoints

    shapes = checkpoints._shapes(full=True, vae=False)
    n_weights, n_names = _check_layout("sd1", shapes, set(SD_UNET.names) | {None})
    assert n_weights > 350 and n_names > 2000, (n_weights, n_names)


def test_full_sdxl_layout_every_module_in_every_naming(comfy):
    from loralab.lora.blocks import SDXL_UNET
    from loralab_testkit import families as F

    shapes = {k: v for k, v in F._sdxl_internal_shapes().items() if not k.startswith("first_stage_model.")}
    n_weights, _ = _check_layout("sdxl", shapes, set(SDXL_UNET.names) | {None})
    assert n_weights > 1000, n_weights


def test_flux_every_double_and_single_block_by_name():
    from loralab.lora import arch

    layout = arch.get("flux").blocks
    for i in range(19):
        for name in (f"lora_unet_double_blocks_{i}_img_attn_qkv", f"diffusion_model.double_blocks.{i}.txt_mlp.0.weight",
                     f"transformer.transformer_blocks.{i}.attn.to_q", f"double_blocks.{i}.processor.qkv_lora1"):
            assert layout.block(name) == f"D{i:02d}", name
    for i in range(38):
        for name in (f"lora_unet_single_blocks_{i}_linear1", f"transformer.single_transformer_blocks.{i}.proj_out",
                     (f"diffusion_model.single_blocks.{i}.linear1.weight", (0, 0, 128))):
            assert layout.block(name) == f"S{i:02d}", name
    for name in ("lora_unet_img_in", "lora_unet_final_layer_linear", "transformer.x_embedder", "lora_te1_text_model_"
                 "encoder_layers_0_mlp_fc1", "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert layout.block(name) == "BASE", name


def _patched(patcher, keys) -> dict:
    patcher.patch_model()
    try:
        sd = patcher.model.state_dict()
        return {k: sd[k].detach().clone() for k in keys}
    finally:
        patcher.unpatch_model()


def _random_vector(names, seed):
    rng = random.Random(seed)
    return {n: round(rng.uniform(-1.5, 1.5), 3) for n in names}


def test_sdxl_block_weights_numbers(pack, tiny_sdxl, comfy):
    """A LoCon over a spread of the tiny SDXL's UNet (every block of its layout), a random weight per
    block (20-value form), strength 0.9."""
    from loralab.lora.blocks import SDXL_UNET
    from loralab.nodes import comfy_model
    from loralab_testkit import lorafiles

    targets = lorafiles.unet_targets(tiny_sdxl.model, kinds=("linear", "conv"))
    by_block: dict = {}
    for t in targets:
        by_block.setdefault(independent_block(t.key), []).append(t)
    chosen = [t for ts in by_block.values() for t in ts[:2]]
    assert set(by_block) == set(SDXL_UNET.names) - {"BASE"} | {None}, sorted(by_block, key=str)
    path = os.path.join(comfy.loras_dir, "sdxl_blocks_test.safetensors")
    spec = lorafiles.write_lora(path, lorafiles.make_lora(chosen, rank=4, alpha=2.0), "kohya", root=comfy.loras_dir)
    w = _random_vector(SDXL_UNET.names, 3)
    item = comfy_model.Item(path, 0.9, 0.0, blocks=",".join(str(w[n]) for n in SDXL_UNET.names))
    model, _, report = comfy_model.load_loras(tiny_sdxl.model, None, [item])
    keys = spec.changed_keys()
    base, got = _patched(tiny_sdxl.model, keys), _patched(model, keys)
    for key in keys:
        block = independent_block(key)
        s = 0.9 * (1.0 if block is None else w[block])
        assert rel_err(got[key] - base[key], s * spec.delta(key)) <= 1e-5, (key, block)
    assert "block weights" in report.text


@pytest.mark.parametrize("producer", ["kohya", "peft"])
def test_flux_block_weights_numbers(pack, tiny_flux, family_lora, producer):
    """kohya (BFL module names) and PEFT (diffusers names, q/k/v slices of fused weights) files on the
    tiny Flux: double block i moves by D_i, single block j by S_j, everything else by BASE."""
    from loralab.lora.blocks import FLUX_DIT
    from loralab.nodes import comfy_model
    from loralab_testkit import family_loras as L

    f = family_lora(tiny_flux, producer)
    w = _random_vector(FLUX_DIT.names, 5)
    item = comfy_model.Item(f.path, 0.8, 0.0, blocks=",".join(str(w[n]) for n in FLUX_DIT.names))
    model, _, _ = comfy_model.load_loras(tiny_flux.model, None, [item])
    deltas = L.full_deltas(f, L.model_shapes(tiny_flux))
    base, got = _patched(tiny_flux.model, deltas), _patched(model, deltas)
    seen = set()
    for key, delta in deltas.items():
        path = key.split("diffusion_model.", 1)[-1].split(".")
        block = {"double_blocks": "D", "single_blocks": "S"}.get(path[0])
        block = f"{block}{int(path[1]):02d}" if block else "BASE"
        seen.add(block[0])
        assert rel_err(got[key] - base[key], 0.8 * w[block] * delta) <= 1e-5, (key, block)
    assert seen == {"D", "S", "B"}, seen
