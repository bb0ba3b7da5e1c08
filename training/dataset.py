"""A folder of captioned images -> encoded training data, in kohya sd-scripts' layout and semantics
(library/train_util.py: DreamBooth subsets, BucketManager, read_caption), with an on-disk cache
of every encoding, keyed by content.

Layout (kohya's DreamBooth style)::

    my_dataset/
        10_sks dog/             "N_name": its images repeat N times per pass over the data
            a.png  a.txt        the caption of a.png (first line, UTF-8), or a.caption
        b.jpg  b.txt            images directly in the folder, and subfolders without "N_",
                                count once (kohya skips such subfolders; ComfyUI's loader keeps them)
        .loralab_cache/         written here: the encodings and the dataset manifests

Buckets (kohya's BucketManager): with ``max_reso`` = (w, h) the bucket resolutions are those of
``make_bucket_resolutions`` (every width from min_size to max_size in ``steps``, its height the
largest multiple of ``steps`` keeping w·h ≤ max area, both orientations, plus the square); each
image goes to the bucket of nearest aspect ratio, is resized to cover it (area filter down,
Lanczos up) and centre-cropped. With ``no_upscale`` the bucket comes from the image itself: shrunk
to the max area if larger, then cut down to multiples of ``steps``. Without bucketing the images
are used at their own size, which must then be the same for all (anything else is an error).

Cache: each latent is stored under sha256(image bytes, geometry, encoder fingerprint); each text
encoding under sha256(text, text-encoder fingerprint). A warm run reads the image files' bytes
(for the hash) and the stored tensors, and decodes no image and runs no encoder. A manifest
(``dataset-<id>.json``) lists the samples with their entries: the dataset on disk, readable
without ComfyUI (``load_manifest``) and split by rank for multi-process training (``shard``).

Nothing here imports ComfyUI: the encoders come in as callables.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..lora.errors import LoraError
from ..lora.io import relative_parts
from .captions import CaptionOptions, tags
from .errors import TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
MISSING_CAPTION = ("error", "folder name")
CACHE_FOLDER = ".loralab_cache"
FORMAT = "loralab-dataset/1"
ENCODE_BATCH = 8


# ---- the folder -----------------------------------------------------------------------------------
@dataclass
class Item:
    """One image of the folder (before repeats)."""
    path: str            # absolute
    rel: str             # relative to the dataset folder, '/' separated
    caption: str
    repeats: int
    subset: str          # the folder it came from ('' for the dataset folder itself)


def dataset_path(input_dir: str, folder: str) -> str:
    """The dataset folder ``folder`` (relative to ComfyUI's input directory); refuses a path that
    leaves it (absolute, '..') or does not exist."""
    if not folder or not folder.strip():
        raise TrainingError("no dataset folder given: name a folder inside ComfyUI's input directory")
    try:
        parts = relative_parts(folder.strip(), "folder")
    except LoraError:
        raise TrainingError(f"folder {folder!r} must be a path inside ComfyUI's input directory (no absolute path, "
                            "no '..')") from None
    path = os.path.join(input_dir, *parts)
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise TrainingError(f"the dataset folder {folder!r} {what} (looked in {input_dir})")
    return path


def _repeats(name: str) -> tuple[int, str] | None:
    """'10_sks dog' -> (10, 'sks dog'); None when the name has no 'N_' prefix."""
    head, sep, rest = name.partition("_")
    if sep and head.isdigit() and int(head) > 0:
        return int(head), rest
    return None


def read_caption(path: str) -> str:
    """kohya's read_caption: the first line, stripped; UTF-8 (a BOM is dropped)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise TrainingError(f"cannot read the caption file: {e.strerror or e}", file=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainingError(f"the caption file is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); "
                            "save it as UTF-8", file=path) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise TrainingError("the caption file is empty (its first line holds no caption)", file=path)
    return lines[0].strip()


def scan(root: str, caption_extension: str = ".txt", missing_caption: str = "error") -> list[Item]:
    """Every image of the dataset folder with its caption and repeat count, in a fixed order."""
    if caption_extension not in CAPTION_EXTENSIONS:
        raise TrainingError(f"caption_extension {caption_extension!r}: choose one of {', '.join(CAPTION_EXTENSIONS)}")
    if missing_caption not in MISSING_CAPTION:
        raise TrainingError(f"missing_caption {missing_caption!r}: choose one of {', '.join(MISSING_CAPTION)}")
    groups: list[tuple[str, int, str]] = [("", 1, "")]          # (subfolder, repeats, class tokens)
    for name in sorted(os.listdir(root)):
        if name.startswith(".") or not os.path.isdir(os.path.join(root, name)):
            continue
        rep = _repeats(name)
        groups.append((name, rep[0], rep[1]) if rep else (name, 1, ""))
    items: list[Item] = []
    for sub, repeats, class_tokens in groups:
        folder = os.path.join(root, sub) if sub else root
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(path):
                continue
            rel = f"{sub}/{name}" if sub else name
            cap_path = os.path.join(folder, stem + caption_extension)
            if os.path.isfile(cap_path):
                caption = read_caption(cap_path)
            elif missing_caption == "folder name" and class_tokens:
                caption = class_tokens
            else:
                other = [e for e in CAPTION_EXTENSIONS if e != caption_extension
                         and os.path.isfile(os.path.join(folder, stem + e))]
                hint = (f"; found {stem + other[0]}: set caption_extension to {other[0]}" if other else
                        "; write one, or set missing_caption to 'folder name' inside an 'N_name' folder" if class_tokens
                        else "; write one next to the image")
                raise TrainingError(f"no caption for this image (expected {rel[: -len(name)]}{stem}{caption_extension}"
                                    f"{hint})", file=rel)
            items.append(Item(path, rel, caption, repeats, sub))
    if not items:
        subs = [g[0] for g in groups if g[0]]
        where = f" or its subfolders ({', '.join(subs)})" if subs else ""
        raise TrainingError(f"no images in the dataset folder{where}: expected {', '.join(IMAGE_EXTENSIONS)} files "
                            "with a caption file beside each", file=root)
    return items


# ---- buckets (kohya's BucketManager) -----------------------------------------------------------------
def bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                       divisible: int = 64) -> list[tuple[int, int]]:
    """kohya's model_util.make_bucket_resolutions."""
    max_area = max_reso[0] * max_reso[1]
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketSpec:
    """kohya's enable_bucket, resolution, min/max_bucket_reso, bucket_reso_steps, bucket_no_upscale."""
    enabled: bool = True
    resolution: tuple[int, int] = (512, 512)
    min_size: int = 256
    max_size: int = 1024
    steps: int = 64
    no_upscale: bool = False

    def check(self) -> "BucketSpec":
        w, h = self.resolution
        if w < 8 or h < 8:
            raise TrainingError(f"resolution {w}x{h} is too small")
        if self.enabled:
            if self.steps < 8 or self.steps % 8:
                raise TrainingError(f"bucket_reso_steps = {self.steps} must be a multiple of 8 (the VAE's factor); "
                                    "kohya uses 64")
            if self.min_size > self.max_size:
                raise TrainingError(f"min_bucket_reso = {self.min_size} is larger than max_bucket_reso = {self.max_size}")
            if not self.no_upscale and self.max_size < max(w, h):
                raise TrainingError(f"max_bucket_reso = {self.max_size} must be ≥ the resolution ({w}x{h})")
            if not self.no_upscale and not bucket_resolutions(self.resolution, self.min_size, self.max_size, self.steps):
                raise TrainingError("these bucket settings give no bucket resolution")
        return self

    def describe(self) -> dict:
        d = asdict(self)
        d["resolution"] = list(self.resolution)
        return d


class Bucketer:
    """Picks each image's bucket and the size it is resized to (kohya's BucketManager.select_bucket)."""

    def __init__(self, spec: BucketSpec):
        self.spec = spec.check()
        self.max_area = spec.resolution[0] * spec.resolution[1]
        self.resos = [] if spec.no_upscale or not spec.enabled else bucket_resolutions(
            spec.resolution, spec.min_size, spec.max_size, spec.steps)
        self._aspects = torch.tensor([w / h for w, h in self.resos], dtype=torch.float64)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.spec.steps

    def select(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket (w, h), resized size (w, h)) for an image of ``width`` × ``height``."""
        if not self.spec.enabled:
            return (width, height), (width, height)
        aspect = width / height
        if not self.spec.no_upscale:
            reso = (width, height)
            if reso not in self.resos:
                reso = self.resos[int((self._aspects - aspect).abs().argmin())]
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * aspect)
            rh = self.max_area / rw
            bw = self._round(rw)
            bh_in_w = self._round(bw / aspect)
            bh = self._round(rh)
            bw_in_h = self._round(bh * aspect)
            if bh_in_w and bh and abs(bw / bh_in_w - aspect) < abs(bw_in_h / bh - aspect):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.spec.steps, resized[1] - resized[1] % self.spec.steps)
        if bucket[0] == 0 or bucket[1] == 0:
            raise TrainingError(f"an image of {width}x{height} is smaller than bucket_reso_steps = {self.spec.steps}")
        return bucket, resized


def crop_ltrb(bucket: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's BucketManager.get_crop_ltrb: where the image sits in its bucket (SDXL's crop
    conditioning, as Stability AI's preprocessing computes it)."""
    bucket_ar, image_ar = bucket[0] / bucket[1], size[0] / size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ar
    left, top = (bucket[0] - rw) // 2, (bucket[1] - rh) // 2
    return left, top, left + rw, top + rh


# ---- images --------------------------------------------------------------------------------------------
def open_size(path: str, rel: str) -> tuple[int, int]:
    """(width, height) as the image will be used (EXIF orientation applied), from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise TrainingError(f"cannot read this image ({type(e).__name__}: {e})", file=rel) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(path: str, rel: str, bucket: tuple[int, int], resized: tuple[int, int]) -> torch.Tensor:
    """The image as ComfyUI's IMAGE (1, H, W, 3) in [0, 1]: RGB, EXIF-rotated, resized to ``resized``
    (area filter when shrinking, Lanczos when enlarging) and centre-cropped to ``bucket``."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise TrainingError(f"cannot read this image ({type(e).__name__}: {e})", file=rel) from None
    if im.size != resized:
        shrink = resized[0] * resized[1] < im.size[0] * im.size[1]
        im = im.resize(resized, Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    if (left, top) != (0, 0) or resized != bucket:
        im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


# ---- fingerprints and the cache ---------------------------------------------------------------------
def fingerprint(tensors: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and a strided sample of each
    tensor's values (every weight of a different checkpoint differs in the sample)."""
    h = hashlib.sha256(extra.encode())
    with torch.no_grad():
        for k in sorted(tensors):
            t = tensors[k]
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class Cache:
    """Content-addressed safetensors entries under ``root`` (latents/, text/), written atomically."""

    def __init__(self, root: str):
        self.root = root

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key[:2], key + ".safetensors")

    def get(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        from safetensors import safe_open

        path = self.path(kind, key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception:      # a damaged entry is a miss: it is encoded again and replaced
            return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        path = self.path(kind, key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=os.path.dirname(path))
            os.close(fd)
            try:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta or {})
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        except OSError:
            pass       # a cache that cannot be written costs time next run, never this run


def _atomic_json(path: str, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- conditioning <-> tensors -------------------------------------------------------------------
def cond_to_tensors(entry) -> dict[str, torch.Tensor] | None:
    """A ComfyUI conditioning entry [cond, {..}] as flat tensors (None when it holds values a
    safetensors file cannot: then it is not cached)."""
    cond, extra = entry
    out = {"cond": cond}
    for k, v in extra.items():
        if isinstance(v, torch.Tensor):
            out[f"extra.{k}"] = v
        elif v is not None:
            return None
    return out


def cond_from_tensors(tensors: Mapping[str, torch.Tensor]) -> list:
    return [tensors["cond"], {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}]


# ---- encoding ---------------------------------------------------------------------------------------
@dataclass
class Sample:
    rel: str
    digest: str
    caption: str
    repeats: int
    subset: str
    size: tuple[int, int]                  # original (w, h)
    bucket: tuple[int, int]
    resized: tuple[int, int]
    latent_key: str
    text_key: str
    latent: torch.Tensor | None = field(default=None, repr=False)      # (C, h, w), the VAE's own output
    cond: list | None = field(default=None, repr=False)                # [cond, {..}] for the caption


@dataclass
class EncodedDataset:
    root: str
    samples: list[Sample]
    buckets: BucketSpec
    captions: CaptionOptions
    manifest: str | None = None
    stats: dict = field(default_factory=dict)     # images, encoded, cached, ...

    @property
    def num_train_images(self) -> int:
        return sum(s.repeats for s in self.samples)

    def expanded(self) -> list[Sample]:
        """Each sample as often as its folder's repeat count says (kohya's num_repeats)."""
        return [s for s in self.samples for _ in range(s.repeats)]

    def info(self) -> dict:
        """kohya's dataset metadata: ss_dataset_dirs, ss_tag_frequency, ss_bucket_info and friends."""
        dirs: dict[str, dict] = {}
        freq: dict[str, dict[str, int]] = {}
        for s in self.samples:
            name = s.subset or os.path.basename(self.root)
            d = dirs.setdefault(name, {"n_repeats": s.repeats, "img_count": 0})
            d["img_count"] += 1
            f = freq.setdefault(name, {})
            for t in tags(s.caption, self.captions.separator):
                f[t] = f.get(t, 0) + 1
        counts: dict[tuple, int] = {}
        errors = []
        for s in self.samples:
            counts[s.bucket] = counts.get(s.bucket, 0) + s.repeats
            errors.append(abs(s.bucket[0] / s.bucket[1] - s.size[0] / s.size[1]))
        buckets = {i: {"resolution": list(r), "count": n} for i, (r, n) in enumerate(sorted(counts.items()))}
        return {"dataset_dirs": dirs, "tag_frequency": freq, "num_train_images": self.num_train_images,
                "bucket_info": {"buckets": buckets, "mean_img_ar_error": sum(errors) / max(1, len(errors))},
                "buckets": self.buckets.describe(), "captions": self.captions.to_dict(),
                "manifest": self.manifest}


def _geometry(spec: BucketSpec) -> str:
    return json.dumps(spec.describe(), sort_keys=True)


def encode_folder(root: str, *, buckets: BucketSpec, captions: CaptionOptions,
                  encode_images: Callable[[torch.Tensor], torch.Tensor], image_encoder_id: str,
                  encode_text: Callable[[str], list], text_encoder_id: str,
                  caption_extension: str = ".txt", missing_caption: str = "error", cache_dir: str | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> EncodedDataset:
    """Scan ``root``, bucket every image, encode images and captions (or read them from the cache),
    write the manifest. ``encode_images``: (B, H, W, 3) in [0, 1] -> latents (B, C, h, w);
    ``encode_text``: caption -> a conditioning entry [cond, {..}]. Raises TrainingError naming the
    file for an unreadable image, a missing or non-UTF-8 caption, an empty folder, or mixed sizes
    without bucketing."""
    captions.check()
    items = scan(root, caption_extension, missing_caption)
    bucketer = Bucketer(buckets)
    cache = Cache(cache_dir or os.path.join(root, CACHE_FOLDER))
    geometry = _geometry(buckets)
    samples: list[Sample] = []
    for it in items:
        digest = file_digest(it.path)
        lkey = _key("latent", FORMAT, digest, geometry, image_encoder_id)
        tkey = _key("text", FORMAT, it.caption, text_encoder_id)
        samples.append(Sample(it.rel, digest, it.caption, it.repeats, it.subset, (0, 0), (0, 0), (0, 0), lkey, tkey))

    stats = {"images": len(samples), "latents_cached": 0, "latents_encoded": 0, "texts_cached": 0, "texts_encoded": 0}
    todo: list[tuple[Sample, Item]] = []
    twins: dict[str, list[Sample]] = {}          # the same image twice (two folders): encoded once
    for s, it in zip(samples, items):
        if s.latent_key in twins:
            twins[s.latent_key].append(s)
            continue
        twins[s.latent_key] = []
        hit = cache.get("latents", s.latent_key)
        if hit is not None and "latent" in hit[0]:
            s.latent = hit[0]["latent"]
            meta = hit[1]
            s.size, s.bucket, s.resized = (tuple(json.loads(meta[k])) for k in ("size", "bucket", "resized"))
            stats["latents_cached"] += 1
        else:
            todo.append((s, it))
    for s, it in todo:
        s.size = open_size(it.path, it.rel)
        s.bucket, s.resized = bucketer.select(*s.size)
    lead = {s.latent_key: s for s in samples if s.latent_key in twins and s.size != (0, 0)}
    for key, others in twins.items():
        for s in others:
            s.size, s.bucket, s.resized = lead[key].size, lead[key].bucket, lead[key].resized
    if not buckets.enabled:
        _same_size(samples)
    done = stats["latents_cached"]
    by_bucket: dict[tuple, list[tuple[Sample, Item]]] = {}
    for s, it in todo:
        by_bucket.setdefault(s.bucket, []).append((s, it))
    for group in by_bucket.values():
        for i in range(0, len(group), ENCODE_BATCH):
            chunk = group[i: i + ENCODE_BATCH]
            pixels = torch.cat([load_image(it.path, it.rel, s.bucket, s.resized) for s, it in chunk])
            latents = encode_images(pixels)
            if latents.shape[0] != len(chunk):
                raise TrainingError(f"the VAE returned {latents.shape[0]} latents for {len(chunk)} images")
            for (s, _), lat in zip(chunk, latents):
                s.latent = lat.detach().float().cpu().clone()
                cache.put("latents", s.latent_key, {"latent": s.latent},
                          {"size": json.dumps(list(s.size)), "bucket": json.dumps(list(s.bucket)),
                           "resized": json.dumps(list(s.resized)), "image": s.rel})
                stats["latents_encoded"] += 1
                done += 1
            if on_progress:
                on_progress(done, len(samples))
    for key, others in twins.items():
        for s in others:
            s.latent = lead[key].latent
    texts: dict[str, list] = {}
    for s in samples:
        if s.text_key not in texts:
            hit = cache.get("text", s.text_key)
            if hit is not None and "cond" in hit[0]:
                texts[s.text_key] = cond_from_tensors(hit[0])
                stats["texts_cached"] += 1
            else:
                entry = encode_text(s.caption)
                texts[s.text_key] = entry
                flat = cond_to_tensors(entry)
                if flat is not None:
                    cache.put("text", s.text_key, flat, {"text": s.caption})
                stats["texts_encoded"] += 1
        s.cond = texts[s.text_key]
    ds = EncodedDataset(root, samples, buckets, captions, stats=stats)
    ds.manifest = write_manifest(ds, cache.root, image_encoder_id, text_encoder_id)
    return ds


def _same_size(samples: Sequence[Sample]) -> None:
    sizes: dict[tuple, list[str]] = {}
    for s in samples:
        sizes.setdefault(s.size, []).append(s.rel)
    if len(sizes) > 1:
        listing = "; ".join(f"{w}x{h}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                            for (w, h), names in sorted(sizes.items()))
        raise TrainingError(f"the images have {len(sizes)} different sizes and bucketing is off ({listing}); "
                            "turn enable_bucket on, or resize the images to one size")


# ---- the manifest: the dataset on disk ------------------------------------------------------------------
def write_manifest(ds: EncodedDataset, cache_root: str, image_encoder_id: str, text_encoder_id: str) -> str | None:
    """``<cache>/dataset-<id>.json``: every sample with its cache entries (paths relative to the
    cache folder). Returns its path, or None when the cache folder is not writable."""
    ident = _key("manifest", FORMAT, _geometry(ds.buckets), image_encoder_id, text_encoder_id)[:16]
    path = os.path.join(cache_root, f"dataset-{ident}.json")
    data = {
        "format": FORMAT, "image_encoder": image_encoder_id, "text_encoder": text_encoder_id,
        "buckets": ds.buckets.describe(), "captions": ds.captions.to_dict(),
        "samples": [{"image": s.rel, "sha256": s.digest, "caption": s.caption, "repeats": s.repeats,
                     "subset": s.subset, "size": list(s.size), "bucket": list(s.bucket), "resized": list(s.resized),
                     "latent": os.path.relpath(Cache(cache_root).path("latents", s.latent_key), cache_root),
                     "text": os.path.relpath(Cache(cache_root).path("text", s.text_key), cache_root)}
                    for s in ds.samples],
    }
    try:
        os.makedirs(cache_root, exist_ok=True)
        _atomic_json(path, data)
    except OSError:
        return None
    return path


def read_manifest(path: str) -> dict:
    """A manifest's JSON, checked to be one (TrainingError names the file otherwise)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot read the dataset manifest: {e}", file=path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TrainingError(f"not a {FORMAT} manifest (format {data.get('format') if isinstance(data, dict) else None!r})",
                            file=path)
    return data


def load_manifest(path: str, *, rank: int = 0, world_size: int = 1, tensors: bool = True) -> EncodedDataset:
    """Read a dataset written by ``encode_folder`` (no ComfyUI needed); with ``world_size`` > 1 only
    this rank's share of the images (``shard``)."""
    data = read_manifest(path)
    root = os.path.dirname(path)
    b = data["buckets"]
    spec = BucketSpec(b["enabled"], tuple(b["resolution"]), b["min_size"], b["max_size"], b["steps"], b["no_upscale"])
    samples = []
    for d in data["samples"]:
        s = Sample(d["image"], d["sha256"], d["caption"], d["repeats"], d["subset"], tuple(d["size"]),
                   tuple(d["bucket"]), tuple(d["resized"]), os.path.basename(d["latent"])[:-12],
                   os.path.basename(d["text"])[:-12])
        samples.append(s)
    ds = EncodedDataset(os.path.dirname(root), samples, spec, CaptionOptions.from_dict(data.get("captions")),
                        manifest=path)
    ds = shard(ds, rank, world_size)
    if tensors:
        cache = Cache(root)
        for s in ds.samples:
            lat, txt = cache.get("latents", s.latent_key), cache.get("text", s.text_key)
            if lat is None or txt is None:
                raise TrainingError(f"the cache entry of {s.rel} is missing or damaged; encode the folder again",
                                    file=path)
            s.latent, s.cond = lat[0]["latent"], cond_from_tensors(txt[0])
    return ds


def shard(ds: EncodedDataset, rank: int, world_size: int) -> EncodedDataset:
    """Images i with i mod world_size == rank (every image on exactly one rank)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise TrainingError(f"rank {rank} of world size {world_size} is not a valid process index")
    if world_size == 1:
        return ds
    part = [s for i, s in enumerate(ds.samples) if i % world_size == rank]
    return EncodedDataset(ds.root, part, ds.buckets, ds.captions, ds.manifest, dict(ds.stats))


def summary(ds: EncodedDataset) -> str:
    """What the node shows: images, repeats, buckets and what the cache saved."""
    info = ds.info()
    dirs = ", ".join(f"{name or '.'} ×{d['n_repeats']} ({d['img_count']} image{'s' if d['img_count'] != 1 else ''})"
                     for name, d in info["dataset_dirs"].items())
    buckets = ", ".join(f"{b['resolution'][0]}x{b['resolution'][1]}: {b['count']}"
                        for b in info["bucket_info"]["buckets"].values())
    st = ds.stats
    lines = [f"{st.get('images', len(ds.samples))} images, {ds.num_train_images} samples with repeats: {dirs}",
             f"buckets {buckets}" if ds.buckets.enabled else f"no bucketing: {buckets}",
             f"latents: {st.get('latents_encoded', 0)} encoded, {st.get('latents_cached', 0)} from the cache; "
             f"captions: {st.get('texts_encoded', 0)} encoded, {st.get('texts_cached', 0)} from the cache"]
    if ds.captions.varies:
        c = ds.captions
        lines.append(f"captions vary per step (shuffle {c.shuffle}, keep_tokens {c.keep_tokens}, dropout "
                     f"{c.dropout_rate:g}, tag dropout {c.tag_dropout_rate:g}): Train LoRA encodes them at every "
                     "step through its clip input")
    return "\n".join(lines)


__all__ = ["BucketSpec", "Bucketer", "Cache", "EncodedDataset", "Item", "Sample", "bucket_resolutions",
           "crop_ltrb", "dataset_path", "encode_folder", "fingerprint", "load_image", "load_manifest", "read_caption",
           "read_manifest", "scan",
           "shard", "summary"]
