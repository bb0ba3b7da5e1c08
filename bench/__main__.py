"""``python -m bench [NAME] [options]``: run one benchmark, or every implemented one.

A benchmark NAME maps to the module ``bench.<NAME>``, which provides ``main(argv) -> int``.
Adding one = adding its module and a line in ``BENCHMARKS``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

BENCHMARKS = {
    "load": "LoRA application time and memory: core LoraLoader vs LoraLabLoadLoRA (first, strength change, stacks)",
    "bypass": "sampling overhead per step, bypass vs merged weights",
    "stack": "10 LoRAs: 10 chained core LoraLoaders vs one LoraLabLoraStack; one row's strength change (forward pass)",
    "train": "training steps/s vs core TrainLoraNode",
    "dataset": "encoding a folder of captioned images: core's dataset nodes vs ours, cold and warm cache",
    "svd": "the SVD of Extract / Resize LoRA on a full SD1.5 layout vs per-layer torch.linalg.svd (+ svd_lowrank)",
    "distributed": "scripts/train.py throughput at world size 1 and 2 (torchrun; gloo on CPU, NCCL on GPUs)",
}


def implemented(name: str) -> bool:
    return importlib.util.find_spec(f"bench.{name}") is not None


def usage() -> str:
    lines = ["usage: python -m bench [NAME] [options]   (python -m bench NAME -h for a benchmark's options)",
             "", "benchmarks:"]
    for name, what in BENCHMARKS.items():
        lines.append(f"  {name:<8} {what}" + ("" if implemented(name) else "  [not implemented yet]"))
    lines.append("\nWithout NAME, every implemented benchmark runs with the options given.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(f"bench: unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}\n\n{usage()}",
                  file=sys.stderr)
            return 2
        if not implemented(name):
            print(f"bench: {name!r} is planned but not implemented yet (no bench/{name}.py)", file=sys.stderr)
            return 2
        return importlib.import_module(f"bench.{name}").main(rest)
    rc = 0
    for name in BENCHMARKS:
        if implemented(name):
            rc = importlib.import_module(f"bench.{name}").main(argv) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
