"""LoraLabTrainingDataset inside ComfyUI (in-process, CPU, tiny SD1.5 with TAESD): repeats, kohya's
buckets, captions encoded as CLIPTextEncode would, the content cache (a second run calls neither
the VAE nor the CLIP), every bad input with a message naming the file, and its output (and core's
dataset nodes') feeding the train node."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from loralab_testkit.datasets import caption_file, image_file, kohya_folder

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return tiny_sd15


@pytest.fixture
def input_dir(comfy):
    return comfy.folder_paths.get_input_directory()


@pytest.fixture
def folder(input_dir, request):
    name = "ds_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    root = os.path.join(input_dir, name)
    shutil.rmtree(root, ignore_errors=True)
    kohya_folder(root)
    yield name
    shutil.rmtree(root, ignore_errors=True)


def run(pack, sd15, folder, **kw):
    args = dict(resolution=96, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    args.update(kw)
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["LoraLabTrainingDataset"]().build(folder, sd15.vae, sd15.clip, **args)
    latents, conds, report = out["result"]
    assert out["ui"]["text"] == [report]
    return latents, conds, report


class Counting:
    """Counts calls of a method on a class while the test runs (patched on the class)."""

    def __init__(self, monkeypatch, cls, name):
        self.calls = 0
        real = getattr(cls, name)

        def wrapper(obj, *a, **k):
            self.calls += 1
            return real(obj, *a, **k)
        monkeypatch.setattr(cls, name, wrapper)


def test_schema_has_tooltips_and_list_outputs(pack):
    cls = pack.NODE_CLASS_MAPPINGS["LoraLabTrainingDataset"]
    spec = cls.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, (_, opts) in spec[group].items():
            assert opts.get("tooltip"), name
    assert cls.RETURN_TYPES == ("LATENT", "CONDITIONING", "STRING") and cls.OUTPUT_IS_LIST == (True, True, False)
    assert len(cls.OUTPUT_TOOLTIPS) == 3 and all(cls.OUTPUT_TOOLTIPS)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LoraLabTrainingDataset"].endswith("(LoRA Lab)")


def test_repeats_buckets_and_captions(pack, sd15, folder):
    import nodes as core_nodes

    latents, conds, report = run(pack, sd15, folder)
    # 3 images × 2 repeats + 1 plain image
    assert len(latents) == len(conds) == 7
    shapes = sorted({tuple(l["samples"].shape) for l in latents})
    # kohya's buckets for a 96x96 area, 64-px steps, 64..128: 64x64, 64x128, 128x64 (96x64 ties between
    # 64x64 and 128x64 and takes the first, as numpy's argmin does in kohya's select_bucket)
    assert shapes == [(1, 4, 8, 8), (1, 4, 16, 8)]
    assert "4 images, 7 samples with repeats" in report and "2_sks square ×2 (3 images)" in report
    texts = [c[0][1]["loralab_caption"]["text"] for c in conds]
    assert texts.count("a grey picture") == 1 and sum(t.startswith("sks, red") for t in texts) == 2
    # the conditioning is what CLIPTextEncode gives for the caption
    with torch.inference_mode():
        ref = core_nodes.CLIPTextEncode().encode(sd15.clip, texts[0])[0][0]
    assert torch.equal(conds[0][0][0], ref[0]) and torch.equal(conds[0][0][1]["pooled_output"], ref[1]["pooled_output"])
    b = conds[texts.index(next(t for t in texts if t.startswith("sks, green")))][0][1]     # b.png, 96x64
    assert {k: b[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == \
        {"width": 96, "height": 64, "crop_w": 0, "crop_h": 10, "target_width": 64, "target_height": 64}
    info = conds[0][0][1]["loralab_dataset"]
    assert info["dataset_dirs"]["2_sks square"] == {"n_repeats": 2, "img_count": 3}
    # the latents are the VAE's own: the 64x64 image through VAEEncode gives the same latent
    import numpy as np
    from PIL import Image

    path = os.path.join(pack_input(folder), "2_sks square", "a.png")
    px = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)[None]
    with torch.inference_mode():
        ref_latent = core_nodes.VAEEncode().encode(sd15.vae, px)[0]["samples"]
    a = next(i for i, t in enumerate(texts) if t.startswith("sks, red"))
    assert torch.allclose(latents[a]["samples"], ref_latent, atol=1e-6)


def pack_input(folder):
    import folder_paths
    return os.path.join(folder_paths.get_input_directory(), folder)


def test_second_run_reads_the_cache_and_calls_no_encoder(pack, sd15, folder, monkeypatch):
    import comfy.sd

    first = run(pack, sd15, folder)
    vae = Counting(monkeypatch, comfy.sd.VAE, "encode")
    clip = Counting(monkeypatch, comfy.sd.CLIP, "encode_from_tokens_scheduled")
    again = run(pack, sd15, folder)
    assert vae.calls == 0 and clip.calls == 0
    assert "latents: 0 encoded, 4 from the cache" in again[2] and "captions: 0 encoded, 4 from the cache" in again[2]
    assert all(torch.equal(a["samples"], b["samples"]) for a, b in zip(first[0], again[0]))
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(first[1], again[1]))
    # a changed image is encoded again, alone
    image_file(os.path.join(pack_input(folder), "plain.png"), 64, 64, (10, 10, 10), square=False)
    run(pack, sd15, folder)
    assert vae.calls == 1


def test_is_changed_follows_the_files(pack, folder):
    cls = pack.NODE_CLASS_MAPPINGS["LoraLabTrainingDataset"]
    a = cls.IS_CHANGED(folder)
    assert cls.IS_CHANGED(folder) == a
    caption_file(os.path.join(pack_input(folder), "plain.txt"), "a grey picture, edited")
    assert cls.IS_CHANGED(folder) != a


@pytest.mark.parametrize("bad,msg", [
    ("../outside", "inside ComfyUI's input directory"), ("/etc", "inside ComfyUI's input directory"),
    ("no_such_dataset", "'no_such_dataset' does not exist"), ("", "no dataset folder given")])
def test_bad_folder_names(pack, sd15, bad, msg):
    from loralab.lora.errors import LoraError

    with pytest.raises(LoraError, match=msg):
        run(pack, sd15, bad)


def test_bad_files_are_named(pack, sd15, folder):
    from loralab.lora.errors import LoraError

    root = pack_input(folder)
    sub = os.path.join(root, "2_sks square")
    caption_file(os.path.join(sub, "b.txt"), "caf\xe9".encode("latin-1"))
    with pytest.raises(LoraError, match=r"b.txt.*not UTF-8"):
        run(pack, sd15, folder)
    caption_file(os.path.join(sub, "b.txt"), "fixed")
    os.remove(os.path.join(sub, "c.txt"))
    with pytest.raises(LoraError, match=r"2_sks square/c.png.*no caption"):
        run(pack, sd15, folder)
    _, conds, _ = run(pack, sd15, folder, missing_caption="folder name")
    assert "sks square" in [c[0][1]["loralab_caption"]["text"] for c in conds]
    caption_file(os.path.join(sub, "c.txt"), "back")
    with open(os.path.join(sub, "a.png"), "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(LoraError, match=r"2_sks square/a.png.*cannot read this image"):
        run(pack, sd15, folder)
    os.remove(os.path.join(sub, "a.png"))
    with pytest.raises(LoraError, match=r"different sizes and bucketing is off"):
        run(pack, sd15, folder, enable_bucket=False)


def test_empty_folder(pack, sd15, input_dir):
    from loralab.lora.errors import LoraError

    os.makedirs(os.path.join(input_dir, "empty_ds", "3_x"), exist_ok=True)
    with pytest.raises(LoraError, match=r"empty_ds.*no images"):
        run(pack, sd15, "empty_ds")


def test_dataset_feeds_the_train_node_with_captions_varied_per_step(pack, sd15, folder):
    latents, conds, _ = run(pack, sd15, folder, shuffle_caption=True, keep_tokens=1)
    node = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]()
    args = dict(model=[sd15.model], latents=latents, positive=conds, batch_size=[2], grad_accumulation_steps=[1],
                steps=[2], learning_rate=[1e-3], rank=[4], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["lora"], gradient_checkpointing=[False],
                existing_lora=["[None]"], clip=[sd15.clip])
    with torch.inference_mode():
        out = node.train(**args)
    lora = out["result"][1]
    assert lora.info["caption_variants_per_step"] is True and lora.info["num_samples"] == 7
    assert lora.info["dataset"]["dataset_dirs"]["2_sks square"]["n_repeats"] == 2


def test_core_dataset_nodes_still_feed_the_train_node(pack, sd15, folder):
    """Core's Load Image and Text Dataset -> Make Training Dataset (LATENT / CONDITIONING lists)."""
    from comfy_extras import nodes_dataset as core

    def value(out):
        return out.result if hasattr(out, "result") else out

    sub = os.path.join(folder, "2_sks square")
    images, texts = value(core.LoadImageTextDataSetFromFolderNode.execute(sub))
    with torch.inference_mode():
        latents, conds = value(core.MakeTrainingDataset.execute(images, [sd15.vae], [sd15.clip], texts))
    node = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]()
    with torch.inference_mode():
        out = node.train(model=[sd15.model], latents=latents, positive=conds, batch_size=[1],
                         grad_accumulation_steps=[1], steps=[1], learning_rate=[1e-3], rank=[4], optimizer=["AdamW"],
                         loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                         algorithm=["lora"], gradient_checkpointing=[False], existing_lora=["[None]"])
    result = out["result"]
    assert result[3] == 1 and result[1] and result[1].info["num_samples"] == 3
