"""The LoRA tools on plain files (lora/tools; no ComfyUI): resize, merge, extract, convert, inspect,
their metadata and how they write. Every ΔW here is computed independently with plain torch from
the files' tensors (``delta_of``), never with the code under test."""
from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.lora.errors import LoraError
from loralab.lora.tools import common, convert, extract, inspect, merge, resize
from loralab.lora.tools.merge import MergeInput
from support.rank_rules import by_definition, optimality_gap
from tolerances import TOL, rel_err

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
XL_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"   # input = text-context width


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rnd(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- files ------------------------------------------------------------------------------------------
def lora(p, out, inn, r, *, alpha=None, kernel=(), seed=0, mid=False):
    k = tuple(kernel)
    if mid:
        sd = {f"{p}.lora_up.weight": rnd(out, r, 1, 1, seed=seed), f"{p}.lora_down.weight": rnd(r, inn, 1, 1, seed=seed + 1),
              f"{p}.lora_mid.weight": rnd(r, r, *k, seed=seed + 2)}
    else:
        ones = (1,) * len(k)
        sd = {f"{p}.lora_up.weight": rnd(out, r, *ones, seed=seed), f"{p}.lora_down.weight": rnd(r, inn, *k, seed=seed + 1)}
    if alpha is not None:
        sd[f"{p}.alpha"] = torch.tensor(float(alpha))
    return sd


def loha(p, out, inn, r, alpha, seed=0):
    return {f"{p}.hada_w1_a": rnd(out, r, seed=seed), f"{p}.hada_w1_b": rnd(r, inn, seed=seed + 1),
            f"{p}.hada_w2_a": rnd(out, r, seed=seed + 2), f"{p}.hada_w2_b": rnd(r, inn, seed=seed + 3),
            f"{p}.alpha": torch.tensor(float(alpha))}


def lokr(p, a, b, c, d, r, alpha, seed=0):
    return {f"{p}.lokr_w1": rnd(a, c, seed=seed), f"{p}.lokr_w2_a": rnd(b, r, seed=seed + 1),
            f"{p}.lokr_w2_b": rnd(r, d, seed=seed + 2), f"{p}.alpha": torch.tensor(float(alpha))}


def write(folder, name, sd, meta=None):
    path = os.path.join(str(folder), name)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    return path


def delta_of(sd, p) -> torch.Tensor:
    """ΔW (out, in·k) at strength 1 from a module's tensors, by each format's definition (float64)."""
    t = {k[len(p) + 1:]: v.double() for k, v in sd.items() if k.startswith(p + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in t:
            d = torch.einsum("mnhw,om,ni->oihw", t["lora_mid.weight"], up, down.flatten(1)).flatten(1)
        else:
            d = up @ down.flatten(1)
    elif "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif "lokr_w1" in t:
        r = t["lokr_w2_b"].shape[0]
        d = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
    elif "diff" in t:
        return t["diff"].flatten(1)
    else:
        raise KeyError(p)
    return d * (alpha / r if alpha else 1.0)


def sd1_file(folder, name="sd1.safetensors", r=8, seed=0, meta=None):
    sd = {}
    for i, x in enumerate("qkv"):
        sd.update(lora(ATTN + x, 64, 64, r, alpha=r / 2, seed=seed + 10 * i))
    sd.update(lora(XL_K, 64, 768, r, alpha=r, seed=seed + 40))
    sd.update(lora(CONV, 64, 32, r, kernel=(3, 3), seed=seed + 50))
    return write(folder, name, sd, meta)


def same_file(a: str, b: str) -> bool:
    """The same tensors (bit for bit, same dtypes) and the same metadata. (safetensors writes the
    metadata in no fixed order, so the header bytes of two equal files may differ.)"""
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(fa.get_tensor(k).dtype == fb.get_tensor(k).dtype and torch.equal(fa.get_tensor(k), fb.get_tensor(k))
                   for k in fa.keys())


# ---- resize -----------------------------------------------------------------------------------------
LAYERS = {
    "linear": lambda: lora(ATTN + "q", 48, 80, 16, alpha=4),
    "locon": lambda: lora(CONV, 40, 24, 16, kernel=(3, 3), alpha=16),
    "tucker": lambda: lora(CONV, 40, 24, 16, kernel=(3, 3), alpha=8, mid=True),
    "loha": lambda: loha(ATTN + "q", 48, 80, 4, alpha=2),
    "lokr": lambda: lokr(ATTN + "q", 6, 8, 8, 10, 4, alpha=2),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_resize_error_is_the_optimal_truncation(tmp_path, kind):
    sd = LAYERS[kind]()
    p = CONV if kind in ("locon", "tucker") else ATTN + "q"
    out = resize.resize(write(tmp_path, "in.safetensors", sd), 5, device="cpu").tensors
    want, got = delta_of(sd, p), delta_of(out, p)
    assert out[p + ".lora_down.weight"].shape[0] == 5
    assert optimality_gap(got, want, 5) < TOL["eckart_young"], kind


def test_resize_keeps_each_layers_scale_as_kohya_writes_it(tmp_path):
    sd = lora(ATTN + "q", 48, 80, 16, alpha=4)                  # γ = 1/4
    out = resize.resize(write(tmp_path, "in.safetensors", sd), 8, device="cpu")
    assert float(out.tensors[ATTN + "q.alpha"]) == 2.0           # γ·k: the scale stays 1/4
    assert out.metadata["ss_network_dim"] == "8" and out.metadata["ss_network_alpha"] == "2"
    assert out.metadata["ss_training_comment"].startswith("dimension is resized from 16 to 8")


def spectrum_layer(p, s_values, seed):
    """A LoRA layer whose ΔW has exactly these singular values (alpha = rank: scale 1)."""
    r = len(s_values)
    q1, _ = torch.linalg.qr(rnd(64, r, seed=seed))
    q2, _ = torch.linalg.qr(rnd(96, r, seed=seed + 1))
    return {f"{p}.lora_up.weight": (q1 * torch.tensor(s_values)).contiguous(), f"{p}.lora_down.weight": q2.T.contiguous(),
            f"{p}.alpha": torch.tensor(float(r))}


@pytest.mark.parametrize("method,param", [("sv_ratio", 6.0), ("sv_fro", 0.9), ("sv_cumulative", 0.7)])
def test_dynamic_resize_picks_each_layers_rank_by_the_rule(tmp_path, method, param):
    spectra = {ATTN + "q": [9, 8, 7, 1, 0.5, 0.1, 0.05, 0.01], ATTN + "k": [5, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
               ATTN + "v": [3, 2.9, 2.8, 2.7, 0.2, 0.1, 0.1, 0.1]}
    sd = {}
    for i, (p, s) in enumerate(spectra.items()):
        sd.update(spectrum_layer(p, s, seed=i))
    out = resize.resize(write(tmp_path, "in.safetensors", sd), 8, method=method, param=param, device="cpu")
    ranks = {p: out.tensors[p + ".lora_down.weight"].shape[0] for p in spectra}
    assert ranks == {p: by_definition(s, method, param) for p, s in spectra.items()}
    assert len(set(ranks.values())) > 1 and out.metadata["ss_network_dim"] == "Dynamic"
    for layer in out.layers:                 # the report's share is the kept Frobenius share
        s = spectra[layer.name]
        assert layer.kept == pytest.approx(math.sqrt(sum(x * x for x in s[:layer.rank]) / sum(x * x for x in s)))
        assert f"{layer.name} | LoRA rank 8 | → rank {layer.rank} | keeps {100 * layer.kept:.2f}%" in out.report()


def test_resize_copies_bias_diffs_and_renames_to_kohya(tmp_path):
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": rnd(4, 64),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": rnd(64, 4, seed=1),
          ATTN + "out_0.diff_b": rnd(64, seed=2)}
    out = resize.resize(write(tmp_path, "peft.safetensors", sd), 2, device="cpu").tensors
    assert set(out) == {ATTN + "q.lora_up.weight", ATTN + "q.lora_down.weight", ATTN + "q.alpha", ATTN + "out_0.diff_b"}
    assert torch.equal(out[ATTN + "out_0.diff_b"], sd[ATTN + "out_0.diff_b"])


@pytest.mark.parametrize("kwargs,msg", [
    ({"rank": 0}, "rank must be a whole number ≥ 1"),
    ({"rank": 12}, "rank 12 is above the rank the file stores for its linear and 1×1 layers"),
    ({"rank": 4, "conv_rank": 9}, "conv_rank 9 is above the rank the file stores for its kernels > 1×1"),
    ({"rank": 4, "method": "sv_fro", "param": 2.0}, r"sv_fro .* must be in \(0, 1\]"),
    ({"rank": 4, "dtype": "int8"}, "dtype 'int8'"),
])
def test_resize_refuses_bad_requests_and_writes_nothing(tmp_path, kwargs, msg):
    path = sd1_file(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(LoraError, match=msg):
        common.save(resize.resize(path, device="cpu", **kwargs), str(tmp_path / "out.safetensors"))
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("keys,msg", [
    ({"m.weight": rnd(8), "m.on_input": torch.tensor(0)}, "IA3's change is computed from the base model's weights"),
    ({"m.oft_blocks": rnd(2, 4, 4), "m.alpha": torch.tensor(0.0)}, "OFT's change is computed from the base"),
    ({**lora("m", 8, 8, 2), "m.dora_scale": rnd(8, 1)}, "DoRA magnitude rescales by the norms of the base weight"),
    ({**lora("m", 8, 8, 2), "junk.something": rnd(3)}, "1 key.* of no LoRA format LoRA Lab knows and would be lost"),
])
def test_weight_dependent_algorithms_and_unknown_keys_are_refused(tmp_path, keys, msg):
    with pytest.raises(LoraError, match=msg):
        resize.resize(write(tmp_path, "x.safetensors", keys), 1, device="cpu")
    with pytest.raises(LoraError, match=msg):
        merge.merge([MergeInput(str(tmp_path / "x.safetensors"))], rank=1, device="cpu")


# ---- merge ------------------------------------------------------------------------------------------
def test_concatenation_is_exact(tmp_path):
    a = sd1_file(tmp_path, "a.safetensors", r=8, seed=0)
    sd_b = {}
    for i, x in enumerate("qkv"):
        sd_b.update(lora(ATTN + x, 64, 64, 4, alpha=1, seed=100 + 10 * i))
    sd_b.update(lora(XL_K, 64, 768, 2, seed=140))
    sd_b.update(lora(CONV, 64, 32, 4, kernel=(3, 3), alpha=2, seed=150, mid=True))     # Tucker: folded
    b = write(tmp_path, "b.safetensors", sd_b)
    out = merge.merge([MergeInput(a, 0.7), MergeInput(b, -1.3)], device="cpu").tensors
    sa, sb = load_file(a), load_file(b)
    for p in [ATTN + x for x in "qkv"] + [XL_K, CONV]:
        want = 0.7 * delta_of(sa, p) - 1.3 * delta_of(sb, p)
        assert rel_err(delta_of(out, p), want) < TOL["fp32"], p
        assert out[p + ".lora_down.weight"].shape[0] == sa[p + ".lora_down.weight"].shape[0] + sb[p + ".lora_down.weight"].shape[0]
    assert out[CONV + ".lora_down.weight"].shape[1:] == (32, 3, 3)


def test_svd_merge_error_is_the_optimal_truncation_of_the_merged_change(tmp_path):
    a = sd1_file(tmp_path, "a.safetensors", r=8, seed=0)
    sd_b = {}
    for i, x in enumerate("qkv"):
        sd_b.update(loha(ATTN + x, 64, 64, 3, alpha=2, seed=200 + 10 * i))     # LoHa: through ΔW
    sd_b.update(lora(XL_K, 64, 768, 6, alpha=3, seed=240))
    sd_b.update({CONV + ".diff": rnd(64, 32, 3, 3, seed=250, scale=0.1)})      # a full diff
    b = write(tmp_path, "b.safetensors", sd_b)
    result = merge.merge([MergeInput(a, 0.5), MergeInput(b, 2.0)], rank=5, conv_rank=7, device="cpu")
    out, sa, sb = result.tensors, load_file(a), load_file(b)
    for p in [ATTN + x for x in "qkv"] + [XL_K, CONV]:
        want = 0.5 * delta_of(sa, p) + 2.0 * delta_of(sb, p)
        k = 7 if p == CONV else 5
        assert out[p + ".lora_down.weight"].shape[0] == k
        assert optimality_gap(delta_of(out, p), want, k) < TOL["eckart_young"], p
    assert json.loads(result.metadata["ss_network_args"]) == {"conv_dim": "7", "conv_alpha": "7"}


def test_merge_with_kohyas_clamp_differs_from_the_optimum(tmp_path):
    a, b = sd1_file(tmp_path, "a.safetensors"), sd1_file(tmp_path, "b.safetensors", seed=7)
    plain = merge.merge([MergeInput(a), MergeInput(b)], rank=4, device="cpu").tensors
    clamped = merge.merge([MergeInput(a), MergeInput(b)], rank=4, clamp_quantile=0.99, device="cpu").tensors
    k = ATTN + "q.lora_up.weight"
    assert not torch.equal(plain[k], clamped[k]) and clamped[k].abs().max() < plain[k].abs().max()


def test_merge_keeps_trigger_words_and_says_how_it_was_made(tmp_path):
    a = sd1_file(tmp_path, "a.safetensors", meta={"modelspec.trigger_phrase": "ohwx", "modelspec.title": "alpha"})
    b = sd1_file(tmp_path, "b.safetensors", seed=3, meta={"modelspec.trigger_phrase": "sks, ohwx"})
    meta = merge.merge([MergeInput(a, 1), MergeInput(b, 0.5)], device="cpu").metadata
    assert meta["modelspec.trigger_phrase"] == "ohwx, sks"
    assert meta["modelspec.merged_from"] == "alpha, b"
    assert meta["ss_training_comment"].startswith("merged by LoRA Lab from a.safetensors ×1, b.safetensors ×0.5")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["lora_lab.tool"] == "merge"


def test_merging_different_architectures_is_refused(tmp_path):
    a = sd1_file(tmp_path, "sd1.safetensors")
    xl = write(tmp_path, "sdxl.safetensors", {**lora(XL_K, 64, 2048, 4), **lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 4)})
    with pytest.raises(LoraError, match=r"different architectures \(sd1.safetensors: SD1.5; sdxl.safetensors: SDXL\)"):
        merge.merge([MergeInput(a), MergeInput(xl)], device="cpu")


def test_merging_different_key_sets_is_refused(tmp_path):
    a = sd1_file(tmp_path, "a.safetensors")
    sd = load_file(a)
    del sd[CONV + ".lora_up.weight"], sd[CONV + ".lora_down.weight"]
    b = write(tmp_path, "b.safetensors", sd)
    with pytest.raises(LoraError, match=f"1 layer.* of a.safetensors are not in it: {CONV}"):
        merge.merge([MergeInput(a), MergeInput(b)], device="cpu")


def test_the_same_layers_in_another_naming_merge(tmp_path):
    """kohya and PEFT names of one layer are the same layer (compared by their kohya form)."""
    a = write(tmp_path, "a.safetensors", lora(ATTN + "q", 64, 64, 4))
    b = write(tmp_path, "b.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": rnd(4, 64, seed=5),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": rnd(64, 4, seed=6)})
    out = merge.merge([MergeInput(a), MergeInput(b)], device="cpu").tensors
    assert out[ATTN + "q.lora_down.weight"].shape[0] == 8


def test_merge_refuses_other_shapes_a_concatenated_loha_and_a_clamped_concatenation(tmp_path):
    a = write(tmp_path, "a.safetensors", lora(ATTN + "q", 64, 64, 4))
    wide = write(tmp_path, "wide.safetensors", lora(ATTN + "q", 64, 96, 4))
    with pytest.raises(LoraError, match=r"changes a weight of shape \(64, 96\) here but \(64, 64\) in a.safetensors"):
        merge.merge([MergeInput(a), MergeInput(wide)], device="cpu")
    h = write(tmp_path, "h.safetensors", loha(ATTN + "q", 64, 64, 2, alpha=1))
    with pytest.raises(LoraError, match="LoHa cannot be concatenated .* merge with a rank"):
        merge.merge([MergeInput(a), MergeInput(h)], device="cpu")
    with pytest.raises(LoraError, match="clamp_quantile applies to an SVD merge"):
        merge.merge([MergeInput(a), MergeInput(a)], clamp_quantile=0.9, device="cpu")
    with pytest.raises(LoraError, match="rank must be a whole number"):
        merge.merge([MergeInput(a), MergeInput(a)], rank=-3, device="cpu")


def test_block_weights_scale_each_module_by_its_block(tmp_path):
    """Per-block merge (kohya svd_merge's --lbws; here concatenation too): each module's ΔW × ratio × its
    block's weight in the SD1.x 17-value form (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00,
    OUT03 … OUT11): down_blocks.0.attentions.0 is IN01, up_blocks.3.attentions.2 is OUT11."""
    out_q = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q"
    a = write(tmp_path, "a.safetensors", {**lora(ATTN + "q", 64, 64, 4), **lora(out_q, 64, 64, 4, seed=3),
                                          **lora(XL_K, 64, 768, 4, seed=9)})
    vec = [1.0] * 17
    vec[1], vec[16] = 0.25, 0.5
    out = merge.merge([MergeInput(a, 2.0, ",".join(map(str, vec)))], device="cpu").tensors
    sa = load_file(a)
    assert rel_err(delta_of(out, ATTN + "q"), 2.0 * 0.25 * delta_of(sa, ATTN + "q")) < TOL["fp32"]
    assert rel_err(delta_of(out, out_q), 2.0 * 0.5 * delta_of(sa, out_q)) < TOL["fp32"]
    assert rel_err(delta_of(out, XL_K), 2.0 * delta_of(sa, XL_K)) < TOL["fp32"]        # IN04: weight 1

    outall = merge.merge([MergeInput(a, 1.0, "OUTALL")], device="cpu").tensors      # a preset: the output blocks only
    assert not any(k.startswith(ATTN + "q.") for k in outall)                     # weight 0: left out
    assert rel_err(delta_of(outall, out_q), delta_of(sa, out_q)) < TOL["fp32"]
    with pytest.raises(LoraError, match="17 .* or 26"):
        merge.merge([MergeInput(a, 1.0, "1,0,1")], device="cpu")


def test_merge_input_from_the_command_line():
    assert MergeInput.parse("a.safetensors:0.5") == MergeInput("a.safetensors", 0.5)
    assert MergeInput.parse("dir/a.safetensors") == MergeInput("dir/a.safetensors", 1.0)
    assert MergeInput.parse("C:\\loras\\a.safetensors") == MergeInput("C:\\loras\\a.safetensors", 1.0)
    assert MergeInput.parse("C:\\loras\\a.safetensors:-1") == MergeInput("C:\\loras\\a.safetensors", -1.0)


# ---- extract ----------------------------------------------------------------------------------------
def dit(seed=0, width=64):
    """A small model in a DiT's own layout (keys like a Flux diffusion-model file)."""
    sd = {}
    for i in range(2):
        sd[f"double_blocks.{i}.img_attn.qkv.weight"] = rnd(3 * width, width, seed=seed + i)
        sd[f"double_blocks.{i}.img_mlp.0.weight"] = rnd(4 * width, width, seed=seed + 10 + i)
        sd[f"double_blocks.{i}.img_attn.norm.query_norm.scale"] = rnd(width // 2, seed=seed + 20 + i)
        sd[f"double_blocks.{i}.img_mlp.0.bias"] = rnd(4 * width, seed=seed + 30 + i)
    sd["img_in.weight"] = rnd(width, 16, seed=seed + 40)
    sd["final_layer.conv.weight"] = rnd(8, width, 3, 3, seed=seed + 50)     # a conv, to test conv ranks
    return sd


def low_rank_change(base, r, seed=100):
    tuned, deltas = dict(base), {}
    for i, (k, w) in enumerate(base.items()):
        if w.dim() < 2:
            continue
        d = (rnd(w.shape[0], r, seed=seed + i) @ rnd(r, w[0].numel(), seed=seed + 50 + i) * 0.01).reshape(w.shape)
        tuned[k], deltas[k] = w + d, d
    return tuned, deltas


def test_extract_of_base_plus_a_rank_r_change_recovers_it():
    base = dit()
    tuned, deltas = low_rank_change(base, 3)
    result = extract.extract(extract.StateDictWeights(base, "base"), extract.StateDictWeights(tuned, "tuned"), 3,
                             device="cpu")
    for k, d in deltas.items():
        name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        assert result.tensors[name + ".lora_down.weight"].shape[0] == 3
        assert rel_err(delta_of(result.tensors, name), d.flatten(1)) < TOL["extract_fp32"], k
    assert all(x.kept == pytest.approx(1.0) for x in result.layers)
    assert result.tensors["lora_unet_final_layer_conv.lora_down.weight"].shape == (3, 64, 3, 3)


def test_extract_comfy_names_dynamic_ranks_and_conv_rank():
    base = dit()
    tuned, _ = low_rank_change(base, 6)
    b, t = extract.StateDictWeights(base, "base"), extract.StateDictWeights(tuned, "tuned")
    out = extract.extract(b, t, 16, conv_rank=2, style="comfy", device="cpu").tensors
    assert out["diffusion_model.final_layer.conv.lora_down.weight"].shape[0] == 2
    assert out["diffusion_model.img_in.lora_down.weight"].shape[0] == 16    # a fixed rank, up to the layer's size
    dyn = extract.extract(b, t, 64, method="sv_fro", param=0.999999, device="cpu").tensors
    assert dyn["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6
    none = extract.extract(b, t, 4, conv_rank=0, device="cpu").tensors
    assert not any("final_layer" in k for k in none)


def test_extract_leaves_out_unchanged_layers():
    base = dit()
    tuned = dict(base)
    tuned["img_in.weight"] = base["img_in.weight"] + 1e-3
    result = extract.extract(extract.StateDictWeights(base, "base"), extract.StateDictWeights(tuned, "tuned"), 2,
                             device="cpu")
    assert {k.split(".")[0] for k in result.tensors} == {"lora_unet_img_in"}
    assert "5 layer(s) equal in both models: left out" in result.report()
    with pytest.raises(LoraError, match="do not differ in any of the 6 layers compared by more than 0.01"):
        extract.extract(extract.StateDictWeights(base, "base"), extract.StateDictWeights(tuned, "tuned"), 2,
                        min_diff=0.01, device="cpu")


def test_extract_from_models_of_other_shapes_or_architectures_is_refused():
    base = dit()
    wide = dit(width=96)
    with pytest.raises(LoraError, match=r"differ in shape between base and wide.*double_blocks.0.img_attn.qkv.weight "
                                        r"\(192, 64\) vs \(288, 96\)"):
        extract.extract(extract.StateDictWeights(base, "base"), extract.StateDictWeights(wide, "wide"), 2, device="cpu")
    sd1 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": rnd(32, 768),
           "model.diffusion_model.input_blocks.1.1.proj_in.weight": rnd(32, 32, 1, 1)}
    xl = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": rnd(32, 2048),
          "model.diffusion_model.input_blocks.4.1.proj_in.weight": rnd(32, 32)}
    with pytest.raises(LoraError, match="different architectures: sd1 is an SD1.5 model, xl an SDXL model"):
        extract.extract(extract.StateDictWeights(sd1, "sd1"), extract.StateDictWeights(xl, "xl"), 2, device="cpu")


def test_extract_from_checkpoint_files_one_layer_at_a_time(tmp_path):
    base = dit()
    tuned, deltas = low_rank_change(base, 2)
    b, t = write(tmp_path, "base.safetensors", base), write(tmp_path, "tuned.safetensors", tuned)
    result = extract.extract(extract.FileWeights(b), extract.FileWeights(t), 2, device="cpu")
    assert rel_err(delta_of(result.tensors, "lora_unet_img_in"), deltas["img_in.weight"]) < TOL["extract_fp32"]
    assert result.metadata["ss_sd_model_name"] == "base.safetensors"
    with pytest.raises(LoraError, match="reads .safetensors model files"):
        extract.FileWeights(str(tmp_path / "model.ckpt"))


# ---- convert ----------------------------------------------------------------------------------------
def test_convert_renames_keeps_the_algorithm_and_the_factors(tmp_path):
    model = dit()
    km = extract.StateDictWeights(model).key_map()
    sd = {**loha("diffusion_model.double_blocks.0.img_attn.qkv", 192, 64, 2, alpha=1),
          **lokr("diffusion_model.img_in", 8, 8, 4, 4, 2, alpha=1, seed=5),
          "diffusion_model.double_blocks.0.img_mlp.0.diff_b": rnd(256, seed=9)}
    path = write(tmp_path, "comfy.safetensors", sd, {"ss_training_comment": "trained", "ss_network_dim": "2"})
    out = convert.convert(path, km, "kohya")
    rename = {"diffusion_model.double_blocks.0.img_attn.qkv": "lora_unet_double_blocks_0_img_attn_qkv",
              "diffusion_model.img_in": "lora_unet_img_in", "diffusion_model.double_blocks.0.img_mlp.0": "lora_unet_double_blocks_0_img_mlp_0"}
    want = {next(rename[p] + k[len(p):] for p in rename if k.startswith(p + ".")): v for k, v in sd.items()}
    assert set(out.tensors) == set(want)
    assert all(torch.equal(out.tensors[k], v) for k, v in want.items())          # bit for bit
    assert out.metadata["ss_training_comment"].startswith("converted to kohya key names") and \
        out.metadata["ss_training_comment"].endswith("; trained")
    back = convert.convert(write(tmp_path, "kohya.safetensors", out.tensors), km, "comfy").tensors
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_convert_fuses_slices_of_a_fused_weight_into_one_lora(tmp_path):
    """q and v LoRAs on row slices of a fused qkv (as diffusers files on Flux have them): one LoRA
    on the fused weight, the missing k rows zero; ΔW equal to the slices' placed in their rows."""
    km = {"diffusion_model.double_blocks.0.img_attn.qkv": "double_blocks.0.img_attn.qkv.weight",
          "lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
          "transformer.attn.to_q": ("double_blocks.0.img_attn.qkv.weight", (0, 0, 64)),
          "transformer.attn.to_v": ("double_blocks.0.img_attn.qkv.weight", (0, 128, 64))}
    sd = {**lora("transformer.attn.to_q", 64, 64, 4, alpha=2, seed=1), **lora("transformer.attn.to_v", 64, 64, 2, seed=2)}
    path = write(tmp_path, "diffusers.safetensors", sd)
    out = convert.convert(path, km, "comfy", shapes={"double_blocks.0.img_attn.qkv.weight": (192, 64)}).tensors
    want = torch.zeros(192, 64, dtype=torch.float64)
    want[:64], want[128:] = delta_of(sd, "transformer.attn.to_q"), delta_of(sd, "transformer.attn.to_v")
    assert rel_err(delta_of(out, "diffusion_model.double_blocks.0.img_attn.qkv"), want) < TOL["fp32"]
    h = write(tmp_path, "loha_slice.safetensors", loha("transformer.attn.to_q", 64, 64, 2, alpha=1))
    with pytest.raises(LoraError, match="LoHa on a part of the fused weight .* only LoRA can be rewritten so"):
        convert.convert(h, km, "comfy")


def test_convert_to_a_model_the_file_does_not_fit_is_refused(tmp_path):
    km = extract.StateDictWeights(dit()).key_map()
    path = sd1_file(tmp_path)
    with pytest.raises(LoraError, match="does not fit this model.*0 of 14 keys match this model"):
        convert.convert(path, km, "comfy")
    with pytest.raises(LoraError, match="convert to 'a1111'"):
        convert.convert(path, km, "a1111")


# ---- inspect ----------------------------------------------------------------------------------------
def test_inspect_describes_algorithm_ranks_blocks_norms_and_architecture(tmp_path):
    sd = {**lora(ATTN + "q", 64, 64, 8, alpha=4), **lora(XL_K, 64, 768, 4, seed=3),
          **loha("lora_unet_up_blocks_1_attentions_0_proj_out", 64, 64, 2, alpha=1, seed=5),
          "lora_unet_up_blocks_1_attentions_0_proj_in.weight": rnd(64), "lora_unet_up_blocks_1_attentions_0_proj_in.on_input": torch.tensor(0)}
    path = write(tmp_path, "mix.safetensors", sd, {"ss_network_dim": "8", "modelspec.trigger_phrase": "ohwx"})
    data = inspect.inspect(path)
    assert data["architecture"]["name"] == "SD1.5" and data["algorithms"] == {"LoRA": 2, "LoHa": 1, "IA3": 1}
    # SD1.x's block layout (lora/blocks.py): down_blocks.0.attentions.0 is IN01, down_blocks.1.attentions.0
    # IN04, up_blocks.1.attentions.0 OUT03 (output_blocks.3)
    assert data["blocks"]["IN01"]["modules"] == 1 and data["blocks"]["IN04"]["modules"] == 1
    assert data["blocks"]["OUT03"]["modules"] == 2
    assert data["norms"]["max"][0] == pytest.approx(float(torch.linalg.norm(delta_of(sd, XL_K))), rel=1e-5)
    assert data["blocks"]["IN01"]["norm"] == pytest.approx(float(torch.linalg.norm(delta_of(sd, ATTN + "q"))), rel=1e-5)
    assert data["norms"]["without_model"] == {"IA3": 1}
    text = inspect.report(data)
    for part in ("architecture: SD1.5", "algorithm: ", "LoRA ×2", "trigger words: ohwx", "OUT03: 2",
                 "no norm without the model (ΔW depends on its weights): IA3 ×1", "ss_network_dim: 8"):
        assert part in text, part


# ---- writing ----------------------------------------------------------------------------------------
def test_save_in_numbers_files_never_overwrites_and_stays_in_the_folder(tmp_path):
    (tmp_path / "in").mkdir()
    result = resize.resize(sd1_file(tmp_path / "in"), 2, device="cpu")
    loras = tmp_path / "loras"
    loras.mkdir()
    p1, n1 = common.save_in(result, str(loras), "tools/small")
    _, n2 = common.save_in(result, str(loras), "tools/small")
    assert (n1, n2) == ("tools/small_00001.safetensors", "tools/small_00002.safetensors")
    for bad in ("../outside", "/abs/path", "C:/x", "a/../../b"):
        with pytest.raises(LoraError, match="must stay inside the loras folders"):
            common.save_in(result, str(loras), bad)
    with pytest.raises(LoraError, match="exists already"):
        common.save(result, p1)
    assert sorted(os.listdir(loras / "tools")) == ["small_00001.safetensors", "small_00002.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["in", "loras"]


def test_written_metadata_hashes_are_kohyas_and_files_are_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    path = sd1_file(tmp_path)
    a = common.save(resize.resize(path, 4, device="cpu"), str(tmp_path / "r.safetensors"))
    data = open(a, "rb").read()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    # sd-webui-additional-networks' hash: SHA-256 of the tensor bytes after the header
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert meta["modelspec.date"] == "2023-11-14T22:13:20+00:00" and meta["ss_output_name"] == "r"
    os.rename(a, tmp_path / "first.safetensors")
    b = common.save(resize.resize(path, 4, device="cpu"), str(tmp_path / "r.safetensors"))
    assert same_file(b, str(tmp_path / "first.safetensors"))


def test_the_command_line_writes_what_the_functions_write(tmp_path, monkeypatch, capsys):
    import importlib.util

    from loralab_testkit.comfy_env import REPO_ROOT

    spec = importlib.util.spec_from_file_location("loratool", os.path.join(REPO_ROOT, "scripts", "loratool.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = sd1_file(tmp_path, "a.safetensors"), sd1_file(tmp_path, "b.safetensors", seed=4)
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["merge", str(out / "m.safetensors"), f"{a}:0.5", b, "--rank", "3", "--device", "cpu"]) == 0
    assert "merge: m.safetensors" in capsys.readouterr().out
    direct = common.save(merge.merge([MergeInput(a, 0.5), MergeInput(b)], rank=3, device="cpu"),
                         str(tmp_path / "m.safetensors"))
    assert same_file(str(out / "m.safetensors"), direct)
    assert cli.main(["resize", a, str(out / "r.safetensors"), "--rank", "99"]) == 2
    assert "rank 99 is above the rank the file stores" in capsys.readouterr().err
    assert not (out / "r.safetensors").exists()
    assert cli.main(["inspect", a, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["name"] == "SD1.5"


def test_extract_with_the_lowrank_svd():
    """svd_lowrank with a fixed rank: exact for a change of that rank; refused with a dynamic rule."""
    base = dit()
    tuned, deltas = low_rank_change(base, 3)
    b, t = extract.StateDictWeights(base, "base"), extract.StateDictWeights(tuned, "tuned")
    out = extract.extract(b, t, 3, device="cpu", svd_method="lowrank").tensors
    d = deltas["double_blocks.0.img_mlp.0.weight"]
    assert rel_err(delta_of(out, "lora_unet_double_blocks_0_img_mlp_0"), d) < TOL["extract_fp32"]
    with pytest.raises(LoraError, match="use the exact SVD with a dynamic rule"):
        extract.extract(b, t, 3, method="sv_fro", param=0.9, device="cpu", svd_method="lowrank")
