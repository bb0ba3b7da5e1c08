"""lora.bypass on plain torch modules: strengths change at the next forward with no re-patch, the
weights are never written, removal is exact, stacks add up, bias adapters work, layers whose
weight cannot be patched (an fp8 weight dequantised in forward) work, DoRA's norms are computed
once per weight, and bad input attaches nothing. (Bypass ≈ merged for every format, dtype and layer geometry: test_adapters_matrix.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loralab.lora import LoraError, apply, parse
from loralab.lora.bypass import attach
from tolerances import rel_err, tol_for

TOL = tol_for(torch.float32, "bypass")


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.3


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = torch.nn.Linear(12, 8)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = self.lin(x)                                   # (n, 4, 4, 8)
        return self.conv(h.permute(0, 3, 1, 2))


X = torch.randn(2, 4, 4, 12, generator=torch.Generator().manual_seed(11))


def adapters():
    """A low-rank LoRA on the Linear, an OFT and a LoHa on the conv: fast paths and the ΔW path."""
    sd = {"lin.lora_up.weight": r(8, 2), "lin.lora_down.weight": r(2, 12), "lin.alpha": torch.tensor(1.0),
          "conv.oft_blocks": r(2, 4, 4, seed=1),
          "c2.hada_w1_a": r(8, 2), "c2.hada_w1_b": r(2, 72), "c2.hada_w2_a": r(8, 2, seed=2), "c2.hada_w2_b": r(2, 72)}
    mods = parse(sd, file="b.safetensors").modules
    return [("lin.weight", mods["lin"][0]), ("conv.weight", mods["conv"][0]), ("conv.weight", mods["c2"][0])]


def merged_output(net, changes):
    with torch.no_grad():
        handle = apply(net, changes)
        y = net(X)
        handle.restore()
    return y


@torch.no_grad()
def test_strength_changes_at_the_next_forward_and_weights_are_never_written():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = attach(net, [(k, a, 1.0) for k, a in adapters()])
    for s in (1.0, 0.3, -1.0):
        hooks.set_strength(s)
        y = net(X)
        assert rel_err(y, merged_output(_fresh(before), [(k, a, s) for k, a in adapters()])) <= TOL
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    hooks.remove()


def _fresh(state):
    net = Net()
    net.load_state_dict(state)
    return net


@torch.no_grad()
def test_strength_per_key_and_zero_is_the_base_model_bit_for_bit():
    net = Net()
    base = net(X)
    hooks = attach(net, [(k, a, 0.8) for k, a in adapters()])
    hooks.set_strength(0.0, key="conv.weight")
    assert rel_err(net(X), merged_output(Net(), [(k, a, 0.8) for k, a in adapters()[:1]])) <= TOL
    hooks.set_strength(0.0)
    assert torch.equal(net(X), base)
    hooks.remove()


@torch.no_grad()
def test_remove_leaves_no_hook_and_the_exact_base_output():
    net = Net()
    base = net(X)
    hooks = attach(net, [(k, a, 1.0) for k, a in adapters()])
    assert not torch.equal(net(X), base)
    assert len(net.conv._forward_hooks) == 1          # one hook per layer, whatever the stack
    hooks.remove()
    assert not net.lin._forward_hooks and not net.conv._forward_hooks
    assert torch.equal(net(X), base)
    hooks.remove()                                    # idempotent


@torch.no_grad()
def test_stacked_adapters_in_bypass_equal_the_merged_stack():
    # LoRA and LoHa are weight-independent, so stacking them commutes in both modes.
    changes = [(k, a, s) for (k, a), s in zip(adapters(), (0.7, 0.0, -0.6))]
    net = Net()
    hooks = attach(net, changes)
    assert rel_err(net(X), merged_output(Net(), changes)) <= TOL
    hooks.remove()


@torch.no_grad()
def test_bias_adapter():
    (a,) = parse({"lin.diff_b": r(8)}, file="b.safetensors").modules["lin"]
    net = Net()
    hooks = attach(net, [("lin.bias", a, 0.5)])
    assert rel_err(net(X), merged_output(Net(), [("lin.bias", a, 0.5)])) <= TOL
    hooks.remove()


class Fp8Linear(torch.nn.Linear):
    """A layer whose weight cannot be patched in place: stored in float8, dequantised per forward."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__(lin.in_features, lin.out_features)
        self.weight = torch.nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)


@pytest.mark.parametrize("factors", [
    {"lora_up.weight": r(8, 2), "lora_down.weight": r(2, 12)},
    {"lokr_w1": r(2, 3), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 4), "alpha": torch.tensor(1.0)},
    {"oft_blocks": r(4, 2, 2)},
    {"weight": r(8), "on_input": torch.tensor(0)},
    {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 12), "hada_w2_a": r(8, 2, seed=1), "hada_w2_b": r(2, 12, seed=1)},
    {"lora_up.weight": r(8, 2), "lora_down.weight": r(2, 12), "dora_scale": 1 + r(8, 1).abs()},
    {"lora_up.weight": r(8, 2), "lora_down.weight": r(2, 12), "dora_scale": 1 + r(1, 12).abs()},
], ids=["lora", "lokr", "oft", "ia3", "loha", "dora_out", "dora_in"])
@torch.no_grad()
def test_fp8_weight_layer(factors):
    net = Net()
    (a,) = parse({f"lin.{k}": v for k, v in factors.items()}, file="b.safetensors").modules["lin"]
    net.lin = Fp8Linear(net.lin)
    dequant = Net()
    dequant.lin.weight.copy_(net.lin.weight.float())     # what the fp8 layer computes with
    hooks = attach(net, [("lin.weight", a, 0.9)])
    assert rel_err(net(X), merged_output(dequant, [("lin.weight", a, 0.9)])) <= TOL
    hooks.remove()


@torch.no_grad()
def test_dora_norms_are_computed_once_per_weight_not_per_forward_or_strength(monkeypatch):
    sd = {"lin.lora_up.weight": r(8, 2), "lin.lora_down.weight": r(2, 12), "lin.dora_scale": 1 + r(8, 1).abs()}
    (a,) = parse(sd, file="b.safetensors").modules["lin"]
    calls = []
    terms = type(a).dora_terms
    monkeypatch.setattr(type(a), "dora_terms", lambda self, w, axis: calls.append(axis) or terms(self, w, axis))
    net = Net()
    hooks = attach(net, [("lin.weight", a, 1.0)])
    for s in (1.0, 0.3, -1.0, 0.3):
        hooks.set_strength(s)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert rel_err(net(X), merged_output(_fresh(before), [("lin.weight", a, s)])) <= TOL
    assert calls == [0], "the norms of W + s·ΔW come from terms computed once (W is frozen)"
    net.lin.weight.mul_(1.1)          # a weight changed in place is noticed
    assert rel_err(net(X), merged_output(_fresh(net.state_dict()), [("lin.weight", a, 0.3)])) <= TOL
    assert calls == [0, 0]
    hooks.remove()


@pytest.mark.parametrize("second", ["missing.weight", "conv.weight", "lin.bias"],
                         ids=["no_such_layer", "shape_mismatch", "weight_adapter_on_a_bias"])
def test_bad_input_attaches_nothing(second):
    net = Net()
    lora = adapters()[0][1]                          # LoRA for the (8, 12) Linear
    with pytest.raises(LoraError) as e:
        attach(net, [("lin.weight", lora, 1.0), (second, lora, 1.0)])
    assert e.value.file == "b.safetensors" and e.value.key == "lin"
    assert not net.lin._forward_hooks and not net.conv._forward_hooks


def test_unsupported_layer_is_refused():
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 8, 3))
    (a,) = parse({"0.diff": r(8, 8, 3, 3)}, file="b.safetensors").modules["0"]
    with pytest.raises(LoraError, match="ConvTranspose2d"):
        attach(model, [("0.weight", a, 1.0)])
    assert not model[0]._forward_hooks


def test_row_blocks_of_a_fused_weight_land_in_their_rows():
    """q, k, v written as three modules onto one fused qkv (ComfyUI's (key, (0, start, length)) targets),
    one of them an OFT (a rotation of its block's outputs), plus a whole-weight LoRA on top: bypass
    equals merging each into its rows, for a Linear and an ungrouped conv."""
    g = torch.Generator().manual_seed(1)
    for layer, x in ((torch.nn.Linear(12, 24), torch.randn(3, 12, generator=g)),
                     (torch.nn.Conv2d(6, 24, 3, padding=1), torch.randn(2, 6, 5, 5, generator=g))):
        inp = layer.weight.shape[1:]
        kernel = list(inp[1:])
        sd = {"q.lora_up.weight": r(8, 2, *[1] * len(kernel)), "q.lora_down.weight": r(2, *inp),
              "k.oft_blocks": r(2, 4, 4, seed=1), "k.alpha": torch.tensor(0.0),
              "v.diff": r(8, *inp, seed=2),
              "all.lora_up.weight": r(24, 2, *[1] * len(kernel), seed=3), "all.lora_down.weight": r(2, *inp, seed=3)}
        mods = parse(sd, file="b.safetensors").modules
        changes = [(("weight", (0, 0, 8)), mods["q"][0], 0.7), (("weight", (0, 8, 8)), mods["k"][0], 0.7),
                   (("weight", (0, 16, 8)), mods["v"][0], 0.7), ("weight", mods["all"][0], 0.7)]
        with torch.no_grad():
            base_out = layer(x)
            handle = apply(layer, changes)
            merged_out = layer(x)
            handle.restore()
            hooks = attach(layer, changes)
            bypass_out = layer(x)
            hooks.remove()
        assert rel_err(bypass_out, merged_out) <= TOL and not torch.equal(bypass_out, base_out)
        axis = -1 if layer.weight.dim() == 2 else 1
        for i in range(3):     # each block changed its own rows
            assert not torch.equal(merged_out.narrow(axis, 8 * i, 8), base_out.narrow(axis, 8 * i, 8))


def test_row_blocks_that_have_no_forward_route_are_refused():
    lin = torch.nn.Linear(12, 24)
    (a,) = parse({"q.diff": r(8, 12)}, file="b.safetensors").modules["q"]
    with pytest.raises(LoraError, match="rows 20…27 are not a row block of 'weight'"):
        attach(lin, [(("weight", (0, 20, 8)), a, 1.0)])
    with pytest.raises(LoraError, match="only row blocks"):
        attach(lin, [(("weight", (1, 0, 8)), a, 1.0)])
    with pytest.raises(LoraError, match="whose layout the key map changes"):
        attach(lin, [(("weight", None, lambda d: d), a, 1.0)])
    grouped = torch.nn.Conv2d(12, 24, 1, groups=2)
    (g,) = parse({"q.diff": r(8, 6, 1, 1)}, file="b.safetensors").modules["q"]
    with pytest.raises(LoraError, match="grouped conv"):
        attach(grouped, [(("weight", (0, 0, 8)), g, 1.0)])
    assert not lin._forward_hooks and not grouped._forward_hooks
