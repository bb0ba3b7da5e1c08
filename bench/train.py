"""``python -m bench train``: training speed and memory, core ``TrainLoraNode`` vs ``LoraLabTrainLoraNode``.

Both nodes get the same inputs: the tiny SD1.5 UNet (``testkit/loralab_testkit/checkpoints.py``, ~44M
parameters, fp32 file), the same seeded latents and conditioning (random CLIP-sized tensors: their
values do not change the cost), batch size 2, rank 8, AdamW, MSE, learning rate 5e-4, seed 0,
gradient checkpointing on, ``training_dtype`` = ``lora_dtype`` = ``--dtype``, algorithm "LoRA"
(both nodes use core's name).

Every run is a fresh process (``python -m bench._worker``) that loads only the UNet (a cached
UNet-only copy of the checkpoint, so loading the text encoder does not set the peak), sets
``torch.set_num_threads(--threads)`` and calls the node once, as ComfyUI would (inference mode).

Speed: a global optimizer-step hook stamps the end of every training step. steps/s = (N-1) / time
from the end of step 1 to the end of step N, so setup and the first (warm-up) step are excluded;
also the median step and the CPU time per step (process CPU time, which other load on a shared
machine inflates far less than wall time).

Memory: ``RSS before`` = resident memory just before the node is called (model loaded, inputs
built); ``peak RSS`` = the process's ru_maxrss at the end (whole process: loading + training);
``train peak`` = highest RSS while the node ran (VmHWM after clearing it, where allowed). On CUDA
also the peak of ``torch.cuda.max_memory_allocated`` during the node.

Core trains every Linear/Conv of the UNet plus bias and norm diffs; ours trains the layers kohya
trains (block layers). The report gives both counts of trained parameters.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time

from .common import (CACHE_DIR, BenchError, PeakProbe, command_line, comfy_version, machine, markdown_table,
                     median, ratio, resolve_device, run_job, setup_comfy, sync, testkit, text_table,
                     write_results)

IMPLS = ("core", "ours")
# --recipe: ours with kohya's recipe on (core has none of it and trains as without the flag)
RECIPE = {"network_alpha": 4.0, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "min_snr_gamma": 5.0,
          "noise_offset": 0.05, "ema_decay": 0.999}
WORK = os.path.join(CACHE_DIR, "train")
UNET_PREFIX = "model.diffusion_model."
MB = 2 ** 20


# ---- the worker side -------------------------------------------------------------------------------
def job_prepare(spec: dict) -> dict:
    """A UNet-only copy of the cached tiny SD1.5 checkpoint (fp32); returns its path."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    setup_comfy("cpu", _folders())
    path = spec["unet"]
    if not os.path.isfile(path):
        src = testkit("checkpoints").cached_tiny_sd15("fp32")
        with safe_open(src, "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file(sd, tmp, metadata={"loralab_bench": "tiny-sd15 UNet only, fp32"})
        os.replace(tmp, path)
    return {"unet": path}


def _folders() -> dict:
    folders = {"loras": os.path.join(WORK, "loras"), "checkpoints": os.path.join(WORK, "checkpoints")}
    for p in folders.values():
        os.makedirs(p, exist_ok=True)
    return folders


def _inputs(spec: dict, torch) -> tuple[list, list]:
    """Seeded latents (one LATENT per image) and one conditioning per image, identical for both nodes."""
    g = torch.Generator().manual_seed(1234)
    size, n = spec["size"], spec["images"]
    latents = [{"samples": torch.randn(1, 4, size, size, generator=g)} for _ in range(n)]
    positive = [[[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
                for _ in range(n)]
    return latents, positive


def job_run(spec: dict) -> dict:
    import logging

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    pack = setup_comfy(device, _folders())
    logging.getLogger().setLevel(logging.WARNING)
    import comfy.sd

    impl = spec["impl"]
    with torch.inference_mode():   # as ComfyUI executes nodes
        model = comfy.sd.load_checkpoint_guess_config(spec["unet"], output_vae=False, output_clip=False,
                                                      model_options={"dtype": torch.float32})[0]
        latents, positive = _inputs(spec, torch)
    if type(model.model.model_config).__name__ != "SD15":
        raise BenchError(f"the UNet-only checkpoint was detected as {type(model.model.model_config).__name__}")
    args = dict(model=[model], latents=latents, positive=positive, batch_size=[spec["batch"]],
                grad_accumulation_steps=[1], steps=[spec["steps"]], learning_rate=[5e-4], rank=[spec["rank"]],
                optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[spec["dtype"]],
                lora_dtype=[spec["dtype"]], algorithm=["LoRA"],
                gradient_checkpointing=[spec["gradient_checkpointing"]], existing_lora=["[None]"])
    if impl == "ours":
        if spec.get("recipe"):
            args.update({k: [v] for k, v in RECIPE.items()})
        if spec.get("conv_dim"):
            args["conv_dim"] = [spec["conv_dim"]]
        node = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLoraNode"]()
        run = lambda: node.train(**args)
    else:
        from comfy_extras.nodes_train import TrainLoraNode
        run = lambda: TrainLoraNode.execute(**args)

    stamps: list[tuple[float, float]] = []

    def on_step(optimizer, a, kw):
        sync(device)
        stamps.append((time.perf_counter(), time.process_time()))

    hook = register_optimizer_step_post_hook(on_step)
    gc.collect()
    probe = PeakProbe(device)
    before = {"rss": probe.snapshot()["rss"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    probe.reset()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = run()
    sync(device)
    t1 = time.perf_counter()
    hook.remove()
    peaks = probe.peaks()
    out = out["result"] if isinstance(out, dict) else getattr(out, "result", out)   # ours: {"ui", "result"}; core: io.NodeOutput
    lora = out[1]
    losses = out[2]["loss"] if isinstance(out[2], dict) else []
    return {
        "impl": impl, "stamps": stamps, "node_s": t1 - t0, "first_step_s": stamps[0][0] - t0 if stamps else None,
        "before": before, "peaks": peaks, "peak_scope": probe.scope,
        "trained_params": int(sum(t.numel() for t in lora.values() if hasattr(t, "numel"))),
        "trained_tensors": len(lora), "loss_first_last": [float(losses[0]), float(losses[-1])] if losses else None,
        "machine": machine(device), "comfyui": comfy_version(),
    }


JOBS = {"prepare": job_prepare, "run": job_run}


# ---- the parent: plan, run, report -------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="training steps per run, >= 2 (default 8; --quick 4)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="training_dtype and lora_dtype (fp32)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8x8 latents, 4 steps, one process per node")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every run (default 1)")
    p.add_argument("--size", type=int, help="latent height = width (default 16, i.e. 128 px; --quick 8)")
    p.add_argument("--images", type=int, default=4, help="latents in the dataset (default 4)")
    p.add_argument("--batch", type=int, default=2, help="batch_size (default 2)")
    p.add_argument("--rank", type=int, default=8, help="rank (default 8)")
    p.add_argument("--no-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="gradient_checkpointing off (default on)")
    p.add_argument("--repeats", type=int, help="processes per node, run core/ours/ours/core... (default 2; --quick 1)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of core,ours")
    p.add_argument("--recipe", action="store_true",
                   help="ours with kohya's recipe on: " + ", ".join(f"{k} {v}" for k, v in RECIPE.items()))
    p.add_argument("--conv-dim", dest="conv_dim", type=int, default=0,
                   help="ours with kohya's conv_dim (LoCon: ResNet blocks and samplers too, closer to core's layer set)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 8)
    args.size = args.size or (8 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up and not timed)")
    args.impls = subset(p, "--impls", args.impls, IMPLS)
    return args


def subset(p: argparse.ArgumentParser, flag: str, value: str, allowed: tuple) -> list[str]:
    """A comma-separated, non-empty subset of ``allowed`` (in the order given), else a usage error."""
    chosen = [x for x in value.split(",") if x]
    if not chosen or any(x not in allowed for x in chosen):
        p.error(f"{flag} {value!r}: choose from {', '.join(allowed)}")
    return chosen


def plan(impls: list[str], repeats: int) -> list[str]:
    """ABBA order, so drift in the machine's load hits both nodes alike."""
    out = []
    for r in range(repeats):
        out += impls if r % 2 == 0 else impls[::-1]
    return out


def summarize(run: dict) -> dict:
    wall = [t for t, _ in run["stamps"]]
    cpu = [c for _, c in run["stamps"]]
    steps = [b - a for a, b in zip(wall, wall[1:])]
    return {"steps_per_s": ratio(len(steps), wall[-1] - wall[0]), "median_step_s": median(steps),
            "cpu_per_step_s": (cpu[-1] - cpu[0]) / len(steps), "first_step_s": run["first_step_s"],
            "rss_before": run["before"]["rss"], "peak_rss": run["peaks"]["ru_maxrss"],
            "train_peak_rss": run["peaks"]["peak_rss"], "cuda_peak": run["peaks"].get("cuda_max_allocated"),
            "trained_params": run["trained_params"], "loss": run["loss_first_last"]}


def combine(runs: list[dict]) -> dict:
    """Per implementation: median over its processes (memory: the largest)."""
    s = [summarize(r) for r in runs]
    out = {k: median([x[k] for x in s]) for k in ("steps_per_s", "median_step_s", "cpu_per_step_s", "first_step_s")}
    for k in ("rss_before", "peak_rss", "train_peak_rss", "cuda_peak"):
        vals = [x[k] for x in s if x[k] is not None]
        out[k] = max(vals) if vals else None
    out["train_delta"] = max(x["train_peak_rss"] - x["rss_before"] for x in s)
    out["trained_params"] = s[0]["trained_params"]
    out["runs_steps_per_s"] = [x["steps_per_s"] for x in s]
    out["loss"] = s[-1]["loss"]
    return out


def _mb(x) -> str:
    return "-" if x is None else f"{x / MB:.0f}"


def report(args, argv, results: dict) -> tuple[str, str, dict]:
    s = {impl: combine(runs) for impl, runs in results.items()}
    first = next(iter(results.values()))[0]
    info = first["machine"]
    cuda = info["device"] == "cuda"
    where = f"cuda ({info['gpu']})" if cuda else f"cpu, {info['threads']} thread(s)"
    cmd = command_line("train", argv)
    setting = (f"tiny SD1.5 UNet (44M params), {args.images} latents {args.size}x{args.size}, batch {args.batch}, "
               f"rank {args.rank}, AdamW, MSE, {args.dtype}, gradient checkpointing "
               f"{'on' if args.gradient_checkpointing else 'off'}, {args.steps} steps (first not timed), "
               f"{'ours with the recipe on (' + ', '.join(f'{k} {v}' for k, v in RECIPE.items()) + '), ' if args.recipe else ''}"
               f"{f'ours with conv_dim {args.conv_dim}, ' if args.conv_dim else ''}"
               f"{args.repeats} process(es) per node; {where}; torch {info['torch']}, ComfyUI {first['comfyui']}")
    header = ["node", "steps/s", "runs steps/s", "median step s", "CPU s/step", "1st step+setup s",
              "RSS before MB", "peak RSS MB", "train peak MB", "train d MB", "trained params"]
    if cuda:
        header.append("CUDA peak MB")
    rows = []
    for impl in args.impls:
        x = s[impl]
        row = [impl, f"{x['steps_per_s']:.3f}", " ".join(f"{v:.3f}" for v in x["runs_steps_per_s"]),
               f"{x['median_step_s']:.3f}", f"{x['cpu_per_step_s']:.3f}", f"{x['first_step_s']:.2f}",
               _mb(x["rss_before"]), _mb(x["peak_rss"]), _mb(x["train_peak_rss"]), _mb(x["train_delta"]),
               f"{x['trained_params']:,}"]
        if cuda:
            row.append(_mb(x["cuda_peak"]))
        rows.append(row)
    md = []
    if len(s) == 2:
        c, o = s["core"], s["ours"]
        r = ratio(o["steps_per_s"], c["steps_per_s"])
        row = ["ours/core", f"{r:.2f}", "", f"{ratio(o['median_step_s'], c['median_step_s']):.2f}",
               f"{ratio(o['cpu_per_step_s'], c['cpu_per_step_s']):.2f}", "", "",
               f"{ratio(o['peak_rss'], c['peak_rss']):.2f}", f"{ratio(o['train_peak_rss'], c['train_peak_rss']):.2f}",
               f"{ratio(o['train_delta'], c['train_delta']):.2f}",
               f"{ratio(o['trained_params'], c['trained_params']):.2f}"]
        if cuda:
            row.append(f"{ratio(o['cuda_peak'], c['cuda_peak']):.2f}" if o["cuda_peak"] else "")
        rows.append(row)
        md_header = ["", "core TrainLoraNode", "LoraLabTrainLoraNode", "ours/core"]
        md = [["steps/s (steps 2..N)", f"{c['steps_per_s']:.3f}", f"{o['steps_per_s']:.3f}", f"**{r:.2f}×**"],
              ["CPU s per step", f"{c['cpu_per_step_s']:.3f}", f"{o['cpu_per_step_s']:.3f}",
               f"{ratio(o['cpu_per_step_s'], c['cpu_per_step_s']):.2f}"],
              ["peak RSS, whole process (MB)", _mb(c["peak_rss"]), _mb(o["peak_rss"]),
               f"**{ratio(o['peak_rss'], c['peak_rss']):.2f}**"],
              ["RSS before training (MB)", _mb(c["rss_before"]), _mb(o["rss_before"]), ""],
              ["peak RSS while training (MB)", _mb(c["train_peak_rss"]), _mb(o["train_peak_rss"]),
               f"{ratio(o['train_peak_rss'], c['train_peak_rss']):.2f}"],
              ["training's own peak: peak while training − RSS before (MB)", _mb(c["train_delta"]),
               _mb(o["train_delta"]), f"{ratio(o['train_delta'], c['train_delta']):.2f}"],
              ["trained parameters", f"{c['trained_params']:,}", f"{o['trained_params']:,}", ""]]
        if cuda:
            md.append(["CUDA peak allocated (MB)", _mb(c["cuda_peak"]), _mb(o["cuda_peak"]),
                       f"{ratio(o['cuda_peak'], c['cuda_peak']):.2f}"])
    scope = {r["peak_scope"] for runs in results.values() for r in runs}
    legend = ("steps/s: steps 2..N of each run (stamped by an optimizer-step hook), median over runs; "
              "CPU s/step: process CPU time per step (less sensitive to other load than wall time); "
              "RSS before: resident memory when the node is called (UNet loaded); peak RSS: ru_maxrss of the "
              f"run's process; train peak: highest RSS while the node ran ({', '.join(sorted(scope))}); "
              "train d: train peak - RSS before. "
              "Memory: the largest over runs. Core also trains conv_in/out, time embedding, biases and norms.")
    text = "\n".join([f"Training benchmark - `{cmd}`", setting, "", text_table(header, rows), "", legend])
    markdown = "\n".join([f"`{cmd}` - {setting}.", "", markdown_table(md_header, md) if md else
                          markdown_table(header, rows)])
    return text, markdown, s


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    unet = os.path.join(WORK, "tiny-sd15-v1-unet-fp32.safetensors")
    spec = {"device": args.device, "threads": args.threads, "size": args.size, "images": args.images,
            "batch": args.batch, "rank": args.rank, "steps": args.steps, "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing, "unet": unet, "recipe": args.recipe,
            "conv_dim": args.conv_dim}
    results: dict[str, list] = {impl: [] for impl in args.impls}
    try:
        if not os.path.isfile(unet):
            print("writing the UNet-only tiny SD1.5 checkpoint (once) ...", flush=True)
            run_job("train", "prepare", {"unet": unet, "label": "prepare"}, timeout=600)
        for i, impl in enumerate(plan(args.impls, args.repeats)):
            res = run_job("train", "run", {**spec, "impl": impl, "label": f"{impl}-{i}"}, timeout=args.timeout)
            x = summarize(res)
            print(f"  {impl:<5} {x['steps_per_s']:.3f} steps/s (median step {x['median_step_s']:.3f} s, CPU "
                  f"{x['cpu_per_step_s']:.3f} s/step), RSS before {_mb(x['rss_before'])} MB, peak "
                  f"{_mb(x['peak_rss'])} MB, train peak {_mb(x['train_peak_rss'])} MB, loss "
                  f"{x['loss'][0]:.4f} -> {x['loss'][1]:.4f}", flush=True)
            results[impl].append(res)
    except BenchError as e:
        print(f"bench train: {e}", file=sys.stderr)
        return 1
    text, markdown, summary = report(args, argv, results)
    print("\n" + text + "\n\nMarkdown for README:\n\n" + markdown)
    data = {"command": command_line("train", argv), "settings": {k: v for k, v in spec.items() if k != "unet"},
            "results": results, "summary": summary, "wall_s": time.perf_counter() - started}
    js, md = write_results(f"train-{args.dtype}{'-recipe' if args.recipe else ''}{f'-conv{args.conv_dim}' if args.conv_dim else ''}"
                           f"{'-quick' if args.quick else ''}", data,
                           f"{text}\n\n{markdown}")
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0
