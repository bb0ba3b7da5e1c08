"""The LoRA tool nodes inside ComfyUI (in-process, CPU): convert, merge, resize, extract, inspect.

What ComfyUI core's LoraLoader makes of every output is the bar: all keys loaded ("lora key not
loaded" never logged) and the weights it computes equal to what the input means (LoRA Lab's load
of the original file, itself pinned to the producers elsewhere, or the writers' reference ΔW).
The nodes and scripts/loratool.py write the same tensors and metadata for the same inputs.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loralab_testkit import lorafiles
from loralab_testkit.comfy_env import REPO_ROOT
from support.rank_rules import optimality_gap
from tolerances import TOL, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EPOCH = "1700000000"


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def applied(patcher) -> dict[str, torch.Tensor]:
    """{key: ΔW} a patcher's patches make, computed by ComfyUI (``calculate_weight``) per patched key."""
    import comfy.lora

    patcher = getattr(patcher, "patcher", patcher)
    table = patcher.get_key_patches()
    out = {}
    for key in patcher.patches:
        (w, convert), *patches = table[key]
        with torch.no_grad():
            w0 = convert(w.detach().to(torch.float32, copy=True), inplace=True)
            out[key] = comfy.lora.calculate_weight(patches, w0.clone(), key) - w0
    return out


def ours(pack, sd15, name) -> dict[str, torch.Tensor]:
    out = node(pack, "LoraLabLoadLoRA").load(sd15.model, sd15.clip, name, 1.0, 1.0)["result"]
    return {**applied(out[0]), **applied(out[1])}


def core(sd15, name, caplog) -> dict[str, torch.Tensor]:
    """ComfyUI core's LoraLoader at strength 1; fails when it leaves any key of the file unloaded."""
    import nodes as core_nodes

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m, c = core_nodes.LoraLoader().load_lora(sd15.model, sd15.clip, name, 1.0, 1.0)
    dropped = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not dropped, f"core left {len(dropped)} key(s) of {name} unloaded: {dropped[:3]}"
    return {**applied(m), **applied(c)}


def same(a: dict, b: dict, tol=TOL["fp32"]):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    worst = max((rel_err(a[k], b[k]), k) for k in a)
    assert worst[0] <= tol, worst


def tensors_and_metadata(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_file(a: str, b: str, names_differ=()):
    """The same tensors bit for bit and the same metadata but the ``names_differ`` keys (and what
    is computed from them)."""
    (ta, ma), (tb, mb) = tensors_and_metadata(a), tensors_and_metadata(b)
    assert set(ta) == set(tb)
    bad = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not bad, [(k, rel_err(ta[k], tb[k])) for k in bad[:5]]
    skip = set(names_differ)
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}


def loras(comfy, name) -> str:
    return os.path.join(comfy.loras_dir, *name.split("/"))


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("loratool_cli", os.path.join(REPO_ROOT, "scripts", "loratool.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- convert ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["kohya", "comfy"])
@pytest.mark.parametrize("scheme", lorafiles.SCHEMES)
def test_convert_loads_in_core_with_the_weights_of_the_original(pack, comfy, tiny_sd15, lora_file, scheme, to, caplog):
    spec = lora_file(scheme, few=True)
    name, report = node(pack, "LoraLabConvertLoRA").run(spec.name, tiny_sd15.model, to, "tools/conv",
                                                        clip=tiny_sd15.clip)["result"]
    assert f"renamed to {to} names for SD1.5" in report
    heads = ("lora_unet_", "lora_te_") if to == "kohya" else ("diffusion_model.", "text_encoders.")
    keys = load_file(loras(comfy, name))
    assert all(k.startswith(heads) for k in keys), sorted(keys)[:3]
    same(core(tiny_sd15, name, caplog), ours(pack, tiny_sd15, spec.name))


def loha_file(folder, targets, peft_names: bool) -> tuple[str, dict]:
    """A LoHa on Linear targets (PEFT's LoHa names under base_model.model., which core does not
    map, or kohya's) and its ΔW (independent formula)."""
    sd, deltas = {}, {}
    for i, t in enumerate(targets):
        g = torch.Generator().manual_seed(i)
        o, n = t.shape
        f = {"hada_w1_a": torch.randn(o, 2, generator=g), "hada_w1_b": torch.randn(2, n, generator=g) / n ** 0.5,
             "hada_w2_a": torch.randn(o, 2, generator=g), "hada_w2_b": torch.randn(2, n, generator=g) / n ** 0.5}
        if t.part == "unet":
            prefix = ("base_model.model." + t.hf) if peft_names else "lora_unet_" + t.hf.replace(".", "_")
        else:
            prefix = "lora_te_" + t.hf.replace(".", "_")
        sd.update({f"{prefix}.{k}": v for k, v in f.items()})
        sd[f"{prefix}.alpha"] = torch.tensor(1.0)
        deltas[t.key] = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 0.5
    path = os.path.join(folder, "loha_peft_names.safetensors")
    save_file(sd, path)
    return path, deltas


def test_convert_keeps_a_loha_a_loha(pack, comfy, tiny_sd15, caplog):
    targets = [t for t in lorafiles.pick(lorafiles.unet_targets(tiny_sd15.model) + lorafiles.clip_targets(tiny_sd15.clip))
               if t.kind == "linear" and t.hf]
    path, deltas = loha_file(comfy.loras_dir, targets, peft_names=True)
    name, _ = node(pack, "LoraLabConvertLoRA").run(os.path.basename(path), tiny_sd15.model, "kohya", "tools/loha",
                                                   clip=tiny_sd15.clip)["result"]
    out = load_file(loras(comfy, name))
    assert {k.rsplit(".", 1)[1] for k in out} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    got = core(tiny_sd15, name, caplog)
    assert set(got) == set(deltas)
    for k, d in deltas.items():
        assert rel_err(got[k], d) <= TOL["fp32"], k


def test_convert_a_diffusers_flux_lora_to_native_names(pack, tiny_flux, family_lora, caplog):
    """diffusers' to_q / to_k / to_v on Flux are row slices of ComfyUI's fused qkv: converted to one
    LoRA on the fused weight per block, the whole file loads in core, as the reference ΔW."""
    from loralab_testkit import family_loras as L

    f = family_lora(tiny_flux, "peft", rank=4, alpha=2.0)
    for to in ("comfy", "kohya"):
        name, report = node(pack, "LoraLabConvertLoRA").run(os.path.basename(f.path), tiny_flux.model, to,
                                                            "tools/flux")["result"]
        assert "slices fused into one LoRA on a fused weight" in report
        path = os.path.join(os.path.dirname(f.path), *name.split("/"))
        got, want = L.core_deltas(tiny_flux, path), L.full_deltas(f, L.model_shapes(tiny_flux))
        assert set(got) == set(want)
        for k in want:
            assert rel_err(got[k], want[k]) <= TOL["fp32"], k


@pytest.mark.parametrize("family, producer", [("wan21_t2v", "peft"), ("hunyuan_video", "lycoris"), ("flux", "xlabs"),
                                              ("wan21_t2v", "kohya_mixed")])
def test_convert_a_file_core_drops_into_one_core_loads(pack, tiny_family, family_lora, family, producer, caplog):
    """Files whose names core drops and the loaders read through lora/dit_keys (diffusers/PEFT Wan,
    SimpleTuner LyCORIS HunyuanVideo, XLabs Flux, kohya Wan with mixed separators): converted, every key
    loads in core, as the reference ΔW."""
    from loralab_testkit import family_loras as L

    tiny = tiny_family(family)
    kwargs = {"lycoris": dict(algo="lora", rank=4, alpha=2.0), "xlabs": dict(rank=4)}.get(producer, dict(rank=4, alpha=2.0))
    f = family_lora(tiny, producer, **kwargs)
    want = L.full_deltas(f, L.model_shapes(tiny))
    for to in ("comfy", "kohya"):
        name, _ = node(pack, "LoraLabConvertLoRA").run(os.path.basename(f.path), tiny.model, to,
                                                       f"tools/{family}")["result"]
        got = L.core_deltas(tiny, os.path.join(os.path.dirname(f.path), *name.split("/")))
        assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
        for k in want:
            assert rel_err(got[k], want[k]) <= TOL["reference_fp32"], k


def test_convert_to_a_model_the_file_does_not_fit_is_refused(pack, comfy, tiny_sd15, tiny_flux, lora_file):
    from loralab.lora.errors import LoraError

    spec = lora_file("kohya", few=True)
    before = set(os.listdir(comfy.loras_dir))
    with pytest.raises(LoraError, match="does not fit this model.*an SD1.5 LoRA on a Flux.1 dev model"):
        node(pack, "LoraLabConvertLoRA").run(spec.name, tiny_flux.model, "kohya", "tools/wrong")
    with pytest.raises(LoraError, match="change a text encoder .* connect the text encoder"):
        node(pack, "LoraLabConvertLoRA").run(spec.name, tiny_sd15.model, "kohya", "tools/wrong")
    assert set(os.listdir(comfy.loras_dir)) == before


# ---- resize, merge: every output loads in core -------------------------------------------------------
def test_resize_and_merge_outputs_load_in_core(pack, comfy, tiny_sd15, lora_file, caplog):
    a = lora_file("kohya_ldm", few=True, rank=8, conv="tucker", seed=1)
    b = lora_file("peft", few=True, rank=4, seed=2)
    name, report = node(pack, "LoraLabResizeLoRA").run(a.name, 4, "none", 0.9, "tools/resized")["result"]
    assert "dimension is resized from 8 to 4" in report and "keeps" in report
    got, want = core(tiny_sd15, name, caplog), a.deltas()
    for k, d in want.items():   # rank 4 of 8: the best rank-4 approximation, per layer
        assert optimality_gap(got[k], d, 4) < TOL["eckart_young"], k
    merger = node(pack, "LoraLabMergeLoRA")
    with pytest.raises(Exception, match="change different layers.*give the model"):
        merger.run(a.name, 0.5, b.name, -2.0, 0, "tools/merged")     # kohya ldm names vs diffusers names
    name, report = merger.run(a.name, 0.5, b.name, -2.0, 0, "tools/merged", model=tiny_sd15.model,
                              clip=tiny_sd15.clip)["result"]
    got, da, db = core(tiny_sd15, name, caplog), a.deltas(), b.deltas()
    for k in da:
        assert rel_err(got[k], 0.5 * da[k] - 2.0 * db[k]) <= TOL["fp32"], k
    name, _ = merger.run(a.name, 0.5, b.name, -2.0, 3, "tools/merged_svd", lora_3=a.name, ratio_3=0.25,
                         model=tiny_sd15.model, clip=tiny_sd15.clip)["result"]
    got = core(tiny_sd15, name, caplog)
    for k in da:
        assert optimality_gap(got[k], 0.75 * da[k] - 2.0 * db[k], 3) < TOL["eckart_young"], k


def test_node_output_names_stay_in_the_loras_folder(pack, comfy, lora_file):
    from loralab.lora.errors import LoraError

    spec = lora_file("kohya", few=True)
    before = {d: set(files) for d, _, files in os.walk(comfy.models_dir)}
    for bad in ("../escaped", "/tmp/abs", "sub/../../x"):
        with pytest.raises(LoraError, match="must stay inside the loras folders"):
            node(pack, "LoraLabResizeLoRA").run(spec.name, 2, "none", 0.9, bad)
    assert {d: set(files) for d, _, files in os.walk(comfy.models_dir)} == before


# ---- extract ----------------------------------------------------------------------------------------
def test_extract_from_a_model_and_its_lora_patched_self_recovers_the_lora(pack, comfy, tiny_sd15, lora_file, caplog):
    spec = lora_file("kohya", few=True, rank=4, conv="locon")
    pm, pc, _ = node(pack, "LoraLabLoadLoRA").load(tiny_sd15.model, tiny_sd15.clip, spec.name, 1.0, 1.0)["result"]
    name, report = node(pack, "LoraLabExtractLoRA").run(tiny_sd15.model, pm, 4, "none", 0.9, "tools/extracted",
                                                        clip_base=tiny_sd15.clip, clip_tuned=pc)["result"]
    want = spec.deltas()
    assert f"{len(want)} layers, ranks 4×{len(want)}" in report
    got = core(tiny_sd15, name, caplog)
    assert set(got) == set(want)
    for k, d in want.items():
        assert rel_err(got[k], d) <= TOL["extract_fp32"], k


def test_extract_works_on_a_dit(pack, tiny_flux, family_lora):
    """Flux and a kohya Flux LoRA loaded onto it: the extracted LoRA is that LoRA (core loads it, all keys)."""
    from loralab_testkit import family_loras as L

    f = family_lora(tiny_flux, "kohya", rank=4, alpha=2.0)
    patched = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_flux.model, os.path.basename(f.path), 1.0)["result"][0]
    name, report = node(pack, "LoraLabExtractLoRA").run(tiny_flux.model, patched, 4, "none", 0.9,
                                                        "tools/flux_extracted")["result"]
    assert "(Flux.1 dev)" in report
    got = L.core_deltas(tiny_flux, os.path.join(os.path.dirname(f.path), *name.split("/")))
    assert set(got) == set(f.deltas)
    for k, d in f.deltas.items():
        assert rel_err(got[k], d) <= TOL["extract_fp32"], k


def test_extract_refuses_other_architectures_and_forward_pass_loras(pack, tiny_sd15, tiny_flux, lora_file):
    from loralab.lora.errors import LoraError

    with pytest.raises(LoraError, match="different architectures"):
        node(pack, "LoraLabExtractLoRA").run(tiny_sd15.model, tiny_flux.model, 4, "none", 0.9, "tools/x")
    spec = lora_file("kohya", few=True)
    pm, _ = node(pack, "LoraLabLoraLoaderModelOnly").load(tiny_sd15.model, spec.name, 1.0,
                                                          mode="forward pass")["result"]
    with pytest.raises(LoraError, match="forward pass.*load it in 'merge weights' mode"):
        node(pack, "LoraLabExtractLoRA").run(tiny_sd15.model, pm, 4, "none", 0.9, "tools/x")


# ---- the nodes and the command line write the same file -----------------------------------------------
@pytest.fixture(scope="module")
def tuned_checkpoint(tiny_sd15_file, tmp_path_factory):
    """The tiny SD1.5 checkpoint with a rank-4 change in a few UNet and CLIP layers, as a file (and
    the reference: ckpt key -> ΔW)."""
    sd = load_file(tiny_sd15_file)
    changes = {}
    keys = [k for k in sorted(sd) if k.startswith("model.diffusion_model.") and sd[k].dim() in (2, 4)
            and ("attn" in k or "in_layers.2" in k)][:6]
    keys += [k for k in sorted(sd) if k.startswith("cond_stage_model") and k.endswith("q_proj.weight")][:2]
    for i, k in enumerate(keys):
        g = torch.Generator().manual_seed(i)
        w = sd[k]
        d = (torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w[0].numel(), generator=g) * 0.01).reshape(w.shape)
        sd[k] = w + d
        changes[k] = d
    path = str(tmp_path_factory.mktemp("tuned") / "tiny_sd15_tuned.safetensors")
    save_file(sd, path)
    return path, changes


def test_nodes_and_the_command_line_write_the_same_files(pack, comfy, tiny_sd15, tiny_sd15_file, tuned_checkpoint,
                                                         lora_file, cli, monkeypatch, tmp_path, capsys):
    from loralab_testkit import checkpoints

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    a, b = lora_file("kohya", few=True, rank=8, seed=1), lora_file("peft_alpha", few=True, rank=4, seed=2)

    def both(node_out, argv, names_differ=()):
        name = node_out["result"][0]
        out = str(tmp_path / os.path.basename(name))       # the same file name: the same ss_output_name
        assert cli.main(argv(out)) == 0, capsys.readouterr().err
        same_file(loras(comfy, name), out, names_differ)
        return name

    both(node(pack, "LoraLabResizeLoRA").run(a.name, 3, "sv_fro", 0.95, "cli/resized"),
         lambda out: ["resize", a.path, out, "--rank", "3", "--dynamic", "sv_fro", "--param", "0.95", "--device", "cpu"])
    both(node(pack, "LoraLabMergeLoRA").run(a.name, 0.5, b.name, 1.5, 0, "cli/merged"),
         lambda out: ["merge", out, f"{a.path}:0.5", f"{b.path}:1.5", "--device", "cpu"])
    both(node(pack, "LoraLabMergeLoRA").run(a.name, 0.5, b.name, 1.5, 5, "cli/merged_svd"),
         lambda out: ["merge", out, f"{a.path}:0.5", f"{b.path}:1.5", "--rank", "5", "--device", "cpu"])
    peft = lora_file("peft", few=True)
    both(node(pack, "LoraLabConvertLoRA").run(peft.name, tiny_sd15.model, "kohya", "cli/converted", clip=tiny_sd15.clip),
         lambda out: ["convert", peft.path, out, "--to", "kohya", "--model", tiny_sd15_file])
    tuned_path, changes = tuned_checkpoint
    tm, tc, _ = checkpoints.load_tiny_sd15(tuned_path)
    name = both(node(pack, "LoraLabExtractLoRA").run(tiny_sd15.model, tm, 4, "none", 0.9, "cli/extracted",
                                                     clip_base=tiny_sd15.clip, clip_tuned=tc),
                lambda out: ["extract", tiny_sd15_file, tuned_path, out, "--rank", "4", "--device", "cpu"],
                # a MODEL does not know the file it came from: the node says "base model"
                names_differ=("ss_sd_model_name", "ss_training_comment", "lora_lab.sources"))
    assert len({k.rsplit(".", 2)[0] for k in load_file(loras(comfy, name)) if "lora_down" in k}) == len(changes)


def test_command_line_convert_with_comfyuis_key_maps(pack, tiny_sd3, family_lora, cli, monkeypatch, tmp_path, capsys):
    """With COMFYUI_PATH, loratool.py reads a DiT file's key names through ComfyUI (the model built on
    the meta device from the header): a diffusers SD3 LoRA converts as the node converts it."""
    from loralab_testkit.comfy_env import comfy_dir

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    monkeypatch.setenv("COMFYUI_PATH", comfy_dir())
    f = family_lora(tiny_sd3, "peft", rank=4, alpha=2.0)
    name = node(pack, "LoraLabConvertLoRA").run(os.path.basename(f.path), tiny_sd3.model, "comfy",
                                                "cli/sd3")["result"][0]
    out = str(tmp_path / os.path.basename(name))
    assert cli.main(["convert", f.path, out, "--to", "comfy", "--model", tiny_sd3.path]) == 0, capsys.readouterr().err
    same_file(os.path.join(os.path.dirname(f.path), *name.split("/")), out)
    monkeypatch.delenv("COMFYUI_PATH")
    assert cli.main(["convert", f.path, str(tmp_path / "x.safetensors"), "--to", "comfy", "--model", tiny_sd3.path]) == 2
    assert "does not fit this model" in capsys.readouterr().err       # native names only without ComfyUI


def test_inspect_node_says_how_the_file_matches_the_model(pack, tiny_sd15, tiny_flux, lora_file):
    spec = lora_file("kohya", few=True)
    out = node(pack, "LoraLabInspectLoRA").run(spec.name, model=tiny_sd15.model, clip=tiny_sd15.clip)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "architecture: SD1.5" in text and f"{len(spec.keys)} of {len(spec.keys)} keys match this model" in text
    text = node(pack, "LoraLabInspectLoRA").run(spec.name, model=tiny_flux.model)["result"][0]
    assert f"0 of {len(spec.keys)} keys match this model (0%): an SD1.5 LoRA on a Flux.1 dev model" in text
