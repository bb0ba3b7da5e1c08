"""The stack's core, without ComfyUI: A1111 prompt tags (lora/tags.py), name resolution with aliases
(lora/names.py), block-weight vectors and presets (lora/blocks.py), the rows' JSON form and LORA_STACK
(lora/stack.py), and one-product accumulation of a stack (lora/patch.accumulate_)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from loralab.lora import LoraError, arch, blocks, names, stack, tags
from loralab.lora.adapters.lora import LoRA
from loralab.lora.patch import accumulate_
from tolerances import TOL, rel_err


# ---- tags ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag, want", [
    ("<lora:x>", ("x", 1.0, 1.0, None, None)),                       # TE defaults to 1, UNET to TE
    ("<lora:x:0.8>", ("x", 0.8, 0.8, None, None)),
    ("<lora:x:0.8:0.3>", ("x", 0.8, 0.3, None, None)),
    ("<lora:x:0.8:0.3:16>", ("x", 0.8, 0.3, 16, None)),
    ("<lora:x:te=0.5>", ("x", 0.5, 0.5, None, None)),               # unet follows a named te
    ("<lora:x:1:unet=0.2>", ("x", 1.0, 0.2, None, None)),
    ("<lora:x:0.7:0.1:te=0.2>", ("x", 0.2, 0.1, None, None)),        # named wins over positional
    ("<lora:x:dyn=8:0.5>", ("x", 0.5, 0.5, 8, None)),                # named items anywhere
    ("<lora:styles/ink wash:1:lbw=OUTALL>", ("styles/ink wash", 1.0, 1.0, None, "OUTALL")),
    ("<lora:x:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>", ("x", 1.0, 1.0, None, "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")),
    ("<lyco:x:-0.5>", ("x", -0.5, -0.5, None, None)),
    ("<LoRA:x:1e-1>", ("x", 0.1, 0.1, None, None)),
])
def test_tag_grammar(tag, want):
    found, text = tags.parse(f"a {tag} b")
    t = found[0]
    assert (t.name, t.te, t.unet, t.dyn, t.lbw) == want and text == "a  b"
    assert (t.start, t.end, t.text) == (2, 2 + len(tag), tag)


def test_tags_removed_exactly_and_others_kept():
    text = "<lora:a:1>masterpiece, <hypernet:h:1> cat <lyco:b:0.5>\n<lora:c>"
    found, clean = tags.parse(text)
    assert [t.name for t in found] == ["a", "b", "c"] and [t.kind for t in found] == ["lora", "lyco", "lora"]
    assert clean == "masterpiece, <hypernet:h:1> cat \n"


@pytest.mark.parametrize("text, message", [
    ("x <lora:>", r"tag <lora:> names no LoRA"),
    ("x <lora::1>", r"tag <lora::1> names no LoRA"),
    ("x <lora:x:abc>", r"tag <lora:x:abc>: 'abc' is not a number \(the text-encoder strength, TE\)"),
    ("x <lora:x:1:nan>", r"'nan' is not a number"),
    ("x <lora:x:1:te=high>", r"'high' is not a number \(the text-encoder strength, te=\)"),
    ("x <lora:x:1:1:-2>", r"dyn '-2' is not a rank"),
    ("x <lora:x:1:1:1:1>", r"has 5 ':'-separated parts"),
    ("x <lora:x:1:stop=10>", r"unknown argument 'stop'="),
    ("x <lora:x:1:lbw=>", r"lbw= is empty"),
    ("x <lora:x:1", r"tag <lora:x:1 is not closed"),
    ("x <lora:x:1\n>", r"tag <lora:x:1 is not closed"),
    ("x <lora:x:1 <lora:y:1>", r"tag <lora:x:1 is not closed"),
])
def test_malformed_tags_are_named(text, message):
    with pytest.raises(tags.TagError, match=message) as e:
        tags.parse(text)
    assert e.value.tag.startswith("<lora:") and text[e.value.start:e.value.end] == e.value.tag


def test_scan_reports_every_tag_with_its_span():
    text = "<lora:good:1> <lora:x:abc> tail <lora:open"
    found = tags.scan(text)
    assert [(s.text, s.tag is not None, s.error is not None) for s in found] == [
        ("<lora:good:1>", True, False), ("<lora:x:abc>", False, True), ("<lora:open", False, True)]
    assert all(text[s.start:s.end] == s.text for s in found)


# ---- names --------------------------------------------------------------------------------------------
LISTED = ["styles/inkwash.safetensors", "detail_tweaker.safetensors", "a/dup.safetensors", "b/dup.safetensors",
          "v2/model.pt", "v2/model.safetensors", "chars/Alice_v3.safetensors"]
ALIASES = {"chars/Alice_v3.safetensors": "Alice", "detail_tweaker.safetensors": "Detail"}


@pytest.mark.parametrize("tag, listed, by", [
    ("styles/inkwash.safetensors", "styles/inkwash.safetensors", "name"),
    ("styles/inkwash", "styles/inkwash.safetensors", "path"),
    ("inkwash", "styles/inkwash.safetensors", "stem"),
    ("INKWASH", "styles/inkwash.safetensors", "stem"),
    ("styles\\inkwash", "styles/inkwash.safetensors", "path"),
    ("a/dup", "a/dup.safetensors", "path"),
    ("Alice", "chars/Alice_v3.safetensors", "alias"),
    ("alice", "chars/Alice_v3.safetensors", "alias"),
    ("alice_v3", "chars/Alice_v3.safetensors", "stem"),
])
def test_names_resolve(tag, listed, by):
    found = names.find(tag, LISTED, ALIASES)
    assert (found.name, found.by) == (listed, by) and found.error() is None


def test_unknown_and_ambiguous_names_say_which_files():
    with pytest.raises(LoraError, match=r"row 3: 'dup' is ambiguous: 2 files .*a/dup.safetensors, b/dup.safetensors.*"
                                        r"e.g. 'a/dup'"):
        names.lookup("dup", LISTED, ALIASES, what="row 3")
    with pytest.raises(LoraError, match=r"no LoRA named 'inkwsh' in the loras folders; closest: styles/inkwash"):
        names.lookup("inkwsh", LISTED)
    assert names.find("v2/model", LISTED).matches == ["v2/model.pt", "v2/model.safetensors"]   # ambiguous


def test_aliases_are_read_lazily_from_headers(tmp_path):
    calls = []

    def table():
        calls.append(1)
        return ALIASES
    assert names.resolve("inkwash", LISTED, table) == "styles/inkwash.safetensors" and not calls
    assert names.resolve("Detail", LISTED, table) == "detail_tweaker.safetensors" and len(calls) == 1   # read once
    path = tmp_path / "x.safetensors"
    save_file({"a.lora_up.weight": torch.zeros(2, 1)}, str(path), metadata={"ss_output_name": " Ink "})
    assert names.aliases({"x.safetensors": str(path), "gone.safetensors": str(tmp_path / "gone")}) == {
        "x.safetensors": "Ink"}


# ---- block weights ------------------------------------------------------------------------------------
def test_forms_and_presets():
    sd1, sdxl, flux = (arch.get(a) for a in ("sd1", "sdxl", "flux"))
    assert sorted(sd1.blocks.forms) == [17, 26] and sorted(sdxl.blocks.forms) == [12, 20]
    assert sorted(flux.blocks.forms) == [58] and arch.get("sd2").blocks is sd1.blocks
    w = blocks.weights_for(sd1, "OUTALL")
    assert w["BASE"] == 1 and w["M00"] == 0 and w["OUT03"] == w["OUT11"] == 1
    assert w["IN00"] == w["OUT02"] == 0                           # not among the 17: weight 0, as hako-mikan's to26
    assert blocks.weights_for("sd1", "outall") == w == blocks.weights_for(sd1, "SD-OUTALL")
    assert blocks.weights_for(sd1, "MYSET:" + ",".join(["1"] + ["0"] * 7 + ["1"] * 9)) == w   # a preset-file line
    assert set(blocks.weights_for(sd1, "SD-LyC-ALL").values()) == {1.0}
    xl = blocks.weights_for(sdxl, "SDXL-OUTALL")
    assert [k for k, v in xl.items() if v] == ["BASE", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
    fl = blocks.weights_for(flux, "FLUX-DBL-FRONT7")
    assert [k for k, v in fl.items() if v] == ["BASE"] + [f"D{i:02d}" for i in range(7)]
    assert blocks.weights_for(flux, "FLUX-DBL-TAIL6")["S37"] == 1       # Inspire: later blocks take the last value
    vec = [0.1 * i for i in range(26)]
    assert list(blocks.weights_for(sd1, vec).values()) == pytest.approx(vec)


@pytest.mark.parametrize("family, spec, message", [
    ("sd1", "1,0,1", r"give 3 values; SD1.5 takes 17 \(BASE, IN01, …, OUT11\) or 26 \(BASE, IN00, …, OUT11\)"),
    ("sdxl", ",".join(["1"] * 17), r"give 17 values; SDXL takes 12 \(.*\) or 20"),
    ("flux", "1,1", r"Flux.1 takes 58 \(BASE, D00, …, S37\)"),
    ("sd1", "SDXL-ALL", r"preset 'SDXL-ALL' is not one SD1.5 has \(it is a preset for SDXL\); presets for SD1.5: NONE"),
    ("sdxl", "OUTD", r"preset 'OUTD' is not one SDXL has \(it is a preset for SD1.5, SD2.x\)"),
    ("sd1", "NOPE", r"preset 'NOPE' is not one SD1.5 has; presets"),
    ("sd1", "1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", r"value 2 is 'R'; random \(R, U\) and parameter \(A, B, X\)"),
    ("sd1", "1,X+0.5,1", r"value 2 is 'X\+0.5'"),
    ("sd1", "1,,1", r"value 2 \(''\) is not a number"),
    ("sd1", "", r"block weights are empty"),
    ("wan", "ALL", r"block weights are not defined for Wan models \(LoRA Lab has block layouts for SD1.5, SD2.x"),
])
def test_bad_block_weights(family, spec, message):
    with pytest.raises(LoraError, match=message):
        blocks.weights_for(family, spec)


def test_problem_is_none_when_any_family_takes_it():
    assert blocks.problem("OUTALL") is None and blocks.problem("FLUX-ALL") is None
    assert blocks.problem(",".join(["1"] * 12)) is None and "give 3 values" in blocks.problem("1,1,1")


def test_describe_runs():
    sd1 = arch.get("sd1").blocks
    assert blocks.describe(sd1, blocks.weights_for("sd1", "OUTALL")) == "BASE 1, IN00–OUT02 0, OUT03–OUT11 1"


# ---- rows ---------------------------------------------------------------------------------------------
def test_rows_json_form():
    rows = stack.rows_from_json(json.dumps([
        {"lora": "a.safetensors"},
        {"on": False, "lora": "b.safetensors", "strength": 0.5},
        {"lora": " c.safetensors ", "strength": 2, "strength_clip": 0, "blocks": [1] * 17, "dyn_rank": 4}]))
    assert rows[0] == stack.Row("a.safetensors", 1.0, 1.0, "", 0, True, "row 1")
    assert rows[1].on is False and (rows[1].strength_model, rows[1].strength_clip) == (0.5, 0.5)
    assert rows[2] == stack.Row("c.safetensors", 2.0, 0.0, ",".join(["1"] * 17), 4, True, "row 3")
    assert rows[2].options() == {"dyn_rank": 4} and rows[0].options() == {}
    assert stack.rows_from_json("") == [] == stack.rows_from_json("[]")
    again = stack.rows_from_json(stack.to_json(rows))
    assert [(r.lora, r.strength_model, r.strength_clip, r.blocks, r.dyn_rank, r.on) for r in again] == \
        [(r.lora, r.strength_model, r.strength_clip, r.blocks, r.dyn_rank, r.on) for r in rows]


@pytest.mark.parametrize("rows, message", [
    ('[{"lora": "a"}, {"strength": 1}]', r"row 2: lora must name a file"),
    ('[{"lora": "a", "on": "yes"}]', r"row 1: on must be true or false"),
    ('[{"lora": "a", "strength_model": Infinity}]', r"row 1: strength_model must be a finite number"),
    ('[{"lora": "a", "dyn_rank": 1.5}]', r"row 1: dyn_rank must be a whole number"),
    ('[{"lora": "a", "blocks": {"x": 1}}]', r"row 1: blocks must be a preset name or a vector"),
    ('["a.safetensors"]', r"row 1: a row is an object"),
])
def test_bad_rows(rows, message):
    with pytest.raises(LoraError, match=message):
        stack.rows_from_json(rows)


def test_lora_stack_in_and_out():
    given = [("a.safetensors", 1.0, 0.5), ["b.safetensors", -1, 2]]
    rows = stack.rows_from_stack(given)
    assert stack.as_stack(rows) == [("a.safetensors", 1.0, 0.5), ("b.safetensors", -1.0, 2.0)]
    assert rows[1].where == "lora_stack item 2 (b.safetensors)"
    for bad, message in ((["a"], r"item 1: expected \(lora_name"), ("abc", "must be a list"),
                         ([("a", "x", 1)], r"item 1 \(a\): strength_model must be a finite number")):
        with pytest.raises(LoraError, match=message):
            stack.rows_from_stack(bad)
    assert stack.rows_from_tags(tags.parse("<lora:x:0.5:1.5:4:lbw=ALL>")[0]) == [
        stack.Row("x", 1.5, 0.5, "ALL", 4, True, "tag <lora:x:0.5:1.5:4:lbw=ALL>")]
    assert stack.join_words([["ohwx", "Cat"], ["cat", "dog"]]) == "ohwx, Cat, dog"


# ---- one product for a stack --------------------------------------------------------------------------
def _lora(out, inn, r, seed, conv=False, **kw):
    g = torch.Generator().manual_seed(seed)
    shape_down = (r, inn, 3, 3) if conv else (r, inn)
    up = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g)
    return LoRA(up=up, down=torch.randn(shape_down, generator=g), alpha=r / 2, **kw)


@pytest.mark.parametrize("conv", [False, True])
def test_accumulate_fuses_plain_loras_and_keeps_order_around_others(conv):
    """A stack's LoRAs summed in one product equal applying them one by one; a DoRA in the middle keeps
    its place (it depends on the weight it is applied to), so the runs around it fuse separately."""
    shape = (24, 16, 3, 3) if conv else (24, 16)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    plain = [(_lora(24, 16, r, s, conv), st) for s, (r, st) in enumerate([(4, 0.5), (2, -1.0), (8, 1.3)])]
    dora = _lora(24, 16, 4, 7, conv, dora_scale=torch.rand(24, *[1] * (len(shape) - 1)) + 0.5)
    for items in (plain, plain[:1] + [(dora, 0.8)] + plain[1:]):
        one_by_one = w.clone()
        for a, s in items:
            one_by_one = a.apply_(one_by_one, s)
        fused = accumulate_(w.clone(), items)
        assert not torch.allclose(fused, w) and rel_err(fused, one_by_one) <= TOL["fp32"]
