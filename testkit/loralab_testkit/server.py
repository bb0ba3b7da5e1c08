"""A real ComfyUI server process with the pack installed, for the server/browser tests and the demo.

Layout of a server's base directory (``--base-directory``: nothing touches the ComfyUI tree)::

    <base>/custom_nodes/ComfyUI-LoRA-Lab -> the repo root (how users install the pack)
    <base>/models/checkpoints/loralab_demo_tiny_sd15.safetensors   the tiny SD1.5 (hard link to the cache)
    <base>/models/loras/loralab_demo/tiny_sd15_demo_lora.safetensors   a kohya LoRA for it, in a subfolder
    <base>/models/loras/loralab_demo/… (DEMO_STACK_LORAS)   two more, with trigger words, for the stack examples
    <base>/models/loras/loralab_demo/tiny_sd15_demo_lora_b.safetensors  another (seed 1), for merge_and_resize
    <base>/input/loralab_demo_dataset/   a few captioned images in kohya's layout (datasets.py)
    <base>/output, input, temp, user, comfyui.log

``example_workflows/Load a LoRA and sample.json`` names exactly these two files;
``example_workflows/train_from_folder.json`` the dataset folder.

    base = prepare_base(tmp, checkpoint_src)
    with ComfyServer(base) as srv:            # starts, waits for /object_info; stop() kills the group
        entry = srv.run(srv.example_prompt())   # POST /prompt, then waits on /history/<id>
        assert entry["status"]["status_str"] == "success"

Only the standard library, requests, torch/safetensors and the sibling test-kit modules are used
(no pytest), so scripts/demo.py can use this too.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import requests

from . import checkpoints, datasets, lorafiles
from .comfy_env import REPO_ROOT, comfy_dir

PACK_DIR_NAME = "ComfyUI-LoRA-Lab"
DEMO_CHECKPOINT = "loralab_demo_tiny_sd15.safetensors"
DEMO_LORA = "loralab_demo/tiny_sd15_demo_lora.safetensors"
# more LoRAs for the stack / prompt-tag / block-weight examples: name -> (seed, metadata, NAME.txt sidecar)
DEMO_STACK_LORAS = {
    "loralab_demo/tiny_sd15_inkwash_style.safetensors": (
        1, {"modelspec.trigger_phrase": "inkwash style, sumi-e", "ss_output_name": "Inkwash Style"}, None),
    "loralab_demo/details/tiny_sd15_fine_detail.safetensors": (2, {}, "fine detail, sharp focus"),
}
DEMO_LORA_B = "loralab_demo/tiny_sd15_demo_lora_b.safetensors"     # a second one (other seed), for merges
DEMO_DATASET = "loralab_demo_dataset"
EXAMPLE_WORKFLOW = os.path.join(REPO_ROOT, "example_workflows", "Load a LoRA and sample.json")
LORA_NODES = ("LoraLabLoadLoRA", "LoraLabLoraLoaderModelOnly")

_CKPT_UNET = "model.diffusion_model."
_CKPT_CLIP = "cond_stage_model.transformer."


# ---- files -----------------------------------------------------------------------------------------
def cached_checkpoint(dtype: str = "fp16") -> str | None:
    """The tiny SD1.5 in the on-disk cache if it was built already (no ComfyUI import), else None:
    then build it with ``checkpoints.cached_tiny_sd15`` after ``comfy_env.setup``."""
    path = os.path.join(checkpoints.CACHE_DIR, f"tiny-sd15-{checkpoints.TINY_VERSION}-s0-{dtype}.safetensors")
    return path if os.path.isfile(path) else None


def lora_targets(checkpoint: str) -> list[lorafiles.Target]:
    """Every UNet Linear/Conv weight and every CLIP encoder-layer projection of a SD1.x checkpoint,
    read from its safetensors header alone (no model is built, no ComfyUI import)."""
    from safetensors import safe_open

    out = []
    with safe_open(checkpoint, framework="pt") as f:
        for k in f.keys():
            if not k.endswith(".weight"):
                continue
            shape = tuple(f.get_slice(k).get_shape())
            if k.startswith(_CKPT_UNET) and len(shape) in (2, 4):
                out.append(lorafiles.Target(k[len("model."):], shape, "unet"))
            elif k.startswith(_CKPT_CLIP + "text_model.encoder.layers.") and len(shape) == 2:
                hf = k[len(_CKPT_CLIP):-len(".weight")]
                if hf.endswith(lorafiles.CLIP_LAYER_TARGETS):
                    out.append(lorafiles.Target("clip_l.transformer." + hf + ".weight", shape, "te", hf))
    return out


def write_demo_lora(path: str, checkpoint: str, *, rank: int = 4, seed: int = 0,
                    root: str | None = None, metadata: dict | None = None) -> lorafiles.LoraSpec:
    """A kohya-named LoRA (lora_unet_<ldm path>, lora_te_<transformers path>, alpha rank/2) that
    covers every UNet and CLIP layer of ``checkpoint``: the file users most often have."""
    adapters = lorafiles.make_lora(lora_targets(checkpoint), rank=rank, alpha=rank / 2, seed=seed)
    return lorafiles.write_lora(path, adapters, "kohya_ldm", dtype=None, root=root,
                                metadata={"ss_network_module": "networks.lora", "loralab_demo": "1", **(metadata or {})})


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for how in (os.link, os.symlink):
        try:
            how(os.path.abspath(src), dst)
            return
        except OSError:
            continue
    import shutil
    shutil.copyfile(src, dst)


def prepare_base(base: str, checkpoint_src: str, *, pack_dir: str = REPO_ROOT) -> str:
    """Fill ``base`` (see the module docstring); idempotent. Returns ``base``."""
    base = os.path.abspath(base)
    for d in ("custom_nodes", "models/checkpoints", "models/loras", "output", "input", "temp", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_DIR_NAME)
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(pack_dir), link)
    ckpt = os.path.join(base, "models", "checkpoints", DEMO_CHECKPOINT)
    _link(checkpoint_src, ckpt)
    for name, seed in ((DEMO_LORA, 0), (DEMO_LORA_B, 1)):
        lora = os.path.join(base, "models", "loras", *name.split("/"))
        if not os.path.exists(lora):
            tmp = lora + ".partial"
            write_demo_lora(tmp, ckpt, seed=seed)
            os.replace(tmp, lora)
    for name, (seed, metadata, sidecar) in DEMO_STACK_LORAS.items():
        path = os.path.join(base, "models", "loras", *name.split("/"))
        if sidecar and not os.path.exists(os.path.splitext(path)[0] + ".txt"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(os.path.splitext(path)[0] + ".txt", "w") as fh:
                fh.write(sidecar)
        if not os.path.exists(path):
            write_demo_lora(path + ".partial", ckpt, seed=seed, metadata=metadata)
            os.replace(path + ".partial", path)
    dataset = os.path.join(base, "input", DEMO_DATASET)
    if not os.path.isdir(dataset):
        tmp = dataset + ".partial"
        datasets.kohya_folder(tmp)
        os.replace(tmp, dataset)
    return base


def load_workflow_api():
    """scripts/workflow_api.py as a module (the UI -> API converter)."""
    name = "loralab_workflow_api"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "scripts", "workflow_api.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server ------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """The server died, did not start, or did not answer; the message ends with its log tail."""


class PromptRejected(RuntimeError):
    """POST /prompt answered with an error (validation): ``.body`` is the server's JSON."""

    def __init__(self, status: int, body):
        self.status, self.body = status, body
        super().__init__(f"POST /prompt -> {status}: {json.dumps(body)[:2000]}")


class ComfyServer:
    """One ComfyUI process (``main.py --cpu``) on 127.0.0.1, in its own process group."""

    def __init__(self, base: str, *, port: int | None = None, output_dir: str | None = None,
                 extra_args: tuple[str, ...] = (), python: str = sys.executable, comfy: str | None = None,
                 log_path: str | None = None, quiet: bool = True, threads: int | None = None):
        self.base = os.path.abspath(base)
        self.port = port
        self.output_dir = output_dir
        self.extra_args = tuple(extra_args)
        self.python = python
        self.comfy = comfy or comfy_dir()
        self.log_path = log_path or os.path.join(self.base, "comfyui.log")
        self.quiet = quiet
        # torch's CPU threads: on a small shared machine one thread is ~10x faster than two
        # fighting other processes (OpenMP spin-waits); None keeps torch's default
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self._object_info: dict | None = None
        self._http = requests.Session()

    # -- lifecycle --
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base, "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:"]   # the default db lives inside the ComfyUI tree
        if self.output_dir:
            cmd += ["--output-directory", os.path.abspath(self.output_dir)]
        if self.quiet:
            cmd += ["--dont-print-server"]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if self.proc is not None:
            return self
        fixed_port = self.port is not None
        for attempt in range(3):
            if not fixed_port:
                self.port = free_port()
            log = open(self.log_path, "ab")
            log.write(f"\n==== {' '.join(self.command())}\n".encode())
            log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if self.threads:
                env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
            self.proc = subprocess.Popen(self.command(), cwd=self.comfy, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
            log.close()
            atexit.register(self.stop)
            try:
                self._wait_ready(timeout)
                return self
            except ServerError:
                died = self.proc.poll() is not None
                self.stop()
                if fixed_port or not died or "address already in use" not in self.log_tail().lower() or attempt == 2:
                    raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} while starting\n{self.log_tail()}")
            try:
                r = self._http.get(self.url + "/object_info", timeout=30)
                if r.status_code == 200:
                    self._object_info = r.json()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f}s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout``; no orphans."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own group
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pgid, 2.0):
                break
        self._http.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 20000))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- HTTP --
    def get(self, path: str, **kw):
        r = self._http.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)
        r.raise_for_status()
        return r.json()

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.get("/object_info")
        return self._object_info

    def to_api(self, workflow: dict) -> dict:
        return load_workflow_api().convert(workflow, self.object_info(refresh=True))

    def example_prompt(self, **lora_inputs) -> dict:
        """The example workflow in API format; ``lora_inputs`` override the LoRA node's inputs."""
        with open(EXAMPLE_WORKFLOW) as fh:
            prompt = self.to_api(json.load(fh))
        for node in prompt.values():
            if node["class_type"] in LORA_NODES:
                node["inputs"].update(lora_inputs)
        return prompt

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected on a validation error."""
        r = self._http.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code != 200:
            raise PromptRejected(r.status_code, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 180.0) -> dict:
        """The /history entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 180.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def wait_idle(self, timeout: float = 180.0) -> None:
        """Until the queue is empty (whatever was queued, from the UI too, has run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = self.get("/queue")
            if not q["queue_running"] and not q["queue_pending"]:
                return
            time.sleep(0.25)
        raise ServerError(f"the queue was still busy after {timeout:.0f}s\n{self.log_tail()}")


def _group_alive(pgid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


# ---- reading a history entry -----------------------------------------------------------------------
def messages(entry: dict, kind: str | None = None) -> list[dict]:
    """The status messages of a history entry (``execution_error``, ``execution_cached``...)."""
    return [data for k, data in entry.get("status", {}).get("messages", []) if kind is None or k == kind]


def error_text(entry: dict) -> str:
    return "\n".join(f"{m.get('node_type')}: {m.get('exception_type')}: {m.get('exception_message')}"
                     for m in messages(entry, "execution_error"))


def reports(entry: dict, prompt: dict) -> dict[str, str]:
    """{node id: report text} for our nodes (LoraLab*), from their ``ui`` text output."""
    out = {}
    for nid, node_out in entry.get("outputs", {}).items():
        if prompt.get(nid, {}).get("class_type", "").startswith("LoraLab") and node_out.get("text"):
            out[nid] = "\n".join(node_out["text"])
    return out


def images(entry: dict) -> list[dict]:
    return [img for node_out in entry.get("outputs", {}).values() for img in node_out.get("images", [])]


# ---- one server shared by the server and browser tests --------------------------------------------
_shared: dict = {}


def shared_server(base: str, checkpoint_src: str) -> ComfyServer:
    """Start (once per process) a server on ``base``; later calls return the same one.
    One torch thread unless LORALAB_SERVER_THREADS says otherwise (tests share small machines)."""
    srv = _shared.get("server")
    if srv is None or not srv.alive():
        threads = int(os.environ.get("LORALAB_SERVER_THREADS", "1")) or None
        srv = ComfyServer(prepare_base(base, checkpoint_src), threads=threads).start()
        _shared["server"] = srv
    return srv


def stop_shared() -> None:
    srv = _shared.pop("server", None)
    if srv is not None:
        srv.stop()


def session_server(request, tmp_path_factory):
    """Body of a session fixture (``yield from``) in each test module that needs the server: the
    first module starts it, the others get the same one, session teardown stops it."""
    ckpt = cached_checkpoint() or request.getfixturevalue("tiny_sd15_fp16_file")
    yield shared_server(str(tmp_path_factory.mktemp("comfy-server")), ckpt)
    stop_shared()
