"""``python -m bench stack``: many LoRAs at once, 10 chained core ``LoraLoader`` nodes vs ONE
``LoraLabLoraStack`` node with 10 rows (one clone, the rows' LoRAs summed in one product per weight),
and one row's strength change in forward-pass mode against core's re-patch.

The checkpoint and LoRAs are ``bench load``'s (cached under ``.cache/bench/``): SD1.5 at full size
(random fp16 weights) and rank-32 kohya LoRAs on every UNet and CLIP Linear/Conv. Cases, each
implementation in its own process (so peak memory is per case):

    stack10   apply 10 LoRAs: core = 10 chained LoraLoader nodes, ours = one stack node (merged);
              timed from the node call(s) until MODEL and CLIP are patched (``patch_model``)
    change1   the 10 are applied and patched; then one row's strength changes (row 5 of 10):
              core re-runs loaders 5..10 (the same node objects, files cached, as ComfyUI does),
              unpatches the old clones and patches the new ones; ours re-runs the stack node in
              forward-pass mode (``mode`` = forward pass) and swaps the hooks (unpatch + patch)

Memory: ``peak Δ`` = highest RSS while the case ran minus RSS with the unpatched model loaded just
before it (the larger of the repeats' retained memory is also shown).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from . import load
from .common import (GIB, BenchError, PeakProbe, command_line, comfy_version, machine, markdown_table, median,
                     ratio, resolve_device, run_job, setup_comfy, sync, text_table, write_results)

N = 10
CHANGED = 4            # the row whose strength changes (0-based: row 5)
CASES = ("stack10", "change1")
IMPLS = ("core", "ours")
REPEATS = {"stack10": 1, "change1": 3}


def _strengths(step: int) -> list[float]:
    s = [1.0 - 0.05 * i for i in range(N)]
    if step:
        s[CHANGED] = 0.5 if step % 2 else 0.75
    return s


class _Core:
    """10 chained core LoraLoaders; a strength change re-runs the changed one and every one after it."""

    def __init__(self, names):
        import nodes

        self.names = names
        self.nodes = [nodes.LoraLoader() for _ in names]
        self.outs = []

    def run(self, model, clip, strengths, start=0):
        m, c = (model, clip) if start == 0 else self.outs[start - 1]
        self.outs = self.outs[:start]
        for node, name, s in zip(self.nodes[start:], self.names[start:], strengths[start:]):
            m, c = node.load_lora(m, c, name, s, s)
            self.outs.append((m, c))
        return m, c


class _Ours:
    def __init__(self, pack, names, mode):
        self.names, self.mode = names, mode
        self.node = pack.NODE_CLASS_MAPPINGS["LoraLabLoraStack"]()

    def run(self, model, clip, strengths, start=0):
        rows = json.dumps([{"lora": n, "strength": s} for n, s in zip(self.names, strengths)])
        return tuple(self.node.apply(model, clip, rows=rows, mode=self.mode)["result"][:2])


def _run_case(ctx: dict, impl: str, case: str, repeats: int) -> dict:
    model, clip, probe, device = ctx["model"], ctx["clip"], ctx["probe"], ctx["device"]
    mode = "forward pass" if case == "change1" else "merge weights"
    runner = _Core(ctx["loras"]) if impl == "core" else _Ours(ctx["pack"], ctx["loras"], mode)
    gc.collect()
    base = probe.snapshot()
    held = None
    if case == "change1":   # applied and patched at the start strengths, not timed
        held = runner.run(model, clip, _strengths(0))
        load._patch(held)
    probe.reset()
    reps = []
    for i in range(repeats):
        step = i + 1 if case == "change1" else 0
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        pair = runner.run(model, clip, _strengths(step), start=CHANGED if case == "change1" else 0)
        t1 = time.perf_counter()
        if held is not None:
            load._unpatch(held)
        load._patch(pair)
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        after = probe.snapshot()
        reps.append({"total": t2 - t0, "nodes": t1 - t0, "patch": t2 - t1, "cpu": c2 - c0,
                     "retained": {k: after[k] - base[k] for k in after}})
        if case == "change1":
            held = pair
        else:
            load._unpatch(pair)
        del pair
        gc.collect()
    peaks = probe.peaks()
    if held is not None:
        load._unpatch(held)
    del held, runner
    gc.collect()
    return {"impl": impl, "case": case, "repeats": reps, "base": base, "peaks": peaks, "peak_scope": probe.scope}


def job_cases(spec: dict) -> dict:
    import logging

    device = resolve_device(spec["device"])
    pack = setup_comfy(device, spec["folders"])
    logging.getLogger().setLevel(logging.WARNING)
    model, clip = load._load_checkpoint(spec["checkpoint"])
    for patcher in (model, clip.patcher):   # weights on the load device, unpatched, as after a first use
        patcher.patch_model(patcher.load_device)
        patcher.unpatch_model()
    ctx = {"pack": pack, "model": model, "clip": clip, "loras": spec["loras"], "probe": PeakProbe(device),
           "device": device}
    runs = [_run_case(ctx, r["impl"], r["case"], r["repeats"]) for r in spec["runs"]]
    return {"runs": runs, "machine": machine(device), "comfyui": comfy_version()}


JOBS = {"cases": job_cases}


def _summary(run: dict) -> dict:
    reps = run["repeats"]
    return {"times": [r["total"] for r in reps], "median": median([r["total"] for r in reps]),
            "cpu": median([r["cpu"] for r in reps]), "nodes": median([r["nodes"] for r in reps]),
            "patch": median([r["patch"] for r in reps]),
            "peak_delta": run["peaks"]["peak_rss"] - run["base"]["rss"],
            "retained": max(r["retained"]["rss"] for r in reps)}


def report(results: list[dict], cmd: str, manifest: dict, variant: str) -> tuple[str, str]:
    s: dict = {}
    for res in results:
        for run in res["runs"]:
            s.setdefault(run["case"], {})[run["impl"]] = _summary(run)
    info = results[0]["machine"]
    where = f"{info['device']}" + (f" ({info['gpu']})" if info["device"] == "cuda" else f", {info['threads']} threads")
    what = {"stack10": f"{N} LoRAs: {N} chained LoraLoader vs one stack node (merged)",
            "change1": f"row {CHANGED + 1} of {N} changes strength: core re-patch vs stack in forward-pass mode"}
    rows, md = [], []
    for case in CASES:
        if case not in s:
            continue
        c, o = s[case].get("core"), s[case].get("ours")
        for impl, x in (("core", c), ("ours", o)):
            if x:
                rows.append([case, impl, " ".join(f"{t:.3f}" for t in x["times"]), f"{x['median']:.3f}",
                             f"{x['nodes']:.3f}", f"{x['patch']:.3f}", f"{x['cpu']:.2f}",
                             f"{x['peak_delta'] / GIB:+.2f}", f"{x['retained'] / GIB:+.2f}"])
        if c and o:
            t, m = ratio(o["median"], c["median"]), ratio(o["peak_delta"], c["peak_delta"])
            rows.append(["", "ours/core", "", f"{t:.3f}", "", "", f"{ratio(o['cpu'], c['cpu']):.2f}", f"{m:.2f}", ""])
            md.append([what[case], f"{c['median']:.3f}", f"{o['median']:.3f}", f"**{t:.3f}**",
                       f"{c['peak_delta'] / GIB:+.2f} / {o['peak_delta'] / GIB:+.2f}", f"{m:.2f}"])
    head = (f"LoRA stack benchmark - `{cmd}`\n{load.VARIANTS[variant]['what']}; {N} rank-{manifest['rank']} kohya LoRAs "
            f"on {manifest['targets_unet']} UNet + {manifest['targets_clip']} CLIP layers ({manifest['lora_mb']:.0f} MB "
            f"each); {where}; torch {info['torch']}, ComfyUI {results[0]['comfyui']}")
    header = ["case", "impl", "runs (s)", "median s", "nodes s", "patch s", "CPU s", "peak d GiB", "retained GiB"]
    legend = ("times: node call(s) + patch_model of MODEL and CLIP (change1: + unpatch of the previous clones); median "
              "of the runs. peak d: highest RSS during the case minus RSS with the unpatched model loaded.")
    text = "\n".join([head, "", text_table(header, rows), "", legend])
    markdown = "\n".join([f"`{cmd}` - {load.VARIANTS[variant]['what']}, {N} rank-{manifest['rank']} LoRAs on every UNet "
                          f"and CLIP Linear/Conv; {where}; torch {info['torch']}, ComfyUI {results[0]['comfyui']}.", "",
                          markdown_table(["case", "core (s)", "ours (s)", "ours/core time", "peak RSS Δ core / ours (GiB)",
                                          "ours/core peak RSS Δ"], md)])
    return text, markdown


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench stack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced UNet (smoke run), all cases in one process")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--repeats", type=int, help=f"repeats per case (default {REPEATS})")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if not cases or any(c not in CASES for c in cases):
        p.error(f"--cases {args.cases!r}: choose from {', '.join(CASES)}")
    variant = "quick" if args.quick else "full"
    paths = load.asset_paths(variant, args.rank, N)
    started = time.perf_counter()
    try:
        manifest = load.ensure_assets(paths, variant, args.rank)
        common = {"device": args.device, "folders": paths["folders"], "checkpoint": paths["checkpoint"],
                  "loras": paths["loras"]}
        plan = [{"impl": i, "case": c, "repeats": args.repeats or REPEATS[c]} for c in cases for i in IMPLS]
        jobs = [("all", plan)] if args.quick else [(f"{r['case']}-{r['impl']}", [r]) for r in plan]
        results = []
        for label, runs in jobs:
            res = run_job("stack", "cases", {**common, "label": f"{variant}-{label}", "runs": runs}, timeout=args.timeout)
            for run in res["runs"]:
                x = _summary(run)
                print(f"  {run['case']:<8} {run['impl']:<5} " + " ".join(f"{t:.3f}" for t in x["times"]) +
                      f" s, CPU {x['cpu']:.2f} s (peak d {x['peak_delta'] / GIB:+.2f} GiB)", flush=True)
            results.append(res)
    except BenchError as e:
        print(f"bench stack: {e}", file=sys.stderr)
        return 1
    cmd = command_line("stack", argv)
    text, markdown = report(results, cmd, manifest, variant)
    print("\n" + text + "\n\nMarkdown for README:\n\n" + markdown)
    js, md = write_results(f"stack-{variant}", {"command": cmd, "variant": variant, "manifest": manifest,
                                                "results": results, "wall_s": time.perf_counter() - started},
                           f"{text}\n\n{markdown}")
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0
