"""``python -m bench svd``: the SVD step of Extract LoRA and Resize LoRA on a full-size SD1.5 layout,
LoRA Lab's against a straightforward per-layer ``torch.linalg.svd`` (what kohya's scripts and
ComfyUI's LoraSave run), with ``torch.svd_lowrank`` beside them and how accurate it is.

The layout: every layer an SD1.5 LoRA can change (UNet Linear and Conv weights, CLIP-L encoder
Linears; 354 layers of 39 distinct shapes, read from ComfyUI's own model classes on the meta
device). Each distinct shape is measured once (``--repeat`` times, median) on seeded random data,
and the full-layout total is Σ over the 354 layers of their shape's time.

    extract   ΔW (out × in·k) with a power-law spectrum (σ_i ∝ i^-0.8, as a fine-tune's difference
              decays), truncated to ``--rank``:
                baseline   torch.linalg.svd(ΔW) (full_matrices, as kohya / ComfyUI call it)
                thin       torch.linalg.svd(ΔW, full_matrices=False)
                ours       lora.tools.svd.svd: eigendecomposition of the smaller Gram matrix (float64)
                lowrank-N  torch.svd_lowrank(ΔW, q = rank + 8, niter = N)
    resize    a rank-``--lora-rank`` LoRA (up · down) to ``--rank``:
                baseline   torch.linalg.svd(up @ down) (kohya's resize_lora)
                ours       QR of up and downᵀ and an SVD of the r × r core (exact)
                lowrank-2  torch.svd_lowrank(up @ down, niter = 2)

Accuracy: each method's rank-k error ‖ΔW − ΔWₖ‖_F over the baseline's (the optimum, Eckart–Young),
minus 1: 0 for an exact method, > 0 for an approximation (max over shapes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .common import (BenchError, command_line, machine, markdown_table, median, ratio, resolve_device,
                     run_job, setup_comfy, sync, testkit, text_table, write_results)

QUICK = [(320, 320), (1280, 1280), (768, 3072), (1280, 11520), (10240, 1280)]


# ---- the worker side -------------------------------------------------------------------------------------
def layout() -> dict[tuple[int, int], int]:
    """(out, in·k) -> how many layers of full-size SD1.5 have that shape (UNet + CLIP-L encoder)."""
    import torch

    checkpoints = testkit("checkpoints")
    counts: dict[tuple[int, int], int] = {}
    for k, s in checkpoints._shapes(True, vae=False).items():
        if not k.endswith(".weight") or len(s) not in (2, 4) or "embedding" in k:
            continue
        if k.startswith(checkpoints.CLIP_PREFIX) and not k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                      "out_proj.weight", "fc1.weight", "fc2.weight")):
            continue
        shape = (int(s[0]), int(torch.Size(s[1:]).numel()))
        counts[shape] = counts.get(shape, 0) + 1
    return counts


def _power_law(out: int, cols: int, seed: int, device):
    import torch

    g = torch.Generator().manual_seed(seed)
    m = min(out, cols)
    a = torch.randn(out, m, generator=g) / m ** 0.5
    b = torch.randn(m, cols, generator=g) / cols ** 0.5
    s = torch.arange(1, m + 1, dtype=torch.float32).pow(-0.8)
    return ((a * s) @ b).to(device)


def _timed(fn, device: str, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return median(times), out


def _error(m, u, s, vh, k: int) -> float:
    import torch

    return float(torch.linalg.norm(m - (u[:, :k] * s[:k]) @ vh[:k]))


def job_run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    setup_comfy(device, {})
    from loralab.lora.tools import svd as S

    counts = layout()
    shapes = sorted(counts) if not spec["quick"] else [s for s in QUICK if s in counts]
    k, r, rep = spec["rank"], spec["lora_rank"], spec["repeat"]
    rows = []
    for i, (out, cols) in enumerate(shapes):
        kk = min(k, out, cols)
        row = {"shape": [out, cols], "count": counts[(out, cols)], "extract": {}, "resize": {}}
        m = _power_law(out, cols, i, device)
        t, (u, s, vh) = _timed(lambda m=m: torch.linalg.svd(m), device, rep)
        opt = max(_error(m, u, s, vh, kk), 1e-30)
        row["extract"]["baseline"] = {"s": t, "excess": 0.0}
        # default arguments bind this iteration's values (each lambda runs within it)
        methods = {"thin": lambda m=m: torch.linalg.svd(m, full_matrices=False),
                   "ours": lambda m=m, out=out, cols=cols: S.svd(S.Delta(out, cols, dense=m))}
        for n in spec["niter"]:
            methods[f"lowrank-{n}"] = (lambda n=n, m=m, kk=kk: _lowrank(m, kk, n))
        for name, fn in methods.items():
            t, (u, s, vh) = _timed(fn, device, rep)
            row["extract"][name] = {"s": t, "excess": _error(m, u, s, vh, kk) / opt - 1}
        del m, u, s, vh
        g = torch.Generator().manual_seed(1000 + i)
        rr = min(r, out, cols)
        up = (torch.randn(out, rr, generator=g) / rr ** 0.5).to(device)
        down = (torch.randn(rr, cols, generator=g) / cols ** 0.5).to(device)
        t, (u, s, vh) = _timed(lambda up=up, down=down: torch.linalg.svd(up @ down), device, rep)
        prod = up @ down
        opt = max(_error(prod, u, s, vh, kk), 1e-30)
        row["resize"]["baseline"] = {"s": t, "excess": 0.0}
        for name, fn in {"ours": lambda out=out, cols=cols, up=up, down=down: S.svd(S.Delta(out, cols, up, down)),
                         "lowrank-2": lambda up=up, down=down, kk=kk: _lowrank(up @ down, kk, 2)}.items():
            t, (u, s, vh) = _timed(fn, device, rep)
            row["resize"][name] = {"s": t, "excess": _error(prod, u, s, vh, kk) / opt - 1}
        del prod, up, down, u, s, vh
        rows.append(row)
        print(f"  {out}×{cols} (×{counts[(out, cols)]}): " + ", ".join(
            f"{task} " + " ".join(f"{n} {v['s']:.3f}s" for n, v in row[task].items()) for task in ("extract", "resize")),
            flush=True)
    return {"rows": rows, "layers": sum(counts.values()), "shapes": len(counts), "machine": machine(device)}


def _lowrank(m, k: int, niter: int):
    import torch

    u, s, v = torch.svd_lowrank(m, q=min(k + 8, *m.shape), niter=niter)
    return u, s, v.T


JOBS = {"run": job_run}


# ---- the parent ----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench svd", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=32, help="the rank kept (default 32)")
    p.add_argument("--lora-rank", type=int, default=128, help="the rank of the LoRA resized (default 128)")
    p.add_argument("--repeat", type=int, default=1, help="timings per method and shape, median (default 1)")
    p.add_argument("--niter", default="2,4", help="svd_lowrank power iterations to try (default 2,4)")
    p.add_argument("--quick", action="store_true", help=f"only the shapes {QUICK}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--timeout", type=float, default=5400, help="seconds the run may take")
    args = p.parse_args(argv)
    args.niter = [int(n) for n in args.niter.split(",") if n]
    return args


def summarize(res: dict, task: str) -> tuple[list[str], list[list[str]]]:
    rows = res["rows"]
    names = list(rows[0][task])
    header = ["method", "Σ layers s", "× baseline speed", "error vs optimum (max)", "slowest shape s"]
    total = {n: sum(r[task][n]["s"] * r["count"] for r in rows) for n in names}
    out = []
    for n in names:
        worst = max(r[task][n]["excess"] for r in rows)
        slowest = max(rows, key=lambda r: r[task][n]["s"])
        out.append([n, f"{total[n]:.1f}", f"{ratio(total['baseline'], total[n]):.1f}",
                    "exact" if abs(worst) < 1e-5 else f"+{100 * worst:.2f}%",
                    f"{slowest[task][n]['s']:.2f} ({slowest['shape'][0]}×{slowest['shape'][1]})"])
    return header, out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = {"device": args.device, "threads": args.threads, "rank": args.rank, "lora_rank": args.lora_rank,
            "repeat": args.repeat, "niter": args.niter, "quick": args.quick, "label": "svd"}
    try:
        res = run_job("svd", "run", spec, timeout=args.timeout)
    except BenchError as e:
        print(f"bench svd: {e}", file=sys.stderr)
        return 1
    info = res["machine"]
    where = f"cuda ({info['gpu']})" if info["device"] == "cuda" else f"cpu, {info['threads']} thread(s)"
    cmd = command_line("svd", argv)
    measured = len(res["rows"])
    covered = sum(r["count"] for r in res["rows"])
    setting = (f"full-size SD1.5 layout ({res['layers']} layers of {res['shapes']} shapes; {measured} shape(s) measured, "
               f"covering {covered} layers: Σ layers = Σ over them of their shape's time), rank {args.rank}, resize "
               f"from rank {args.lora_rank}; {where}; torch {info['torch']}")
    text, markdown = [f"SVD benchmark - `{cmd}`", setting], [f"`{cmd}` - {setting}."]
    for task, what in (("extract", "Extract (dense ΔW of a fine-tune)"), ("resize", "Resize (a LoRA's up·down)")):
        header, rows = summarize(res, task)
        text += ["", what, text_table(header, rows)]
        markdown += ["", f"{what}:", "", markdown_table(header, rows)]
    print("\n" + "\n".join(text) + "\n\nMarkdown for README:\n\n" + "\n".join(markdown))
    js, md = write_results(f"svd{'-quick' if args.quick else ''}", {"command": cmd, "settings": spec, "results": res},
                           "\n".join(text) + "\n\n" + "\n".join(markdown))
    print(f"\nwritten: {os.path.relpath(js)}, {os.path.relpath(md)}  ({time.perf_counter() - started:.0f} s)")
    return 0

