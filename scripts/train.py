#!/usr/bin/env python
"""Train a LoRA from the command line with LoRA Lab's training loop (the one Train LoRA runs in a graph):
in one process, or data-parallel over several processes and machines with torchrun.

    python scripts/train.py --checkpoint CKPT --dataset DIR --output FILE --resolution PX [settings]
    torchrun --standalone --nproc_per_node G scripts/train.py …            one machine, G processes
    torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:PORT … scripts/train.py …   N machines
    python scripts/train.py --job JOB_FOLDER                               a job Train LoRA wrote

Settings are flags named after Train LoRA's inputs (``--steps``, ``--batch-size``, ``--learning-rate``,
``--rank``, ``--optimizer``, ``--loss-function``, ``--seed``, ``--training-dtype``, ``--lora-dtype``,
``--algorithm``, ``--existing-lora``, the recipe's ``--network-alpha``, ``--lr-scheduler``, …) and, for a
dataset folder, after Training Dataset from Folder's (``--resolution``, ``--enable-bucket``,
``--shuffle-caption``, …); ``--help`` lists them all with the nodes' tooltips. A job's settings are
the node's; flags given on the command line override them.

``--dataset``: a folder of captioned images in kohya's layout (encoded with the checkpoint's VAE and
text encoder, cached on disk as the dataset node does), or a dataset manifest
(``.loralab_cache/dataset-<id>.json``) the node wrote. ``--checkpoint``: a checkpoint file (its
text encoder and VAE come along) or a diffusion-model file. ComfyUI is found at ``COMFYUI_PATH``, the
bundled tree (``scripts/bootstrap.sh``), or the ComfyUI this pack is installed in.

Under torchrun every process trains on its share of every global batch (``--batch-size`` must
divide by the number of processes); NCCL on GPUs (one per process), gloo with ``--cpu``. With the
same seed and global batch the LoRA equals a one-process run's, within float reduction order.
Process 0 alone writes files and logs. A process that dies stops the others with an error (exit code
1, or torchrun's), and no partial file is left: files are written to a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "loralab"
log = logging.getLogger("LoRA Lab")


# ---- ComfyUI and the pack ------------------------------------------------------------------------
def comfy_root() -> str:
    """COMFYUI_PATH, the bundled tree (.comfyui/path or .comfyui/ComfyUI), or the ComfyUI this pack
    sits in (custom_nodes/<pack>)."""
    candidates = [os.environ.get("COMFYUI_PATH", "").strip()]
    stamp = os.path.join(ROOT, ".comfyui", "path")
    if os.path.isfile(stamp):
        with open(stamp) as fh:
            candidates.append(fh.read().strip())
    candidates += [os.path.join(ROOT, ".comfyui", "ComfyUI"), os.path.dirname(os.path.dirname(ROOT))]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "comfy", "model_management.py")):
            return os.path.abspath(c)
    sys.exit("LoRA Lab: ComfyUI not found: set COMFYUI_PATH to a ComfyUI folder, or run scripts/bootstrap.sh")


def setup(cpu: bool):
    """Import ComfyUI (on the CPU with ``cpu``; else this process's GPU under torchrun) and the pack."""
    local = os.environ.get("LOCAL_RANK")
    if not cpu and local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one GPU per process: this one sees only its own (NCCL needs distinct devices)
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(local)] if visible and int(local) < len(visible) else local
    home = comfy_root()
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]   # its nodes/ is not ComfyUI's
    sys.path.insert(0, home)
    if cpu:
        import comfy.cli_args as cli

        wanted, default = cli.parser.parse_args(["--cpu"]), cli.parser.parse_args([])
        for k, v in vars(wanted).items():
            if getattr(default, k) != v:
                setattr(cli.args, k, v)
    import comfy.model_management  # noqa: F401  (reads the arguments once)
    import folder_paths

    extra = os.path.join(home, "extra_model_paths.yaml")
    if os.path.isfile(extra):
        from utils.extra_config import load_extra_path_config
        load_extra_path_config(extra)
    del folder_paths
    # the pack and its nodes package, without running their __init__.py: no node registration, no
    # HTTP routes (which would import ComfyUI's server), only the modules the script imports
    for name, folder in ((PACK, ROOT), (PACK + ".nodes", os.path.join(ROOT, "nodes"))):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])
            sys.modules[name] = importlib.util.module_from_spec(spec)


# ---- command line --------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(group, name: str, kind, opts: dict) -> None:
    tip = (opts.get("tooltip") or "").replace("%", "%%")
    default = opts.get("default")
    help_text = f"{tip} (default: {default!r})" if default not in (None, "") else tip
    if isinstance(kind, list):
        group.add_argument(_flag(name), dest=name, choices=kind, default=None, help=help_text)
    elif kind == "BOOLEAN":
        group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        typ = {"INT": int, "FLOAT": float, "STRING": str}[kind]
        group.add_argument(_flag(name), dest=name, type=typ, default=None, help=help_text)


def parser(train_node, dataset_node) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("what to train on, and where the LoRA goes")
    io.add_argument("--checkpoint", help="checkpoint (or diffusion-model) file; a name in ComfyUI's checkpoints "
                    "folder works too. With --job: overrides the job's")
    io.add_argument("--dataset", help="a folder of captioned images (kohya's layout) or a dataset manifest "
                    "(dataset-<id>.json); with --job: overrides the job's")
    io.add_argument("--output", help="the LoRA file to write (never overwritten); with --job: default "
                    "<job>/<name>.safetensors")
    io.add_argument("--job", help="a job folder Train LoRA wrote (its job_name input)")
    io.add_argument("--existing-lora", dest="existing_lora", help="continue training this LoRA file (its factors, "
                    "step count and optimizer state; any number of processes)")
    io.add_argument("--trigger-words", dest="trigger_words", default="", help="comma-separated, stored in the file")
    run = p.add_argument_group("how to run")
    run.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds a process waits for a silent peer before "
                     "the run stops (default: 1800)")
    run.add_argument("--log-every", dest="log_every", type=int, default=1, help="log the loss every N steps")
    settings = p.add_argument_group("training settings (Train LoRA's inputs)")
    for name, (kind, opts) in train_node.setting_specs().items():
        if name != "job_name":
            _add(settings, name, kind, opts)
    data = p.add_argument_group("dataset settings (Training Dataset from Folder's inputs; for a --dataset folder)")
    spec = dataset_node.LoraLabTrainingDataset.INPUT_TYPES()
    for name, (kind, opts) in {**spec["required"], **spec["optional"]}.items():
        if name not in ("folder", "vae", "clip"):
            _add(data, name, kind, opts)
    return p


# ---- the run ------------------------------------------------------------------------------------------
class Progress:
    """Process 0 logs every ``every`` steps: step, loss, seconds per step."""

    def __init__(self, world, every: int):
        self.world, self.every, self.t0 = world, max(1, every), time.perf_counter()

    def __call__(self, step: int, total: int, loss: float) -> bool:
        if self.world.main and (step % self.every == 0 or step == total):
            rate = (time.perf_counter() - self.t0) / step
            print(f"step {step}/{total}  loss {loss:.5f}  {rate:.2f} s/step", flush=True)
        return False


def load_model(path: str, weight_dtype: str = "default"):
    """(MODEL, CLIP or None, VAE or None): a checkpoint through ComfyUI's checkpoint loader, a file of
    diffusion-model weights alone through its diffusion-model loader."""
    import comfy.sd
    import folder_paths
    import torch

    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
        checkpoint = any(k.startswith("model.diffusion_model.") for k in keys)
        has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in keys)
    except Exception:
        checkpoint = has_vae = True          # .ckpt / .pt: the checkpoint loader reads those
    if checkpoint:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=has_vae, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        return model, clip, vae
    options = {"fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
               "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
               "fp8_e5m2": {"dtype": torch.float8_e5m2}}.get(weight_dtype, {})
    return comfy.sd.load_diffusion_model(path, model_options=options), None, None


def checkpoint_path(given: str | None, job) -> tuple[str, str]:
    """(file, weight_dtype): --checkpoint (a path, or a name in ComfyUI's checkpoints folder), else the
    job's checkpoint by name in its ComfyUI folder here, else at the path it had where it was written."""
    from loralab.training.errors import TrainingError
    import folder_paths

    if given:
        if os.path.isfile(given):
            return given, (job.checkpoint.get("weight_dtype", "default") if job else "default")
        for folder in ("checkpoints", "diffusion_models"):
            found = folder_paths.get_full_path(folder, given)
            if found:
                return found, "default"
        raise TrainingError("the checkpoint does not exist (neither a file nor a name in ComfyUI's checkpoints or "
                            "diffusion_models folders)", file=given)
    if job is None:
        raise TrainingError("no --checkpoint given")
    ck = job.checkpoint
    found = folder_paths.get_full_path(ck["folder"], ck["name"])
    for candidate in (found, ck.get("path")):
        if candidate and os.path.isfile(candidate):
            return candidate, ck.get("weight_dtype", "default")
    raise TrainingError(f"the job's checkpoint {ck['name']!r} is not in ComfyUI's {ck['folder']} folder here "
                        f"({', '.join(folder_paths.get_folder_paths(ck['folder']))}) nor at {ck.get('path')!r}: "
                        "put it there, or give --checkpoint", file=job.root)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup(cpu="--cpu" in argv)
    from loralab.lora.errors import LoraError
    from loralab.nodes import dataset as dataset_node
    from loralab.nodes import train as train_node
    from loralab.training import distributed

    args = parser(train_node, dataset_node).parse_args(argv)
    import comfy.model_management as mm

    world = distributed.SINGLE
    try:
        world = distributed.from_env(mm.get_torch_device(), args.timeout)
        _logging(world)
        signal.signal(signal.SIGTERM, _stopped(world))
        run(args, world, train_node, dataset_node)
        return 0
    except LoraError as e:
        who = f"process {world.rank} of {world.size}: " if world.size > 1 and not isinstance(e, distributed.PeerLost) \
            else ""
        print(f"LoRA Lab: error: {who}{e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("LoRA Lab: interrupted; no LoRA was written", file=sys.stderr, flush=True)
        return 130
    finally:
        world.close()


def _logging(world) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    log.setLevel(logging.INFO if world.main else logging.ERROR)


def _stopped(world):
    def handler(signum, frame):
        # torchrun stops every process when one fails: leave through the normal exits (temporary files go)
        raise SystemExit(f"LoRA Lab: process {world.rank} of {world.size} was stopped (SIGTERM: torchrun stops the "
                         "others when one process fails; its error is above); no LoRA was written")
    return handler


def run(args, world, train_node, dataset_node) -> None:
    from loralab.training import dataset, job as jobs
    from loralab.training.errors import TrainingError
    from loralab.training.save import save, save_to

    job = jobs.read_job(args.job) if args.job else None
    given = {k: v for k, v in vars(args).items() if k in train_node.setting_specs() and v is not None}
    settings = train_node.settings_of({**(job.settings if job else {}), **given, "job_name": ""})
    world.check_batch(settings["batch_size"])
    output = args.output or (os.path.join(job.root, job.output) if job else None)
    if not output:
        raise TrainingError("no --output given: the LoRA file to write")
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise TrainingError("the output file exists already: choose another name (nothing is overwritten)", file=output)
    if not os.path.isdir(os.path.dirname(output)):
        raise TrainingError("the output's folder does not exist", file=output)

    data_values = {k: v for k, v in vars(args).items() if v is not None and k in _dataset_inputs(dataset_node)}
    source = args.dataset or (job.dataset if job else None)
    kind = _check_dataset(source, data_values, dataset_node)
    existing = args.existing_lora or (job.existing_lora if job else None)
    if existing and not os.path.isfile(existing):
        raise TrainingError("--existing-lora does not exist", file=existing)
    ckpt, weight_dtype = checkpoint_path(args.checkpoint, job)

    if world.main:
        log.info("LoRA Lab: %s on %d process(es) (%s); checkpoint %s; dataset %s", "training" if not existing else
                 f"continuing {existing}", world.size, world.backend or "single", ckpt, source)
    model, clip, vae = load_model(ckpt, weight_dtype)
    if kind == "manifest":
        latents, positive = dataset_node.outputs(dataset.load_manifest(source))
    else:
        if clip is None or vae is None:
            raise TrainingError("encoding a dataset folder needs the checkpoint's text encoder and VAE; this file is a "
                                "diffusion model alone: give a checkpoint, or a dataset manifest", file=ckpt)
        buckets, captions, ext, missing = dataset_node.options_of(data_values)
        latents = positive = None
        for turn in (True, False):         # each machine's first process encodes; the others read its cache
            if (world.local_rank == 0) == turn:
                latents, positive, report = dataset_node.encode(source, vae, clip, buckets, captions, ext, missing)
                if world.main:
                    log.info("LoRA Lab dataset: %s", report.replace("\n", "; "))
            world.barrier()
    config, extra = train_node.make_config(settings)
    extra.clip, extra.vae = clip, vae
    stem = os.path.splitext(os.path.basename(output))[0]
    extra.checkpoint_prefix = stem          # sample images: <output folder>/samples/<stem>_step…
    folder = os.path.dirname(output)
    if config.sample_every_n_steps:
        import folder_paths
        folder_paths.set_output_directory(folder)

    def save_every(result):
        path, _ = save(result.lora, folder, filename_prefix=f"{stem}_step{result.steps:06d}",
                       trigger_words=args.trigger_words)
        log.info("LoRA Lab: saved %s (step %d)", path, result.steps)
        saved.append(path)

    def recover(result) -> str:
        return save(result.lora, folder, filename_prefix=f"{stem}_stopped_at_step_{result.steps}")[0]

    saved: list[str] = []
    out = train_node.train_lora(model, latents, positive, config, existing, extra=extra, world=world,
                                on_step=Progress(world, args.log_every),
                                saver=save_every if config.save_every_n_steps and world.main else None,
                                recover=recover, apply=False)
    if world.main:
        save_to(out["lora"], output, trigger_words=args.trigger_words)
        log.info("LoRA Lab: wrote %s (%d steps)", output, out["steps"])
        print(f"wrote {output}", flush=True)


def _dataset_inputs(dataset_node) -> set[str]:
    spec = dataset_node.LoraLabTrainingDataset.INPUT_TYPES()
    return {k for k in {**spec["required"], **spec["optional"]} if k not in ("folder", "vae", "clip")}


def _check_dataset(source: str | None, values: dict, dataset_node) -> str:
    """"manifest" or "folder", after checking it (before any model is loaded): a manifest readable, a
    folder holding captioned images."""
    from loralab.training import dataset
    from loralab.training.errors import TrainingError

    if not source:
        raise TrainingError("no --dataset given: a folder of captioned images, or a dataset manifest (dataset-<id>.json)")
    if os.path.isfile(source):
        if not source.endswith(".json"):
            raise TrainingError("a dataset is a folder of images or a dataset-<id>.json manifest", file=source)
        dataset.load_manifest(source, tensors=False)
        return "manifest"
    if not os.path.isdir(source):
        raise TrainingError("the dataset folder does not exist", file=source)
    _, _, ext, missing = dataset_node.options_of(values)
    dataset.scan(source, ext, missing)      # an empty folder, or an image without a caption, fails here
    return "folder"


if __name__ == "__main__":
    sys.exit(main())
