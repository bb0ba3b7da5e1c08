"""The tiny models of every family (testkit/loralab_testkit/families.py), their diffusers twins, and the LoRA
files their producers write (testkit/loralab_testkit/family_loras.py).

- every family builds from ComfyUI 0.3.75's classes, loads the way users load it, runs a forward
  and a comfy.sample step on CPU, and its conditioning reaches the output;
- every twin holds the same weights (found by value, not by any key map), and ComfyUI's LoRA key
  map sends each diffusers name it maps onto exactly that weight (fused q/k/v slices and swapped
  scale/shift included); which names it drops is pinned below (COVERAGE);
- every written file's reference ΔW equals what its producer makes of it (diffusers reading the
  file + PEFT's merge; LyCORIS' forward; for kohya files ComfyUI core, which is right for plain
  LoRA), and what ComfyUI core's LoraLoader applies is pinned (CORE).
"""
from __future__ import annotations

import os

import pytest
import torch

from loralab_testkit import families as F
from loralab_testkit import family_loras as L
from tolerances import TOL, rel_err

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_torch_thread")]
FAMILIES = list(F.FAMILIES)


# ---- builders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_runs_and_samples(tiny_family, name):
    tiny = tiny_family(name)
    fam, base = tiny.family, tiny.model.model
    assert type(base.model_config).__name__ == fam.config
    assert F.family(tiny.model) is fam                      # found again from the MODEL alone
    assert F.num_params(tiny) < 10_000_000                  # a few M parameters
    if fam.loader == "detect":
        # the fixture's MODEL came from this file through comfy.sd.load_diffusion_model
        import comfy.utils
        F.check_detection(fam, comfy.utils.load_torch_file(tiny.path))
    else:
        assert tiny.path is None and fam.why
    # every Linear weight is reachable by its kohya name through ComfyUI's own key map
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    for module in L.comfy_linear_modules(tiny):
        assert key_map[L.kohya_name(module)] == F.UNET + module + ".weight"

    inp = F.inputs(tiny)
    out = F.forward(tiny, inp)
    assert out.shape == inp.x.shape and torch.isfinite(out).all()
    assert torch.equal(out, F.forward(tiny, inp))          # deterministic
    other = F.inputs(tiny, seed=1)
    moved = F.Inputs(inp.x, inp.sigma, {**inp.cond, "cross_attn": other.cond["cross_attn"]})
    assert rel_err(F.forward(tiny, moved), out) > 1e-4      # the text conditioning reaches the output
    if "pooled_output" in inp.cond:
        moved = F.Inputs(inp.x, inp.sigma, {**inp.cond, "pooled_output": other.cond["pooled_output"]})
        assert rel_err(F.forward(tiny, moved), out) > 1e-4

    latent = F.sample(tiny, inp, steps=1, cfg=2.0)
    assert latent.shape == inp.x.shape and torch.isfinite(latent).all() and latent.abs().max() > 0


def test_builds_are_seeded_per_key(tiny_flux):
    a = F.state_dict("flux")
    assert all(torch.equal(v, w) for v, w in zip(a.values(), F.comfy_weights(tiny_flux).values()))
    b = F.state_dict("flux", seed=1)
    assert not torch.equal(a["img_in.weight"], b["img_in.weight"])
    # a key's values do not depend on which other keys exist (flux_schnell lacks guidance_in)
    assert torch.equal(a["img_in.weight"], F.state_dict("flux_schnell")["img_in.weight"])


def test_config_built_families_cannot_come_from_a_file(comfy, tmp_path):
    with pytest.raises(ValueError, match="num_heads 24"):
        F.write_diffusion_model("flux", str(tmp_path))
    assert not os.listdir(tmp_path)


def test_unet_loader_node_loads_the_written_file(tiny_wan21_i2v):
    """What a user does: pick the file in "Load Diffusion Model" (UNETLoader)."""
    import nodes as core_nodes

    (model,) = core_nodes.UNETLoader().load_unet(os.path.basename(tiny_wan21_i2v.path), "default")
    assert type(model.model.model_config).__name__ == "WAN21_I2V"
    assert F.family(model).name == "wan21_i2v"


def test_sdxl_checkpoint_loads_as_sdxl_and_samples(tiny_sdxl):
    from loralab_testkit import checkpoints

    model, clip, vae = tiny_sdxl.model, tiny_sdxl.clip, tiny_sdxl.vae
    assert type(model.model.model_config).__name__ == "SDXL"
    assert type(clip.cond_stage_model).__name__ == "SDXLClipModel"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    cfg = model.model.model_config.unet_config
    assert cfg["transformer_depth"] == [0, 0, 2, 2, 10, 10] and cfg["channel_mult"] == [1, 1, 1]
    assert 280e6 < sum(p.numel() for p in model.model.diffusion_model.parameters()) < 290e6
    # the text encoders hold the file's values (full-size CLIP-L and OpenCLIP-G, through ComfyUI's
    # own save layout and back): a spread of keys, re-generated from their seeds
    sd = clip.cond_stage_model.state_dict()
    keys = [k for k in sorted(sd)[::25] if not k.endswith(("position_ids", "logit_scale")) and sd[k].numel() < 4e6]
    keys += ["clip_g.transformer.text_projection.weight", "clip_g.transformer.text_model.final_layer_norm.weight"]
    for k in keys:
        assert torch.equal(sd[k].half(), checkpoints.random_tensor(k, sd[k].shape, 0).half()), k

    tokens = clip.tokenize("a photo of a cat")
    cross_attn, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cross_attn.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
    inp = F.sdxl_inputs(model)
    inp.cond.update(cross_attn=cross_attn.float(), pooled_output=pooled.float())
    latent = F.sample(model, inp, steps=1, cfg=2.0)
    assert torch.isfinite(latent).all()
    image = vae.decode(latent)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


# ---- twins and ComfyUI's key map -------------------------------------------------------------------
ALL, NONE = "all", "none"
# {family: {naming: ALL | NONE | the module patterns ComfyUI 0.3.75 maps}}; "diffusion_model" names
# map where a diffusers name happens to equal ComfyUI's own. Namings: families.NAMINGS.
COVERAGE = {
    "sd3": dict(diffusers=ALL, lycoris=ALL, onetrainer=ALL, diffusion_model={"context_embedder"}),
    "flux": dict(diffusers=ALL, lycoris=ALL, onetrainer=ALL, diffusion_model=NONE),
    "flux_schnell": dict(diffusers=ALL, lycoris=ALL, onetrainer=ALL, diffusion_model=NONE),
    "wan21_t2v": dict(diffusers=NONE, lycoris=NONE, onetrainer=NONE, diffusion_model={"patch_embedding"}),
    "wan21_i2v": dict(diffusers=NONE, lycoris=NONE, onetrainer=NONE, diffusion_model={"patch_embedding"}),
    "wan22_ti2v": dict(diffusers=NONE, lycoris=NONE, onetrainer=NONE, diffusion_model={"patch_embedding"}),
    "hunyuan_video": dict(diffusers=NONE, lycoris=NONE, onetrainer=NONE, diffusion_model=NONE),
    "lumina2": dict(diffusers=NONE, lycoris=NONE, onetrainer=NONE, diffusion_model={"x_embedder"}),
    "z_image": dict(diffusers=NONE, lycoris=ALL, onetrainer=NONE, diffusion_model=ALL),
    "qwen_image": dict(diffusers=ALL, lycoris=ALL, onetrainer=NONE, diffusion_model=ALL),
    "hidream": dict(diffusers=ALL, lycoris=ALL, onetrainer=NONE, diffusion_model=ALL),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_twin_corresponds_and_key_map_coverage(tiny_family, name):
    tiny = tiny_family(name)
    twin = F.twin(tiny)                                   # loads the converted weights strictly
    # the same network: same input, same output (time, packing and sign conventions in
    # families._TWIN_CALL), so a file written on the twin means the same to the ComfyUI model
    comfy_out, twin_out = F.forward_pair(tiny, twin_model=twin)
    assert rel_err(twin_out, comfy_out) <= TOL["twin_forward_fp32"]
    unused = sum(F.comfy_weights(tiny)[k].numel() for k in tiny.family.unused)
    assert sum(p.numel() for p in twin.parameters()) == F.num_params(tiny) - unused
    places = F.twin_map(tiny, twin)                       # raises if a twin weight is not in the model
    assert set(places) == set(F.twin_modules(twin))
    sizes = {F.UNET + k: v.shape for k, v in F.comfy_weights(tiny).items()}
    for name_, p in places.items():
        assert p.shape == tuple(sizes[p.key]), name_
    if name in ("flux", "sd3", "hunyuan_video", "lumina2", "z_image"):
        assert any(p.offset for p in places.values())     # fused qkv: row slices are found

    cov = F.coverage(tiny, twin)
    wrong = {n: c.entries for n, c in cov.items() if "wrong" in c.status.values()}
    assert not wrong, f"ComfyUI maps these diffusers names onto other weights: {wrong}"
    for naming, want in COVERAGE[name].items():
        mapped = {F.pattern(n) for n, c in cov.items() if c.status[naming] == "mapped"}
        patterns = {F.pattern(n) for n in cov}
        expect = patterns if want == ALL else set() if want == NONE else want
        assert mapped == expect, (naming, sorted(mapped ^ expect))


# ---- LoRA files: reference ΔW against the producer, and against ComfyUI core -----------------------
PRODUCERS = {   # id: (producer, writer kwargs)
    "peft": ("peft", dict(rank=4, alpha=2.0)),
    "peft_rslora": ("peft", dict(rank=4, alpha=3.0, rslora=True)),
    "peft_no_metadata": ("peft", dict(rank=4, metadata=False)),
    "lycoris_lora": ("lycoris", dict(algo="lora", rank=4, alpha=2.0)),
    "lycoris_loha": ("lycoris", dict(algo="loha", rank=4, alpha=2.0)),
    "lycoris_lokr": ("lycoris", dict(algo="lokr", rank=4, alpha=2.0)),
    "kohya": ("kohya", dict(rank=4, alpha=2.0)),
}
# LoHa / LoKr math does not depend on the family: a fused-qkv one, a plain one, a GQA one
ALGO_FAMILIES = ("flux", "wan21_t2v", "lumina2")
# ... and so do the PEFT scale options (the names are those of "peft" on every family)
CASES = [(f, p) for f in FAMILIES for p in PRODUCERS
         if p in ("peft", "lycoris_lora", "kohya") or f in ALGO_FAMILIES]
# what ComfyUI 0.3.75's LoraLoader does with each file: "exact" (every target, the reference ΔW),
# "dropped" (no target changes), "scale_1" (every target, but ΔW · alpha/r ignored: core does not read
# lora_adapter_metadata, so it applies B @ A at scale 1)
TWIN_NAMED_DROPPED = {"wan21_t2v", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "lumina2"}


def core_expectation(family: str, producer: str) -> str:
    if producer == "kohya":
        return "exact"
    if family in TWIN_NAMED_DROPPED or (family == "z_image" and producer.startswith("peft")):
        return "dropped"
    if producer in ("peft", "peft_rslora"):
        return "scale_1"
    return "exact"


def producer_deltas(tiny, producer: str, kwargs: dict, f: L.LoraFile) -> dict:
    """{target: ΔW} as the producing library makes it, in ComfyUI layout."""
    places = F.twin_map(tiny)
    if producer == "peft":
        got = L.diffusers_load_deltas(tiny, f.path)       # diffusers reads the file, PEFT merges
        twin_built, _ = L.peft_twin(tiny, **{k: v for k, v in kwargs.items() if k != "metadata"})
        built = L.peft_merge_deltas(twin_built)           # the in-memory adapter that was saved
        assert set(built) == set(got) == set(F.twin_linears(tiny))
        for n in got:
            assert rel_err(got[n], built[n]) <= TOL["reference_fp32"], n
        # end to end: the ComfyUI model plus the reference ΔW (fused-qkv slices, swapped scale /
        # shift rows and all) computes what PEFT's own (unmerged) LoRA forward on the twin computes
        comfy_out, twin_out = F.forward_pair(L.with_deltas(tiny, f), twin_model=twin_built)
        assert rel_err(twin_out, comfy_out) <= TOL["twin_forward_fp32"]
        assert rel_err(comfy_out, F.forward_pair(tiny)[0]) > 1e-3          # and the LoRA shows
    elif producer == "lycoris":
        twin, net, _ = L.lycoris_twin(tiny, **kwargs)
        got = L.lycoris_forward_deltas(twin, net)
        assert set(got) == set(F.twin_linears(tiny))
    else:
        assert len(f.deltas) == len(L.comfy_linear_modules(tiny))
        return L.core_deltas(tiny, f.path)                # kohya: ComfyUI core computes plain LoRA right
    return {places[n].target: places[n].to_comfy(d) for n, d in got.items()}


@pytest.mark.parametrize("name,pid", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_lora_file_reference_matches_producer_and_core(tiny_family, family_lora, name, pid):
    """Every Linear layer adapted, ΔW != 0 everywhere; the file's reference ΔW is the producer's."""
    tiny = tiny_family(name)
    producer, kwargs = PRODUCERS[pid]
    f = family_lora(tiny, producer, **kwargs)
    assert f.deltas and all(d.abs().max() > 0 for d in f.deltas.values())

    ref = producer_deltas(tiny, producer, kwargs, f)
    targets = {k: v for k, v in ref.items() if isinstance(k, str)} if producer == "kohya" else ref
    assert set(targets) == set(f.deltas)
    for t, d in f.deltas.items():
        assert rel_err(d, targets[t]) <= TOL["reference_fp32"], t

    core = L.core_deltas(tiny, f.path)
    full = L.full_deltas(f, L.model_shapes(tiny))
    expect = core_expectation(name, pid)
    if expect == "dropped":
        assert not core
        return
    assert set(core) == set(full)
    if expect == "scale_1":
        r, alpha = kwargs["rank"], kwargs["alpha"]
        scale = alpha / r ** 0.5 if kwargs.get("rslora") else alpha / r
        full = {k: v / scale for k, v in full.items()}
    for k, d in full.items():
        assert rel_err(core[k], d) <= TOL["core_parity_fp32"], k


def test_peft_metadata_round_trips(tiny_flux, tmp_path):
    f = L.write_peft(tiny_flux, str(tmp_path / "a.safetensors"), rank=4, alpha=3.0, rslora=True)
    meta = f.meta
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 3.0 and meta["transformer.use_rslora"]
    from safetensors import safe_open
    with safe_open(f.path, "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    with pytest.raises(ValueError, match="alpha = rank"):
        L.write_peft(tiny_flux, str(tmp_path / "b.safetensors"), rank=4, alpha=2.0, metadata=False)
    assert not (tmp_path / "b.safetensors").exists()


def test_writers_never_overwrite(tiny_flux, tmp_path):
    path = str(tmp_path / "x.safetensors")
    L.write_kohya(tiny_flux, path)
    before = open(path, "rb").read()
    for write in (L.write_kohya, L.write_peft, L.write_lycoris):
        with pytest.raises(FileExistsError):
            write(tiny_flux, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]    # no temporary files left


def test_lycoris_merge_to_scales_loha_twice(tiny_flux):
    """Why LyCORIS' forward, not its merge_to, is the reference: lycoris-lora 4.1.3's LoHa
    get_diff_weight multiplies by alpha / rank twice (pinned so an upgrade that fixes it shows)."""
    twin, net, _ = L.lycoris_twin(tiny_flux, algo="loha", rank=4, alpha=2.0,
                                  targets=["transformer_blocks.0.attn.to_q"])
    fwd = L.lycoris_forward_deltas(twin, net)["transformer_blocks.0.attn.to_q"]
    merged = L.lycoris_merge_deltas(twin, net)["transformer_blocks.0.attn.to_q"]
    assert rel_err(merged, fwd * 0.5) <= TOL["reference_fp32"]


def test_shared_model_guard_restores_a_changed_family_model(tiny_flux):
    """The fixture guard's repair path (it runs when a test forgets to clone before patching)."""
    from support import family_fixtures as FX

    w = tiny_flux.model.model.diffusion_model.img_in.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    FX._restore("flux", tiny_flux, [F.UNET + "img_in.weight"])
    assert torch.equal(w, before)
