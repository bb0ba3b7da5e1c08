"""``python -m bench dataset``: encoding a folder of captioned images, ComfyUI core vs LoRA Lab, cold and warm.

The same folder (``--images`` images of mixed sizes and aspect ratios, PNG and JPEG, one caption
each, kohya's layout with a repeat folder) is turned into training data three ways, each run in a
fresh process (``python -m bench._worker``) with the tiny SD1.5 (its VAE is TAESD, its text encoder
the full CLIP-L):

    core        Load Image and Text Dataset from Folder -> Make Training Dataset (no cache, images at
                their own sizes, no buckets)
    ours cold   LoraLabTrainingDataset with its cache folder deleted first (kohya buckets at
                ``--resolution``, every image and caption encoded, the cache written)
    ours warm   LoraLabTrainingDataset again, in a new process: everything from the cache

Reported: wall and CPU time of the node call(s), VAE / CLIP calls, peak RSS. The target is
warm ≤ 0.05 × cold. With a full-size KL VAE (SD1.5's is ~80x TAESD) the cold run is slower and
the warm one is not, so this ratio is the conservative one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from .common import (CACHE_DIR, BenchError, PeakProbe, command_line, comfy_version, machine, markdown_table, median,
                     ratio, resolve_device, run_job, setup_comfy, testkit, text_table, write_results)

WORK = os.path.join(CACHE_DIR, "dataset")
FOLDER = "bench_dataset"
SIZES = ((640, 480), (480, 640), (512, 512), (768, 512), (600, 400), (512, 768), (700, 700), (900, 600))
KINDS = ("core", "ours_cold", "ours_warm")
MB = 2 ** 20


def _folders() -> dict:
    folders = {"checkpoints": os.path.join(WORK, "checkpoints"), "loras": os.path.join(WORK, "loras")}
    for p in folders.values():
        os.makedirs(p, exist_ok=True)
    return folders


def _input_dir() -> str:
    return os.path.join(CACHE_DIR, "comfy-work", "input")


def write_folder(root: str, n: int) -> None:
    """``n`` images: a quarter at the root (repeat 1), the rest in 5_sks thing/ (repeat 5)."""
    ds = testkit("datasets")
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        sub = "" if i < n // 4 else "5_sks thing"
        ext = ".jpg" if i % 2 else ".png"
        name = f"img{i:03d}"
        ds.image_file(os.path.join(root, sub, name + ext), w, h, ds.COLORS[i % len(ds.COLORS)])
        ds.caption_file(os.path.join(root, sub, name + ".txt"),
                        f"sks thing, photo {i}, {['red', 'green', 'blue'][i % 3]} background, white square, detailed")


# ---- worker side ------------------------------------------------------------------------------------
def job_prepare(spec: dict) -> dict:
    setup_comfy("cpu", _folders())
    ckpt = testkit("checkpoints").tiny_sd15_path(_folders()["checkpoints"], "fp32")
    root = os.path.join(_input_dir(), FOLDER)
    shutil.rmtree(root, ignore_errors=True)
    write_folder(root, spec["images"])
    return {"checkpoint": ckpt, "root": root}


class _Count:
    def __init__(self, cls, name):
        self.calls = 0
        real = getattr(cls, name)

        def wrapper(obj, *a, **k):
            self.calls += 1
            return real(obj, *a, **k)
        setattr(cls, name, wrapper)


def job_run(spec: dict) -> dict:
    import logging

    import torch

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    pack = setup_comfy(device, _folders())
    logging.getLogger().setLevel(logging.WARNING)
    import comfy.sd

    with torch.inference_mode():
        _, clip, vae = comfy.sd.load_checkpoint_guess_config(
            spec["checkpoint"], output_vae=True, output_clip=True,
            model_options={"dtype": torch.float32}, te_model_options={"dtype": torch.float32})[:3]
    kind = spec["kind"]
    root = os.path.join(_input_dir(), FOLDER)
    if kind == "ours_cold":
        shutil.rmtree(os.path.join(root, ".loralab_cache"), ignore_errors=True)
    vae_calls, clip_calls = _Count(comfy.sd.VAE, "encode"), _Count(comfy.sd.CLIP, "encode_from_tokens_scheduled")
    if kind == "core":
        from comfy_extras import nodes_dataset as core

        def run():
            out = core.LoadImageTextDataSetFromFolderNode.execute(FOLDER)
            images, texts = getattr(out, "result", out)
            out = core.MakeTrainingDataset.execute(images, [vae], [clip], texts)
            return getattr(out, "result", out)[0]
    else:
        node = pack.NODE_CLASS_MAPPINGS["LoraLabTrainingDataset"]()

        def run():
            return node.build(FOLDER, vae, clip, spec["resolution"])["result"][0]
    probe = PeakProbe(device)
    probe.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        latents = run()
    t1, c1 = time.perf_counter(), time.process_time()
    return {"kind": kind, "wall_s": t1 - t0, "cpu_s": c1 - c0, "vae_calls": vae_calls.calls,
            "clip_calls": clip_calls.calls, "samples": len(latents), "peaks": probe.peaks(),
            "peak_scope": probe.scope, "machine": machine(device), "comfyui": comfy_version()}


JOBS = {"prepare": job_prepare, "run": job_run}


# ---- parent ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24, help="images in the folder (default 24)")
    p.add_argument("--resolution", type=int, default=512, help="the dataset node's resolution (default 512)")
    p.add_argument("--repeats", type=int, default=2, help="processes per kind (default 2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--quick", action="store_true", help="8 images at 256, one process per kind")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.resolution, args.repeats = 8, 256, 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = {"device": args.device, "threads": args.threads, "images": args.images, "resolution": args.resolution}
    results: dict[str, list] = {k: [] for k in KINDS}
    try:
        prep = run_job("dataset", "prepare", {**spec, "label": "prepare"}, timeout=900)
        spec["checkpoint"] = prep["checkpoint"]
        order = []
        for r in range(args.repeats):
            order += ["core", "ours_cold", "ours_warm"] if r % 2 == 0 else ["ours_cold", "ours_warm", "core"]
        for i, kind in enumerate(order):
            res = run_job("dataset", "run", {**spec, "kind": kind, "label": f"{kind}-{i}"}, timeout=1800)
            print(f"  {kind:<9} {res['wall_s']:.2f} s (CPU {res['cpu_s']:.2f} s), VAE calls {res['vae_calls']}, "
                  f"CLIP calls {res['clip_calls']}, {res['samples']} samples, peak RSS "
                  f"{res['peaks']['peak_rss'] / MB:.0f} MB", flush=True)
            results[kind].append(res)
    except BenchError as e:
        print(f"bench dataset: {e}", file=sys.stderr)
        return 1
    s = {k: {"wall_s": median([r["wall_s"] for r in v]), "cpu_s": median([r["cpu_s"] for r in v]),
             "vae_calls": v[0]["vae_calls"], "clip_calls": v[0]["clip_calls"], "samples": v[0]["samples"],
             "peak_rss": max(r["peaks"]["peak_rss"] for r in v)} for k, v in results.items()}
    info = results["core"][0]["machine"]
    where = f"cuda ({info['gpu']})" if info["device"] == "cuda" else f"cpu, {info['threads']} thread(s)"
    cmd = command_line("dataset", argv)
    setting = (f"{args.images} images (8 sizes from 480x640 to 900x600, PNG and JPEG, a 5_ repeat folder), tiny "
               f"SD1.5 (TAESD VAE, CLIP-L), resolution {args.resolution}, {args.repeats} process(es) per kind; "
               f"{where}; torch {info['torch']}, ComfyUI {results['core'][0]['comfyui']}")
    names = {"core": "core: Load Image+Text Dataset -> Make Training Dataset", "ours_cold": "LoRA Lab, cold cache",
             "ours_warm": "LoRA Lab, warm cache (new process)"}
    rows = [[names[k], f"{x['wall_s']:.2f}", f"{x['cpu_s']:.2f}", str(x["vae_calls"]), str(x["clip_calls"]),
             str(x["samples"]), f"{x['peak_rss'] / MB:.0f}"] for k, x in s.items()]
    header = ["", "wall s", "CPU s", "VAE calls", "CLIP calls", "samples out", "peak RSS MB"]
    warm = ratio(s["ours_warm"]["wall_s"], s["ours_cold"]["wall_s"])
    lines = [f"warm / cold: **{warm:.3f}×** wall ({ratio(s['ours_warm']['cpu_s'], s['ours_cold']['cpu_s']):.3f}× CPU)"
             f" (target ≤ 0.05); cold / core: {ratio(s['ours_cold']['wall_s'], s['core']['wall_s']):.2f}× wall"]
    text = "\n".join([f"Dataset benchmark - `{cmd}`", setting, "", text_table(header, rows), "", *lines])
    markdown = "\n".join([f"`{cmd}` - {setting}.", "", markdown_table(header, rows), "", *lines])
    print("\n" + text + "\n\nMarkdown for README:\n\n" + markdown)
    js, md = write_results(f"dataset{'-quick' if args.quick else ''}", {"command": cmd, "settings": spec,
                                                                        "results": results, "summary": s},
                           f"{text}\n\n{markdown}")
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0
