"""The dataset core (no ComfyUI): kohya's folder layout and repeats, its bucket resolutions and
bucket choice (checked against values derived independently), captions, the content cache (a
second run calls no encoder), the manifest read back and sharded, and every bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from loralab.training import dataset as ds
from loralab.training.captions import CaptionOptions
from loralab.training.errors import TrainingError
from loralab_testkit.datasets import caption_file as caption


def image(path, w, h, color=(200, 30, 30)):
    from loralab_testkit.datasets import image_file
    return image_file(path, w, h, color, square=False)


class Encoders:
    """Stand-ins for the VAE and the CLIP that count their calls."""

    def __init__(self):
        self.image_calls = 0
        self.images = 0
        self.text_calls = 0

    def images_fn(self, pixels):
        assert pixels.dim() == 4 and pixels.shape[-1] == 3 and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
        self.image_calls += 1
        self.images += pixels.shape[0]
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)

    def text_fn(self, text):
        self.text_calls += 1
        g = torch.Generator().manual_seed(sum(map(ord, text)))
        return [torch.randn(1, 3, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]


def encode(root, enc=None, **kw):
    enc = enc or Encoders()
    kw.setdefault("buckets", ds.BucketSpec(resolution=(64, 128), min_size=64, max_size=128, steps=64))
    kw.setdefault("captions", CaptionOptions())
    return ds.encode_folder(str(root), encode_images=enc.images_fn, image_encoder_id="vae-a",
                            encode_text=enc.text_fn, text_encoder_id="clip-a", **kw), enc


@pytest.fixture
def folder(tmp_path):
    """kohya layout: 3_sks dog/ (2 images), plain/ (no repeat prefix), one image at the root."""
    root = tmp_path / "input" / "dogs"
    image(str(root / "3_sks dog" / "a.png"), 64, 64)
    caption(str(root / "3_sks dog" / "a.txt"), "sks dog, red collar, sitting\nsecond line is ignored")
    image(str(root / "3_sks dog" / "b.jpg"), 96, 64, (10, 200, 10))
    caption(str(root / "3_sks dog" / "b.txt"), "sks dog, running")
    image(str(root / "plain" / "c.webp"), 64, 128, (10, 10, 200))
    caption(str(root / "plain" / "c.caption"), "a cat")
    caption(str(root / "plain" / "c.txt"), "a cat, plain")
    image(str(root / "d.png"), 64, 64, (120, 120, 0))
    caption(str(root / "d.txt"), "\ufeffa bird")          # a BOM is not part of the caption
    return root


# ---- the folder -----------------------------------------------------------------------------------
def test_scan_reads_kohyas_layout(folder):
    items = ds.scan(str(folder))
    assert [(i.rel, i.repeats, i.caption) for i in items] == [
        ("d.png", 1, "a bird"), ("3_sks dog/a.png", 3, "sks dog, red collar, sitting"),
        ("3_sks dog/b.jpg", 3, "sks dog, running"), ("plain/c.webp", 1, "a cat, plain")]
    caption(str(folder / "d.caption"), "a bird, from its .caption")
    by_caption = ds.scan(str(folder), ".caption", "folder name")        # the sks images: their folder's class tokens
    assert [i.caption for i in by_caption] == ["a bird, from its .caption", "sks dog", "sks dog", "a cat"]


def test_missing_caption_names_the_image_and_the_option(folder):
    os.remove(folder / "3_sks dog" / "b.txt")
    with pytest.raises(TrainingError, match=r"3_sks dog/b.jpg.*expected 3_sks dog/b.txt"):
        ds.scan(str(folder))
    items = ds.scan(str(folder), missing_caption="folder name")        # kohya's class tokens
    assert next(i for i in items if i.rel.endswith("b.jpg")).caption == "sks dog"
    caption(str(folder / "3_sks dog" / "b.txt"), "sks dog, running")
    os.remove(folder / "plain" / "c.txt")
    with pytest.raises(TrainingError, match=r"plain/c.webp.*set caption_extension to .caption"):
        ds.scan(str(folder))


def test_caption_that_is_not_utf8_is_named(folder):
    caption(str(folder / "d.txt"), "caf\xe9 au lait", encoding="latin-1")
    with pytest.raises(TrainingError, match=r"d.txt.*not UTF-8.*0xe9 at position 3"):
        ds.scan(str(folder))


def test_empty_caption_file_is_named(folder):
    caption(str(folder / "d.txt"), "\n\n")
    with pytest.raises(TrainingError, match=r"d.txt.*caption file is empty"):
        ds.scan(str(folder))


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "input" / "empty" / "5_x").mkdir(parents=True)
    with pytest.raises(TrainingError, match=r"empty.*no images in the dataset folder or its subfolders \(5_x\)"):
        ds.scan(str(tmp_path / "input" / "empty"))
    with pytest.raises(TrainingError, match="'nope' does not exist"):
        ds.dataset_path(str(tmp_path / "input"), "nope")
    (tmp_path / "input" / "f.png").write_bytes(b"x")
    with pytest.raises(TrainingError, match="is a file, not a folder"):
        ds.dataset_path(str(tmp_path / "input"), "f.png")


@pytest.mark.parametrize("bad", ["../outside", "/etc", "a/../../b", "C:\\data", ""])
def test_dataset_path_must_stay_inside_input(tmp_path, bad):
    (tmp_path / "input").mkdir()
    with pytest.raises(TrainingError, match="inside ComfyUI's input directory"):
        ds.dataset_path(str(tmp_path / "input"), bad)


def test_unreadable_image_is_named(folder):
    (folder / "d.png").write_bytes(b"not a png at all")
    with pytest.raises(TrainingError, match=r"d.png.*cannot read this image"):
        encode(folder)


# ---- buckets ------------------------------------------------------------------------------------------
def brute_force_buckets(area: int, lo: int, hi: int, step: int) -> set:
    """kohya's bucket set, derived differently: for each width in [lo, hi] the tallest height that is
    a multiple of ``step``, at most ``hi`` and keeps w·h ≤ area (if ≥ lo), both orientations, plus the
    largest square."""
    out = set()
    side = int(area ** 0.5) // step * step
    out.add((side, side))
    for w in range(lo, hi + 1, step):
        h = max((h for h in range(step, hi + 1, step) if w * h <= area), default=0)
        if h >= lo:
            out |= {(w, h), (h, w)}
    return out


KOHYA_SD_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)]


def test_bucket_resolutions_are_kohyas():
    assert ds.bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_SD_512    # kohya's SD 512 list
    for reso, lo, hi, step in [((512, 512), 256, 1024, 64), ((1024, 1024), 256, 2048, 64), ((768, 512), 320, 960, 32),
                               ((64, 64), 64, 128, 64)]:
        assert set(ds.bucket_resolutions(reso, lo, hi, step)) == brute_force_buckets(reso[0] * reso[1], lo, hi, step)


@pytest.mark.parametrize("size,bucket,resized", [
    ((600, 400), (640, 384), (640, 427)),       # aspect 1.5: nearest bucket 640x384 (1.667), cover then crop
    ((512, 512), (512, 512), (512, 512)),       # an exact bucket: kept
    ((1000, 1000), (512, 512), (512, 512)),     # shrunk
    ((300, 1200), (256, 1024), (256, 1024)),    # tall
    ((256, 832), (256, 832), (256, 832)),       # its own size is a bucket
])
def test_bucket_choice_is_kohyas_select_bucket(size, bucket, resized):
    b = ds.Bucketer(ds.BucketSpec(resolution=(512, 512)))
    assert b.select(*size) == (bucket, resized)


@pytest.mark.parametrize("size,bucket,resized", [
    ((300, 200), (256, 192), (300, 200)),       # small enough: never enlarged, cut to 64-px steps
    ((1024, 512), (640, 320), (640, 320)),      # larger than the max area: shrunk to it (the rounding of nearer aspect)
])
def test_no_upscale_buckets_come_from_the_image(size, bucket, resized):
    b = ds.Bucketer(ds.BucketSpec(resolution=(512, 512), no_upscale=True))
    assert b.select(*size) == (bucket, resized)


@pytest.mark.parametrize("spec,msg", [(dict(steps=12), "multiple of 8"), (dict(min_size=2048), "larger than"),
                                      (dict(max_size=256), "must be ≥ the resolution")])
def test_bad_bucket_settings(spec, msg):
    with pytest.raises(TrainingError, match=msg):
        ds.BucketSpec(**spec).check()


# ---- encoding and the cache -----------------------------------------------------------------------------
def test_encode_buckets_repeats_and_captions(folder):
    data, enc = encode(folder)
    by = {s.rel: s for s in data.samples}
    assert by["3_sks dog/b.jpg"].bucket == (64, 64) and by["3_sks dog/b.jpg"].resized == (96, 64)
    assert by["plain/c.webp"].bucket == (64, 128) and by["plain/c.webp"].latent.shape == (4, 16, 8)
    assert data.num_train_images == 1 + 3 + 3 + 1 and len(data.expanded()) == 8
    assert enc.images == 4 and enc.text_calls == 4
    info = data.info()
    assert info["dataset_dirs"]["3_sks dog"] == {"n_repeats": 3, "img_count": 2}
    assert info["tag_frequency"]["3_sks dog"] == {"sks dog": 2, "red collar": 1, "sitting": 1, "running": 1}
    assert sum(b["count"] for b in info["bucket_info"]["buckets"].values()) == 8


def test_images_are_centre_cropped_to_their_bucket(tmp_path):
    """96x64 into a 64x64 bucket: kohya trims (96 − 64) / 2 = 16 px from each side."""
    im = Image.new("RGB", (96, 64), (0, 0, 0))
    im.paste((255, 255, 255), (16, 0, 80, 64))
    path = str(tmp_path / "striped.png")
    im.save(path)
    px = ds.load_image(path, "striped.png", (64, 64), (96, 64))
    assert px.shape == (1, 64, 64, 3) and bool((px == 1.0).all())
    px = ds.load_image(path, "striped.png", (64, 32), (96, 64))
    assert px.shape == (1, 32, 64, 3) and bool((px == 1.0).all())


def test_second_run_calls_no_encoder(folder):
    first, _ = encode(folder)
    again, enc = encode(folder)
    assert enc.image_calls == 0 and enc.text_calls == 0
    assert again.stats == {"images": 4, "latents_cached": 4, "latents_encoded": 0, "texts_cached": 4, "texts_encoded": 0}
    for a, b in zip(first.samples, again.samples):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.cond[0], b.cond[0]) and a.bucket == b.bucket


def test_cache_is_keyed_by_content_encoder_and_geometry(folder):
    encode(folder)
    image(str(folder / "d.png"), 64, 64, (1, 2, 3))                            # new content, same name
    _, enc = encode(folder)
    assert enc.images == 1 and enc.text_calls == 0
    other = Encoders()                                                          # another VAE: every image again
    ds.encode_folder(str(folder), buckets=ds.BucketSpec(resolution=(64, 128), min_size=64, max_size=128, steps=64),
                     captions=CaptionOptions(), encode_images=other.images_fn, image_encoder_id="vae-b",
                     encode_text=other.text_fn, text_encoder_id="clip-a")
    assert other.images == 4 and other.text_calls == 0
    _, enc = encode(folder, buckets=ds.BucketSpec(resolution=(64, 64), min_size=64, max_size=128, steps=64))
    assert enc.images == 4, "other bucket settings: other crops"
    caption(str(folder / "d.txt"), "a different bird")
    _, enc = encode(folder)
    assert enc.images == 0 and enc.text_calls == 1


def test_damaged_cache_entry_is_encoded_again(folder):
    data, _ = encode(folder)
    path = ds.Cache(str(folder / ds.CACHE_FOLDER)).path("latents", data.samples[0].latent_key)
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    again, enc = encode(folder)
    assert enc.images == 1 and torch.equal(again.samples[0].latent, data.samples[0].latent)


def test_mixed_sizes_without_bucketing_are_refused(folder):
    with pytest.raises(TrainingError, match=r"4 different sizes|3 different sizes.*enable_bucket"):
        encode(folder, buckets=ds.BucketSpec(enabled=False))


def test_the_same_image_twice_is_encoded_once(folder):
    image(str(folder / "plain" / "twin.png"), 64, 64, (120, 120, 0))       # d.png's content
    caption(str(folder / "plain" / "twin.txt"), "a bird")
    data, enc = encode(folder)
    assert enc.images == 4 and len(data.samples) == 5
    a, b = (next(s for s in data.samples if s.rel == r) for r in ("d.png", "plain/twin.png"))
    assert a.latent is b.latent and a.bucket == b.bucket


def test_same_sizes_without_bucketing_keep_their_size(tmp_path):
    root = tmp_path / "same"
    for n in ("a", "b"):
        image(str(root / f"{n}.png"), 48, 32)
        caption(str(root / f"{n}.txt"), n)
    data, _ = encode(root, buckets=ds.BucketSpec(enabled=False))
    assert all(s.bucket == (48, 32) and s.latent.shape == (4, 4, 6) for s in data.samples)


# ---- the dataset on disk -------------------------------------------------------------------------------
def test_manifest_reads_back_without_comfy_and_shards_by_rank(folder):
    data, _ = encode(folder, captions=CaptionOptions(shuffle=True, keep_tokens=1))
    assert data.manifest and os.path.dirname(data.manifest) == str(folder / ds.CACHE_FOLDER)
    with open(data.manifest) as fh:
        assert json.load(fh)["format"] == ds.FORMAT
    back = ds.load_manifest(data.manifest)
    assert [s.rel for s in back.samples] == [s.rel for s in data.samples]
    assert all(torch.equal(a.latent, b.latent) and a.caption == b.caption for a, b in zip(back.samples, data.samples))
    assert back.captions == CaptionOptions(shuffle=True, keep_tokens=1)
    parts = [ds.load_manifest(data.manifest, rank=r, world_size=3) for r in range(3)]
    assert sorted(s.rel for p in parts for s in p.samples) == sorted(s.rel for s in data.samples)
    assert [len(p.samples) for p in parts] == [2, 1, 1]
    with pytest.raises(TrainingError, match="rank 3 of world size 3"):
        ds.load_manifest(data.manifest, rank=3, world_size=3)


def test_summary_says_what_was_encoded_and_cached(folder):
    encode(folder)
    data, _ = encode(folder, captions=CaptionOptions(shuffle=True))
    text = ds.summary(data)
    assert "4 images, 8 samples with repeats" in text and "3_sks dog ×3 (2 images)" in text
    assert "latents: 0 encoded, 4 from the cache" in text and "captions vary per step" in text


def test_fingerprint_tells_weights_apart():
    a = {"w": torch.randn(64, 64), "b": torch.zeros(3)}
    b = {"w": a["w"].clone(), "b": torch.zeros(3)}
    assert ds.fingerprint(a) == ds.fingerprint(b)
    b["w"][0, 0] += 1.0
    assert ds.fingerprint(a) != ds.fingerprint(b)
    assert ds.fingerprint(a) != ds.fingerprint(a, extra="clip skip 2")


def test_crop_conditioning_is_kohyas_get_crop_ltrb():
    # the bucket is wider than the image: fit to its height, centred horizontally
    assert ds.crop_ltrb((640, 384), (600, 400)) == (32.0, 0.0, 608.0, 384.0)
    # the image is wider than the bucket: kohya (Stability's preprocessing) fits it to the width
    left, top, right, bottom = ds.crop_ltrb((64, 64), (96, 64))
    assert (left, top, right) == (0, 10.0, 64) and bottom == pytest.approx(10 + 64 / 1.5)
