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
checkpoint or diffusion-model .safetensors; only its header is read (its key names). Without
ComfyUI: SD1.x, SD2.x and SDXL files in any naming, other families in their own (ComfyUI / kohya)
naming. With COMFYUI_PATH set, other families' diffusion-model files get ComfyUI's key maps (what
the Convert LoRA node uses): diffusers / PEFT names of those families too.
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


def comfy_model_map(path: str):
    """(key map, identity, shapes) of a diffusion-model file through ComfyUI (COMFYUI_PATH): the model
    is detected from the header's shapes and built on the meta device (no weights read or allocated),
    and named by the same ``nodes.comfy_model.key_map`` the Convert LoRA node uses."""
    import types

    import torch

    comfy_dir = os.path.abspath(os.environ["COMFYUI_PATH"])
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_management.py")):
        raise SystemExit(f"error: COMFYUI_PATH {comfy_dir!r} is not a ComfyUI checkout")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]   # its nodes.py, not ours
    sys.path.insert(0, comfy_dir)
    import comfy.model_detection

    from loralab.lora.errors import LoraError
    from loralab.lora.io import read_header
    from loralab.nodes import comfy_model

    header = read_header(path)
    _DT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    sd = {k: torch.empty(s, dtype=_DT.get(header.dtypes[k], torch.float32), device="meta")
          for k, s in header.shapes.items()}
    import comfy.utils

    # as comfy.sd.load_diffusion_model_state_dict reads a file: its diffusion model, without a prefix
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=header.metadata)
    if config is None:
        raise LoraError("ComfyUI does not recognise this model file (a diffusion model in ComfyUI's layout is "
                        "needed)", file=header.name)
    patcher = types.SimpleNamespace(model=config.get_model(sd, "", device="meta"))
    shapes = {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}
    # a function of the LoRA's module names: the loaders' map for that file (with the DiT names core drops)
    return (lambda modules: comfy_model.key_map(patcher, None, modules)), comfy_model.model_arch(patcher), shapes


def model_map(path: str):
    """(key map, identity, shapes) of a model file: the standalone map for SD1.x/SD2.x/SDXL (UNet and
    text encoders, in every naming: the same names ComfyUI's maps give); for other families ComfyUI's
    when COMFYUI_PATH is set, else their native names."""
    from loralab.lora.arch import SD_KEYS
    from loralab.lora.tools import extract

    weights = extract.FileWeights(path)
    ident = weights.identity()
    if (ident.arch is None or ident.arch.key_map != SD_KEYS) and os.environ.get("COMFYUI_PATH", "").strip():
        return comfy_model_map(path)
    return weights.key_map(), ident, weights.shapes()


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
            km, model, _ = model_map(args.model)
        data = inspect.inspect(args.input, key_map=km, model=model)
        return inspect.to_json(data) if args.json else inspect.report(data)
    if args.command == "resize":
        result = resize.resize(args.input, args.rank, conv_rank=args.conv_rank, method=args.dynamic, param=args.param,
                               clamp_quantile=args.clamp_quantile, dtype=args.dtype, device=args.device)
    elif args.command == "merge":
        km = model_map(args.model)[0] if args.model else None
        result = merge.merge([merge.MergeInput.parse(t) for t in args.inputs], rank=args.rank, conv_rank=args.conv_rank,
                             clamp_quantile=args.clamp_quantile, dtype=args.dtype, device=args.device, key_map=km)
    elif args.command == "convert":
        km, model, shapes = model_map(args.model)
        result = convert.convert(args.input, km, args.to, model=model, shapes=shapes)
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
