"""Small image datasets in kohya's folder layout, for the dataset node's tests, the server test, the
benchmark and the demo (pillow only; no ComfyUI import).

    kohya_folder(root)      root/2_sks square/{a,b,c}.png + .txt   (three sizes: 3 buckets at 64 px)
                            root/plain.png + plain.txt              (repeats 1)
"""
from __future__ import annotations

import os

COLORS = ((220, 40, 40), (40, 180, 60), (40, 60, 220), (230, 200, 40), (160, 60, 200), (30, 200, 200))


def image_file(path: str, width: int, height: int, color=(200, 30, 30), *, square: bool = True) -> str:
    """A PNG/JPEG/WebP (by extension) of one colour with a white square in the middle."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im = Image.new("RGB", (width, height), color)
    if square:
        s = min(width, height) // 3
        left, top = (width - s) // 2, (height - s) // 2
        im.paste((255, 255, 255), (left, top, left + s, top + s))
    im.save(path)
    return path


def caption_file(path: str, text, encoding: str = "utf-8") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(text.encode(encoding) if isinstance(text, str) else text)
    return path


def kohya_folder(root: str, *, repeats: int = 2, concept: str = "sks square",
                 sizes=((64, 64), (96, 64), (64, 128)), plain: bool = True) -> list[tuple[str, str, int]]:
    """Write a dataset; returns (image path relative to root, caption, repeats) for each image."""
    out = []
    sub = f"{repeats}_{concept}"
    for i, (w, h) in enumerate(sizes):
        name = "abcdefghijklmnopqrstuvwxyz"[i]
        cap = f"sks, {['red', 'green', 'blue', 'yellow', 'purple', 'cyan'][i % 6]} background, white square, {w}x{h}"
        image_file(os.path.join(root, sub, f"{name}.png"), w, h, COLORS[i % len(COLORS)])
        caption_file(os.path.join(root, sub, f"{name}.txt"), cap)
        out.append((f"{sub}/{name}.png", cap, repeats))
    if plain:
        image_file(os.path.join(root, "plain.png"), 64, 64, (90, 90, 90), square=False)
        caption_file(os.path.join(root, "plain.txt"), "a grey picture")
        out.append(("plain.png", "a grey picture", 1))
    return out


def encoded_dataset(root: str, latent: tuple[int, ...], context: tuple[int, int], *, pooled: int | None = None,
                    n: int = 4, seed: int = 0) -> str:
    """A dataset as Training Dataset from Folder leaves it on disk (cache entries + manifest), with
    random latents of shape ``latent`` and random conditioning (cross_attn ``context``, optional
    pooled_output), without any encoder: for scripts/train.py and job tests. Returns the
    manifest's path (``root/.loralab_cache/dataset-<id>.json``)."""
    import hashlib

    import torch
    from loralab.training import dataset as D
    from loralab.training.captions import CaptionOptions

    g = torch.Generator().manual_seed(seed)
    cache_root = os.path.join(root, D.CACHE_FOLDER)
    cache = D.Cache(cache_root)
    samples = []
    for i in range(n):
        key = hashlib.sha256(f"{seed}/{i}/{latent}".encode()).hexdigest()
        lat = torch.randn(*latent, generator=g)
        cond = {"cond": torch.randn(1, *context, generator=g)}
        if pooled:
            cond["extra.pooled_output"] = torch.randn(1, pooled, generator=g)
        cache.put("latents", "l" + key, {"latent": lat})
        cache.put("text", "t" + key, cond)
        h, w = latent[-2] * 8, latent[-1] * 8
        s = D.Sample(f"img{i}.png", key, f"sks, picture {i}", 1, "", (w, h), (w, h), (w, h), "l" + key, "t" + key)
        samples.append(s)
    ds = D.EncodedDataset(root, samples, D.BucketSpec(resolution=(latent[-1] * 8, latent[-2] * 8)), CaptionOptions())
    path = D.write_manifest(ds, cache_root, f"random-{seed}", f"random-{seed}")
    assert path is not None
    return path
