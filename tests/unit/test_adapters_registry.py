"""The single adapter registry: classes sharing a suffix each say which modules they accept (OFT
and BOFT share ``.oft_blocks``), registration refuses what would make lookup ambiguous, and the
same table gives the node combos their options."""
from __future__ import annotations

import pytest
import torch

from loralab.lora import parse
from loralab.lora.adapters import ADAPTERS, by_label, register, split_key, trainable
from loralab.lora.adapters.base import Adapter
from loralab.lora.adapters.boft import BOFT
from loralab.lora.adapters.oft import OFT


def test_oft_and_boft_share_their_suffixes_and_each_takes_its_own_modules():
    prefix, owners, role = split_key("m.oft_blocks")
    assert (prefix, set(owners), role) == ("m", {OFT, BOFT}, "oft_blocks")
    parsed = parse({"a.oft_blocks": torch.zeros(2, 4, 4), "b.oft_blocks": torch.zeros(2, 4, 2, 2),
                    "c.oft_diag": torch.eye(4).expand(2, 4, 4).clone()})
    assert {p: type(a) for p, (a,) in parsed.modules.items()} == {"a": OFT, "b": BOFT, "c": OFT}


def _fake(name, roles, identify, label=None):
    return type(f"Fake_{name}", (Adapter,), {"name": name, "label": label or name.upper(), "roles": roles,
                                             "identify": frozenset(identify)})


@pytest.mark.parametrize("cls,match", [
    (_fake("lora", {".x": "x"}, {"x"}), "registered twice"),
    (_fake("other", {".x": "x"}, {"x"}, label="lora"), "label 'lora' is empty or taken"),
    (_fake("other", {".lora_up.weight": "x"}, {"x"}), "already means 'up'"),
    (_fake("other", {".alpha": "alpha"}, {"alpha"}), "already means 'alpha'"),
    (_fake("other", {".x": "x"}, {"y"}), "not among its roles"),
])
def test_registration_refuses_ambiguity(cls, match):
    before = dict(ADAPTERS)
    with pytest.raises(ValueError, match=match):
        register(cls)
    assert ADAPTERS == before


def test_combo_options_come_from_the_registry():
    assert [c.label for c in trainable()] == ["LoRA", "LoHa", "LoKr", "OFT"]
    assert by_label("lokr") is by_label("LoKr") is ADAPTERS["lokr"]
    assert by_label("nothing") is None
