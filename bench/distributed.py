"""``python -m bench distributed``: training throughput of ``scripts/train.py`` at world size 1 and 2.

The same run (tiny SD1.5 UNet, ~44M parameters, the UNet-only checkpoint ``bench train`` writes; a
dataset manifest of seeded random latents 16x16 and CLIP-sized conditioning; global batch 4, rank 8,
AdamW, fp32, gradient checkpointing on) under ``torchrun --standalone --nproc_per_node W`` for W =
1 and 2, alternating W=1, W=2, W=2, W=1, … so drift in the machine's load hits both alike. On the
CPU each process gets ``--threads`` torch threads (gloo between processes); on CUDA one GPU each
(NCCL), where ``--device cuda`` needs at least two GPUs for W=2.

Every process runs ``bench/train_probe.py``: the script itself, plus an optimizer-step hook that
stamps the end of each step, and its ru_maxrss at the end. steps/s = (N-1) / time from the end of
step 1 to the end of step N on process 0 (setup and the first step excluded); samples/s = steps/s
× global batch; scaling = steps/s at W=2 / at W=1 (2.0 is perfect). Memory: peak RSS of each
process, and of all of a run's processes together.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from .common import (CACHE_DIR, REPO_ROOT, BenchError, command_line, markdown_table, median, ratio, run_job,
                     testkit, text_table, write_results)

WORK = os.path.join(CACHE_DIR, "distributed")
UNET = os.path.join(CACHE_DIR, "train", "tiny-sd15-v1-unet-fp32.safetensors")   # bench train's file
PROBE = os.path.join(REPO_ROOT, "bench", "train_probe.py")
MB = 2 ** 20


def job_prepare(spec: dict) -> dict:
    """The dataset manifest: random latents (4, size, size) and CLIP-L-sized conditioning, seeded."""
    testkit("comfy_env").register_pack()
    path = testkit("datasets").encoded_dataset(spec["folder"], (4, spec["size"], spec["size"]), (77, 768),
                                                    pooled=768, n=spec["images"], seed=1234)
    return {"manifest": path}


JOBS = {"prepare": job_prepare}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench distributed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="training steps per run, >= 2 (default 8)")
    p.add_argument("--batch", type=int, default=4, help="global batch_size, divisible by 2 (default 4)")
    p.add_argument("--size", type=int, default=16, help="latent height = width (default 16, 128 px)")
    p.add_argument("--images", type=int, default=8, help="latents in the dataset (default 8)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU (default 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (gloo) or cuda (NCCL; default cpu)")
    p.add_argument("--repeats", type=int, default=2, help="runs per world size (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    args = p.parse_args(argv)
    if args.steps < 2 or args.batch % 2:
        p.error("--steps must be >= 2 and --batch even")
    return args


def torchrun() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.isfile(exe) else [sys.executable, "-m", "torch.distributed.run"]


def run_world(args, world: int, manifest: str, label: str) -> dict:
    """One run at ``world`` processes; per process: its step stamps and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        out = os.path.join(tmp, "lora.safetensors")
        cmd = [*torchrun(), "--standalone", "--nproc_per_node", str(world), PROBE, tmp,
               "--checkpoint", UNET, "--dataset", manifest, "--output", out, "--steps", str(args.steps),
               "--batch-size", str(args.batch), "--rank", str(args.rank), "--training-dtype", "fp32",
               "--lora-dtype", "fp32", "--seed", "0", "--log-every", str(args.steps)]
        if args.device == "cpu":
            cmd.append("--cpu")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        log_path = os.path.join(WORK, f"{label}.log")
        with open(log_path, "w") as log:
            try:
                p = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{label} ran past {args.timeout:.0f} s; log: {log_path}") from None
        if p.returncode != 0:
            with open(log_path) as fh:
                raise BenchError(f"{label} failed ({p.returncode}); log: {log_path}\n{''.join(fh.readlines()[-30:])}")
        procs = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as fh:
                procs.append(json.load(fh))
    stamps = procs[0]["stamps"]
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"world": world, "steps_per_s": ratio(len(steps), stamps[-1] - stamps[0]), "median_step_s": median(steps),
            "peak_rss": [x["ru_maxrss"] for x in procs], "cpu_s": [x["cpu_s"] for x in procs]}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.makedirs(WORK, exist_ok=True)
    results: dict[int, list] = {1: [], 2: []}
    try:
        if not os.path.isfile(UNET):
            print("writing the UNet-only tiny SD1.5 checkpoint (once) ...", flush=True)
            run_job("train", "prepare", {"unet": UNET, "label": "prepare"}, timeout=600)
        manifest = run_job("distributed", "prepare", {"folder": os.path.join(WORK, f"data-{args.size}-{args.images}"),
                                                      "size": args.size, "images": args.images,
                                                      "label": "prepare"})["manifest"]
        order = [w for r in range(args.repeats) for w in ((1, 2) if r % 2 == 0 else (2, 1))]
        for i, w in enumerate(order):
            res = run_world(args, w, manifest, f"w{w}-{i}")
            print(f"  world {w}: {res['steps_per_s']:.3f} steps/s, median step {res['median_step_s']:.3f} s, "
                  f"peak RSS {', '.join(f'{x / MB:.0f}' for x in res['peak_rss'])} MB", flush=True)
            results[w].append(res)
    except BenchError as e:
        print(f"bench distributed: {e}", file=sys.stderr)
        return 1
    s = {w: {"steps_per_s": median([r["steps_per_s"] for r in runs]),
             "median_step_s": median([r["median_step_s"] for r in runs]),
             "peak_rss": max(max(r["peak_rss"]) for r in runs),
             "total_rss": max(sum(r["peak_rss"]) for r in runs)} for w, runs in results.items()}
    scaling = ratio(s[2]["steps_per_s"], s[1]["steps_per_s"])
    cmd = command_line("distributed", argv)
    where = f"{args.device}, {args.threads} thread(s) per process" if args.device == "cpu" else "cuda, one GPU each"
    setting = (f"tiny SD1.5 UNet (44M params), {args.images} latents {args.size}x{args.size}, global batch "
               f"{args.batch}, rank {args.rank}, AdamW, fp32, gradient checkpointing on, {args.steps} steps (first "
               f"not timed), {args.repeats} run(s) per world size; {where}; {os.cpu_count()} CPU core(s)")
    header = ["", "world size 1", "world size 2", "2 / 1"]
    rows = [["steps/s (steps 2..N)", f"{s[1]['steps_per_s']:.3f}", f"{s[2]['steps_per_s']:.3f}", f"**{scaling:.2f}×**"],
            ["samples/s", f"{s[1]['steps_per_s'] * args.batch:.2f}", f"{s[2]['steps_per_s'] * args.batch:.2f}", ""],
            ["median step (s)", f"{s[1]['median_step_s']:.3f}", f"{s[2]['median_step_s']:.3f}",
             f"{ratio(s[2]['median_step_s'], s[1]['median_step_s']):.2f}"],
            ["peak RSS per process (MB)", f"{s[1]['peak_rss'] / MB:.0f}", f"{s[2]['peak_rss'] / MB:.0f}",
             f"{ratio(s[2]['peak_rss'], s[1]['peak_rss']):.2f}"],
            ["peak RSS, all processes (MB)", f"{s[1]['total_rss'] / MB:.0f}", f"{s[2]['total_rss'] / MB:.0f}",
             f"{ratio(s[2]['total_rss'], s[1]['total_rss']):.2f}"]]
    text = "\n".join([f"Distributed training benchmark - `{cmd}`", setting, "", text_table(header, rows)])
    markdown = "\n".join([f"`{cmd}` - {setting}.", "", markdown_table(header, rows)])
    print("\n" + text + "\n\nMarkdown for README:\n\n" + markdown)
    js, md = write_results(f"distributed-{args.device}", {"command": cmd, "settings": vars(args), "results": results,
                                                          "summary": s, "wall_s": time.perf_counter() - started},
                           f"{text}\n\n{markdown}")
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0
