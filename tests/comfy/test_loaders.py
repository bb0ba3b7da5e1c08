"""LoraLabLoadLoRA / LoraLabLoraLoaderModelOnly inside ComfyUI (in-process, CPU).

Every format is checked against an independent reference (ΔW computed by the test's own writer,
testkit/loralab_testkit/lorafiles.py) and, where ComfyUI core handles the format correctly, against core's
LoraLoader on the same checkpoint, file and strengths.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from loralab_testkit.comfy_env import patched_weights as weights
from loralab_testkit.comfy_env import unet_out as _unet_out
from tolerances import TOL, rel_err

CORE_CORRECT = ("kohya", "kohya_ldm", "diffusers_old", "comfy")
# core drops these keys (current diffusers/PEFT attention names, transformers-5 text encoder names)
# or mis-scales them (PEFT alpha in the header)
CORE_WRONG = ("peft", "peft_alpha", "peft_te5", "peft_metadata")


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def run_loader(pack, sd15, lora_name, sm=1.0, sc=1.0, **kw):
    out = node(pack, "LoraLabLoadLoRA").load(sd15.model, sd15.clip, lora_name, sm, sc, **kw)
    model, clip, report = out["result"]
    assert out["ui"]["text"] == [report]
    return model, clip, report


@pytest.fixture(scope="module")
def base(tiny_sd15):
    return weights(tiny_sd15.model), weights(tiny_sd15.clip)


@pytest.mark.parametrize("scheme", CORE_CORRECT + CORE_WRONG)
def test_every_scheme_matches_reference(pack, tiny_sd15, base, lora_file, scheme):
    spec = lora_file(scheme, few=True)
    model, clip, report = run_loader(pack, tiny_sd15, spec.name, 0.7, -1.3)
    assert f"{len(spec.keys)} of {len(spec.keys)} keys match" in report, report
    got = {**weights(model), **weights(clip)}
    ref = {**base[0], **base[1]}
    deltas = spec.deltas()
    assert deltas, "the test file must change something"
    for key, d in deltas.items():
        s = 0.7 if key.startswith("diffusion_model.") else -1.3
        assert not torch.equal(got[key], ref[key]), key          # not vacuous: the weight moved
        assert rel_err(got[key] - ref[key], s * d) <= 1e-5, key   # ΔW as the file defines it
    untouched = set(got) - set(deltas)
    assert all(torch.equal(got[k], ref[k]) for k in untouched)


@pytest.mark.parametrize("scheme", CORE_CORRECT)
def test_parity_with_core_loader(pack, tiny_sd15, lora_file, scheme):
    import nodes as core_nodes

    spec = lora_file(scheme)
    model, clip, _ = run_loader(pack, tiny_sd15, spec.name, 0.8, 0.6)
    cm, cc = core_nodes.LoraLoader().load_lora(tiny_sd15.model, tiny_sd15.clip, spec.name, 0.8, 0.6)
    ours, core = {**weights(model), **weights(clip)}, {**weights(cm), **weights(cc)}
    deltas = spec.deltas()
    changed = [k for k in core if k in deltas or not torch.equal(core[k], ours[k])]
    assert changed
    worst = max(rel_err(ours[k], core[k]) for k in changed)
    assert worst <= TOL["core_parity_fp32"], worst


@pytest.mark.parametrize("scheme", CORE_WRONG)
def test_core_gets_these_wrong_we_do_not(pack, tiny_sd15, base, lora_file, scheme):
    """Pins why we do not defer to core here: for current diffusers/PEFT names core drops the keys
    (its map only knows `…attn1.processor.to_q`), for transformers-5 text-encoder names it drops the
    text encoder, and for PEFT alpha in the header it assumes scale 1 (here off by ×0.5)."""
    import nodes as core_nodes

    spec = lora_file(scheme, few=True, rank=4, **({"alpha": 2.0} if scheme == "peft_metadata" else {}))
    cm, cc = core_nodes.LoraLoader().load_lora(tiny_sd15.model, tiny_sd15.clip, spec.name, 1.0, 1.0)
    core = {**weights(cm), **weights(cc)}
    ref = {**base[0], **base[1]}
    wrong = [k for k, d in spec.deltas().items() if rel_err(core[k] - ref[k], d) > 1e-3]
    assert wrong, "core now loads this format correctly: move it to CORE_CORRECT"


def test_patch_unpatch_restores_bit_for_bit_and_inputs_untouched(pack, tiny_sd15, base, lora_file):
    spec = lora_file("kohya")
    patches_before = dict(tiny_sd15.model.patches), dict(tiny_sd15.clip.patcher.patches)
    model, clip, _ = run_loader(pack, tiny_sd15, spec.name, 1.0, 1.0)
    for p, ref in ((model, base[0]), (clip.patcher, base[1])):
        p.patch_model()
        assert any(not torch.equal(v, ref[k]) for k, v in p.model.state_dict().items())
        p.unpatch_model()
        now = p.model.state_dict()
        assert all(torch.equal(now[k], ref[k]) for k in ref)
    assert model is not tiny_sd15.model and clip is not tiny_sd15.clip
    assert (dict(tiny_sd15.model.patches), dict(tiny_sd15.clip.patcher.patches)) == patches_before


def test_strength_zero_returns_inputs_unchanged(pack, tiny_sd15, lora_file):
    spec = lora_file("kohya", few=True)
    model, clip, report = run_loader(pack, tiny_sd15, spec.name, 0.0, 0.0)
    assert model is tiny_sd15.model and clip is tiny_sd15.clip
    model, clip, report = run_loader(pack, tiny_sd15, spec.name, 1.0, 0.0)
    assert clip is tiny_sd15.clip and model is not tiny_sd15.model


def test_stack_of_two_is_base_plus_both_deltas(pack, tiny_sd15, base, lora_file):
    a, b = lora_file("kohya", few=True, seed=1), lora_file("peft_metadata", few=True, seed=2, alpha=1.0)
    loader = node(pack, "LoraLabLoadLoRA")
    m1, c1, _ = loader.load(tiny_sd15.model, tiny_sd15.clip, a.name, 0.5, 1.0)["result"]
    m2, c2, _ = node(pack, "LoraLabLoadLoRA").load(m1, c1, b.name, 2.0, 1.0)["result"]
    got = {**weights(m2), **weights(c2)}
    ref = {**base[0], **base[1]}
    da, db = a.deltas(), b.deltas()
    for key in set(da) | set(db):
        s_a = 0.5 if key.startswith("diffusion_model.") else 1.0
        s_b = 2.0 if key.startswith("diffusion_model.") else 1.0
        want = s_a * da.get(key, 0) + s_b * db.get(key, 0)
        assert rel_err(got[key] - ref[key], want) <= 1e-5, key


@pytest.fixture(scope="module")
def fp16_model(tiny_sd15_fp16_file):
    """The UNet held in fp16 (ComfyUI would pick fp32 on the CPU by itself)."""
    from loralab_testkit import checkpoints
    return checkpoints.load_tiny_sd15(tiny_sd15_fp16_file, dtype="fp16", model_dtype=torch.float16)[0]


def test_fp16_model_rounds_once_and_matches_core(pack, fp16_model, lora_file):
    import nodes as core_nodes

    spec = lora_file("kohya", few=True)
    ours = weights(node(pack, "LoraLabLoraLoaderModelOnly").load(fp16_model, spec.name, 0.9)["result"][0])
    core = weights(core_nodes.LoraLoaderModelOnly().load_lora_model_only(fp16_model, spec.name, 0.9)[0])
    for k in spec.deltas("unet"):
        assert ours[k].dtype == torch.float16
        assert rel_err(ours[k].float(), core[k].float()) <= TOL["fp16"], k


def test_model_only_ignores_text_encoder_and_says_so(pack, tiny_sd15, lora_file):
    spec = lora_file("kohya", few=True)
    out = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_sd15.model, spec.name, 1.0)
    model, report = out["result"]
    assert "text-encoder module(s) ignored (no CLIP input)" in report
    assert "not in this model" not in report


def test_subfolders_are_listed_and_loaded(pack, tiny_sd15, lora_file):
    spec = lora_file("kohya", few=True, subfolder="sub")
    names = pack.NODE_CLASS_MAPPINGS["LoraLabLoadLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    assert spec.name == "sub/" + os.path.basename(spec.path) and spec.name in names
    _, _, report = run_loader(pack, tiny_sd15, spec.name)
    assert "keys match" in report


def test_wrong_architecture_is_named(pack, tiny_sd15, comfy):
    """An SDXL LoRA on an SD1.5 model: nothing matches, and the report says why."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(3):
        p = f"lora_unet_input_blocks_4_1_transformer_blocks_{i}_attn2_to_k"
        sd[p + ".lora_down.weight"] = torch.randn(4, 2048, generator=g)
        sd[p + ".lora_up.weight"] = torch.randn(640, 4, generator=g)
        q = f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1"
        sd[q + ".lora_down.weight"] = torch.randn(4, 1280, generator=g)
        sd[q + ".lora_up.weight"] = torch.randn(5120, 4, generator=g)
    save_file(sd, os.path.join(comfy.loras_dir, "sdxl_style.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    model, clip, report = run_loader(pack, tiny_sd15, "sdxl_style.safetensors")
    assert "0 of 12 keys match this model (0%): an SDXL LoRA on an SD1.5 model" in report
    assert "text-context width 2048" in report and "Load it on an SDXL model." in report


# ---- bad input: clear error naming file / key / shapes; nothing mutated, nothing written ----------
def _snapshot(comfy, sd15):
    files = sorted(os.listdir(comfy.loras_dir))
    return files, dict(sd15.model.patches), dict(sd15.clip.patcher.patches)


def test_shape_mismatch_names_key_and_shapes(pack, tiny_sd15, comfy):
    from loralab.lora import LoraError

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({key + ".lora_down.weight": torch.ones(4, 77), key + ".lora_up.weight": torch.ones(320, 4)},
              os.path.join(comfy.loras_dir, "bad_shape.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    before = _snapshot(comfy, tiny_sd15)
    with pytest.raises(LoraError) as e:
        run_loader(pack, tiny_sd15, "bad_shape.safetensors")
    msg = str(e.value)
    assert "bad_shape.safetensors" in msg and key in msg and "(4, 77)" in msg and "(320, 320)" in msg
    assert _snapshot(comfy, tiny_sd15) == before


@pytest.mark.parametrize("name", ["../escape.safetensors", "sub/../../escape.safetensors", "/etc/passwd",
                                  "..\\escape.safetensors"])
def test_lora_name_cannot_leave_loras_folders(pack, tiny_sd15, comfy, name):
    from loralab.lora import LoraError

    outside = os.path.join(os.path.dirname(comfy.loras_dir), "escape.safetensors")
    save_file({"x.lora_up.weight": torch.ones(1, 1), "x.lora_down.weight": torch.ones(1, 1)}, outside)
    with pytest.raises(LoraError, match="inside the loras folders"):
        run_loader(pack, tiny_sd15, name)


def test_corrupt_file_names_file(pack, tiny_sd15, comfy):
    from loralab.lora import LoraError

    path = os.path.join(comfy.loras_dir, "corrupt.safetensors")
    with open(path, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    before = _snapshot(comfy, tiny_sd15)
    with pytest.raises(LoraError, match="corrupt.safetensors"):
        run_loader(pack, tiny_sd15, "corrupt.safetensors")
    assert _snapshot(comfy, tiny_sd15) == before


# ---- mode = "forward pass" (bypass mode) ------------------------------------------------------------
FORWARD = {"mode": "forward pass"}
def test_bypass_equals_merged_and_never_writes_weights(pack, tiny_sd15, base, lora_file):
    spec = lora_file("kohya", parts=("unet",))
    loader = node(pack, "LoraLabLoraLoaderModelOnly")
    merged = loader.load(tiny_sd15.model, spec.name, 0.9)["result"][0]
    bypassed, report = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_sd15.model, spec.name, 0.9,
                                                                     **FORWARD)["result"]
    assert "bypassed (applied in the forward pass)" in report
    assert not bypassed.patches or bypassed.patches.keys() == tiny_sd15.model.patches.keys()
    y_base = _unet_out(tiny_sd15.model)
    y_merged = _unet_out(merged)
    y_bypass = _unet_out(bypassed)
    assert not torch.allclose(y_merged, y_base)                 # the LoRA does something
    assert rel_err(y_bypass, y_merged) <= TOL["bypass_fp32"]
    # while the bypassed clone is loaded, the weights are the original ones
    sd = bypassed.model.state_dict()
    assert all(torch.equal(sd[k], base[0][k]) for k in base[0])


def test_bypass_strength_change_swaps_hooks_without_repatching(pack, tiny_sd15, base, lora_file):
    spec = lora_file("kohya", parts=("unet",), few=True)
    a = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_sd15.model, spec.name, 1.0, **FORWARD)["result"][0]
    b = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_sd15.model, spec.name, 0.25, **FORWARD)["result"][0]
    ya, yb = _unet_out(a), _unet_out(b)
    sd = b.model.state_dict()                                    # b loaded: weights are the originals
    assert all(torch.equal(sd[k], base[0][k]) for k in base[0])
    ya2 = _unet_out(a)
    assert torch.equal(ya, ya2) and not torch.equal(ya, yb)      # a's hooks came back, b's left
    merged_b = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_sd15.model, spec.name, 0.25)["result"][0]
    assert rel_err(yb, _unet_out(merged_b)) <= TOL["bypass_fp32"]


def test_mode_inputs_and_the_legacy_bypass_flag(pack, tiny_sd15, lora_file):
    """`mode` replaced the boolean `bypass` input (which read like ComfyUI's node Bypass). Old API
    prompts still send `bypass`: it is a hidden input, so ComfyUI passes it and no widget shows it."""
    spec = lora_file("kohya", parts=("unet",), few=True)
    for name in ("LoraLabLoadLoRA", "LoraLabLoraLoaderModelOnly", "LoraLabLoraModelLoader"):
        types = node(pack, name).INPUT_TYPES()
        assert "bypass" not in types["optional"] and "bypass" in types["hidden"], name
        assert types["optional"]["mode"][0] == ["merge weights", "forward pass"], name
        assert types["optional"]["on_no_match"][0] == ["warn", "stop the run"], name
    load = node(pack, "LoraLabLoraLoaderModelOnly").load
    cases = {"merged": ({}, "patched"), "mode merge": ({"mode": "merge weights"}, "patched"),
             "mode forward": (FORWARD, "bypassed"), "old prompt bypass=True": ({"bypass": True}, "bypassed"),
             "old prompt bypass=False": ({"bypass": False}, "patched")}
    for case, (kw, how) in cases.items():
        report = load(tiny_sd15.model, spec.name, 1.0, **kw)["result"][1]
        assert f"\n{how} " in report, (case, report)
    with pytest.raises(ValueError, match="mode 'bypass' is not one of"):
        load(tiny_sd15.model, spec.name, 1.0, mode="bypass")


def test_on_no_match_stops_the_run_with_the_report(pack, tiny_sd15, comfy, lora_file):
    """A file none of whose keys fit the model: 'warn' passes the model through with a 0-match
    report; 'stop the run' raises, and the error carries the report (file name, 0 of N)."""
    from loralab.lora import LoraError
    from loralab_testkit import lorafiles

    targets = [lorafiles.Target(f"diffusion_model.label_emb.{i}.0.weight", (32, 16), "unet") for i in range(3)]
    path = os.path.join(comfy.loras_dir, "other_model_for_on_no_match.safetensors")
    lorafiles.write_lora(path, lorafiles.make_lora(targets, rank=2, alpha=1.0), "kohya_ldm")
    comfy.folder_paths.filename_list_cache.clear()
    name = os.path.basename(path)
    model, _, report = run_loader(pack, tiny_sd15, name)
    assert "0 of 9 keys match" in report and not model.patches, report
    with pytest.raises(LoraError, match=r"(?s)other_model_for_on_no_match.*0 of 9 keys match.*stop the run"):
        run_loader(pack, tiny_sd15, name, on_no_match="stop the run")
    sd = lorafiles.state_dict(lorafiles.make_lora(targets, rank=2, alpha=1.0), "kohya_ldm")[0]
    with pytest.raises(LoraError, match="0 of 9 keys match"):
        node(pack, "LoraLabLoraModelLoader").load(tiny_sd15.model, sd, 1.0, on_no_match="stop the run")
    # a file that matches runs as usual with the option on
    spec = lora_file("kohya", few=True)
    model, _, report = run_loader(pack, tiny_sd15, spec.name, on_no_match="stop the run")
    assert model.patches and re.search(r"\b(\d+) of \1 keys match", report), report


# ---- LORA_MODEL interchange with core ----------------------------------------------------------------
def test_lora_model_input_interchanges_with_core(pack, tiny_sd15, base):
    """Core's LoraModelLoader and ours give the same weights for the same LORA_MODEL state dict
    (core's TrainLoraNode emits `diffusion_model.<path>.lora_up.weight / lora_down.weight / alpha`)."""
    from comfy_extras.nodes_train import LoraModelLoader
    from loralab_testkit import lorafiles

    ads = lorafiles.make_lora(lorafiles.pick(lorafiles.unet_targets(tiny_sd15.model)), rank=4, alpha=2.0, seed=5)
    sd, _, _ = lorafiles.state_dict(ads, "comfy")
    ours, report = node(pack, "LoraLabLoraModelLoader").load(tiny_sd15.model, sd, 0.7)["result"]
    assert f"{len(sd)} of {len(sd)} keys match" in report
    core = LoraModelLoader.execute(tiny_sd15.model, sd, 0.7)
    core = core.result[0] if hasattr(core, "result") else core[0]
    a, b = weights(ours), weights(core)
    changed = [k for k in a if not torch.equal(a[k], base[0][k])]
    assert len(changed) == len(ads)
    assert max(rel_err(a[k], b[k]) for k in changed) <= TOL["core_parity_fp32"]
