"""lora.dit_keys without ComfyUI: the key maps of the DiT families onto hand-made state dicts with the
model's (ComfyUI's) layer names, loaded through ``lora.patch.load_into`` and compared with the closed
form of each file's factors: every naming (diffusers / PEFT, SimpleTuner's ``lycoris_``, OneTrainer,
kohya, mixed separators, XLabs), fused row blocks (q, k, v of a qkv, Lumina 2's grouped-query k/v,
``linear1``'s MLP rows), swapped halves, and the reverse map.

The same maps are checked against ComfyUI's real models, by value, for every Linear of every family in
tests/comfy/test_dit_formats.py.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from loralab.lora import LoraError, dit_keys
from loralab.lora.patch import load_into, split_target
from tolerances import TOL, rel_err

D, MLP, KV = 8, 12, 4       # hidden width, MLP width, Lumina 2's k/v rows (grouped-query)


def weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


WAN = {f"blocks.{i}.{a}.{p}.weight": (D, D) for i in range(2) for a in ("self_attn", "cross_attn")
       for p in ("q", "k", "v", "o")} | {"blocks.0.ffn.0.weight": (MLP, D), "blocks.0.ffn.2.weight": (D, MLP),
                                         "head.head.weight": (16, D), "blocks.0.self_attn.norm_q.weight": (D,)}
HUNYUAN = {"double_blocks.0.img_attn.qkv.weight": (3 * D, D), "double_blocks.0.txt_attn.qkv.weight": (3 * D, D),
           "double_blocks.0.img_mlp.0.weight": (MLP, D), "single_blocks.0.linear1.weight": (3 * D + MLP, D),
           "single_blocks.0.linear2.weight": (D, D + MLP), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
           "final_layer.linear.weight": (16, D)}
LUMINA2 = {"layers.0.attention.qkv.weight": (D + 2 * KV, D), "layers.0.attention.out.weight": (D, D),
           "layers.0.feed_forward.w1.weight": (MLP, D), "layers.0.adaLN_modulation.1.weight": (4 * D, D)}


class File:
    """A LoRA file written module by module; ``expect`` holds each target's ΔW at strength 1."""

    def __init__(self):
        self.sd: dict[str, torch.Tensor] = {}
        self.expect: list[tuple[str, tuple | None, bool, torch.Tensor]] = []   # (key, rows, swapped, ΔW)
        self.g = torch.Generator().manual_seed(1)

    def lora(self, name: str, out: int, inp: int, key: str, rows=None, *, style="kohya", swap=False, rank=2):
        up, down = torch.randn(out, rank, generator=self.g), torch.randn(rank, inp, generator=self.g)
        if style == "kohya":
            self.sd |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(1.0)}
            scale = 1.0 / rank
        elif style == "peft":
            self.sd |= {f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down}
            scale = 1.0
        else:   # XLabs: no alpha, scale 1
            self.sd |= {f"{name}.up.weight": up, f"{name}.down.weight": down}
            scale = 1.0
        self.expect.append((key, rows, swap, up @ down * scale))

    def loha(self, name: str, out: int, inp: int, key: str):
        t = {s: torch.randn(*shape, generator=self.g) for s, shape in
             (("hada_w1_a", (out, 2)), ("hada_w1_b", (2, inp)), ("hada_w2_a", (out, 2)), ("hada_w2_b", (2, inp)))}
        self.sd |= {f"{name}.{s}": v for s, v in t.items()} | {f"{name}.alpha": torch.tensor(4.0)}
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 2.0     # alpha 4 / rank 2
        self.expect.append((key, None, False, delta))

    def write(self, tmp_path, name="f.safetensors") -> str:
        path = str(tmp_path / name)
        save_file(self.sd, path)
        return path


def check_loaded(model: dict[str, torch.Tensor], before: dict, f: File, strength: float):
    want = {k: torch.zeros_like(v) for k, v in before.items()}
    for key, rows, swap, d in f.expect:
        d = d.roll(d.shape[0] // 2, dims=0) if swap else d     # diffusers' (scale, shift) -> (shift, scale)
        (want[key] if rows is None else want[key].narrow(0, *rows)).add_(strength * d)
    for k, v in model.items():
        if want[k].abs().max() > 0:
            assert rel_err(v - before[k], want[k]) <= TOL["fp32"], k
        else:
            assert torch.equal(v, before[k]), k


def test_wan_every_naming_and_mixed_separators(tmp_path):
    model = weights(WAN)
    before = {k: v.clone() for k, v in model.items()}
    f = File()
    f.lora("transformer.blocks.0.attn1.to_q", D, D, "blocks.0.self_attn.q.weight", style="peft")    # diffusers
    f.lora("lora_unet_blocks_1.self_attn.q", D, D, "blocks.1.self_attn.q.weight")     # the separators users meet
    f.lora("lora_unet_blocks_1_cross_attn_o", D, D, "blocks.1.cross_attn.o.weight")   # kohya / musubi-tuner
    f.lora("diffusion_model.blocks.0.attn2.to_out.0", D, D, "blocks.0.cross_attn.o.weight", style="peft")
    f.lora("lora_transformer_proj_out", 16, D, "head.head.weight")                     # OneTrainer
    f.loha("lycoris_blocks_0_ffn_net_0_proj", MLP, D, "blocks.0.ffn.0.weight")         # SimpleTuner LyCORIS
    handle, m = load_into(model, f.write(tmp_path), 0.7, arch="wan")
    assert len(m.targets) == 6 and not m.unmatched and not m.unknown
    check_loaded(model, before, f, 0.7)
    handle.restore()
    assert all(torch.equal(model[k], before[k]) for k in model)


def test_fused_row_blocks_each_patched_in_their_rows(tmp_path):
    """HunyuanVideo's diffusers q, k, v (three modules, one fused weight), linear1's q/k/v/MLP rows,
    diffusers' (scale, shift) norm_out onto ComfyUI's (shift, scale), and original-name modules."""
    model = weights(HUNYUAN)
    before = {k: v.clone() for k, v in model.items()}
    f = File()
    qkv, lin1 = "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"
    for i, p in enumerate("qkv"):
        f.lora(f"transformer.transformer_blocks.0.attn.to_{p}", D, D, qkv, (i * D, D), style="peft")
        f.lora(f"transformer.single_transformer_blocks.0.attn.to_{p}", D, D, lin1, (i * D, D), style="peft")
    f.lora("transformer.single_transformer_blocks.0.proj_mlp", MLP, D, lin1, (3 * D, MLP), style="peft")
    f.lora("transformer.transformer_blocks.0.attn.add_k_proj", D, D, "double_blocks.0.txt_attn.qkv.weight", (D, D),
           style="peft")
    f.lora("transformer.norm_out.linear", 2 * D, D, "final_layer.adaLN_modulation.1.weight", style="peft", swap=True)
    f.lora("lora_unet_double_blocks_0_img_mlp_fc1", MLP, D, "double_blocks.0.img_mlp.0.weight")   # musubi-tuner
    handle, m = load_into(model, f.write(tmp_path), -1.0, arch="hunyuan-video")
    assert len(m.targets) == 10 and not m.unmatched
    check_loaded(model, before, f, -1.0)
    handle.restore()
    assert all(torch.equal(model[k], before[k]) for k in model)


def test_lumina2_grouped_query_kv_rows(tmp_path):
    model = weights(LUMINA2)
    before = {k: v.clone() for k, v in model.items()}
    f = File()
    for p, rows in (("q", (0, D)), ("k", (D, KV)), ("v", (D + KV, KV))):
        f.lora(f"transformer.layers.0.attn.to_{p}", rows[1], D, "layers.0.attention.qkv.weight", rows, style="peft")
    f.lora("lycoris_layers_0_feed_forward_linear_1", MLP, D, "layers.0.feed_forward.w1.weight")
    f.lora("transformer.layers.0.norm1.linear", 4 * D, D, "layers.0.adaLN_modulation.1.weight", style="peft")
    load_into(model, f.write(tmp_path), 1.0, arch="lumina2")
    check_loaded(model, before, f, 1.0)


def test_xlabs_names(tmp_path):
    model = weights(HUNYUAN | {"double_blocks.0.img_attn.proj.weight": (D, D)})
    before = {k: v.clone() for k, v in model.items()}
    f = File()
    f.lora("double_blocks.0.processor.qkv_lora1", 3 * D, D, "double_blocks.0.img_attn.qkv.weight", style="xlabs")
    f.lora("diffusion_model.double_blocks.0.processor.proj_lora1", D, D, "double_blocks.0.img_attn.proj.weight",
           style="xlabs")
    f.lora("double_blocks.0.processor.qkv_lora2", 3 * D, D, "double_blocks.0.txt_attn.qkv.weight", style="xlabs")
    f.lora("single_blocks.0.processor.qkv_lora", 3 * D, D, "single_blocks.0.linear1.weight", (0, 3 * D), style="xlabs")
    f.lora("single_blocks.0.processor.proj_lora", D, D + MLP, "single_blocks.0.linear2.weight", style="xlabs")
    load_into(model, f.write(tmp_path), 0.5, arch="flux")
    check_loaded(model, before, f, 0.5)


def test_a_layer_the_model_lacks_is_left_unmatched():
    """Wan 2.1 I2V's image cross-attention on a T2V model: no target, reported as not in this model."""
    shapes = {"diffusion_model." + k: s for k, s in WAN.items()}
    got = dit_keys.comfy_targets("wan", ["transformer.blocks.0.attn2.add_k_proj", "transformer.blocks.0.attn2.to_k"],
                                 shapes)
    assert got == {"transformer.blocks.0.attn2.to_k": "diffusion_model.blocks.0.cross_attn.k.weight"}


def test_without_shapes_rows_come_from_the_file():
    """A converter without a model: row blocks sized from each module's own (rows, input width)."""
    widths = {"transformer.layers.0.attn.to_k": (KV, D), "transformer.layers.0.attn.to_v": (KV, D)}
    got = dit_keys.comfy_targets("lumina2", [*widths, "transformer.layers.0.attn.to_out.0", "lora_unet_layers_0_x"],
                                 widths=widths)
    assert got == {"transformer.layers.0.attn.to_k": ("diffusion_model.layers.0.attention.qkv.weight", (0, D, KV)),
                   "transformer.layers.0.attn.to_v": ("diffusion_model.layers.0.attention.qkv.weight", (0, D + KV, KV)),
                   "transformer.layers.0.attn.to_out.0": "diffusion_model.layers.0.attention.out.weight"}


@pytest.mark.parametrize("arch,shapes", [("hunyuan-video", HUNYUAN), ("lumina2", LUMINA2), ("wan", WAN)])
@pytest.mark.parametrize("naming", ["diffusers", "lycoris", "onetrainer", "kohya", "comfy"])
def test_reverse_map_round_trips(arch, shapes, naming):
    shapes = {"diffusion_model." + k: s for k, s in shapes.items()}
    forward = dit_keys.comfy_targets(arch, [f"transformer.{m}" for m in _diffusers_names(arch)], shapes)
    targets = list(forward.values()) + [k for k in shapes if k.endswith(".weight") and len(shapes[k]) == 2]
    names = dit_keys.file_names(arch, targets, shapes, naming=naming)
    assert names
    for target, name in names.items():
        assert dit_keys.comfy_targets(arch, [name], shapes)[name] == target, name
    if naming in ("kohya", "comfy"):
        assert all(isinstance(t, str) for t in names)      # whole weights only
    else:
        assert set(forward.values()) <= set(names)          # every diffusers target has its name back


def _diffusers_names(arch):
    return {"hunyuan-video": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                              "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                              "single_transformer_blocks.0.attn.to_v", "norm_out.linear"],
            "lumina2": ["layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v", "layers.0.norm1.linear"],
            "wan": ["blocks.1.attn2.to_q", "blocks.0.ffn.net.2", "proj_out"]}[arch]


def test_reverse_map_knows_lumina2_from_z_image():
    """Both load into ComfyUI's NextDiT; their diffusers classes name the same layer differently."""
    z = {"diffusion_model.layers.0.attention.qkv.weight": (3 * D, D),
         "diffusion_model.layers.0.adaLN_modulation.0.weight": (4 * D, D)}
    lumina = {"diffusion_model." + k: v for k, v in LUMINA2.items()}
    k = ("diffusion_model.layers.0.attention.qkv.weight", (0, D, D))
    assert dit_keys.file_names("lumina2", [k], z) == {k: "transformer.layers.0.attention.to_k"}
    k = ("diffusion_model.layers.0.attention.qkv.weight", (0, D, KV))
    assert dit_keys.file_names("lumina2", [k], lumina) == {k: "transformer.layers.0.attn.to_k"}
    with pytest.raises(ValueError, match="naming 'nope'"):
        dit_keys.file_names("lumina2", [k], lumina, naming="nope")


def test_split_target_reads_every_key_form():
    assert split_target("a.weight") == ("a.weight", None, None)
    assert split_target(("a.in_proj_weight", 0, 8, 8)) == ("a.in_proj_weight", (0, 8, 8), None)   # sd_keys
    assert split_target(("a.weight", (0, 8, 8))) == ("a.weight", (0, 8, 8), None)                  # ComfyUI
    assert split_target(("a.weight", None, dit_keys.swap_halves)) == ("a.weight", None, dit_keys.swap_halves)


def test_names_two_layers_share_flattened_are_not_guessed():
    shapes = {"diffusion_model.a.b_c.weight": (D, D), "diffusion_model.a_b.c.weight": (D, D),
              "diffusion_model.x.weight": (D, D)}
    assert dit_keys.comfy_targets(None, ["lora_unet_a_b_c", "lora_unet_x"], shapes) == {
        "lora_unet_x": "diffusion_model.x.weight"}


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(KeyError, match="no architecture 'nope'"):
        dit_keys.comfy_targets("nope", ["x"])
    with pytest.raises(LoraError, match="model has no tensor"):
        from loralab.lora.patch import apply
        from loralab.lora.adapters.lora import LoRA
        apply({}, [("x.weight", LoRA(up=torch.ones(1, 1), down=torch.ones(1, 1)), 1.0)])


def test_a_weight_not_fused_the_familys_way_gets_no_row_block():
    """Rows that cannot be q + two equal k/v (or q, k, v + MLP) are not guessed at."""
    odd = {"diffusion_model.double_blocks.0.img_attn.qkv.weight": (3 * D + 1, D),
           "diffusion_model.single_blocks.0.linear1.weight": (3 * D, D)}
    assert dit_keys.comfy_targets("flux", ["transformer.transformer_blocks.0.attn.to_k",
                                           "transformer.single_transformer_blocks.0.proj_mlp"], odd) == {}
