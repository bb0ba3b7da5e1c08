#!/usr/bin/env python3
"""LoRA Lab's LoRA tools on plain files, without ComfyUI. The same code as the tool nodes: the same
inputs give the same tensors and metadata (set SOURCE_DATE_EPOCH to fix modelspec.date):

    loratool.py resize  IN OUT --rank R [--conv-rank C] [--dynamic sv_ratio|sv_fro|sv_cumulative --param P]
    loratool.py merge   OUT IN[:RATIO] IN[:RATIO] ... [--rank R [--conv-rank C]] [--model MODEL_FILE]
                        (no rank: concatenate, exact)
    loratool.py convert IN OUT --to kohya|comfy --model MODEL_FILE
    loratool.py extract BASE TUNED OUT --rank R [--conv-rank C | --no-conv] [--dynamic ... --param P]
    loratool.py inspect IN [--model MODEL_FILE] [--json]

Options common to the writing commands: --clamp-quantile Q (kohya's clamp; off by default),
--dtype auto|fp32|fp16|bf16, --device auto|cpu|cuda. OUT is never overwritten. MODEL_FILE is a
checkpoint or diffusion-model .safetensors; only its header is read (its key names): SD1.x, SD2.x
and SDXL files in any naming, other families in their own (ComfyUI / kohya) naming.
Errors name the file and key and exit with status 2; nothing is left half-written.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "loralab"


def register_core() -> None:
    """Make the pack importable as the package ``loralab`` without running its __init__ (which needs
    ComfyUI), as ComfyUI itself names it by folder; only ``loralab.lora`` (no ComfyUI) is used."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loratool.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def writing(p, conv_help="rank of conv layers with kernels > 1×1 (default: --rank)"):
        p.add_argument("--conv-rank", type=int, default=None, help=conv_help)
        p.add_argument("--clamp-quantile", type=float, default=None,
                       help="kohya's clamp of the factors at this quantile (kohya: 0.99); default off")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="precision of the written factors (auto: the inputs')")
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")

    def dynamic(p):
        p.add_argument("--dynamic", default=None, choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                       help="choose each layer's rank by this rule (--rank is then the largest)")
        p.add_argument("--param", type=float, default=None, help="the dynamic rule's parameter")

    p = sub.add_parser("resize", help="lower a LoRA's rank (kohya resize_lora)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--rank", type=int, required=True)
    dynamic(p)
    writing(p)

    p = sub.add_parser("merge", help="merge LoRAs with ratios (kohya merge_lora --concat / svd_merge_lora)")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+", metavar="IN[:RATIO]")
    p.add_argument("--rank", type=int, default=None, help="SVD to this rank (default: concatenate, exact)")
    p.add_argument("--model", default=None, help="the model file: match layers by the weight they change "
                   "(files that name the same layers differently merge)")
    writing(p, "SVD merge: rank of conv layers with kernels > 1×1 (default: --rank)")

    p = sub.add_parser("convert", help="rewrite with kohya's or ComfyUI's key names, algorithm kept")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=["kohya", "comfy"])
    p.add_argument("--model", required=True, help="the model file (its header gives the key names)")

    p = sub.add_parser("extract", help="the difference of two models as a LoRA (kohya extract_lora_from_models)")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("output")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--no-conv", action="store_true", help="leave out conv layers with kernels > 1×1")
    p.add_argument("--min-diff", type=float, default=0.0, help="leave out layers differing by at most this")
    p.add_argument("--naming", default="kohya", choices=["kohya", "comfy"])
    p.add_argument("--svd", default="exact", choices=["exact", "lowrank"],
                   help="lowrank: torch.svd_lowrank, faster, ~0.1%% above the best error (fixed rank only)")
    dynamic(p)
    writing(p)

    p = sub.add_parser("inspect", help="describe a LoRA file")
    p.add_argument("input")
    p.add_argument("--model", default=None, help="also match it against this model file's keys")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap


def run(args) -> str:
    """Do the command; returns what to print."""
    from loralab.lora.tools import common, convert, extract, inspect, merge, resize

    if args.command == "inspect":
        km = model = None
        if args.model:
            weights = extract.FileWeights(args.model)
            km, model = weights.key_map(), weights.identity()
        data = inspect.inspect(args.input, key_map=km, model=model)
        return inspect.to_json(data) if args.json else inspect.report(data)
    if args.command == "resize":
        result = resize.resize(args.input, args.rank, conv_rank=args.conv_rank, method=args.dynamic, param=args.param,
                               clamp_quantile=args.clamp_quantile, dtype=args.dtype, device=args.device)
    elif args.command == "merge":
        km = extract.FileWeights(args.model).key_map() if args.model else None
        result = merge.merge([merge.MergeInput.parse(t) for t in args.inputs], rank=args.rank, conv_rank=args.conv_rank,
                             clamp_quantile=args.clamp_quantile, dtype=args.dtype, device=args.device, key_map=km)
    elif args.command == "convert":
        weights = extract.FileWeights(args.model)
        result = convert.convert(args.input, weights.key_map(), args.to, model=weights.identity(),
                                 shapes=weights.shapes())
    else:
        result = extract.extract(extract.FileWeights(args.base), extract.FileWeights(args.tuned), args.rank,
                                 conv_rank=0 if args.no_conv else args.conv_rank, method=args.dynamic,
                                 param=args.param, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
                                 style=args.naming, dtype=args.dtype, device=args.device, svd_method=args.svd)
    path = common.save(result, args.output)
    return result.report(os.path.basename(path)) + f"\nfile: {path}"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    register_core()
    from loralab.lora.errors import LoraError

    try:
        print(run(args))
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
