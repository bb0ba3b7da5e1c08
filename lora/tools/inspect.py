"""Describe a LoRA file: its metadata, algorithm, ranks, which architecture it fits, how many
modules each block has and how large its changes are (‖ΔW‖ per module and per block).

Header facts (base model, algorithm, rank/alpha, trigger words, training settings) come from
``lora.info.summarize``, the same reading the UI's info panel shows; the architecture from
``lora.arch.identify`` (keys, widths, metadata); the rest from the factors. Norms are Frobenius
norms of ΔW at strength 1, from the factors (‖U·V‖² = Σ (UᵀU) ⊙ (V·Vᵀ): no ΔW is built for a LoRA);
algorithms whose ΔW depends on the model's weights (IA3, OFT, BOFT, GLoRA, DoRA) have none without
the model and are counted. Blocks: ``Arch.blocks`` where the architecture has a layout, else the
module name up to its first number (``down_blocks_1``, ``double_blocks_7``,
``te_text_model_encoder_layers_3``).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict

import torch

from .. import arch as arch_table
from ..adapters import parse
from ..errors import LoraError
from ..info import summarize
from ..io import read
from ..patch import match
from . import common, delta

_BLOCK = re.compile(r"^(.*?_\d+)(?:_|$)")
MAX_VALUE = 160      # characters of a metadata value shown


def block_of(the_arch: arch_table.Arch | None, module: str) -> str:
    if the_arch is not None and the_arch.blocks is not None:
        return the_arch.blocks.block(module) or "(no block)"
    flat = arch_table.flat_name(module)
    m = _BLOCK.match(flat)
    return m.group(1) if m else flat


def _natural(name: str) -> list:
    """'layers_10' after 'layers_9'."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def norm(a) -> float | None:
    """‖ΔW‖_F at strength 1 from the factors; None when ΔW needs the model's weights."""
    if delta.is_vector(a):
        return float(torch.linalg.vector_norm(delta.vector(a)))
    try:
        d = delta.matrix(a)
    except LoraError:
        return None
    if d.factored:
        return math.sqrt(max(0.0, float(((d.u.T @ d.u) * (d.v @ d.v.T)).sum())))
    return float(torch.linalg.vector_norm(d.dense))


def inspect(path: str, *, key_map: common.KeyMap | None = None, model: arch_table.Identity | None = None) -> dict:
    """Everything the report shows, JSON-ready. With a model's ``key_map`` (or a function of the file's
    module names giving it; and ``model``, what it is) it also says how the file matches that model, as
    a loader would report it."""
    info = summarize(path)
    f = read(path)
    parsed = parse(f.tensors, file=f.name, options={"metadata": f.metadata})
    ident = arch_table.identify(f.tensors, f.metadata)
    blocks: dict[str, dict] = defaultdict(lambda: {"modules": 0, "sq": 0.0})
    norms, no_norm, algos = [], Counter(), Counter()
    for prefix, adapters in parsed.modules.items():
        b = blocks[block_of(ident.arch, prefix)]
        b["modules"] += 1
        for a in adapters:
            algos[a.label] += 1
            n = norm(a)
            if n is None:
                no_norm[a.label] += 1
                continue
            norms.append((n, prefix))
            b["sq"] += n * n
    norms.sort()
    out = {
        "file": f.name, "size": os.path.getsize(path), "tensors": len(f.tensors), "modules": len(parsed.modules),
        "architecture": {"kind": ident.kind, "name": ident.name, "confidence": ident.confidence, "why": ident.why,
                         "naming": ident.naming, "metadata_names": ident.named_text},
        "algorithm": info.get("algorithm"), "algorithms": dict(algos), "rank": info.get("rank"),
        "ranks": info.get("ranks"), "alpha": info.get("alpha"), "trigger_words": info.get("trigger_words"),
        "training": info.get("training"),
        "blocks": {k: {"modules": blocks[k]["modules"], "norm": math.sqrt(blocks[k]["sq"])}
                   for k in sorted(blocks, key=_natural)},
        "norms": {"median": norms[len(norms) // 2][0] if norms else None,
                  "max": list(norms[-1]) if norms else None, "min": list(norms[0]) if norms else None,
                  "without_model": dict(no_norm)},
        "unknown_keys": parsed.unknown,
        "metadata": {k: v if len(v) <= MAX_VALUE else f"{v[:MAX_VALUE]}… ({len(v)} characters)"
                     for k, v in sorted(f.metadata.items())},
    }
    key_map = common.key_map_for(key_map, parsed.modules)
    if key_map is not None:
        m = match(parsed, key_map, file=f.name, n_file_keys=len(f.tensors))
        out["model"] = m.summary(ident, model)
    return out


def report(data: dict) -> str:
    """The inspect data as the text the node and the command line show."""
    a = data["architecture"]
    lines = [f"{data['file']}: {data['tensors']} tensors, {data['modules']} modules, {data['size'] / 2**20:.1f} MiB"]
    if a["name"]:
        lines.append(f"architecture: {a['name']} ({a['confidence']} confidence: {a['why']})"
                     + (f", {a['naming']} key names" if a["naming"] else ""))
    else:
        lines.append(f"architecture: none LoRA Lab knows ({a['why']})")
    if a["kind"] == "weights":
        lines.append("this is a model checkpoint (plain weights), not a LoRA")
    if a["metadata_names"]:
        lines.append(f"metadata names: {a['metadata_names']}")
    if "model" in data:
        lines.append("on the connected model: " + data["model"])
    rank = data["rank"] if not data["ranks"] else ", ".join(map(str, data["ranks"]))
    lines.append(f"algorithm: {data['algorithm'] or 'none'} ("
                 + ", ".join(f"{k} ×{n}" for k, n in data["algorithms"].items()) + f"); rank {rank}; alpha {data['alpha']}")
    if data["trigger_words"]:
        lines.append("trigger words: " + ", ".join(data["trigger_words"]))
    if data["unknown_keys"]:
        lines.append(f"{len(data['unknown_keys'])} key(s) of no known format: " + ", ".join(data["unknown_keys"][:5]))
    n = data["norms"]
    if n["max"]:
        lines.append(f"‖ΔW‖ (Frobenius, strength 1) per module: median {n['median']:.4g}, largest {n['max'][0]:.4g} "
                     f"({n['max'][1]}), smallest {n['min'][0]:.4g} ({n['min'][1]})")
    if n["without_model"]:
        lines.append("no norm without the model (ΔW depends on its weights): "
                     + ", ".join(f"{k} ×{v}" for k, v in n["without_model"].items()))
    lines.append("modules per block (‖ΔW‖ of the block):")
    for name, b in data["blocks"].items():
        lines.append(f"  {name}: {b['modules']} ({b['norm']:.4g})")
    if data["training"]:
        lines.append("training: " + "; ".join(f"{k} {v}" for k, v in data["training"].items()))
    lines.append("metadata:" if data["metadata"] else "metadata: none")
    lines += [f"  {k}: {v}" for k, v in data["metadata"].items()]
    return "\n".join(lines)


def to_json(data: dict) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False)
