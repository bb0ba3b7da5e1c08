"""Every LoRA-family algorithm through the loader node inside ComfyUI.

For formats ComfyUI core computes the producer's way, our weights equal core LoraLoader's
(parity tolerance). For the ones it gets wrong or drops, our weights equal our standalone core
(`lora.patch.apply`, which tests/unit/test_adapters_reference.py pins to lycoris-lora and PEFT)
and core's differ: each such case says what core does.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from loralab_testkit.comfy_env import patched_weights as patched
from tolerances import TOL, rel_err
from unit import test_adapters_matrix as M

STRENGTH = 0.7
# (ldm module path in the tiny SD1.5, kind)
TARGETS = [("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "linear"),
           ("input_blocks.1.0.in_layers.2", "conv")]


def oft_blocks(shape, rnd, alpha=0.0):
    return {".oft_blocks": rnd(shape[0] // 4, 4, 4), ".alpha": torch.tensor(alpha)}


def boft_blocks(shape, rnd):
    return {".oft_blocks": rnd(2, shape[0] // 2, 2, 2), ".alpha": torch.tensor(0.0)}


def oft_diag_rot(shape, rnd):
    q = rnd(shape[0] // 4, 4, 4)
    q = q - q.mT
    eye = torch.eye(4)
    return {".oft_diag": torch.linalg.solve(eye - q, eye + q, left=False)}


CORE_AGREES = ["lora", "locon_tucker", "loha", "loha_tucker", "lokr_w2_lowrank", "lokr_w1_lowrank",
               "lokr_both_lowrank", "lokr_full", "glora", "diff"]
CORE_DIFFERS = {
    "lora_dora_out": "DoRA: core normalises by the unpatched weight and blends the result by strength",
    "lora_dora_in": "DoRA: core blends the rescaled weight by strength, LyCORIS blends the rescale",
    "lora_peft_dora": "PEFT DoRA: core does not load lora_magnitude_vector (plain LoRA)",
    "ia3_out": "IA3: core drops the keys",
    "ia3_in": "IA3 on_input: core drops the keys",
    "lokr_t1": "LoKr lokr_t1: core cannot load the module",
    "lokr_t2": "LoKr Tucker lokr_t2 on a conv: core's patch raises 'mat2 must be a matrix'",
    "glora_bm": "GLoRA bm: core cannot load the module",
    "oft": "OFT: core applies strength twice",
    "oft_constrained": "OFT: core constrains by alpha instead of alpha·out, strength twice",
    "oft_diag": "legacy oft_diag: core drops the keys",
    "boft": "BOFT: core scales the interpolated result by strength again",
    "set_weight": "set_weight: core replaces the weight whatever the strength; we blend W + s·(S − W)",
}
CUSTOM = {"oft": oft_blocks, "oft_constrained": lambda s, r: oft_blocks(s, r, 0.05), "oft_diag": oft_diag_rot,
          "boft": boft_blocks}


def case_file(comfy, tiny_sd15, name: str) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    msd = tiny_sd15.model.model.state_dict()
    sd, keys = {}, []
    for path, kind in TARGETS:
        case = M.BY_NAME[name]
        if kind not in case.kinds:
            continue
        key = f"diffusion_model.{path}.weight"
        shape = tuple(msd[key].shape)
        prefix = "lora_unet_" + path.replace(".", "_")
        if name in CUSTOM:
            g = M.gen(f"{name}/{kind}")
            part = {prefix + s: t for s, t in CUSTOM[name](shape, lambda *sh, g=g: torch.randn(*sh, generator=g) * 0.3).items()}
        else:
            part = M.state_dict(case, kind, prefix, shape)
            if name == "lokr_both_lowrank" and kind == "conv":   # LyCORIS stores conv w2_b flattened
                part[prefix + ".lokr_w2_b"] = part[prefix + ".lokr_w2_b"].flatten(1)
        sd.update(part)
        keys.append(key if case.target == "weight" else key[: -len("weight")] + "bias")
    file = f"algo_{name}.safetensors"
    save_file(sd, os.path.join(comfy.loras_dir, file))
    comfy.folder_paths.filename_list_cache.clear()
    return file, sd, keys


def ours_and_core(pack, tiny_sd15, file, **kw):
    import nodes as core_nodes

    out = pack.NODE_CLASS_MAPPINGS["LoraLabLoraLoaderModelOnly"]().load(tiny_sd15.model, file, STRENGTH, **kw)
    model, report = out["result"]
    core = core_nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_sd15.model, file, STRENGTH)[0]
    try:
        core_w = patched(core)
    except RuntimeError as e:    # core crashes on some formats; the caller decides if that is expected
        core_w = e
    return patched(model), core_w, report


def standalone(tiny_sd15, sd, options=None):
    from loralab.lora import apply, parse

    w = {k: v.clone() for k, v in tiny_sd15.model.model.state_dict().items()}
    parsed = parse(sd, file="case", options=options)
    changes = []
    for prefix, adapters in parsed.modules.items():
        key = "diffusion_model." + prefix.removeprefix("lora_unet_")
        for path, _ in TARGETS:
            if prefix == "lora_unet_" + path.replace(".", "_"):
                key = f"diffusion_model.{path}.weight"
        for a in adapters:
            changes.append((key if a.target == "weight" else key[: -len("weight")] + "bias", a, STRENGTH))
    apply(w, changes)
    return w


@pytest.mark.parametrize("name", CORE_AGREES)
def test_formats_core_gets_right_match_core(pack, tiny_sd15, comfy, name):
    file, sd, keys = case_file(comfy, tiny_sd15, name)
    ours, core, report = ours_and_core(pack, tiny_sd15, file)
    assert f"{len(sd)} of {len(sd)} keys match" in report, report
    base = tiny_sd15.model.model.state_dict()
    for k in keys:
        assert not torch.equal(ours[k], base[k]), k
        assert rel_err(ours[k], core[k]) <= TOL["core_parity_fp32"], (k, rel_err(ours[k], core[k]))


@pytest.mark.parametrize("name", sorted(CORE_DIFFERS))
def test_formats_core_gets_wrong_follow_the_producer(pack, tiny_sd15, comfy, name):
    file, sd, keys = case_file(comfy, tiny_sd15, name)
    ours, core, report = ours_and_core(pack, tiny_sd15, file)
    assert f"{len(sd)} of {len(sd)} keys match" in report, report
    want = standalone(tiny_sd15, sd)
    base = tiny_sd15.model.model.state_dict()
    for k in keys:
        assert not torch.equal(ours[k], base[k]), k
        assert rel_err(ours[k] - base[k], want[k] - base[k]) <= TOL["fp32"] * 10, k
    if isinstance(core, Exception):
        return
    worst = max(rel_err(core[k] - base[k], want[k] - base[k]) for k in keys)
    assert worst > 1e-4, f"core now agrees for {name} ({CORE_DIFFERS[name]}): move it to CORE_AGREES"


@pytest.mark.parametrize("name", ["oft", "loha", "loha_tucker", "ia3_out", "lokr_t1", "lokr_w2_lowrank",
                                  "lora_dora_out", "lora_dora_in", "lora_peft_dora"])
def test_bypass_equals_merged_in_comfy(pack, tiny_sd15, comfy, name, monkeypatch):
    """One forward of the whole UNet: bypass hooks ≈ merged weights, for non-LoRA algorithms too,
    each through its own forward route (the ΔW-building fallback is never taken for these)."""
    import comfy.model_management as mm
    from loralab.lora import bypass as bypass_mode

    built = []
    fallback = bypass_mode.weight_delta
    monkeypatch.setattr(bypass_mode, "weight_delta", lambda *a: built.append(a[0].prefix) or fallback(*a))
    file, sd, keys = case_file(comfy, tiny_sd15, name)
    N = pack.NODE_CLASS_MAPPINGS["LoraLabLoraLoaderModelOnly"]
    merged = N().load(tiny_sd15.model, file, STRENGTH)["result"][0]
    bypassed = N().load(tiny_sd15.model, file, STRENGTH, bypass=True)["result"][0]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    outs = []
    for p in (tiny_sd15.model, merged, bypassed):
        mm.load_models_gpu([p])
        with torch.no_grad():
            outs.append(p.model.apply_model(x, torch.tensor([400.0]), c_crossattn=ctx).clone())
    y0, ym, yb = outs
    assert not torch.allclose(ym, y0)
    assert rel_err(yb, ym) <= TOL["bypass_fp32"]
    assert not built, f"bypass built ΔW for {built}"


def test_dyn_rank_input_selects_dylora_rank(pack, tiny_sd15, comfy):
    file, sd, keys = case_file(comfy, tiny_sd15, "dylora")
    full, _, _ = ours_and_core(pack, tiny_sd15, file)
    low, _, report = ours_and_core(pack, tiny_sd15, file, dyn_rank=2)
    want = standalone(tiny_sd15, sd, options={"dyn_rank": 2})
    for k in keys:
        assert rel_err(low[k], want[k]) <= TOL["fp32"] and not torch.equal(low[k], full[k])
