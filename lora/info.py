"""What a LoRA file says about itself, read from its safetensors header alone (never its tensors):
base model, algorithm, rank/alpha, trigger words, training settings (kohya ``ss_*``, ``modelspec.*``),
dataset tags, and the sidecar files beside it (preview image, ``NAME.txt`` trigger words).

The UI's info panel is built from ``summarize`` (nodes/routes.py serves it); ``trigger_words`` is
the one place that decides a file's trigger words, for any node that wants them. No ComfyUI import.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
from typing import Mapping

from .adapters import split_key
from .errors import LoraError
from .io import PICKLE_SUFFIXES, read_header
from . import arch

# Sidecar previews, in the order they are looked for: NAME.preview.png before NAME.png (the
# ComfyUI-Manager / LoRA Manager convention wins when both exist), then jpeg and webp.
PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.jpeg", ".jpeg",
                    ".preview.webp", ".webp")
MAX_PREVIEW_BYTES = 32 * 1024 * 1024
MAX_SIDECAR_BYTES = 64 * 1024
MAX_TAGS = 40            # dataset tags returned; the rest are only counted
MAX_TRIGGER_TAGS = 5     # tags taken as trigger words when the file names none

_ALGORITHMS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "glora": "GLoRA", "oft": "OFT",
               "boft": "BOFT", "oft_flux": "OFT (kohya Flux)", "diff": "full diff", "diff_b": "full diff",
               "w_norm": "norm diff", "b_norm": "norm diff", "set_weight": "set weight", "dylora": "DyLoRA",
               "locon": "LoCon"}
# role whose first dimension is the rank, per algorithm (OFT: the block size)
_RANK_ROLE = {"lora": ("down",), "loha": ("hada_w1_b",), "lokr": ("lokr_w1_b", "lokr_w2_b"),
              "glora": ("glora_b2",), "oft": ("oft_blocks",),
              "oft_flux": ("oft_part_0",)}


def image_type(path: str) -> str | None:
    """'image/png', 'image/jpeg' or 'image/webp' when the file's first bytes say so, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def preview_of(path: str) -> tuple[str, str] | None:
    """(sidecar path, mime type) of the LoRA's preview image, or None. A sidecar that is not an
    image (by its first bytes), or larger than MAX_PREVIEW_BYTES, is no preview."""
    for suffix in PREVIEW_SUFFIXES:
        p = _stem(path) + suffix
        if os.path.isfile(p) and os.path.getsize(p) <= MAX_PREVIEW_BYTES:
            mime = image_type(p)
            if mime:
                return p, mime
    return None


def sidecar_text(path: str) -> str | None:
    """The text of ``NAME.txt`` beside the LoRA (trigger words, as users and trainers write them)."""
    p = _stem(path) + ".txt"
    try:
        if not os.path.isfile(p) or os.path.getsize(p) > MAX_SIDECAR_BYTES:
            return None
        with open(p, "rb") as fh:
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def split_words(text: str | None) -> list[str]:
    """'ohwx person, red hat\\nblue sky' -> ['ohwx person', 'red hat', 'blue sky']."""
    if not text:
        return []
    return [w.strip() for line in text.splitlines() for w in line.split(",") if w.strip()]


def tag_frequency(metadata: Mapping[str, str]) -> list[tuple[str, int]]:
    """Dataset tags with their counts, most frequent first, summed over every dataset/subset of
    kohya's ``ss_tag_frequency`` ({folder: {tag: count}}) and ``ss_datasets[*].tag_frequency``."""
    tables: list = []
    raw = _json(metadata.get("ss_tag_frequency"))
    if isinstance(raw, dict):
        tables.extend(raw.values())
    datasets = _json(metadata.get("ss_datasets"))
    if isinstance(datasets, list):
        tables.extend(t for d in datasets if isinstance(d, dict) and isinstance(d.get("tag_frequency"), dict)
                      for t in d["tag_frequency"].values())
    counts: collections.Counter = collections.Counter()
    for table in tables:
        if not isinstance(table, dict):
            continue
        for tag, n in table.items():
            tag = str(tag).strip()
            if tag and isinstance(n, (int, float)) and n > 0:
                counts[tag] += int(n)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def trigger_words(metadata: Mapping[str, str], sidecar: str | None = None, *,
                  max_tags: int = MAX_TRIGGER_TAGS) -> list[str]:
    """A file's trigger words: ``modelspec.trigger_phrase`` (what LoRA Lab's Save LoRA writes, and
    the SAI model spec's field), then the sidecar ``NAME.txt``; when neither names any, the
    ``max_tags`` most frequent dataset tags. Duplicates (ignoring case) are dropped."""
    words = split_words(metadata.get("modelspec.trigger_phrase")) + split_words(sidecar)
    if not words:
        words = [t for t, _ in tag_frequency(metadata)[:max_tags]]
    seen, out = set(), []
    for w in words:
        if w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out


def file_trigger_words(path: str) -> list[str]:
    """``trigger_words`` of a file on disk (header + sidecar); [] for files without a header."""
    meta = {} if path.lower().endswith(PICKLE_SUFFIXES) else read_header(path).metadata
    return trigger_words(meta, sidecar_text(path))


def summarize(path: str, *, max_tags: int = MAX_TAGS) -> dict:
    """Everything the info panel shows, as JSON-ready values. Raises LoraError naming the file
    when the header cannot be read. Reads the header and the small sidecars, never the tensors."""
    name = os.path.basename(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        return {"file": name, "format": "pickle", "size": os.path.getsize(path), "base_model": None,
                "algorithm": None, "rank": None, "alpha": None, "tensors": None,
                "trigger_words": split_words(sidecar_text(path)), "training": {}, "tags": [], "tags_total": 0,
                "notes": ["a pickle file: only safetensors files describe themselves without being loaded"]}
    header = read_header(path)
    meta, shapes = header.metadata, header.shapes
    structure = _structure(shapes)
    tags = tag_frequency(meta)
    base, base_from = _base_model(meta, shapes)
    return {
        "file": name,
        "format": "safetensors",
        "size": header.size,
        "tensors": len(shapes),
        "modules": structure["modules"],
        "title": meta.get("modelspec.title") or meta.get("ss_output_name") or None,
        "description": meta.get("modelspec.description") or None,
        "author": meta.get("modelspec.author") or None,
        "base_model": base,
        "base_model_from": base_from,
        "algorithm": _algorithm(structure, meta),
        "rank": structure["rank"] if structure["rank"] is not None else _int(meta.get("ss_network_dim")),
        "ranks": structure["ranks"],
        "alpha": _alpha(meta),
        "trigger_words": trigger_words(meta, sidecar_text(path)),
        "training": _training(meta),
        "tags": [[t, n] for t, n in tags[:max_tags]],
        "tags_total": len(tags),
        "notes": structure["notes"],
    }


# ---- the pieces -------------------------------------------------------------------------------------
def _json(raw):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def _int(v) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _structure(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Algorithms, ranks and conv use, from key names and shapes (the header's tensor table)."""
    algos: collections.Counter = collections.Counter()
    ranks: collections.Counter = collections.Counter()
    roles_by_module: dict[str, dict[str, tuple]] = {}
    unknown = 0
    for key, shape in shapes.items():
        hit = split_key(key)
        if hit is None:
            unknown += 1
            continue
        prefix, owners, role = hit
        # the first owner of a shared suffix (OFT before BOFT: told apart by the block dims below)
        roles_by_module.setdefault(prefix, {})[role] = (owners[0].name if owners else None, shape)
    dora = conv = False
    for roles in roles_by_module.values():
        names = {n for n, _ in roles.values() if n}
        if "oft" in names and len(roles.get("oft_blocks", (None, ()))[1]) == 4:
            names = (names - {"oft"}) | {"boft"}
        if names == {"ia3"} and "ia3_on_input" not in roles:
            unknown += len(roles)   # a bare ".weight" (e.g. a checkpoint's): no adapter
            continue
        algos.update(names)
        dora |= "dora_scale" in roles or "peft_magnitude" in roles
        for n in names & set(_RANK_ROLE):
            for role in _RANK_ROLE[n]:
                if role in roles:
                    shape = roles[role][1]
                    ranks[shape[-1] if n == "oft" else shape[0]] += 1
                    break
        conv |= any(len(shape) == 4 and shape[-1] > 1 for _, shape in roles.values())
    notes = []
    if unknown:
        notes.append(f"{unknown} of {len(shapes)} keys belong to no LoRA-family format")
    return {"algos": algos, "dora": dora, "conv": conv, "modules": sum(algos.values()),
            "rank": ranks.most_common(1)[0][0] if ranks else None,
            "ranks": sorted(ranks) if len(ranks) > 1 else None, "notes": notes}


def _algorithm(structure: dict, meta: Mapping[str, str]) -> str | None:
    algos = structure["algos"]
    module = (meta.get("ss_network_module") or "").lower()
    args = _json(meta.get("ss_network_args"))
    algo_arg = str(args.get("algo", "")).lower() if isinstance(args, dict) else ""
    names = []
    for n, _ in algos.most_common():
        label = _ALGORITHMS.get(n, n)
        if label not in names:
            names.append(label)
    if not names:
        return None
    if "LoRA" in names:
        if "dylora" in module or algo_arg == "dylora":
            names[names.index("LoRA")] = "DyLoRA"
        elif structure["conv"] or algo_arg == "locon":
            names[names.index("LoRA")] = "LoCon"
    label = " + ".join(names)
    return label + " (DoRA)" if structure["dora"] else label


def _alpha(meta: Mapping[str, str]) -> float | None:
    alpha = _float(meta.get("ss_network_alpha"))
    if alpha is None:
        peft = _json(meta.get("lora_adapter_metadata"))
        if isinstance(peft, dict):
            alpha = _float(peft.get("lora_alpha", next((v for k, v in peft.items() if k.endswith(".lora_alpha")), None)))
    return alpha


def _base_model(meta: Mapping[str, str], shapes) -> tuple[str | None, str | None]:
    """(display name, where it came from: 'metadata' or 'keys'), from the one architecture table."""
    named_arch, named_variant, _ = arch.by_metadata(meta)
    if named_arch is not None:
        return (named_variant or named_arch).name, "metadata"
    for key in ("ss_base_model_version", "modelspec.architecture"):   # a value the table does not know
        raw = (meta.get(key) or "").strip()
        if raw and raw.lower() not in ("unknown", "none"):
            return raw.split("/")[0], "metadata"
    if meta.get("ss_v2") == "True":
        return "SD2.x", "metadata"
    name = arch.identify(dict(shapes)).name
    return (name, "keys") if name else (None, None)


def _date(v) -> str | None:
    f = _float(v)
    if f and f > 0:
        return datetime.datetime.fromtimestamp(f, datetime.timezone.utc).strftime("%Y-%m-%d")
    return (v or "")[:10] or None


def _resolution(meta: Mapping[str, str]) -> str | None:
    raw = meta.get("ss_resolution") or meta.get("modelspec.resolution")
    if not raw:
        return None
    nums = [p for p in raw.replace("(", " ").replace(")", " ").replace("x", " ").replace(",", " ").split() if p.isdigit()]
    return "×".join(nums) if nums else raw


def _training(meta: Mapping[str, str]) -> dict[str, str]:
    """Training settings worth showing, label -> text, in display order; absent ones left out."""
    epochs = meta.get("ss_epoch")
    if epochs and meta.get("ss_num_epochs"):
        epochs = f"{epochs} of {meta['ss_num_epochs']}"
    batch = meta.get("ss_batch_size_per_device") or meta.get("ss_total_batch_size")
    if batch and meta.get("ss_gradient_accumulation_steps") not in (None, "", "1", "None"):
        batch = f"{batch} × {meta['ss_gradient_accumulation_steps']} accumulated"
    lr = meta.get("ss_learning_rate") or meta.get("ss_unet_lr")
    te_lr = meta.get("ss_text_encoder_lr")
    optimizer = (meta.get("ss_optimizer") or "").split("(")[0].replace("torch.optim.", "") or None
    network = meta.get("ss_network_module")
    args = _json(meta.get("ss_network_args"))
    if network and isinstance(args, dict) and args:
        network += " (" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"
    rows = {
        "steps": meta.get("ss_steps") or meta.get("ss_max_train_steps") or meta.get("lora_lab.steps"),
        "epochs": epochs,
        "learning rate": lr,
        "text encoder lr": te_lr if te_lr and te_lr != lr else None,
        "resolution": _resolution(meta),
        "batch size": batch,
        "images": meta.get("ss_num_train_images"),
        "optimizer": optimizer,
        "scheduler": meta.get("ss_lr_scheduler"),
        "precision": {"no": "fp32 (no mixed precision)"}.get(meta.get("ss_mixed_precision"), meta.get("ss_mixed_precision")),
        "network": network,
        "seed": meta.get("ss_seed"),
        "trained on": meta.get("ss_sd_model_name"),
        "trained": _date(meta.get("ss_training_finished_at")) or _date(meta.get("modelspec.date")),
        "comment": meta.get("ss_training_comment"),
    }
    return {k: str(v) for k, v in rows.items() if v not in (None, "", "None", "none")}


__all__ = ["LoraError", "PREVIEW_SUFFIXES", "file_trigger_words", "image_type", "preview_of", "sidecar_text",
           "split_words", "summarize", "tag_frequency", "trigger_words"]
