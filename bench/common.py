"""What every benchmark shares: subprocess jobs, memory probes, device handling, ComfyUI setup, output.

Jobs: ``run_job(module, job, spec)`` starts ``python -m bench._worker`` in a fresh interpreter,
which calls ``bench.<module>.JOBS[job](spec)`` and hands its dict back as JSON. The child's
output goes to a log file that is shown when the job fails.

Memory on the CPU is read from /proc: ``reset_peak_rss()`` clears the kernel's high-water mark
(``/proc/self/clear_refs`` "5") so ``peak_rss()`` (VmHWM) covers only what ran after it, not
loading the checkpoint; where that is not allowed the whole process's peak (ru_maxrss) is used
and ``PeakProbe.scope`` says so.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(REPO_ROOT, ".cache", "bench")
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
GIB = 2 ** 30


class BenchError(RuntimeError):
    pass


# ---- jobs in subprocesses -----------------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    # ComfyUI is imported afresh by every job; without cached bytecode that costs ~10 s of CPU per
    # job. Keep the .pyc files under .cache/ so nothing is written into the source trees.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", os.path.join(CACHE_DIR, "pycache"))
    return env


def run_job(module: str, job: str, spec: dict, *, timeout: float = 900, log_dir: str | None = None) -> dict:
    """Run ``bench.<module>.JOBS[job](spec)`` in a fresh interpreter; returns its dict."""
    log_dir = log_dir or os.path.join(CACHE_DIR, "logs")
    os.makedirs(log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        log_path = os.path.join(log_dir, f"{module}-{job}-{spec.get('label', 'job')}.log")
        cmd = [sys.executable, "-m", "bench._worker", module, job, spec_path, out_path]
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_child_env(), stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{module}/{job} ({spec.get('label')}) ran past {timeout:.0f} s; log: {log_path}") from None
        if proc.returncode != 0 or not os.path.isfile(out_path):
            with open(log_path) as fh:
                tail = "".join(fh.readlines()[-30:])
            raise BenchError(f"{module}/{job} ({spec.get('label')}) failed with exit code "
                             f"{proc.returncode}; log: {log_path}\n{tail}")
        with open(out_path) as fh:
            return json.load(fh)


# ---- devices -------------------------------------------------------------------------------------
def resolve_device(requested: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; an explicit "cuda" without one is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device here")
    if requested not in ("cpu", "cuda"):
        raise BenchError(f"--device {requested!r}: use auto, cpu or cuda")
    return requested


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    import platform

    import torch

    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- memory --------------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakProbe:
    """Peak resident memory (and CUDA memory) of this process from ``reset()`` on."""

    def __init__(self, device: str):
        self.device = device
        self.scope = "since reset"

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.scope = "whole process (ru_maxrss: /proc/self/clear_refs not writable)"
        if self.device == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()

    def peak_rss(self) -> int:
        if self.scope == "since reset":
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def snapshot(self) -> dict:
        out = {"rss": rss()}
        if self.device == "cuda":
            import torch
            out["cuda_allocated"] = torch.cuda.memory_allocated()
        return out

    def peaks(self) -> dict:
        out = {"peak_rss": self.peak_rss(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device == "cuda":
            import torch
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            out["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
        return out


# ---- ComfyUI in-process ---------------------------------------------------------------------------
def testkit(name: str):
    """A module of the test kit (testkit/loralab_testkit: the tiny models and LoRA files the tests build)."""
    return importlib.import_module(f"loralab_testkit.{name}")


def setup_comfy(device: str, folders: dict[str, str]):
    """Import ComfyUI for ``device`` with its model folders at ``folders``; returns the pack module.

    Like the tests' ``comfy_env.setup`` but the device is a choice: "cpu" makes ComfyUI's command
    line ``--cpu`` (comfy.model_management reads it once, at import); "cuda" leaves ComfyUI's
    own GPU choice.
    """
    env = testkit("comfy_env")
    why = env.comfy_available()
    if why:
        raise BenchError(why)
    # the repo root must not be importable: its nodes/ would shadow ComfyUI's nodes.py
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]
    sys.path.insert(0, env.comfy_dir())
    if device == "cpu":
        env._set_cpu_args()
    import comfy.model_management as mm
    import folder_paths

    got = mm.get_torch_device().type
    if got != device:
        raise BenchError(f"ComfyUI picked {got!r}, the benchmark asked for {device!r}")
    for name, path in folders.items():
        folder_paths.folder_names_and_paths[name] = ([path], folder_paths.supported_pt_extensions)
    work = os.path.join(CACHE_DIR, "comfy-work")
    for what in ("output", "input", "temp", "user"):
        os.makedirs(os.path.join(work, what), exist_ok=True)
        getattr(folder_paths, f"set_{what}_directory")(os.path.join(work, what))
    folder_paths.filename_list_cache.clear()
    return env.import_pack()


def comfy_version() -> str:
    try:
        from comfyui_version import __version__
        return __version__
    except ImportError:
        return "unknown"


# ---- output --------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def command_line(name: str, argv: list[str]) -> str:
    python = os.path.relpath(sys.executable, REPO_ROOT) if sys.executable.startswith(REPO_ROOT) else "python"
    return shlex.join([python, "-m", "bench", name, *argv])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    line = lambda r: "| " + " | ".join(str(c) for c in r) + " |"
    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


def write_results(name: str, data: dict, markdown: str) -> tuple[str, str]:
    """bench/results/<name>-<time>.json and .md, plus <name>-latest.*; returns the two paths."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for ext, text in (("json", json.dumps(data, indent=1)), ("md", markdown)):
        path = os.path.join(RESULTS_DIR, f"{name}-{stamp}.{ext}")
        for p in (path, os.path.join(RESULTS_DIR, f"{name}-latest.{ext}")):
            with open(p, "w") as fh:
                fh.write(text + "\n")
        paths.append(path)
    return paths[0], paths[1]
