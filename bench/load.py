"""``python -m bench load``: applying LoRAs, core ``LoraLoader`` vs our ``LoraLabLoadLoRA``.

One checkpoint of real SD1.5 size (ComfyUI's SD15 UNet and CLIP-L, random fp16 weights) and
rank-32 kohya LoRAs that cover every UNet and CLIP Linear/Conv that ComfyUI's key maps can
name, both cached under ``.cache/bench/``. Cases, each timed from the node call(s) until the
weights are patched (``patch_model`` of MODEL and of CLIP's patcher, on the load device):

    first     a fresh node applies one LoRA (file read included)
    change    the same node re-run at another strength: unpatch the old clones, patch the new
    stack3    3 chained nodes, 3 different LoRAs, patched at once
    stack10   the same with 10

Every (implementation, case) runs in its own process (``--quick``: one process for all), so
peak memory is per case. Memory: ``peak Δ`` = highest RSS while the case ran minus RSS with
the unpatched model loaded just before it; ``retained`` = RSS right after patching minus that
same baseline (the largest over repeats). On CUDA the same for ``torch.cuda`` allocations.

The floor: total up·down FLOPs of the case divided by the fp32 matmul rate, measured in each
case's process just before it runs (the machine may be shared; a rate taken at another moment
would not fit) with matmuls of exactly the LoRA's shapes; each time is also given as a
multiple of it.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

from .common import (CACHE_DIR, GIB, BenchError, PeakProbe, command_line, comfy_version, machine,
                     markdown_table, median, ratio, resolve_device, run_job, setup_comfy, sync,
                     testkit, text_table, write_results)

ASSET_VERSION = "v1"   # bump when the checkpoint or the LoRA files change
CASES = {"first": 1, "change": 1, "stack3": 3, "stack10": 10}   # case -> LoRAs in it
REPEATS = {"first": 3, "change": 3, "stack3": 1, "stack10": 1}
QUICK_CASES = ("first", "change", "stack3")
IMPLS = ("core", "ours")
VARIANTS = {
    "full": {"full": True, "what": "SD1.5 full size (UNet 860M + CLIP-L 123M), fp16"},
    "quick": {"full": False, "what": "reduced SD1.5 (UNet 44M + CLIP-L 123M), fp16"},
}


# ---- assets (cached on disk) ---------------------------------------------------------------------
def asset_paths(variant: str, rank: int, n_loras: int) -> dict:
    root = os.path.join(CACHE_DIR, variant)
    return {
        "folders": {"checkpoints": os.path.join(root, "checkpoints"), "loras": os.path.join(root, "loras")},
        "checkpoint": os.path.join(root, "checkpoints", f"sd15-{variant}-{ASSET_VERSION}.safetensors"),
        "loras": [f"r{rank}-{i}-{ASSET_VERSION}.safetensors" for i in range(n_loras)],
        "manifest": os.path.join(root, f"manifest-r{rank}-{ASSET_VERSION}.json"),
    }


def _save_atomic(sd: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(sd, tmp, metadata=metadata)
    os.replace(tmp, path)


def _load_checkpoint(path: str):
    import comfy.sd
    import torch

    fp16 = {"dtype": torch.float16}
    model, clip = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True,
                                                        model_options=fp16, te_model_options=fp16)[:2]
    return model, clip


def lora_targets(model, clip) -> tuple[list[tuple[str, str, tuple]], list[str]]:
    """(kohya name, model key, weight shape) for every UNet/CLIP Linear and Conv2d, named through
    ComfyUI's own key maps (diffusers-style kohya names preferred, as kohya writes them), and
    the keys no kohya name reaches."""
    import comfy.lora
    import torch

    km = comfy.lora.model_lora_keys_unet(model.model, {})
    km = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, km)
    names: dict[str, list[str]] = {}
    for name, key in km.items():
        if isinstance(key, str) and name.startswith(("lora_unet_", "lora_te_")):
            names.setdefault(key, []).append(name)
    found, missing = [], []
    for root in (model.model, clip.cond_stage_model):
        for module_name, module in root.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            key = f"{module_name}.weight"
            ldm_name = "lora_unet_" + module_name.removeprefix("diffusion_model.").replace(".", "_")
            candidates = sorted(names.get(key, []), key=lambda n: (n == ldm_name, n))
            if candidates:
                found.append((candidates[0], key, tuple(module.weight.shape)))
            else:
                missing.append(key)
    return found, missing


def _write_lora(path: str, targets: list, rank: int, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, _key, shape in targets:
        fan_in = math.prod(shape[1:])
        down = torch.randn((rank, *shape[1:]), generator=g) / math.sqrt(fan_in)
        up = torch.randn((shape[0], rank, *[1] * (len(shape) - 2)), generator=g) * (0.05 / math.sqrt(rank))
        sd[f"{name}.lora_down.weight"] = down.half()
        sd[f"{name}.lora_up.weight"] = up.half()
        sd[f"{name}.alpha"] = torch.tensor(rank / 2)
    _save_atomic(sd, path, {"loralab_bench": f"rank {rank} seed {seed} {ASSET_VERSION}"})


def job_prepare(spec: dict) -> dict:
    """Build the checkpoint and LoRA files that are missing; returns the manifest."""
    import json

    import torch

    setup_comfy("cpu", spec["folders"])
    checkpoints = testkit("checkpoints")
    if not os.path.isfile(spec["checkpoint"]):
        sd = checkpoints.build_state_dict(spec["full"], dtype=torch.float16, vae=False)
        checkpoints.check_detected_as_sd15(sd)
        _save_atomic(sd, spec["checkpoint"], {"loralab_bench": f"random SD1.5 {ASSET_VERSION}"})
        del sd
    model, clip = _load_checkpoint(spec["checkpoint"])
    targets, missing = lora_targets(model, clip)
    rank = spec["rank"]
    for i, name in enumerate(spec["loras"]):
        path = os.path.join(spec["folders"]["loras"], name)
        if not os.path.isfile(path):
            _write_lora(path, targets, rank, seed=1000 + i)
    manifest = {
        "version": ASSET_VERSION, "rank": rank, "loras": spec["loras"],
        "unet_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "clip_params": sum(p.numel() for p in clip.cond_stage_model.parameters()),
        "targets_unet": sum(k.startswith("diffusion_model.") for _, k, _ in targets),
        "targets_clip": sum(not k.startswith("diffusion_model.") for _, k, _ in targets),
        "not_nameable": missing,
        "flops_per_lora": sum(2 * s[0] * rank * math.prod(s[1:]) for _, _, s in targets),
        "lora_mb": os.path.getsize(os.path.join(spec["folders"]["loras"], spec["loras"][0])) / 2**20,
    }
    with open(spec["manifest"], "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def ensure_assets(paths: dict, variant: str, rank: int) -> dict:
    import json

    ok = os.path.isfile(paths["manifest"]) and os.path.isfile(paths["checkpoint"]) and all(
        os.path.isfile(os.path.join(paths["folders"]["loras"], n)) for n in paths["loras"])
    if ok:
        with open(paths["manifest"]) as fh:
            manifest = json.load(fh)
        if manifest.get("version") == ASSET_VERSION:
            return manifest
    print(f"building the {variant} checkpoint and {len(paths['loras'])} LoRA file(s) under "
          f"{os.path.relpath(CACHE_DIR)} (once) ...", flush=True)
    return run_job("load", "prepare", {**paths, "label": f"prepare-{variant}", "rank": rank,
                                       "full": VARIANTS[variant]["full"]}, timeout=1800)


# ---- the floor -----------------------------------------------------------------------------------
def measure_floor(lora_path: str, device: str, passes: int = 2) -> dict:
    """fp32 matmul rate on ``device`` for exactly the up·down products of one LoRA file
    (one warm-up pass, then the best of ``passes``)."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(lora_path)
    pairs = []
    for k in sorted(sd):
        if k.endswith(".lora_up.weight"):
            prefix = k[: -len(".lora_up.weight")]
            up = sd[k].flatten(1).to(device, torch.float32)
            down = sd[f"{prefix}.lora_down.weight"].flatten(1).to(device, torch.float32)
            pairs.append((up, down))
    buf = torch.empty(max(u.shape[0] * d.shape[1] for u, d in pairs), device=device)
    outs = [buf[: u.shape[0] * d.shape[1]].view(u.shape[0], d.shape[1]) for u, d in pairs]

    def once() -> tuple[float, float]:
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        for (up, down), out in zip(pairs, outs):
            torch.mm(up, down, out=out)
        sync(device)
        return time.perf_counter() - t, time.process_time() - c

    once()  # warm-up
    runs = [once() for _ in range(passes)]
    flops = sum(2 * u.shape[0] * u.shape[1] * d.shape[1] for u, d in pairs)
    return {"flops": flops, "seconds": [w for w, _ in runs], "cpu_seconds": [c for _, c in runs],
            "rate": flops / min(w for w, _ in runs), "cpu_rate": flops / min(c for _, c in runs)}


# ---- the cases -----------------------------------------------------------------------------------
def _implementations(pack) -> dict:
    import nodes

    ours = pack.NODE_CLASS_MAPPINGS["LoraLabLoadLoRA"]
    return {
        "core": (nodes.LoraLoader, lambda node, m, c, name, s: node.load_lora(m, c, name, s, s)),
        "ours": (ours, lambda node, m, c, name, s: tuple(node.load(m, c, name, s, s)["result"][:2])),
    }


def _patch(pair) -> None:
    for patcher in (pair[0], pair[1].patcher):
        patcher.patch_model(patcher.load_device)


def _unpatch(pair) -> None:
    for patcher in (pair[0], pair[1].patcher):
        patcher.unpatch_model()


def _run_case(ctx: dict, impl: str, case: str, repeats: int) -> dict:
    import cProfile

    node_cls, apply = ctx["impls"][impl]
    profiler = cProfile.Profile() if ctx["profile"] else None
    names, probe, device = ctx["loras"][: CASES[case]], ctx["probe"], ctx["device"]

    def stacked(nodes, strength):
        m, c = ctx["model"], ctx["clip"]
        for node, name in zip(nodes, names):
            m, c = apply(node, m, c, name, strength)
        return m, c

    gc.collect()
    base = probe.snapshot()
    held = None
    if case == "change":   # one node, already applied and patched at strength 1
        nodes = [node_cls()]
        held = stacked(nodes, 1.0)
        _patch(held)
    probe.reset()
    reps = []
    for i in range(repeats):
        if case != "change":
            nodes = [node_cls() for _ in names]
        strength = (0.5 if i % 2 == 0 else 1.0) if case == "change" else 1.0
        if profiler:
            profiler.enable()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        pair = stacked(nodes, strength)
        t1 = time.perf_counter()
        if held is not None:
            _unpatch(held)
        _patch(pair)
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.disable()
        after = probe.snapshot()
        reps.append({"total": t2 - t0, "nodes": t1 - t0, "patch": t2 - t1, "cpu": c2 - c0,
                     "retained": {k: after[k] - base[k] for k in after},
                     "patched_keys": [len(pair[0].patches), len(pair[1].patcher.patches)]})
        if case == "change":
            held = pair
        else:
            _unpatch(pair)
        del pair
        gc.collect()
    peaks = probe.peaks()
    if held is not None:
        _unpatch(held)
    del held
    gc.collect()
    out = {"impl": impl, "case": case, "repeats": reps, "base": base, "peaks": peaks, "peak_scope": probe.scope}
    if profiler:
        out["profile"] = _profile_text(profiler, ctx["profile"])
    return out


def _profile_text(profiler, top: int) -> str:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue().split("\n\n", 1)[-1].strip()


def job_cases(spec: dict) -> dict:
    import logging

    device = resolve_device(spec["device"])
    pack = setup_comfy(device, spec["folders"])
    logging.getLogger().setLevel(logging.WARNING)
    model, clip = _load_checkpoint(spec["checkpoint"])
    floor = measure_floor(os.path.join(spec["folders"]["loras"], spec["loras"][0]), device)
    for patcher in (model, clip.patcher):   # weights on the load device, unpatched, as after a first use
        patcher.patch_model(patcher.load_device)
        patcher.unpatch_model()
    ctx = {"impls": _implementations(pack), "model": model, "clip": clip, "loras": spec["loras"],
           "probe": PeakProbe(device), "device": device, "profile": spec.get("profile", 0)}
    runs = [_run_case(ctx, r["impl"], r["case"], r["repeats"]) for r in spec["runs"]]
    return {"runs": runs, "floor": floor, "machine": machine(device), "comfyui": comfy_version(),
            "load_devices": [str(model.load_device), str(clip.patcher.load_device)]}


JOBS = {"prepare": job_prepare, "cases": job_cases}


# ---- the parent: plan, run, report ---------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: reduced UNet, 1 repeat, cases {','.join(QUICK_CASES)} (unless --cases), "
                        "all in one process (< 1 min on an idle 2-core machine once cached)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available, else cpu")
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of core,ours")
    p.add_argument("--repeats", type=int, help=f"repeats per case (default {REPEATS}; --quick: 1)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one case process may take")
    p.add_argument("--report", metavar="JSON", help="only re-print the tables of a results file written earlier")
    p.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="TOP",
                   help="cProfile the timed part of every run and print its TOP (15) functions by own time "
                        "(times then include the profiler's overhead)")
    args = p.parse_args(argv)
    if args.cases is None:
        args.cases = ",".join(QUICK_CASES if args.quick else CASES)
    for what, allowed in (("cases", CASES), ("impls", IMPLS)):
        chosen = [x for x in getattr(args, what).split(",") if x]
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            p.error(f"--{what} {getattr(args, what)!r}: choose from {', '.join(allowed)}")
        setattr(args, what, chosen)
    return args


_MISSING = {k: float("nan") for k in ("median", "patch", "floor", "cpu", "cpu_floor", "peak_delta", "retained", "cuda_peak_delta",
                                      "cuda_retained")}


def _gib(x: float | None, sign: bool = False) -> str:
    if x is None or x != x:
        return "-"
    return f"{x / GIB:+.2f}" if sign else f"{x / GIB:.2f}"


def _summary(run: dict) -> dict:
    reps = run["repeats"]
    out = {"times": [r["total"] for r in reps], "median": median([r["total"] for r in reps]),
           "cpu": median([r["cpu"] for r in reps]),
           "patch": median([r["patch"] for r in reps]), "nodes": median([r["nodes"] for r in reps]),
           "peak_rss": run["peaks"]["peak_rss"], "peak_delta": run["peaks"]["peak_rss"] - run["base"]["rss"],
           "retained": max(r["retained"]["rss"] for r in reps), "patched_keys": reps[0]["patched_keys"]}
    if "cuda_max_allocated" in run["peaks"]:
        out["cuda_peak_delta"] = run["peaks"]["cuda_max_allocated"] - run["base"]["cuda_allocated"]
        out["cuda_retained"] = max(r["retained"]["cuda_allocated"] for r in reps)
    return out


def report(cases, impls, cmd, manifest, results, variant) -> tuple[str, str, dict]:
    per_lora = manifest["flops_per_lora"]
    rates = [res["floor"]["rate"] for res in results]
    rate = median(rates)
    info = results[0]["machine"]
    cuda = info["device"] == "cuda"
    where = (f"{info['device']} ({info['gpu']})" if cuda else f"cpu, {info['threads']} threads")
    head = (f"LoRA load benchmark - `{cmd}`\n"
            f"{VARIANTS[variant]['what']}; rank-{manifest['rank']} kohya LoRA on {manifest['targets_unet']} UNet + "
            f"{manifest['targets_clip']} CLIP layers ({manifest['lora_mb']:.0f} MB); {where}; "
            f"torch {info['torch']}, ComfyUI {results[0]['comfyui']}\n"
            f"floor: {per_lora / 1e9:.1f} GFLOP per LoRA / fp32 matmul rate of the same shapes, measured in each "
            f"case's process: {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} GFLOP/s (median {rate / 1e9:.1f}) = "
            f"{per_lora / rate:.2f} s per LoRA")
    summaries: dict = {}
    for res in results:
        for run in res["runs"]:
            x = summaries.setdefault(run["case"], {})[run["impl"]] = _summary(run)
            x["floor"] = CASES[run["case"]] * per_lora / res["floor"]["rate"]
            x["cpu_floor"] = CASES[run["case"]] * per_lora / res["floor"]["cpu_rate"]
    rows, md_rows, notes = [], [], []
    for case in cases:
        s = summaries.get(case, {})
        fl = median([x["floor"] for x in s.values()])
        for impl in impls:
            if impl not in s:
                continue
            x = s[impl]
            row = [case, impl, " ".join(f"{t:.2f}" for t in x["times"]), f"{x['median']:.2f}", f"{x['patch']:.2f}",
                   f"{x['floor']:.2f}", f"{x['median'] / x['floor']:.1f}", f"{x['cpu']:.2f}",
                   f"{x['cpu'] / x['cpu_floor']:.1f}", _gib(x["peak_rss"]), _gib(x["peak_delta"], True), _gib(x["retained"], True)]
            if cuda:
                row += [_gib(x["cuda_peak_delta"], True), _gib(x["cuda_retained"], True)]
            rows.append(row)
        if s:
            c, o = s.get("core", _MISSING), s.get("ours", _MISSING)
            row = ["", "ours/core", "", f"{ratio(o['median'], c['median']):.2f}", f"{ratio(o['patch'], c['patch']):.2f}",
                   "", "", f"{ratio(o['cpu'], c['cpu']):.2f}", "", "", f"{ratio(o['peak_delta'], c['peak_delta']):.2f}", f"{ratio(o['retained'], c['retained']):.2f}"]
            if cuda:
                row += [f"{ratio(o['cuda_peak_delta'], c['cuda_peak_delta']):.2f}",
                        f"{ratio(o['cuda_retained'], c['cuda_retained']):.2f}"]
            if len(s) == 2:
                rows.append(row)
            if len(s) == 2 and c["patched_keys"] != o["patched_keys"]:
                notes.append(f"{case}: patched keys differ (MODEL, CLIP): core {c['patched_keys']}, ours {o['patched_keys']}")
            normalised = ratio(o["median"] / o["floor"], c["median"] / c["floor"])
            md = [case, f"{fl:.2f}", f"{c['median']:.2f}", f"{o['median']:.2f}", f"**{ratio(o['median'], c['median']):.2f}**",
                  f"{normalised:.2f}", f"{ratio(o['cpu'], c['cpu']):.2f}", f"{c['median'] / c['floor']:.1f}", f"{o['median'] / o['floor']:.1f}",
                  f"{_gib(c['peak_delta'], True)} / {_gib(o['peak_delta'], True)}",
                  f"{_gib(c['retained'], True)} / {_gib(o['retained'], True)}"]
            if cuda:
                md += [f"{_gib(c['cuda_peak_delta'], True)} / {_gib(o['cuda_peak_delta'], True)}",
                       f"{_gib(c['cuda_retained'], True)} / {_gib(o['cuda_retained'], True)}"]
            md_rows.append(md)
    header = ["case", "impl", "runs (s)", "median s", "patch s", "floor s", "x floor", "CPU s", "CPU x floor", "peak RSS GiB", "peak d GiB", "retained GiB"]
    md_header = ["case", "floor (s)", "core (s)", "ours (s)", "ours/core", "ours/core of x floor", "ours/core CPU time",
                 "core x floor",
                 "ours x floor",
                 "peak RSS d core / ours (GiB)", "retained RSS core / ours (GiB)"]
    if cuda:
        header += ["cuda peak d", "cuda retained"]
        md_header += ["CUDA peak d core / ours (GiB)", "CUDA retained core / ours (GiB)"]
    scope = {r["peak_scope"] for res in results for r in res["runs"]}
    legend = ("times: node call(s) + patch_model of MODEL and CLIP (change: + unpatch of the previous clones); "
              "median of the runs (wall clock). x floor: time / the floor measured in the same process just before "
              "the case, so 'ours/core of x floor' cancels load that differed between the two processes. CPU s: the same span in process CPU time (all threads); "
              "other load on a shared machine inflates it less than wall time, though not to zero (spinning threads); CPU x floor against the floor's own "
              "CPU time. peak d: highest RSS during the case minus RSS with the unpatched model loaded "
              f"(peak measured {', '.join(sorted(scope))}); retained: RSS after patching minus the same baseline.")
    if variant == "quick":
        legend += " QUICK run: reduced UNet, all cases in one process."
    text = "\n".join([head, "", text_table(header, rows), "", legend, *notes])
    markdown = "\n".join([f"`{cmd}` - {VARIANTS[variant]['what']}, rank-{manifest['rank']} LoRA on every UNet and "
                          f"CLIP Linear/Conv ({manifest['targets_unet']} + {manifest['targets_clip']} layers); {where}; "
                          f"torch {info['torch']}, ComfyUI {results[0]['comfyui']}; floor = up·down FLOPs at the measured "
                          f"fp32 matmul rate ({rate / 1e9:.0f} GFLOP/s, measured beside each case); median of runs; d = increase over the loaded, unpatched model.",
                          "", markdown_table(md_header, md_rows), *[f"\n{n}" for n in notes]])
    return text, markdown, summaries


def _reprint(path: str) -> int:
    import json

    with open(path) as fh:
        data = json.load(fh)
    runs = [run for res in data["results"] for run in res["runs"]]
    cases = [c for c in CASES if any(r["case"] == c for r in runs)]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in runs)]
    text, markdown, _ = report(cases, impls, data["command"], data["manifest"], data["results"], data["variant"])
    print(text + "\n\nMarkdown for README:\n\n" + markdown)
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report:
        return _reprint(args.report)
    variant = "quick" if args.quick else "full"
    n_loras = max(CASES[c] for c in args.cases)
    paths = asset_paths(variant, args.rank, n_loras)
    started = time.perf_counter()
    try:
        manifest = ensure_assets(paths, variant, args.rank)
        common = {"device": args.device, "folders": paths["folders"], "checkpoint": paths["checkpoint"],
                  "loras": paths["loras"], "profile": args.profile}

        def repeats(case):
            return args.repeats or (1 if args.quick else REPEATS[case])

        plan = [(case, impl) for case in args.cases for impl in args.impls]
        if args.quick:
            jobs = [("all", [{"impl": i, "case": c, "repeats": repeats(c)} for c, i in plan])]
        else:
            jobs = [(f"{c}-{i}", [{"impl": i, "case": c, "repeats": repeats(c)}]) for c, i in plan]
        results = []
        for label, runs in jobs:
            res = run_job("load", "cases", {**common, "label": f"{variant}-{label}", "runs": runs}, timeout=args.timeout)
            print(f"  [{label}: {res['machine']['device']}, floor rate {res['floor']['rate'] / 1e9:.1f} GFLOP/s]", flush=True)
            for run in res["runs"]:
                s = _summary(run)
                print(f"  {run['case']:<8} {run['impl']:<5} " + " ".join(f"{t:.2f}" for t in s["times"]) +
                      f" s, CPU {s['cpu']:.2f} s  (peak d {_gib(s['peak_delta'], True)} GiB, retained {_gib(s['retained'], True)} GiB)", flush=True)
                if "profile" in run:
                    print(f"\n  cProfile of {run['impl']} / {run['case']} (all repeats, by own time):\n{run['profile']}\n")
            results.append(res)
    except BenchError as e:
        print(f"bench load: {e}", file=sys.stderr)
        return 1
    text, markdown, summaries = report(args.cases, args.impls, command_line("load", argv), manifest, results, variant)
    print("\n" + text + "\n\nMarkdown for README:\n\n" + markdown)
    data = {"command": command_line("load", argv), "variant": variant, "manifest": manifest,
            "results": results, "summary": summaries, "wall_s": time.perf_counter() - started}
    js, md = write_results(f"load-{variant}", data, f"{text}\n\n{markdown}")
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0
