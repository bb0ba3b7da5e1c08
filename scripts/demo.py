"""LoRA Lab demo (`make demo`, `make serve`): a real ComfyUI server with the pack, one workflow run.

1. builds the embedded default once, locally (no downloads): a tiny SD1.5-architecture checkpoint
   with random weights and a kohya LoRA for it covering every UNet and CLIP layer;
2. starts ComfyUI on 127.0.0.1 with its own base directory ``.cache/demo/`` (models,
   custom_nodes/ComfyUI-LoRA-Lab -> this repo, user settings) and output folder ``demo-out/``,
   so neither your ComfyUI install nor its models are touched;
3. converts ``example_workflows/*.json`` (UI format) to the API format with the server's
   ``/object_info``, queues each through ``POST /prompt`` and waits on ``/history``;
4. prints which nodes ran, the LoRA report (keys matched, tensors patched) and the image path;
5. stops the server, or with ``--serve`` keeps it up until Ctrl-C.

The images come from random weights: they are noise. The point is the plumbing.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import sys
import time

from loralab_testkit import checkpoints, comfy_env, server   # the tiny model files, ComfyUI, the server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO_BASE = os.path.join(ROOT, ".cache", "demo")
DEMO_OUT = os.path.join(ROOT, "demo-out")
MAX_REPORT_LINES = 12


def say(msg: str = "") -> None:
    print(msg, flush=True)


def tiny_checkpoint() -> str:
    """The cached tiny SD1.5 (fp16), built on first use with ComfyUI's model classes."""
    cached = server.cached_checkpoint("fp16")
    if cached:
        return cached
    say("building the tiny SD1.5 checkpoint (random weights, once; cached in .cache/tiny-sd15/)")
    scratch = os.path.join(DEMO_BASE, "build")
    comfy_env.setup(os.path.join(scratch, "models"), os.path.join(scratch, "work"))
    return checkpoints.cached_tiny_sd15("fp16")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def describe_run(prompt: dict, entry: dict, output_dir: str) -> list[str]:
    cached = {str(n) for m in server.messages(entry, "execution_cached") for n in m.get("nodes", [])}
    lines = []
    ran = [f"{nid} {node['_meta']['title']}" for nid, node in prompt.items() if nid not in cached]
    lines.append("  nodes run:    " + ", ".join(ran))
    if cached:
        lines.append("  cached:       " + ", ".join(sorted(cached)))
    for nid, text in server.reports(entry, prompt).items():
        shown = text.splitlines()
        if len(shown) > MAX_REPORT_LINES:   # the tools report every layer: the node shows it all
            shown = shown[:MAX_REPORT_LINES] + [f"… ({len(shown) - MAX_REPORT_LINES} more lines on the node)"]
        lines.append(f"  LoRA report ({prompt[nid]['_meta']['title']}, node {nid}):")
        lines += [f"    {line}" for line in shown]
    for img in server.images(entry):
        if img.get("type") == "output":
            lines.append("  image:        " + os.path.join(output_dir, img.get("subfolder", ""), img["filename"]))
    return lines


def run_workflow(srv: server.ComfyServer, path: str) -> bool:
    name = os.path.relpath(path, ROOT)
    with open(path) as fh:
        workflow = json.load(fh)
    prompt = srv.to_api(workflow)
    say(f"\nqueueing {name} ({len(prompt)} nodes) through POST /prompt ...")
    t = time.monotonic()
    try:
        entry = srv.run(prompt, timeout=900)
    except server.PromptRejected as e:
        say(f"  the server refused the prompt: {json.dumps(e.body, indent=2)[:3000]}")
        return False
    status = entry["status"]["status_str"]
    say(f"  status:       {status} in {time.monotonic() - t:.1f}s (read back from /history)")
    for line in describe_run(prompt, entry, srv.output_dir):
        say(line)
    if status != "success":
        say("  error:        " + server.error_text(entry))
    return status == "success"


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the LoRA Lab example workflow(s) on a real ComfyUI server.")
    ap.add_argument("--serve", action="store_true", help="keep the server running after the run (Ctrl-C stops it)")
    ap.add_argument("--port", type=int, default=8188, help="port on 127.0.0.1 (a free one is picked if taken)")
    ap.add_argument("--workflow", action="append", help="workflow JSON(s) to queue (default: example_workflows/*.json)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for the server (default: torch's choice; 1 is fastest on a busy small machine)")
    ap.add_argument("--no-run", action="store_true", help="start the server without queueing anything (with --serve)")
    args = ap.parse_args(argv)

    why = comfy_env.comfy_available()
    if why:
        say(f"{why}\nRun `make demo` (or `bash scripts/bootstrap.sh`) first.")
        return 2
    say(f"ComfyUI:      {comfy_env.comfy_dir()}")
    ckpt = tiny_checkpoint()
    base = server.prepare_base(DEMO_BASE, ckpt)
    os.makedirs(DEMO_OUT, exist_ok=True)
    say(f"models:       {os.path.join(base, 'models', 'checkpoints', server.DEMO_CHECKPOINT)}")
    say(f"              {os.path.join(base, 'models', 'loras', server.DEMO_LORA)}")

    port = args.port if port_free(args.port) else server.free_port()
    if port != args.port:
        say(f"port {args.port} is taken; using {port}")
    srv = server.ComfyServer(base, port=port, output_dir=DEMO_OUT, log_path=os.path.join(base, "comfyui.log"),
                              threads=args.threads)
    say(f"starting ComfyUI on {srv.url} (log: {os.path.relpath(srv.log_path, ROOT)}) ...")
    t = time.monotonic()
    # SIGTERM (e.g. from a process manager) ends the run the same way Ctrl-C does: server stopped
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            srv.start(timeout=300)
        except server.ServerError as e:
            say(str(e))
            return 1
        info = srv.object_info()
        ours = sorted(k for k in info if k.startswith("LoraLab"))
        say(f"server up in {time.monotonic() - t:.1f}s; LoRA Lab nodes: {', '.join(ours) or 'NONE (see the log)'}")
        ok = True
        if not args.no_run:
            paths = args.workflow or sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
            for path in paths:
                ok = run_workflow(srv, path) and ok
        say("")
        say(f"Open the UI:  {srv.url}   (templates: Extensions > ComfyUI-LoRA-Lab, or drop "
            f"example_workflows/Load a LoRA and sample.json onto the page)")
        if args.serve:
            say("serving; Ctrl-C stops the server")
            while srv.alive():
                time.sleep(1)
            say("the server exited:\n" + srv.log_tail(30))
            return 1
        say("stopping the server (run `make serve` to keep it up)")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("\nstopping the server")
        return 0
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
