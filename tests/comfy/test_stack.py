"""LoRA Stack and Prompt with LoRA tags (issue 7) inside ComfyUI (in-process, CPU, tiny SD1.5).

The numbers: a stack (rows, a LORA_STACK input, prompt tags) gives the weights of core's LoraLoader
chained with the same strengths; the prompt node's CONDITIONING is CLIPTextEncode of its text output
on its CLIP output; LORA_STACK round-trips; block weights equal an independent per-block computation.
The bad inputs of the issue each raise an error naming the row or tag, and leave the inputs as they were.
"""
from __future__ import annotations

import json
import os
import random
import re
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab_testkit.comfy_env import patched_weights as weights
from tolerances import TOL, rel_err

FORWARD = {"mode": "forward pass"}


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def run_stack(pack, sd15, rows=(), lora_stack=None, **kw):
    out = node(pack, "LoraLabLoraStack").apply(sd15.model, sd15.clip, lora_stack=lora_stack,
                                                rows=json.dumps(list(rows)), **kw)
    model, clip, stack, words, report = out["result"]
    assert out["ui"] == {"text": [report], "loralab_triggers": [words]}
    return model, clip, stack, words, report


def core_chain(sd15, loras):
    """Core LoraLoader, one node per (lora_name, strength_model, strength_clip), chained."""
    import nodes as core_nodes

    m, c = sd15.model, sd15.clip
    for name, sm, sc in loras:
        m, c = core_nodes.LoraLoader().load_lora(m, c, name, sm, sc)
    return m, c


def assert_weights_match(ours, core, base, tol=TOL["core_parity_fp32"]):
    """Every tensor within ``tol`` of core's, and some of them moved (the comparison is not vacuous)."""
    moved = 0
    for k, ref in core.items():
        assert rel_err(ours[k], ref) <= tol, k
        moved += not torch.equal(ref, base[k])
    assert moved, "the LoRAs changed nothing"


@pytest.fixture(scope="module")
def base(tiny_sd15):
    return {**weights(tiny_sd15.model), **weights(tiny_sd15.clip)}


@pytest.fixture
def three(lora_file):
    """Three kohya LoCon files over the same spread of UNet and CLIP layers (so each tensor gets three
    patches), one of them in a subfolder."""
    return [lora_file("kohya", few=True, seed=s, subfolder="stack" if s == 1 else "") for s in range(3)]


def test_stack_equals_chained_core_loaders(pack, tiny_sd15, base, three):
    a, b, c = three
    rows = [{"lora": b.name, "strength": 0.8},
            {"on": False, "lora": a.name, "strength": 5.0},                       # off: skipped
            {"lora": c.name, "strength_model": -0.6, "strength_clip": 1.3}]
    model, clip, stack, _, report = run_stack(pack, tiny_sd15, rows, lora_stack=[(a.name, 1.1, 0.4)])
    assert stack == [(a.name, 1.1, 0.4), (b.name, 0.8, 0.8), (c.name, -0.6, 1.3)]
    assert report.startswith("3 LoRA(s) on one clone, merged") and "row 3: " in report, report
    ours = {**weights(model), **weights(clip)}
    cm, cc = core_chain(tiny_sd15, stack)
    assert_weights_match(ours, {**weights(cm), **weights(cc)}, base)


def test_all_rows_go_on_one_clone(pack, tiny_sd15, three):
    """One clone of MODEL and one of CLIP carry every row's patches (not N chained clones); in forward-pass
    mode one injection carries every row's hooks."""
    import comfy.model_patcher
    import comfy.sd

    rows = [{"lora": s.name, "strength": 0.5 + i} for i, s in enumerate(three)]
    with mock.patch.object(comfy.model_patcher.ModelPatcher, "clone", autospec=True,
                           side_effect=comfy.model_patcher.ModelPatcher.clone) as patcher_clone, \
            mock.patch.object(comfy.sd.CLIP, "clone", autospec=True, side_effect=comfy.sd.CLIP.clone) as clip_clone:
        model, clip, *_ = run_stack(pack, tiny_sd15, rows)
    assert clip_clone.call_count == 1 and patcher_clone.call_count == 2   # MODEL, and CLIP's own patcher
    key = three[0].changed_keys("unet")[0]
    assert [p[0] for p in model.patches[key]] == [0.5, 1.5, 2.5]
    bypassed, *_ = run_stack(pack, tiny_sd15, rows, **FORWARD)
    from loralab.nodes.comfy_model import BYPASS_KEY
    assert not bypassed.patches and len(bypassed.get_injections(BYPASS_KEY)) == 1


def test_default_node_applies_only_the_lora_stack(pack, tiny_sd15, base, three):
    """A new node has no rows: with every input at its default it applies exactly the lora_stack rows,
    and with no lora_stack either it passes MODEL and CLIP through."""
    types = node(pack, "LoraLabLoraStack").INPUT_TYPES()
    assert types["optional"]["rows"][1]["default"] == "[]"
    out = node(pack, "LoraLabLoraStack").apply(tiny_sd15.model, tiny_sd15.clip)["result"]
    assert out[0] is tiny_sd15.model and out[1] is tiny_sd15.clip and out[2] == [] and out[3] == ""
    assert "no LoRAs to apply" in out[4]
    given = [(three[0].name, 0.7, 0.2)]
    model, clip, stack, *_ = node(pack, "LoraLabLoraStack").apply(tiny_sd15.model, tiny_sd15.clip,
                                                                   lora_stack=given)["result"][:3]
    assert stack == given
    cm, cc = core_chain(tiny_sd15, given)
    assert_weights_match({**weights(model), **weights(clip)}, {**weights(cm), **weights(cc)}, base)


def test_lora_stack_round_trips(pack, tiny_sd15, three):
    """LORA_STACK out -> LORA_STACK in gives the same stack and bit-identical weights; other packs' lists
    (lists instead of tuples) read the same."""
    rows = [{"lora": three[0].name, "strength": 0.9}, {"lora": three[2].name, "strength_model": 0.3,
                                                       "strength_clip": -1.0}]
    m1, c1, stack1, words1, _ = run_stack(pack, tiny_sd15, rows)
    m2, c2, stack2, words2, _ = run_stack(pack, tiny_sd15, (), lora_stack=stack1)
    m3, _, stack3, *_ = run_stack(pack, tiny_sd15, (), lora_stack=[list(t) for t in stack1])
    assert stack1 == stack2 == stack3 and words1 == words2
    w1, w2 = {**weights(m1), **weights(c1)}, {**weights(m2), **weights(c2)}
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_prompt_tags_equal_chained_core_and_encode_as_clip_text_encode(pack, tiny_sd15, base, three):
    import nodes as core_nodes

    a, b, c = three
    stem = lambda s: os.path.splitext(os.path.basename(s.name))[0]   # noqa: E731
    text = (f"a watercolor cat <lora:{stem(a)}:0.8>, sitting <lyco:stack/{stem(b)}:te=0.5:unet=1.2>\n"
            f"on a mat <LORA:{stem(c)}:1:0.3>, <hypernet:x:1> best quality")
    out = node(pack, "LoraLabPromptLoRA").apply(tiny_sd15.model, tiny_sd15.clip, text)
    model, clip, cond, clean, words, report = out["result"]
    assert clean == "a watercolor cat , sitting \non a mat , <hypernet:x:1> best quality"
    assert out["ui"]["text"] == [report] and report.count("keys match") == 3, report
    cm, cc = core_chain(tiny_sd15, [(a.name, 0.8, 0.8), (b.name, 1.2, 0.5), (c.name, 0.3, 1.0)])
    assert_weights_match({**weights(model), **weights(clip)}, {**weights(cm), **weights(cc)}, base)
    ref = core_nodes.CLIPTextEncode().encode(clip, clean)[0]
    assert len(cond) == len(ref) == 1
    assert torch.equal(cond[0][0], ref[0][0]) and torch.equal(cond[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    plain = core_nodes.CLIPTextEncode().encode(tiny_sd15.clip, clean)[0]
    assert not torch.equal(cond[0][0], plain[0][0])                  # encoded with the patched CLIP


def _independent_block(key: str) -> str | None:
    """The block of a ComfyUI SD1.x model key, read off its ldm path (not through lora/blocks.py)."""
    if key.startswith(("clip_l.", "clip_g.", "clip_h.")):
        return "BASE"
    parts = key.split(".")
    if parts[1] in ("input_blocks", "output_blocks"):
        return f"{'IN' if parts[1] == 'input_blocks' else 'OUT'}{int(parts[2]):02d}"
    return "M00" if parts[1] == "middle_block" else None


def test_block_weights_equal_a_per_block_computation(pack, tiny_sd15, base, lora_file):
    """A 26-value vector of random weights (every block its own) on a LoCon over every UNet and CLIP
    Linear/Conv: each tensor moves by strength × its block's weight × ΔW; modules outside the blocks
    (time_embed, out) by strength × 1. The full-size layouts' key -> block maps are in test_blocks.py."""
    from loralab.lora.blocks import SD_UNET

    spec = lora_file("kohya")
    rng = random.Random(7)
    vector = [round(rng.uniform(-1.5, 1.5), 3) for _ in SD_UNET.names]
    w = dict(zip(SD_UNET.names, vector))
    model, clip, _, _, report = run_stack(pack, tiny_sd15, [{"lora": spec.name, "strength_model": 0.7,
                                                             "strength_clip": 1.1, "blocks": ",".join(map(str, vector))}])
    assert "block weights" in report
    got = {**weights(model), **weights(clip)}
    seen = set()
    for key in spec.changed_keys():
        block = _independent_block(key)
        seen.add(block)
        s = (1.1 if block == "BASE" else 0.7) * (1.0 if block is None else w[block])
        assert rel_err(got[key] - base[key], s * spec.delta(key)) <= 1e-5, (key, block)
    assert {"BASE", "IN00", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT03", None} <= seen, seen


def test_block_presets_and_lbw_tag(pack, tiny_sd15, base, lora_file):
    """lbw=OUTALL on a tag and blocks="OUTALL" on a row give the same weights: the 17-value preset
    leaves BASE at 1, the input and middle blocks at 0 and output blocks 3-11 at 1 (the tiny SD1.5's
    outputs 0-2 are not among the 17 blocks: weight 0)."""
    spec = lora_file("kohya", few=True)
    stem = os.path.splitext(os.path.basename(spec.name))[0]
    tagged = node(pack, "LoraLabPromptLoRA").apply(tiny_sd15.model, tiny_sd15.clip, f"<lora:{stem}:0.9:lbw=OUTALL>")
    row, *_ = run_stack(pack, tiny_sd15, [{"lora": spec.name, "strength": 0.9, "blocks": "outall"}])
    got, by_row = {**weights(tagged["result"][0]), **weights(tagged["result"][1])}, weights(row)
    for key in spec.changed_keys():
        block = _independent_block(key)
        if block in ("BASE", "OUT03", None):
            assert rel_err(got[key] - base[key], 0.9 * spec.delta(key)) <= 1e-5, (key, block)
        else:
            assert torch.equal(got[key], base[key]), (key, block)
        if key in by_row:
            assert torch.equal(by_row[key], got[key]), key


def test_forward_pass_stack_equals_merged(pack, tiny_sd15, three):
    from loralab_testkit.comfy_env import unet_out as _unet_out

    rows = [{"lora": s.name, "strength": 0.4 * (i + 1)} for i, s in enumerate(three)]
    rows[1]["blocks"] = "MIDD"
    merged, *_ = run_stack(pack, tiny_sd15, rows)
    bypassed, _, _, _, report = run_stack(pack, tiny_sd15, rows, **FORWARD)
    assert "in the forward pass" in report
    y_base, y_merged, y_bypass = _unet_out(tiny_sd15.model), _unet_out(merged), _unet_out(bypassed)
    assert not torch.allclose(y_merged, y_base)
    assert rel_err(y_bypass, y_merged) <= TOL["bypass_fp32"]


def test_trigger_words_in_stack_order(pack, tiny_sd15, comfy, three):
    """Each file's modelspec.trigger_phrase, its NAME.txt sidecar, else its top ss_tag_frequency tags;
    one string in stack order, each word once; shown on the node (ui)."""
    a, b, c = three
    for spec, meta in ((a, {"modelspec.trigger_phrase": "ohwx cat, watercolor"}),
                       (c, {"ss_tag_frequency": json.dumps({"10_x": {"mat": 3, "sitting": 9, "ohwx cat": 1}})})):
        sd = load_file(spec.path)
        save_file(sd, spec.path, metadata={**spec.metadata, **meta})
    with open(os.path.splitext(b.path)[0] + ".txt", "w") as fh:
        fh.write("inkwash style\nWatercolor")
    rows = [{"lora": c.name, "strength": 1}, {"lora": a.name, "strength": 1}, {"lora": b.name, "strength": 0.5}]
    *_, words, _ = run_stack(pack, tiny_sd15, rows)
    assert words == "sitting, mat, ohwx cat, watercolor, inkwash style"


@pytest.fixture
def named(comfy):
    """Files to resolve names against: one stem in two folders (ambiguous), one with an alias."""
    from loralab_testkit import lorafiles

    root = comfy.loras_dir
    made = {}
    for rel, meta in (("amb/dup_name.safetensors", {}), ("amb2/dup_name.safetensors", {}),
                      ("aliased_file_v3.safetensors", {"ss_output_name": "Inkwash Style"})):
        path = os.path.join(root, *rel.split("/"))
        targets = [lorafiles.Target("diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1), "unet")]
        made[rel] = lorafiles.write_lora(path, lorafiles.make_lora(targets, rank=2, alpha=1.0), "kohya_ldm",
                                         metadata=meta, root=root)
    comfy.folder_paths.filename_list_cache.clear()
    return made


def test_names_resolve_by_stem_path_and_alias(pack, tiny_sd15, named):
    apply = node(pack, "LoraLabPromptLoRA").apply
    report = apply(tiny_sd15.model, tiny_sd15.clip, "<lora:Inkwash Style:1> <lora:amb2/dup_name:0.5>")["result"][5]
    assert "tag <lora:Inkwash Style:1>: aliased_file_v3.safetensors: 3 of 3 keys match" in report, report
    assert "tag <lora:amb2/dup_name:0.5>: dup_name.safetensors: 3 of 3 keys match" in report, report


def _stays_unchanged(sd15):
    return dict(sd15.model.patches), len(sd15.clip.patcher.patches), sd15.model.get_injections("loralab_bypass")


BAD_TAGS = {   # text -> what the error must say (besides naming the tag)
    "a cat <lora:>": r"tag <lora:> names no LoRA",
    "a cat <lora:x:abc>": r"tag <lora:x:abc>: 'abc' is not a number",
    "a cat <lora:dup_name:1": r"tag <lora:dup_name:1 is not closed",
    "<lora:amb/dup_name:1:lbw=1,0>": r"block weights '1,0' give 2 values; SD1.5 takes 17 .* or 26",
    "<lora:amb/dup_name:1:lbw=OUTALLL>": r"preset 'OUTALLL' is not one SD1.5 has",
    "<lora:dup_name:1:stop=10>": r"unknown argument 'stop'=",
    "<lora:no_such_lora_anywhere:1>": r"no LoRA named 'no_such_lora_anywhere'",
    "<lora:dup_nme:1>": r"no LoRA named 'dup_nme' .*closest: amb/dup_name.safetensors",
    "<lora:dup_name:1>": r"'dup_name' is ambiguous: 2 files .*amb/dup_name.safetensors, amb2/dup_name.safetensors",
}


@pytest.mark.parametrize("text", BAD_TAGS)
def test_bad_tags_are_named_and_inputs_stay(pack, tiny_sd15, named, text):
    from loralab.lora import LoraError

    before = _stays_unchanged(tiny_sd15)
    with pytest.raises(LoraError, match=BAD_TAGS[text]) as e:
        node(pack, "LoraLabPromptLoRA").apply(tiny_sd15.model, tiny_sd15.clip, text)
    assert "tag <lora:" in str(e.value), str(e.value)
    assert _stays_unchanged(tiny_sd15) == before


BAD_ROWS = {   # rows (JSON text) -> the error
    '[{"lora": "amb/dup_name.safetensors"}, {"lora": "from_another_machine/gone.safetensors", "strength": 1}]':
        r"row 2: no LoRA named 'from_another_machine/gone.safetensors'",
    '[{"lora": "amb/dup_name.safetensors", "blocks": "1,1,1"}]': r"row 1: block weights '1,1,1' give 3 values",
    '[{"lora": "amb/dup_name.safetensors", "blocks": "SDXL-OUTALL"}]': r"row 1: .*preset 'SDXL-OUTALL'.*for SDXL",
    '[{"lora": "amb/dup_name.safetensors", "strenght": 1}]': r"row 1: unknown key\(s\) 'strenght'",
    '[{"lora": "amb/dup_name.safetensors", "strength": "high"}]': r"row 1: strength must be a finite number",
    '{"lora": "x"}': r"rows must be a JSON list",
    '[{"lora": "x",]': r"rows is not valid JSON",
}


@pytest.mark.parametrize("rows", BAD_ROWS)
def test_bad_rows_are_named_and_inputs_stay(pack, tiny_sd15, named, rows):
    from loralab.lora import LoraError

    before = _stays_unchanged(tiny_sd15)
    with pytest.raises(LoraError, match=BAD_ROWS[rows]):
        node(pack, "LoraLabLoraStack").apply(tiny_sd15.model, tiny_sd15.clip, rows=rows)
    assert _stays_unchanged(tiny_sd15) == before


def test_missing_lora_stack_file_is_named(pack, tiny_sd15, named):
    from loralab.lora import LoraError

    with pytest.raises(LoraError, match=re.escape("lora_stack item 2 (other/missing.safetensors): no LoRA named")):
        node(pack, "LoraLabLoraStack").apply(tiny_sd15.model, tiny_sd15.clip, lora_stack=[
            ("amb/dup_name.safetensors", 1.0, 1.0), ("other/missing.safetensors", 1.0, 1.0)])
