"""Bad adapter input: each case raises one LoraError that names the file, the module key and the
shapes involved, and leaves everything as it was (the file's tensors, the model's weights — also when
a good adapter comes before the bad one in the same call)."""
from __future__ import annotations

import pytest
import torch

from loralab.lora import LoraError, apply, parse
from loralab.lora.bypass import attach

FILE = "bad.safetensors"


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.3


def snapshot(tensors):
    return {k: v.detach().clone() for k, v in tensors.items()}


def assert_same(before, tensors):
    assert before.keys() == tensors.keys()
    for k, v in before.items():
        assert torch.equal(v, tensors[k]), f"{k} was changed"


def assert_names(err: LoraError, key: str, *shapes):
    msg = str(err)
    assert err.file == FILE and FILE in msg
    assert key in msg, msg
    for s in shapes:
        assert str(s) in msg, f"{s} not in: {msg}"


def parse_error(sd, key, *shapes, options=None):
    before = snapshot(sd)
    with pytest.raises(LoraError) as e:
        parse(sd, file=FILE, options=options)
    assert_names(e.value, key, *shapes)
    assert_same(before, sd)


def apply_error(sd, model_key, key, *shapes, shape=(8, 12)):
    """The adapter parses; patching and bypassing refuse it before touching the model."""
    model = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], 3)
    good = parse({"good.lora_up.weight": r(shape[0], 2), "good.lora_down.weight": r(2, *shape[1:])},
                 file="good.safetensors").modules["good"][0]
    (bad,) = parse(sd, file=FILE).modules[key.strip("'")]
    before = snapshot(model.state_dict())
    for attempt in (apply, attach):
        with pytest.raises(LoraError) as e:
            attempt(model, [(model_key, good, 1.0), (model_key, bad, 1.0)])
        assert_names(e.value, key, *shapes)
        assert_same(before, model.state_dict())
        assert not model._forward_hooks


def test_one_module_with_keys_of_two_algorithms():
    sd = {"m.lora_up.weight": r(8, 2), "m.lora_down.weight": r(2, 12),
          "m.hada_w1_a": r(8, 2), "m.hada_w1_b": r(2, 12), "m.hada_w2_a": r(8, 2), "m.hada_w2_b": r(2, 12)}
    parse_error(sd, "'m'", "lora", "loha", "m.lora_up.weight (8, 2)", "m.hada_w1_a (8, 2)")


def test_ia3_keys_next_to_another_algorithm_are_two_algorithms():
    # ".weight" is generic: with "on_input" it is IA3, and IA3 plus LoKr on one module is a conflict
    sd = {"m.weight": r(8), "m.on_input": torch.tensor(0), "m.lokr_w1": r(2, 3), "m.lokr_w2": r(4, 4)}
    parse_error(sd, "'m'", "ia3", "lokr", "m.weight (8,)")


@pytest.mark.parametrize("sd,shapes", [
    ({"m.lora_up.weight": r(8, 4), "m.lora_down.weight": r(3, 12)}, [(8, 4), (3, 12)]),
    ({"m.lora_up.weight": r(8, 3, 1, 1), "m.lora_down.weight": r(3, 6, 1, 1), "m.lora_mid.weight": r(2, 3, 3, 3)},
     [(8, 3, 1, 1), (2, 3, 3, 3)]),
    ({"m.hada_w1_a": r(8, 2), "m.hada_w1_b": r(3, 12), "m.hada_w2_a": r(8, 2), "m.hada_w2_b": r(2, 12)},
     [(8, 2), (3, 12)]),
    ({"m.hada_w1_a": r(2, 8), "m.hada_w1_b": r(2, 6), "m.hada_t1": r(3, 2, 3, 3),
      "m.hada_w2_a": r(2, 8), "m.hada_w2_b": r(2, 6), "m.hada_t2": r(2, 2, 3, 3)}, [(3, 2, 3, 3)]),
    ({"m.lokr_w1": r(2, 3), "m.lokr_w2_a": r(4, 2), "m.lokr_w2_b": r(3, 4)}, [(4, 2), (3, 4)]),
    ({"m.lokr_w1_a": r(2, 1), "m.lokr_w1_b": r(1, 3), "m.lokr_w2_a": r(4, 2), "m.lokr_w2_b": r(2, 4)},
     [(1, 3), (2, 4)]),
    ({"m.a1.weight": r(12, 2), "m.a2.weight": r(3, 12), "m.b1.weight": r(8, 2), "m.b2.weight": r(2, 12)},
     [(12, 2), (3, 12)]),
], ids=["lora", "locon_mid", "loha", "loha_tucker", "lokr_pair", "lokr_halves", "glora"])
def test_factors_whose_ranks_disagree(sd, shapes):
    parse_error(sd, "'m'", "ranks disagree", *shapes)


def test_dylora_rank_above_the_stored_one():
    sd = {"m.lora_up.weight": r(8, 4), "m.lora_down.weight": r(4, 12), "m.alpha": torch.tensor(2.0)}
    parse_error(sd, "'m'", "DyLoRA rank 6", "stores rank 4", (8, 4), (4, 12), options={"dyn_rank": 6})


def test_oft_blocks_that_do_not_divide_the_weight():
    # 3 blocks of 3 cover 9 output channels; the layer has 8
    apply_error({"m.oft_blocks": r(3, 3, 3), "m.alpha": torch.tensor(0.0)}, "weight", "'m'", (3, 3, 3), (8, 12))


def test_boft_stages_that_do_not_fit_the_channels():
    # 3 butterfly stages of blocks of 4 need a multiple of 16 channels; 3·4 = 12 are given
    parse_error({"m.oft_blocks": r(3, 3, 4, 4)}, "'m'", (3, 3, 4, 4), "multiple of 16")


@pytest.mark.parametrize("scale", [r(5, 1), r(1, 5), r(5)], ids=["out_shaped", "in_shaped", "flat"])
def test_dora_scale_that_fits_neither_axis(scale):
    sd = {"m.lora_up.weight": r(8, 2), "m.lora_down.weight": r(2, 12), "m.dora_scale": 1 + scale.abs()}
    apply_error(sd, "weight", "'m'", tuple(scale.shape), (8, 12), "fits neither")


def test_dora_scale_on_loha_that_fits_neither_axis():
    sd = {"m.hada_w1_a": r(8, 2), "m.hada_w1_b": r(2, 12), "m.hada_w2_a": r(8, 2), "m.hada_w2_b": r(2, 12),
          "m.dora_scale": 1 + r(1, 7).abs()}
    apply_error(sd, "weight", "'m'", (1, 7), (8, 12))


def test_peft_magnitude_of_the_wrong_length():
    sd = {"m.lora_B.weight": r(8, 2), "m.lora_A.weight": r(2, 12), "m.lora_magnitude_vector": 1 + r(12).abs()}
    apply_error(sd, "weight", "'m'", (12,), (8, 12))


@pytest.mark.parametrize("sd,shapes", [
    ({"m.lokr_w1": r(2, 3), "m.lokr_w2": r(4, 5)}, [(2, 3), (4, 5), (8, 12)]),
    ({"m.weight": r(12), "m.on_input": torch.tensor(0)}, [(12,), (8, 12)]),
    ({"m.a1.weight": r(10, 2), "m.a2.weight": r(2, 10), "m.b1.weight": r(8, 2), "m.b2.weight": r(2, 10)},
     [(10, 2), (8, 12)]),
    ({"m.hada_w1_a": r(8, 2), "m.hada_w1_b": r(2, 10), "m.hada_w2_a": r(8, 2), "m.hada_w2_b": r(2, 10)},
     [(8, 10), (8, 12)]),
], ids=["lokr", "ia3", "glora", "loha"])
def test_factors_that_do_not_fit_the_target(sd, shapes):
    apply_error(sd, "weight", "'m'", *shapes)


def test_a_bare_weight_key_is_unknown_not_an_error():
    # ".weight" alone (no "on_input") is not IA3: it is reported as a key of no known format
    parsed = parse({"stray.weight": r(8), "m.lora_up.weight": r(8, 2), "m.lora_down.weight": r(2, 12)}, file=FILE)
    assert list(parsed.modules) == ["m"] and parsed.unknown == ["stray.weight"]
