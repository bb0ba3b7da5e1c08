"""lora/info.py (what a file says about itself, from its header alone), lora/names.py (names in
<lora:…> prompt tags) and lora.io.read_header. No ComfyUI here."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from loralab.lora import LoraError, info, names
from loralab.lora.io import read, read_header

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 32
WEBP = b"RIFF\x24\0\0\0WEBPVP8 " + b"\0" * 32


def _z(*shape):
    return torch.zeros(*shape, dtype=torch.float16)


def _lora(prefix="lora_unet_down_blocks_0_attentions_0_proj_in", rank=4, out=8, inp=6, conv=False):
    down = _z(rank, inp, 3, 3) if conv else _z(rank, inp)
    up = _z(out, rank, 1, 1) if conv else _z(out, rank)
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": torch.tensor(1.0)}


def _write(path, tensors, metadata=None) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def _truncate_after_header(path: str) -> None:
    """Keep the 8-byte length and the header; drop every tensor byte (reading tensors now fails)."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    with open(path, "wb") as fh:
        fh.write(data[: 8 + n])


# ---- header only --------------------------------------------------------------------------------------
def test_summary_reads_the_header_only(tmp_path, monkeypatch):
    """The tensor bytes are gone (a real read fails) and loading tensors is forbidden: the summary
    still comes out whole, from the header alone."""
    path = _write(tmp_path / "style.safetensors", {**_lora(rank=16), **_lora("lora_te_text_model_q", rank=16)},
                  {"ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8",
                   "ss_base_model_version": "sdxl_base_v1-0", "modelspec.trigger_phrase": "ohwx, red hat",
                   "ss_steps": "1200", "ss_learning_rate": "0.0001", "ss_resolution": "(1024, 1024)",
                   "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)",
                   "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 10, "smile": 4}})})
    _truncate_after_header(path)
    with pytest.raises(LoraError):
        read(path)
    import safetensors

    def forbidden(*a, **k):
        raise AssertionError("tensors were read")
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    s = info.summarize(path)
    assert (s["base_model"], s["base_model_from"]) == ("SDXL", "metadata")
    assert (s["algorithm"], s["rank"], s["alpha"]) == ("LoRA", 16, 8.0)
    assert s["trigger_words"] == ["ohwx", "red hat"]
    assert s["training"]["steps"] == "1200" and s["training"]["learning rate"] == "0.0001"
    assert s["training"]["resolution"] == "1024×1024" and s["training"]["optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert s["tags"] == [["ohwx", 10], ["smile", 4]] and s["tags_total"] == 2
    assert (s["tensors"], s["modules"], s["format"]) == (6, 2, "safetensors")


@pytest.mark.parametrize("content, match", [
    (b"\x05\0\0", r"too short"),
    (struct.pack("<Q", 10**6) + b"{}", r"header claims"),
    (struct.pack("<Q", 12) + b"{not json!!}", r"not JSON"),
    (struct.pack("<Q", 2) + b"[]", r"not a JSON object"),
    (struct.pack("<Q", 30) + b'{"__metadata__": {"a": 1}}    ', r"__metadata__"),
    (struct.pack("<Q", 23) + b'{"k": {"dtype": "F32"}}', r"dtype or shape"),
], ids=["short", "lying-length", "not-json", "not-object", "metadata-not-strings", "no-shape"])
def test_bad_headers_are_refused_naming_the_file(tmp_path, content, match):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(content)
    for fn in (read_header, info.summarize):
        with pytest.raises(LoraError, match=match) as e:
            fn(str(p))
        assert "broken.safetensors" in str(e.value)


def test_pickle_files_are_described_without_loading(tmp_path, monkeypatch):
    p = tmp_path / "old.ckpt"
    p.write_bytes(b"not even a pickle")
    (tmp_path / "old.txt").write_text("sks dog")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    s = info.summarize(str(p))
    assert s["format"] == "pickle" and s["algorithm"] is None and s["trigger_words"] == ["sks dog"]


# ---- structure: algorithm, rank, base model -----------------------------------------------------------------
def _algo_files():
    p = "lora_unet_mid_block_attentions_0_proj_in"
    return {
        "lora": (_lora(), {}, "LoRA", 4),
        "locon": ({**_lora(), **_lora("lora_unet_conv", conv=True)}, {}, "LoCon", 4),
        "dylora": (_lora(rank=8), {"ss_network_module": "networks.dylora"}, "DyLoRA", 8),
        "dora": ({**_lora(), "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": _z(8, 1)}, {}, "LoRA (DoRA)", 4),
        "peft": ({"unet.a.to_q.lora_A.weight": _z(12, 6), "unet.a.to_q.lora_B.weight": _z(8, 12)},
                 {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 6, "unet.r": 12})}, "LoRA", 12),
        "loha": ({f"{p}.hada_w1_a": _z(8, 2), f"{p}.hada_w1_b": _z(2, 6), f"{p}.hada_w2_a": _z(8, 2),
                  f"{p}.hada_w2_b": _z(2, 6)}, {}, "LoHa", 2),
        "lokr": ({f"{p}.lokr_w1": _z(2, 2), f"{p}.lokr_w2_a": _z(4, 3), f"{p}.lokr_w2_b": _z(3, 3)}, {}, "LoKr", 3),
        "oft": ({f"{p}.oft_blocks": _z(2, 4, 4)}, {}, "OFT", 4),
        "boft": ({f"{p}.oft_blocks": _z(2, 2, 4, 4)}, {}, "BOFT", None),
        "ia3": ({f"{p}.weight": _z(8), f"{p}.on_input": torch.tensor(False)}, {}, "IA3", None),
        "full": ({f"{p}.diff": _z(8, 6), f"{p}.diff_b": _z(8)}, {}, "full diff", None),
        "mixed": ({**_lora(), f"{p}.hada_w1_a": _z(8, 2), f"{p}.hada_w1_b": _z(2, 6), f"{p}.hada_w2_a": _z(8, 2),
                   f"{p}.hada_w2_b": _z(2, 6)}, {}, "LoRA + LoHa", 4),
    }


@pytest.mark.parametrize("kind", list(_algo_files()))
def test_algorithm_and_rank_from_the_keys(tmp_path, kind):
    tensors, meta, algorithm, rank = _algo_files()[kind]
    s = info.summarize(_write(tmp_path / f"{kind}.safetensors", tensors, meta))
    assert (s["algorithm"], s["rank"]) == (algorithm, rank)
    if kind == "peft":
        assert s["alpha"] == 6.0


def test_ranks_that_differ_per_module_are_listed(tmp_path):
    tensors = {**_lora("lora_unet_a", rank=4), **_lora("lora_unet_b", rank=4), **_lora("lora_unet_c", rank=32)}
    s = info.summarize(_write(tmp_path / "r.safetensors", tensors))
    assert s["rank"] == 4 and s["ranks"] == [4, 32]


def test_not_a_lora_says_so(tmp_path):
    s = info.summarize(_write(tmp_path / "ckpt.safetensors", {"model.diffusion_model.out.2.weight": _z(4, 4),
                                                               "first_stage_model.decoder.conv_in.bias": _z(4)}))
    assert s["algorithm"] is None and s["rank"] is None
    assert "2 of 2 keys belong to no LoRA-family format" in s["notes"]


@pytest.mark.parametrize("meta, tensors, expected", [
    # display names come from the architecture table (lora/arch.py)
    ({"ss_base_model_version": "sd_v1"}, None, ("SD1.5", "metadata")),
    ({"ss_base_model_version": "sd_v2_v"}, None, ("SD2.x 768-v", "metadata")),
    ({"modelspec.architecture": "flux-1-dev/lora"}, None, ("Flux.1 dev", "metadata")),
    ({"modelspec.architecture": "hunyuan-video/lora"}, None, ("HunyuanVideo", "metadata")),
    ({"modelspec.architecture": "some-new-model/lora"}, None, ("some-new-model", "metadata")),
    ({"ss_base_model_version": "unknown", "ss_v2": "True"}, None, ("SD2.x", "metadata")),
    ({}, {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _z(4, 1280)}, ("SDXL", "keys")),
    ({}, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": _z(4, 768)},
     ("SD1.5", "keys")),
    ({}, {"something.else": _z(2)}, (None, None)),
], ids=["sd1", "sd2-v", "flux", "hunyuan", "unknown-arch-raw", "ss_v2", "te2-keys", "context-768", "nothing"])
def test_base_model(tmp_path, meta, tensors, expected):
    s = info.summarize(_write(tmp_path / "b.safetensors", tensors or _lora(), meta))
    assert (s["base_model"], s["base_model_from"]) == expected


# ---- trigger words and tags -------------------------------------------------------------------------------
def test_trigger_words_sources_in_order():
    meta = {"modelspec.trigger_phrase": "ohwx person, Red Hat",
            "ss_tag_frequency": json.dumps({"a": {"x": 3, "y": 9}, "b": {"y": 1, "z": 5}})}
    assert info.trigger_words(meta) == ["ohwx person", "Red Hat"]
    assert info.trigger_words(meta, "red hat\nblue sky,  ") == ["ohwx person", "Red Hat", "blue sky"]
    # neither names any: the most frequent dataset tags (summed over datasets)
    tags_only = {"ss_tag_frequency": meta["ss_tag_frequency"]}
    assert info.trigger_words(tags_only) == ["y", "z", "x"]
    assert info.trigger_words(tags_only, max_tags=1) == ["y"]
    assert info.trigger_words({}) == []


def test_tag_frequency_reads_ss_datasets_and_skips_junk():
    meta = {"ss_datasets": json.dumps([{"tag_frequency": {"img": {"cat": 2, "": 7, "dog": "x", "bird": -1}}},
                                       {"no": "tags"}]),
            "ss_tag_frequency": "{not json"}
    assert info.tag_frequency(meta) == [("cat", 2)]


def test_a_huge_tag_table_is_truncated_with_a_count(tmp_path):
    table = {f"tag_{i:06d}": 100000 - i for i in range(100_000)}
    path = _write(tmp_path / "big.safetensors", _lora(), {"ss_tag_frequency": json.dumps({"d": table})})
    s = info.summarize(path)
    assert len(s["tags"]) == info.MAX_TAGS and s["tags_total"] == 100_000
    assert s["tags"][0] == ["tag_000000", 100000] and len(s["trigger_words"]) == info.MAX_TRIGGER_TAGS
    assert len(json.dumps(s)) < 10_000


def test_sidecar_text_and_lora_labs_own_trigger_words(tmp_path):
    """Save LoRA writes its trigger words as modelspec.trigger_phrase; a NAME.txt adds to them."""
    from loralab.training import metadata as meta

    header = meta.build({"algorithm": "lora", "rank": 4, "alpha": 4, "num_samples": 3}, output_name="x",
                        trigger_words="sks, photo")
    path = _write(tmp_path / "mine.safetensors", _lora(), header)
    (tmp_path / "mine.txt").write_text("extra word\n")
    assert info.file_trigger_words(path) == ["sks", "photo", "extra word"]
    assert info.summarize(path)["trigger_words"] == ["sks", "photo", "extra word"]


# ---- previews ---------------------------------------------------------------------------------------------
def test_preview_sidecars_are_found_and_checked(tmp_path):
    path = _write(tmp_path / "p.safetensors", _lora())
    assert info.preview_of(path) is None
    (tmp_path / "p.webp").write_bytes(WEBP)
    assert info.preview_of(path) == (str(tmp_path / "p.webp"), "image/webp")
    (tmp_path / "p.jpg").write_bytes(JPEG)
    assert info.preview_of(path) == (str(tmp_path / "p.jpg"), "image/jpeg")
    (tmp_path / "p.png").write_text("this is not an image")           # not an image: skipped
    assert info.preview_of(path) == (str(tmp_path / "p.jpg"), "image/jpeg")
    (tmp_path / "p.preview.png").write_bytes(PNG)
    assert info.preview_of(path) == (str(tmp_path / "p.preview.png"), "image/png")


def test_a_preview_that_is_not_an_image_is_no_preview(tmp_path):
    path = _write(tmp_path / "q.safetensors", _lora())
    (tmp_path / "q.png").write_bytes(b"GIF89a" + b"\0" * 20)
    (tmp_path / "q.preview.png").write_bytes(b"")
    assert info.preview_of(path) is None and info.image_type(str(tmp_path / "q.png")) is None


# ---- names in <lora:…> tags ----------------------------------------------------------------------------------
LISTED = ["detail.safetensors", "styles/anime.safetensors", "styles/old/Anime.safetensors", "chars/alice.pt",
          "a\\win.safetensors", "x/detail.safetensors"]


def test_tag_names_are_the_shortest_that_resolve_back():
    tags = names.tag_names(LISTED)
    assert tags == {"detail.safetensors": "detail", "styles/anime.safetensors": "styles/anime",
                    "styles/old/Anime.safetensors": "styles/old/Anime", "chars/alice.pt": "alice",
                    "a\\win.safetensors": "win", "x/detail.safetensors": "x/detail"}
    for name, tag in tags.items():
        assert names.resolve(tag, LISTED) == name, tag


@pytest.mark.parametrize("tag, expected", [
    ("alice", "chars/alice.pt"), ("ALICE", "chars/alice.pt"), ("chars/alice", "chars/alice.pt"),
    ("chars/alice.pt", "chars/alice.pt"), ("styles\\anime", "styles/anime.safetensors"),
    ("a/win", "a\\win.safetensors"), ("win", "a\\win.safetensors"),
    ("detail", "detail.safetensors"),          # the top-level file's own path, without extension
    ("anime", "styles/anime.safetensors"),     # exactly one file is called anime ...
    ("Anime", "styles/old/Anime.safetensors"),  # ... and one Anime
    ("ANIME", None),                           # case aside there are two: ambiguous
    ("missing", None), ("", None),
])
def test_resolve(tag, expected):
    assert names.resolve(tag, LISTED) == expected
