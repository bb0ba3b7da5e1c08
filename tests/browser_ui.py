"""Helpers for the browser tests (Debian's chromium driven by Playwright, against the session's real
ComfyUI server; tests/browser): opening the UI, workflows to load, waiting on runs, screenshots to look at, and the
console errors that come from our extension. Fixtures are in tests/browser/conftest.py."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile

import pytest

from loralab_testkit import lorafiles, server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
EXT_URL = f"/extensions/{server.PACK_DIR_NAME}/loralab.js"
MISMATCH_LORA = "loralab_test/other_model.safetensors"
OURS = re.compile(r"loralab|lora-lab", re.I)
LOCALE_PROBE = re.compile(r"/extensions/[^/]+/docs/LoraLab\w+/[\w-]+\.md$")


def settings(srv, **extra) -> None:
    """A returning user's settings, so no first-run dialog covers the canvas."""
    path = os.path.join(srv.base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"Comfy.TutorialCompleted": True, **extra}, fh)


def example(seed: int | None = None) -> dict:
    """The example workflow; a new ``seed`` makes the sampler run again, and with it the server
    re-sends the (possibly cached) loader's report: a fully cached prompt sends nothing."""
    with open(server.EXAMPLE_WORKFLOW) as fh:
        wf = json.load(fh)
    if seed is not None:
        next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"][0] = seed
    return wf


def preview_workflow(lora_name: str) -> dict:
    """Load Checkpoint -> Load LoRA -> report -> Preview Any: runs the loader without sampling."""
    wf = example()
    nodes = [n for n in wf["nodes"] if n["id"] in (1, 2)]
    lora = next(n for n in nodes if n["id"] == 2)
    lora["widgets_values"][0] = lora_name
    lora["outputs"] = [{"name": "MODEL", "type": "MODEL", "links": None}, {"name": "CLIP", "type": "CLIP", "links": None},
                       {"name": "report", "type": "STRING", "links": [3]}]
    nodes.append({"id": 3, "type": "PreviewAny", "pos": [800, 120], "size": [300, 160], "flags": {}, "order": 2,
                  "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 3}], "outputs": [],
                  "properties": {}, "widgets_values": []})
    return {"last_node_id": 3, "last_link_id": 3, "version": 0.4, "groups": [], "config": {},
            "extra": {"ds": {"offset": [40, 40], "scale": 1.0}}, "nodes": nodes,
            "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "CLIP"], [3, 2, 2, 3, 0, "STRING"]]}


def mismatch_lora(srv) -> str:
    """A kohya file for layers the tiny SD1.5 does not have: every key fails to match."""
    path = os.path.join(srv.base, "models", "loras", *MISMATCH_LORA.split("/"))
    if not os.path.exists(path):
        targets = [lorafiles.Target(f"diffusion_model.label_emb.{i}.0.weight", (32, 16), "unet") for i in range(3)]
        lorafiles.write_lora(path, lorafiles.make_lora(targets, rank=2, alpha=1.0), "kohya_ldm")
    return MISMATCH_LORA


def shot(page, name: str) -> str:
    folder = os.path.join(tempfile.gettempdir(), "loralab-browser")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    page.screenshot(path=path)
    print("screenshot:", path)
    return path


def our_errors(page) -> list:
    """Console errors and uncaught exceptions that come from our extension (its file, its name).
    Offline lookups the frontend makes on its own (api.comfy.org asks about every node id) are not ours,
    nor its probe for a translated help page (docs/<node>/<locale>.md, 404, before docs/<node>.md)."""
    out = []
    for kind, text, where in page.logs:
        if kind not in ("error", "pageerror") or (where.startswith("http") and "127.0.0.1" not in where):
            continue
        if LOCALE_PROBE.search(where or "") and "404" in (text or ""):
            continue
        if OURS.search(text or "") or OURS.search(where or ""):
            out.append((kind, text, where))
    return out


READY = "() => window.app?.graph && window.LiteGraph && app.extensions?.some(e => e.name === 'LoraLab.Report')"

QUEUE_AND_WAIT = """async ([wf, id]) => {
  await app.loadGraphData(wf);
  const node = app.graph.getNodeById(id);
  const w = node.widgets.find(w => w.name === 'loralab_report');
  w.value = '';
  await app.queuePrompt(0);
  return true;
}"""

REPORT_OF = """(id) => {
  const node = app.graph.getNodeById(id);
  const w = node?.widgets?.find(w => w.name === 'loralab_report');
  return w ? {text: w.value, warn: !!node.loralabWarning, color: node.color ?? null,
              bgcolor: node.bgcolor ?? null, visible: !!w.element?.isConnected} : null;
}"""


def wait_idle(srv, timeout: float = 150.0) -> None:
    """Until the server's queue is empty (the rest of the graph ran too)."""
    srv.wait_idle(timeout)


def dismiss_banners(page) -> None:
    """Close the frontend's announcement bar if it is there (cosmetic: screenshots only)."""
    bar = page.locator("span", has_text="Introducing Nodes 2.0")
    if bar.count():
        try:  # the banner: <div><div><i/><span/><button>Try it out</button></div><button>x</button></div>
            bar.first.locator("xpath=../..").locator(":scope > button").last.click(timeout=2000)
        except Exception:
            pass


def wait_report(page, node_id: int, timeout_ms: int = 150_000) -> dict:
    page.wait_for_function(f"() => ({REPORT_OF})({node_id})?.text?.includes('keys match')", timeout=timeout_ms)
    page.wait_for_timeout(300)  # one more frame so the canvas shows it
    return page.evaluate(REPORT_OF, node_id)


@contextlib.contextmanager
def open_page(srv, profile_dir: str, viewport=(1500, 800)):
    """A fresh Chromium profile on the UI, with console errors and our extension's HTTP statuses
    recorded on the page (``page.logs``, ``page.ext_status``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run scripts/bootstrap.sh")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: scripts/bootstrap.sh installs Debian's chromium")
    settings(srv)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile_dir, executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": viewport[0], "height": viewport[1]})
        pg = ctx.pages[0] if ctx.pages else ctx.new_page()
        pg.logs = []
        pg.ext_status = []
        pg.on("console", lambda m: pg.logs.append((m.type, m.text, (m.location or {}).get("url", ""))))
        pg.on("pageerror", lambda e: pg.logs.append(("pageerror", str(e), str(getattr(e, "stack", "")))))
        pg.on("response", lambda r: pg.ext_status.append(r.status) if r.url.endswith(EXT_URL) else None)
        try:
            yield pg
        finally:
            ctx.close()


TRAIN_WORKFLOW = os.path.join(server.REPO_ROOT, "example_workflows", "Train a LoRA, save it, load it and sample.json")


def goto(page, srv) -> None:
    """Open the UI and wait until the graph and our extension are there."""
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    dismiss_banners(page)


def train_workflow(steps: int, sampler_steps: int = 1) -> dict:
    """The example training workflow with fewer steps (its numbers are positional widget values)."""
    with open(TRAIN_WORKFLOW) as fh:
        wf = json.load(fh)
    for n in wf["nodes"]:
        if n["type"] == "LoraLabTrainLoraNode":
            n["widgets_values"][2] = steps
        if n["type"] == "KSampler":
            n["widgets_values"][2] = sampler_steps
    return wf


def add_node(page, node_type: str, pos=(120, 140), width: int | None = None) -> int:
    """A new node on an emptied canvas at scale 1 (so screen positions are predictable); its id."""
    return page.evaluate("""([type, pos, width]) => {
      const n = LiteGraph.createNode(type);
      n.pos = pos;
      if (width) n.size[0] = width;
      app.graph.add(n);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [0, 0];
      app.canvas.setDirty(true, true);
      return n.id;
    }""", [node_type, list(pos), width])


def widget_point(page, node_id: int, widget: str, at: float = 0.5) -> tuple[float, float]:
    """Screen point inside a canvas-drawn widget (``at``: fraction of the node's width)."""
    return tuple(page.evaluate("""([id, name, at]) => {
      const n = app.graph.getNodeById(id);
      const w = n.widgets.find(w => w.name === name);
      const r = app.canvas.canvas.getBoundingClientRect();
      const [x, y] = app.canvas.ds.convertCanvasToOffset([n.pos[0] + n.size[0] * at, n.pos[1] + w.y + 10]);
      return [r.left + x, r.top + y];
    }""", [node_id, widget, at]))


def open_tab(page, label: str) -> None:
    """Click a workflow tab by its label and wait until its graph is the one on screen."""
    page.locator(".workflow-label").filter(has_text=re.compile("^" + re.escape(label) + "$")).first.click()
    page.wait_for_function("(label) => app.extensionManager.workflow.activeWorkflow?.filename === label", arg=label,
                           timeout=20_000)
    page.wait_for_timeout(400)


def frame(page, node_ids, scale: float = 0.75) -> None:
    """Center the view on some nodes at a zoom where every widget is drawn (far out, the canvas
    skips DOM widgets and text)."""
    page.evaluate("""([ids, scale]) => {
      const nodes = ids.map(id => app.graph.getNodeById(id));
      const x0 = Math.min(...nodes.map(n => n.pos[0])), x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
      const y0 = Math.min(...nodes.map(n => n.pos[1])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
      const r = app.canvas.canvas.getBoundingClientRect();
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [r.width / 2 / scale - (x0 + x1) / 2, r.height / 2 / scale - (y0 + y1) / 2];
      app.canvas.setDirty(true, true);
    }""", [list(node_ids), scale])
    page.wait_for_timeout(500)


def pan_to(page, element_js: str) -> None:
    """Pan the canvas so the DOM element ``element_js`` evaluates to sits mid-screen (Vue nodes taller
    than the viewport put widgets off screen, where Playwright cannot click them)."""
    page.evaluate(f"""() => {{
      const el = {element_js};
      const r = el.getBoundingClientRect(), ds = app.canvas.ds;
      ds.offset[1] -= (r.top + r.height / 2 - window.innerHeight / 2) / ds.scale;
      app.canvas.setDirty(true, true);
    }}""")
    page.wait_for_timeout(300)
