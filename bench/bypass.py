"""``python -m bench bypass``: sampling cost per step of a LoRA in bypass mode versus merged weights.

The tiny SD1.5 checkpoint (``testkit/loralab_testkit/checkpoints.py``: ~44M-parameter UNet, fp32) and a
rank-32 kohya LoRA on every UNet Linear and Conv (``testkit/loralab_testkit/lorafiles.py``, cached under
``.cache/bench/bypass/``). Modes:

    base     the model alone
    merged   LoraLabLoraLoaderModelOnly, weights patched (ComfyUI's ModelPatcher)
    bypass   the same node with bypass=True: hooks add up(down(x)) in the forward pass
    core     ComfyUI's LoraLoaderModelOnly (merged), for reference

Per step: ``comfy.sample.sample`` (what KSampler runs: euler, normal schedule, cfg 7, so each
step is one UNet forward on a batch of cond + uncond), a callback stamping every step; the time
per step is the median of the intervals between stamps, so loading/patching and the first step are
excluded. Modes run interleaved (rotated order, ``--rounds`` times) in one process, so a change in
the machine's load hits every mode alike; the ratios are what this measures.

Strength change: the same node instance called again at another strength, then
``load_models_gpu`` on its output, as the next sampler run would: merged modes unpatch and
re-patch every weight, bypass mode swaps its hooks. Median over ``--changes`` alternations 1 <-> 0.5.

Sanity: the sampled latents of merged and bypass must agree and must differ from base.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from .common import (CACHE_DIR, BenchError, command_line, comfy_version, machine, markdown_table, median, ratio,
                     resolve_device, run_job, setup_comfy, sync, testkit, text_table, write_results)
from .train import subset

MODES = ("base", "merged", "bypass", "core")
WORK = os.path.join(CACHE_DIR, "bypass")
LORA_VERSION = "v1"   # bump when the LoRA file changes


# ---- the worker side -------------------------------------------------------------------------------
def _folders() -> dict:
    folders = {"loras": os.path.join(WORK, "loras"), "checkpoints": os.path.join(WORK, "checkpoints")}
    for p in folders.values():
        os.makedirs(p, exist_ok=True)
    return folders


def _ensure_lora(model, folder: str, rank: int) -> str:
    """rank-``rank`` kohya LoRA on every UNet Linear/Conv of ``model`` (written once); returns its name."""
    name = f"tiny-sd15-unet-r{rank}-{LORA_VERSION}.safetensors"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        lf = testkit("lorafiles")
        adapters = lf.make_lora(lf.unet_targets(model), rank=rank, alpha=rank / 2, seed=7)
        tmp = f"{path}.{os.getpid()}.tmp"
        lf.write_lora(tmp, adapters, "kohya")
        os.replace(tmp, path)
    return name


def _loaders(pack, model, name: str) -> dict:
    """mode -> (strength -> a MODEL): each mode keeps one node instance, as a graph re-run does."""
    import nodes

    ours_merged = pack.NODE_CLASS_MAPPINGS["LoraLabLoraLoaderModelOnly"]()
    ours_bypass = pack.NODE_CLASS_MAPPINGS["LoraLabLoraLoaderModelOnly"]()
    core = nodes.LoraLoaderModelOnly()
    reports = {}

    def ours(node, mode, s, **kw):
        m, reports[mode] = node.load(model, name, s, **kw)["result"]
        return m

    return {
        "base": lambda s: model,
        "merged": lambda s: ours(ours_merged, "merged", s),
        "bypass": lambda s: ours(ours_bypass, "bypass", s, bypass=True),
        "core": lambda s: core.load_lora_model_only(model, name, s)[0],
    }, reports


def _sampler(spec: dict, device: str):
    import comfy.sample
    import torch

    g = torch.Generator().manual_seed(99)
    size = spec["size"]
    cond = lambda: [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    positive, negative = cond(), cond()
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=g)

    def run(model, steps: int) -> tuple[list[tuple[float, float]], "torch.Tensor"]:
        """(wall s, process CPU s) of steps 2..N, and the sampled latent."""
        stamps = []

        def callback(step, x0, x, total):
            sync(device)
            stamps.append((time.perf_counter(), time.process_time()))

        out = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                                  callback=callback, disable_pbar=True, seed=0)
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])], out.float().cpu()
    return run


def _change(make, strength_pairs: list[float], device: str) -> list[dict]:
    """Apply at each strength in turn (node call + load_models_gpu, as the next sampler run does)."""
    import comfy.model_management as mm

    out = []
    for s in strength_pairs:
        sync(device)
        t0 = time.perf_counter()
        m = make(s)
        t1 = time.perf_counter()
        mm.load_models_gpu([m])
        sync(device)
        t2 = time.perf_counter()
        out.append({"strength": s, "total": t2 - t0, "node": t1 - t0, "load": t2 - t1})
    return out


def job_run(spec: dict) -> dict:
    import logging

    import torch

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    folders = _folders()
    pack = setup_comfy(device, folders)
    logging.getLogger().setLevel(logging.WARNING)
    import comfy.model_management as mm
    import comfy.sd

    ckpt = testkit("checkpoints").cached_tiny_sd15("fp32")
    with torch.inference_mode():   # as ComfyUI executes nodes
        model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False,
                                                      model_options={"dtype": torch.float32})[0]
        name = _ensure_lora(model, folders["loras"], spec["rank"])
        make, reports = _loaders(pack, model, name)
        models = {mode: make[mode](1.0) for mode in spec["modes"]}
        patched = {mode: len(m.patches) for mode, m in models.items()}
        bypass_hooks = len(m.get_injections("loralab_bypass") or []) if (m := models.get("bypass")) else 0
        sample = _sampler(spec, device)
        steps: dict[str, list[list[float]]] = {mode: [] for mode in spec["modes"]}
        latents = {}
        order = list(spec["modes"])
        for r in range(spec["rounds"]):
            for mode in order[r % len(order):] + order[: r % len(order)]:
                intervals, out = sample(models[mode], spec["steps"])
                steps[mode] += intervals
                latents.setdefault(mode, out)
        del models
        gc.collect()
        changes = {}
        strengths = [1.0] + [0.5 if i % 2 == 0 else 1.0 for i in range(spec["changes"])]
        for mode in spec["modes"]:
            if mode == "base":
                continue
            runs = _change(make[mode], strengths, device)
            changes[mode] = {"first": runs[0], "changes": runs[1:]}
            mm.load_models_gpu([model])   # back to the base model before the next mode
    diffs = {"scale": max(x.abs().max().item() for x in latents.values())}
    if "base" in latents:
        for mode in ("merged", "bypass", "core"):
            if mode in latents:
                diffs[f"{mode}-base"] = (latents[mode] - latents["base"]).abs().max().item()
    for a, b in (("bypass", "merged"), ("core", "merged")):
        if a in latents and b in latents:
            diffs[f"{a}-{b}"] = (latents[a] - latents[b]).abs().max().item()
    return {"steps": steps, "changes": changes, "patched": patched, "bypass_injections": bypass_hooks,
            "latent_diffs": diffs, "lora": name, "reports": dict(reports), "machine": machine(device), "comfyui": comfy_version()}


JOBS = {"run": job_run}


# ---- the parent: run, report ---------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench bypass", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="sampler steps per run, >= 2 (default 4; --quick 4)")
    p.add_argument("--rounds", type=int, help="runs per mode, interleaved (default 4; --quick 1)")
    p.add_argument("--changes", type=int, help="strength changes timed per mode (default 6; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 16x16 latent, 4 steps, 1 round")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--size", type=int, help="latent height = width (default 32, i.e. 256 px; --quick 16)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--timeout", type=float, default=1200, help="seconds the run may take")
    args = p.parse_args(argv)
    args.steps = args.steps or 4
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.changes = args.changes or (2 if args.quick else 6)
    args.size = args.size or (16 if args.quick else 32)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is not timed)")
    args.modes = subset(p, "--modes", args.modes, MODES)
    return args


def summarize(res: dict) -> dict:
    out = {}
    for mode, xs in res["steps"].items():
        x = {"step_s": median([w for w, _ in xs]), "cpu_s": median([c for _, c in xs]), "n": len(xs),
             "patched": res["patched"].get(mode, 0)}
        ch = res["changes"].get(mode)
        if ch:
            x["change_s"] = median([c["total"] for c in ch["changes"]])
            x["change_load_s"] = median([c["load"] for c in ch["changes"]])
            x["first_s"] = ch["first"]["total"]
        out[mode] = x
    for key in ("step_s", "cpu_s"):
        base = out.get("base", {}).get(key)
        merged = out.get("merged", {}).get(key)
        for x in out.values():
            x[f"{key}_vs_base"] = ratio(x[key], base) if base else float("nan")
            x[f"{key}_vs_merged"] = ratio(x[key], merged) if merged else float("nan")
    return out


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def report(args, argv, res: dict) -> tuple[str, str, dict]:
    s = summarize(res)
    info = res["machine"]
    where = f"cuda ({info['gpu']})" if info["device"] == "cuda" else f"cpu, {info['threads']} thread(s)"
    cmd = command_line("bypass", argv)
    setting = (f"tiny SD1.5 (UNet 44M params, fp32), rank-{args.rank} LoRA on every UNet Linear/Conv "
               f"({s.get('merged', s.get('core', {})).get('patched', '?')} weights), latent {args.size}x{args.size}, "
               f"euler, cfg 7 (batch 2 per forward), {args.steps} steps x {args.rounds} round(s) per mode, interleaved; "
               f"{where}; torch {info['torch']}, ComfyUI {res['comfyui']}")
    what = {"base": "no LoRA", "merged": "LoRA Lab, merged", "bypass": "LoRA Lab, bypass=True",
            "core": "core LoraLoaderModelOnly (merged)"}
    change_how = {"merged": "re-patch", "bypass": "hook swap", "core": "re-patch"}
    header = ["mode", "what", "s/step", "x base", "x merged", "CPU s/step", "CPU x base", "CPU x merged",
              "steps timed", "strength change s", "(load part s)", "first apply s"]
    rows, md_rows = [], []
    r2 = "{:.2f}"
    for mode in args.modes:
        x = s[mode]
        rows.append([mode, what[mode], _f(x["step_s"]), _f(x["step_s_vs_base"], r2), _f(x["step_s_vs_merged"], r2),
                     _f(x["cpu_s"]), _f(x["cpu_s_vs_base"], r2), _f(x["cpu_s_vs_merged"], r2), x["n"],
                     _f(x.get("change_s")), _f(x.get("change_load_s")), _f(x.get("first_s"))])
        change = f"{_f(x.get('change_s'))} ({change_how[mode]})" if mode in change_how else "-"
        bold = (lambda t: f"**{t}**") if mode == "bypass" else (lambda t: t)
        md_rows.append([what[mode], _f(x["step_s"]), _f(x["step_s_vs_base"], r2), bold(_f(x["step_s_vs_merged"], r2)),
                        _f(x["cpu_s"]), bold(_f(x["cpu_s_vs_merged"], r2)), change])
    d = res["latent_diffs"]
    sanity = (f"max |latent| after sampling {d['scale']:.3g}; max |Δ|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in d.items() if k != "scale"))
    legend = ("s/step: median interval between the sampler's per-step callbacks (first step and loading excluded); "
              "CPU s/step: the same in process CPU time (all threads), which other load on a shared machine "
              "inflates far less than wall time. "
              "strength change: node re-run at the other strength + load_models_gpu (median of "
              f"{args.changes}, alternating 1 <-> 0.5); first apply: the same from the base model. "
              "Loader reports: " + "; ".join(f"{m}: {t.splitlines()[-1]}" for m, t in res["reports"].items()))
    notes = []
    if "bypass-merged" in d and "merged-base" in d and not d["bypass-merged"] < 0.05 * d["merged-base"]:
        notes.append("WARNING: bypass and merged outputs differ by more than 5% of the LoRA's effect")
    if d.get("merged-base") == 0.0 or d.get("bypass-base") == 0.0:
        notes.append("WARNING: a LoRA mode sampled exactly what the base model did: the LoRA had no effect")
    text = "\n".join([f"Bypass benchmark - `{cmd}`", setting, "", text_table(header, rows), "", legend, sanity, *notes])
    md_header = ["mode", "s/step", "× base", "× merged", "CPU s/step", "CPU × merged", "strength change (s)"]
    markdown = "\n".join([f"`{cmd}` - {setting}.", "", markdown_table(md_header, md_rows), "", sanity, *notes])
    return text, markdown, s


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = {"device": args.device, "threads": args.threads, "size": args.size, "rank": args.rank,
            "steps": args.steps, "rounds": args.rounds, "changes": args.changes, "modes": args.modes,
            "label": "quick" if args.quick else "full"}
    try:
        res = run_job("bypass", "run", spec, timeout=args.timeout)
    except BenchError as e:
        print(f"bench bypass: {e}", file=sys.stderr)
        return 1
    text, markdown, summary = report(args, argv, res)
    print(text + "\n\nMarkdown for README:\n\n" + markdown)
    data = {"command": command_line("bypass", argv), "settings": spec, "result": res, "summary": summary,
            "wall_s": time.perf_counter() - started}
    js, md = write_results(f"bypass{'-quick' if args.quick else ''}", data, f"{text}\n\n{markdown}")
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0
