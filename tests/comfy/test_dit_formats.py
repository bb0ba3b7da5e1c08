"""The DiT-family files ComfyUI 0.3.75 core does not load, loaded by LoRA Lab on the tiny models of
testkit/loralab_testkit/families.py (ComfyUI's own classes, random weights):

- key maps: every Linear / Conv of every family's diffusers twin, in every naming (diffusers / PEFT
  ``transformer.``, SimpleTuner's LyCORIS ``lycoris_``, OneTrainer ``lora_transformer_``,
  ``diffusion_model.``), lands on its own weight (rows, fused slice, swapped halves), found by VALUE
  (families.twin_map), through ``nodes.comfy_model.key_map``; where ComfyUI's map has a name, ours
  agrees with it;
- numbers: each format loaded through the loader (merged and forward pass) equals an independent
  computation from the file (testkit/loralab_testkit/family_loras.py: the producer's documented formula; for
  PEFT and LyCORIS pinned there to diffusers + PEFT and LyCORIS themselves), and equals ComfyUI core
  (≤ 1e-6) wherever core loads the file;
- bad input: a file of these formats on the wrong family gets the diagnosing report; a Flux OFT
  split that does not fit is a clear error naming file and key; nothing is mutated.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from loralab_testkit import families as F
from loralab_testkit import family_loras as L
from tolerances import TOL, rel_err

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_torch_thread")]


def comfy_model():
    from loralab.nodes import comfy_model as cm
    return cm


# ---- key maps, by value --------------------------------------------------------------------------
def _lands(entry, place: F.Place, probe: torch.Tensor) -> bool:
    """Does the key-map value put a twin-layout ΔW exactly where the twin weight lives?"""
    return entry is not None and F.key_of(entry) == place.key and \
        torch.equal(F.place_by_key_map(entry, place.shape, probe), place.full(probe))


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_every_twin_module_in_every_naming_lands_on_its_weight(tiny_family, name):
    """Core's map and ours together: nothing dropped, nothing misplaced (SD3 keeps core's names only:
    diffusers names under ``diffusion_model.`` are not an SD3 naming anyone writes)."""
    import comfy.lora

    from loralab.lora import dit_keys

    tiny = tiny_family(name)
    places = F.twin_map(tiny)
    g = torch.Generator().manual_seed(0)
    probes = {n: torch.randn(len(p.rows) if p.rows else p.offset[2] if p.offset else p.shape[0], *p.shape[1:],
                             generator=g) for n, p in places.items()}
    core = comfy.lora.model_lora_keys_unet(tiny.model.model, {})
    ident = comfy_model().model_arch(tiny.model)
    shapes = {k: v.shape for k, v in tiny.model.model.state_dict().items()}
    for naming, spell in F.NAMINGS.items():
        modules = {spell(n): n for n in places}
        km = comfy_model().key_map(tiny.model, None, list(modules))
        ours = dit_keys.comfy_targets(ident.arch, list(modules), shapes)
        for module, n in modules.items():
            if module in core and module in ours:      # both maps name it: they agree
                assert _lands(ours[module], places[n], probes[n]), (naming, module, ours[module])
            if name == "sd3" and naming == "diffusion_model" and module not in core:
                continue
            assert _lands(km.get(module), places[n], probes[n]), (naming, module, km.get(module))


# ---- numbers -------------------------------------------------------------------------------------
def our_deltas(tiny, path: str, strength: float = 1.0) -> tuple[dict[str, torch.Tensor], str]:
    """{ComfyUI key: ΔW} our loader (merged) applies to the MODEL for the file, and its report."""
    model, _, report = comfy_model().load_lora(tiny.model, None, path, strength, 0.0)
    after, before = F.comfy_weights(model), F.comfy_weights(tiny.model)
    return {F.UNET + k: after[k] - before[k] for k in after if not torch.equal(after[k], before[k])}, report.text


# id: (family, producer, writer kwargs). Every case is one core drops in whole or in part.
DROPPED = {
    "wan21_t2v-peft": ("wan21_t2v", "peft", dict(rank=4, alpha=2.0)),
    "wan21_i2v-peft_rslora": ("wan21_i2v", "peft", dict(rank=4, alpha=3.0, rslora=True)),
    "wan22_ti2v-lycoris_loha": ("wan22_ti2v", "lycoris", dict(algo="loha", rank=4, alpha=2.0)),
    "wan21_t2v-kohya_mixed": ("wan21_t2v", "kohya_mixed", dict(rank=4, alpha=2.0)),
    "wan21_t2v-onetrainer": ("wan21_t2v", "onetrainer", dict(rank=4, alpha=2.0)),
    "hunyuan_video-peft": ("hunyuan_video", "peft", dict(rank=4, alpha=2.0)),
    "hunyuan_video-lycoris_lokr": ("hunyuan_video", "lycoris", dict(algo="lokr", rank=4, alpha=2.0)),
    "lumina2-peft": ("lumina2", "peft", dict(rank=4, alpha=2.0)),
    "lumina2-lycoris_lora": ("lumina2", "lycoris", dict(algo="lora", rank=4, alpha=2.0)),
    "z_image-peft": ("z_image", "peft", dict(rank=4, alpha=2.0)),
    "qwen_image-onetrainer": ("qwen_image", "onetrainer", dict(rank=4, alpha=2.0)),
    "hidream-onetrainer": ("hidream", "onetrainer", dict(rank=4, alpha=2.0)),
    "flux-xlabs": ("flux", "xlabs", dict(rank=4)),
    "flux-xlabs_comfy_prefix": ("flux", "xlabs", dict(rank=4, prefix="diffusion_model.")),
    "flux-oft_flux": ("flux", "oft_flux", dict(num_blocks=4, alpha=0.05)),
    "flux-oft_flux_attention": ("flux", "oft_flux", dict(num_blocks=2, alpha=0.05, all_linear=False)),
}
# core loads these right: ours must equal core's
CORE_RIGHT = {
    "flux-peft": ("flux", "peft", dict(rank=4, metadata=False)),
    "sd3-peft": ("sd3", "peft", dict(rank=4, metadata=False)),
    "qwen_image-peft": ("qwen_image", "peft", dict(rank=4, metadata=False)),
    "hidream-lycoris_lora": ("hidream", "lycoris", dict(algo="lora", rank=4, alpha=2.0)),
    "z_image-lycoris_lora": ("z_image", "lycoris", dict(algo="lora", rank=4, alpha=2.0)),
    "hunyuan_video-kohya": ("hunyuan_video", "kohya", dict(rank=4, alpha=2.0)),
}


@pytest.mark.parametrize("case", list(DROPPED))
def test_files_core_drops_load_exactly(tiny_family, family_lora, case):
    name, producer, kwargs = DROPPED[case]
    tiny = tiny_family(name)
    f = family_lora(tiny, producer, **kwargs)
    ref = L.full_deltas(f, L.model_shapes(tiny))
    assert ref and all(d.abs().max() > 0 for d in ref.values())
    core = L.core_deltas(tiny, f.path)
    assert set(core) != set(ref), "core loads this file: it belongs in CORE_RIGHT"
    got, report = our_deltas(tiny, f.path, 0.8)
    n = len(L._read(f.path)[0])
    assert f"{n} of {n} keys match this model (100%" in report, report
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:6]
    for k, d in ref.items():
        assert rel_err(got[k], 0.8 * d) <= TOL["reference_fp32"], k


@pytest.mark.parametrize("case", list(CORE_RIGHT))
def test_files_core_loads_load_the_same(tiny_family, family_lora, case):
    name, producer, kwargs = CORE_RIGHT[case]
    tiny = tiny_family(name)
    f = family_lora(tiny, producer, **kwargs)
    core = L.core_deltas(tiny, f.path, -0.6)
    assert set(core) == set(L.full_deltas(f, L.model_shapes(tiny)))
    got, _ = our_deltas(tiny, f.path, -0.6)
    assert set(got) == set(core)
    for k, d in core.items():
        assert rel_err(got[k], d) <= TOL["core_parity_fp32"], k


def test_xlabs_equals_cores_own_converter(tiny_flux, family_lora):
    """Core converts XLabs files only when it sees full-size Flux's last blocks (single_blocks.37 and
    double_blocks.18 together): on any other file, here the tiny model's, it drops them. Its converter
    run by hand gives what we load from the file as it is."""
    import comfy.lora_convert

    f = family_lora(tiny_flux, "xlabs", rank=4)
    assert not L.core_deltas(tiny_flux, f.path)
    core = L.core_deltas(tiny_flux, f.path, 0.7, convert=comfy.lora_convert.convert_uso_lora)
    got, _ = our_deltas(tiny_flux, f.path, 0.7)
    assert set(got) == set(core) == set(L.full_deltas(f, L.model_shapes(tiny_flux)))
    for k, d in core.items():
        assert rel_err(got[k], d) <= TOL["core_parity_fp32"], k


@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_kohya_flux_oft_follows_its_multiplier(tiny_flux, family_lora, strength):
    """sd-scripts' multiplier interpolates each R toward I: the layer at multiplier s, computed from
    the file by its own formula (family_loras.kohya_oft_weight), is what we load at strength s."""
    f = family_lora(tiny_flux, "oft_flux", num_blocks=4, alpha=0.01)
    got, _ = our_deltas(tiny_flux, f.path, strength)
    w = F.comfy_weights(tiny_flux)
    sd, _ = L._read(f.path)
    for name, key in f.modules.items():
        parts = [sd[k] for k in sorted(k for k in sd if k.startswith(name + ".oft_blocks."))]
        wt = w[key[len(F.UNET):]]
        want = L.kohya_oft_weight(parts, float(sd[name + ".alpha"]), wt, strength) - wt
        assert rel_err(got[key], want) <= TOL["reference_fp32"], key


# ---- through the loader node, both modes -------------------------------------------------------------
NODE_CASES = {   # id: (family, producer, writer kwargs, tensors the forward pass merges instead)
    "hunyuan_video-peft": ("hunyuan_video", "peft", dict(rank=4, alpha=2.0), 1),   # norm_out: swapped halves
    "wan21_i2v-kohya_mixed": ("wan21_i2v", "kohya_mixed", dict(rank=4, alpha=2.0), 0),
    "lumina2-lycoris_loha": ("lumina2", "lycoris", dict(algo="loha", rank=4, alpha=2.0), 0),
    "flux-xlabs": ("flux", "xlabs", dict(rank=4), 0),
    "flux-oft_flux": ("flux", "oft_flux", dict(num_blocks=4, alpha=0.01), 0),
}


@pytest.mark.parametrize("case", list(NODE_CASES))
def test_loader_node_merged_and_forward_pass(pack, tiny_family, family_lora, case):
    """What a user runs: LoraLabLoraLoaderModelOnly on the file, merged and in the forward pass; the
    denoised output equals the model with the reference ΔW added (fused q/k/v row blocks run in the
    forward pass too; only swapped-row targets are merged there)."""
    name, producer, kwargs, merged_instead = NODE_CASES[case]
    tiny = tiny_family(name)
    f = family_lora(tiny, producer, **kwargs)
    node = pack.NODE_CLASS_MAPPINGS["LoraLabLoraLoaderModelOnly"]()
    inp = F.inputs(tiny)
    want = F.forward(L.with_deltas(tiny, f, 0.9), inp)
    base = F.forward(tiny, inp)
    assert rel_err(want, base) > 1e-4                      # the LoRA shows in the output
    lora_name = os.path.basename(f.path)
    for mode, tol in (("merge weights", TOL["reference_fp32"]), ("forward pass", TOL["bypass_fp32"])):
        out = node.load(tiny.model, lora_name, 0.9, mode=mode)
        model, report = out["result"]
        assert "keys match this model (100%" in report, report
        assert ("merged instead" in report) == (mode == "forward pass" and merged_instead > 0), report
        if merged_instead and mode == "forward pass":
            assert f"; {merged_instead} tensor(s) merged instead" in report, report
        assert rel_err(F.forward(model, inp), want) <= tol, mode
    assert torch.equal(F.forward(tiny, inp), base)          # the input MODEL is untouched


# ---- bad input -------------------------------------------------------------------------------------
def _factors(modules: dict[str, tuple[int, int]], up=".lora_B.weight", down=".lora_A.weight", rank=2) -> dict:
    """Full-width rank-2 factors (tiny tensors), so the file is recognised as the family it was made for."""
    g = torch.Generator().manual_seed(0)
    return {k: v for m, (o, i) in modules.items()
            for k, v in ((m + down, torch.randn(rank, i, generator=g)), (m + up, torch.randn(o, rank, generator=g)))}


WRONG_FAMILY = {   # id: (file keys -> tensors, the family its keys say, the tiny model it is loaded on)
    "wan_diffusers_on_flux": (_factors({f"transformer.blocks.{i}.attn1.to_{p}": (5120, 5120)
                                        for i in range(2) for p in "qkv"}), "Wan", "flux"),
    "wan_simpletuner_lycoris_on_hunyuan": (_factors({f"lycoris_blocks_{i}_attn2_to_{p}": (5120, 5120)
                                                     for i in range(2) for p in "qk"}, ".lora_up.weight",
                                                    ".lora_down.weight"), "Wan", "hunyuan_video"),
    "xlabs_on_wan": (_factors({f"double_blocks.{i}.processor.{p}": (3072, 3072) for i in range(2)
                               for p in ("qkv_lora1", "proj_lora1")}, ".up.weight", ".down.weight"), "Flux.1",
                     "wan21_t2v"),
    "kohya_flux_oft_on_lumina2": ({f"oft_unet_double_blocks_{i}_{p}.oft_blocks.0": torch.zeros(4, 8, 8)
                                   for i in range(2) for p in ("img_mod_lin", "img_mlp_0")}, "Flux.1", "lumina2"),
}


@pytest.mark.parametrize("case", list(WRONG_FAMILY))
def test_a_file_on_the_wrong_family_is_diagnosed(tiny_family, tmp_path, case):
    from loralab.lora import LoraError

    sd, family, on = WRONG_FAMILY[case]
    tiny = tiny_family(on)
    path = str(tmp_path / f"{case}.safetensors")
    save_file(sd, path)
    _, _, report = comfy_model().load_lora(tiny.model, None, path, 1.0, 0.0)
    first = report.text.splitlines()[0]
    assert first.startswith(f"{case}.safetensors: 0 of {len(sd)} keys match this model (0%): a {family}"), first
    assert f"LoRA on a {comfy_model().model_arch(tiny.model).name} model" in first, first
    assert f"Load it on a {family}" in report.text, report.text
    with pytest.raises(LoraError, match=rf"{case}.safetensors: 0 of .* a {family}") as e:
        comfy_model().load_lora(tiny.model, None, path, 1.0, 0.0, require_match=True)
    assert "stop the run" in str(e.value)
    assert not tiny.model.patches


def test_a_flux_oft_split_that_does_not_fit_names_file_and_key(tiny_flux, family_lora):
    """A Flux OFT made for a model of another width: its q/k/v parts tile other rows than this qkv's."""
    from loralab.lora import LoraError

    f = family_lora(tiny_flux, "oft_flux", num_blocks=4, alpha=1e-3, hidden=64)
    name = os.path.basename(f.path)
    with pytest.raises(LoraError, match=rf"file '{name}', key 'oft_unet_double_blocks_0_img_attn_qkv': kohya Flux "
                                        r"OFT blocks split the output rows as 4×16 \+ 4×16 \+ 4×16 = 192, but target "
                                        r"'diffusion_model.double_blocks.0.img_attn.qkv.weight' of shape \(384, 128\)"):
        comfy_model().load_lora(tiny_flux.model, None, f.path, 1.0, 0.0)
    assert not tiny_flux.model.patches


def test_a_row_block_of_a_bias_is_merged_in_the_forward_pass(tiny_flux, tmp_path):
    """A diffusers ``to_k`` with a bias diff (``diff_b``): the weight's k rows run in the forward pass,
    the bias's k rows (no forward route) are merged, and both modes give the same output."""
    g = torch.Generator().manual_seed(0)
    h = F.FAMILIES["flux"].unet_config["hidden_size"]
    name = "transformer.transformer_blocks.0.attn.to_k"
    sd = {f"{name}.lora_A.weight": torch.randn(2, h, generator=g), f"{name}.lora_B.weight": torch.randn(h, 2, generator=g),
          f"{name}.diff_b": torch.randn(h, generator=g)}
    path = str(tmp_path / "k_with_bias.safetensors")
    save_file(sd, path)
    merged, _, _ = comfy_model().load_lora(tiny_flux.model, None, path, 0.5, 0.0)
    bias = "double_blocks.0.img_attn.qkv.bias"
    before, after = F.comfy_weights(tiny_flux)[bias], F.comfy_weights(merged)[bias]
    assert torch.equal(after[:h], before[:h]) and torch.equal(after[2 * h:], before[2 * h:])
    assert rel_err(after[h:2 * h] - before[h:2 * h], 0.5 * sd[f"{name}.diff_b"]) <= TOL["reference_fp32"]
    forward, _, report = comfy_model().load_lora(tiny_flux.model, None, path, 0.5, 0.0, bypass=True)
    assert "1 tensor(s) merged instead" in report.text, report.text
    assert "LoRA on a" not in report.text       # names SD3 has too, but every key is this model's
    inp = F.inputs(tiny_flux)
    assert rel_err(F.forward(forward, inp), F.forward(merged, inp)) <= TOL["bypass_fp32"]
