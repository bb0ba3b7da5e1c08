"""The ComfyUI frontend in Debian's chromium (Playwright) against the real server: our extension
loads without errors, our nodes can be added, and a loader shows its report after a run (and turns
red when no key matched). Screenshots go to $TMPDIR/loralab-browser/ (printed with -s).
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import pytest

from support import lorafiles, server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
EXT_URL = f"/extensions/{server.PACK_DIR_NAME}/loralab.js"
MISMATCH_LORA = "loralab_test/other_model.safetensors"
OURS = re.compile(r"loralab|lora-lab", re.I)


@pytest.fixture(scope="session")
def srv(request, tmp_path_factory) -> server.ComfyServer:
    yield from server.session_server(request, tmp_path_factory)


@pytest.fixture
def page(srv, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run scripts/bootstrap.sh")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: scripts/bootstrap.sh installs Debian's chromium")
    _settings(srv)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1500, "height": 800})
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


def _settings(srv, **extra) -> None:
    """A returning user's settings, so no first-run dialog covers the canvas."""
    path = os.path.join(srv.base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"Comfy.TutorialCompleted": True, **extra}, fh)


def _example(seed: int | None = None) -> dict:
    """The example workflow; a new ``seed`` makes the sampler run again, and with it the server
    re-sends the (possibly cached) loader's report: a fully cached prompt sends nothing."""
    with open(server.EXAMPLE_WORKFLOW) as fh:
        wf = json.load(fh)
    if seed is not None:
        next(n for n in wf["nodes"] if n["type"] == "KSampler")["widgets_values"][0] = seed
    return wf


def _preview_workflow(lora_name: str) -> dict:
    """Load Checkpoint -> Load LoRA -> report -> Preview Any: runs the loader without sampling."""
    wf = _example()
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


def _mismatch_lora(srv) -> str:
    """A kohya file for layers the tiny SD1.5 does not have: every key fails to match."""
    path = os.path.join(srv.base, "models", "loras", *MISMATCH_LORA.split("/"))
    if not os.path.exists(path):
        targets = [lorafiles.Target(f"diffusion_model.label_emb.{i}.0.weight", (32, 16), "unet") for i in range(3)]
        lorafiles.write_lora(path, lorafiles.make_lora(targets, rank=2, alpha=1.0), "kohya_ldm")
    return MISMATCH_LORA


def _shot(page, name: str) -> str:
    folder = os.path.join(tempfile.gettempdir(), "loralab-browser")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    page.screenshot(path=path)
    print("screenshot:", path)
    return path


def _our_errors(page) -> list:
    """Console errors and uncaught exceptions that come from our extension (its file, its name).
    Offline lookups the frontend makes on its own (api.comfy.org asks about every node id) are not ours."""
    out = []
    for kind, text, where in page.logs:
        if kind not in ("error", "pageerror") or (where.startswith("http") and "127.0.0.1" not in where):
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


def _wait_idle(srv, timeout: float = 150.0) -> None:
    """Until the server's queue is empty (the rest of the graph ran too)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = srv.get("/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.25)
    raise AssertionError(f"queue still busy after {timeout}s:\n{srv.log_tail()}")


def _dismiss_banners(page) -> None:
    """Close the frontend's announcement bar if it is there (cosmetic: screenshots only)."""
    bar = page.locator("span", has_text="Introducing Nodes 2.0")
    if bar.count():
        try:  # the banner: <div><div><i/><span/><button>Try it out</button></div><button>x</button></div>
            bar.first.locator("xpath=../..").locator(":scope > button").last.click(timeout=2000)
        except Exception:
            pass


def _wait_report(page, node_id: int, timeout_ms: int = 150_000) -> dict:
    page.wait_for_function(f"() => ({REPORT_OF})({node_id})?.text?.includes('keys match')", timeout=timeout_ms)
    page.wait_for_timeout(300)  # one more frame so the canvas shows it
    return page.evaluate(REPORT_OF, node_id)


def test_extension_loads_and_nodes_can_be_added(page, srv):
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    assert page.ext_status and all(s == 200 for s in page.ext_status), page.ext_status
    made = page.evaluate("""() => {
      const out = {};
      for (const type of ['LoraLabLoadLoRA', 'LoraLabLoraLoaderModelOnly']) {
        const node = LiteGraph.createNode(type);
        app.graph.add(node);
        out[type] = {title: node.title, widgets: node.widgets.map(w => w.name),
                     inputs: node.inputs.filter(i => !i.widget).map(i => i.name),
                     outputs: node.outputs.map(o => o.name),
                     lora_names: node.widgets.find(w => w.name === 'lora_name').options.values};
        app.graph.remove(node);
      }
      return out;
    }""")
    full, only = made["LoraLabLoadLoRA"], made["LoraLabLoraLoaderModelOnly"]
    assert full["title"] == "Load LoRA (LoRA Lab)"
    assert full["inputs"] == ["model", "clip"] and full["outputs"][:2] == ["MODEL", "CLIP"]
    assert full["widgets"][:3] == ["lora_name", "strength_model", "strength_clip"]
    assert "loralab_report" in full["widgets"] and "loralab_report" in only["widgets"]
    assert only["inputs"] == ["model"] and only["outputs"][0] == "MODEL"
    assert server.DEMO_LORA in full["lora_names"]
    assert not _our_errors(page), _our_errors(page)


def test_report_shown_after_run_and_zero_match_warns(page, srv):
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    _dismiss_banners(page)

    # the example workflow, queued from the UI: the loader (node 2) shows its report
    page.evaluate(QUEUE_AND_WAIT, [_example(seed=int.from_bytes(os.urandom(4), "little")), 2])
    shown = _wait_report(page, 2)
    m = re.search(r"(\d+) of (\d+) keys match", shown["text"])
    assert m and int(m[1]) == int(m[2]) > 0, shown
    assert not shown["warn"] and shown["visible"], shown
    _wait_idle(srv)
    page.wait_for_timeout(500)
    _shot(page, "example_report.png")
    # the report widget is never saved into the workflow
    saved = page.evaluate("() => app.graph.serialize().nodes.find(n => n.id === 2).widgets_values")
    assert not any(isinstance(v, str) and "keys match" in v for v in saved), saved

    # a LoRA for another model: 0 keys match -> the node turns red (and gets a title badge)
    page.evaluate(QUEUE_AND_WAIT, [_preview_workflow(_mismatch_lora(srv)), 2])
    warned = _wait_report(page, 2, 60_000)
    m = re.search(r"(\d+) of (\d+) keys match", warned["text"])
    assert m and int(m[1]) == 0 < int(m[2]), warned
    assert warned["warn"] and warned["color"] and warned["bgcolor"], warned
    _shot(page, "zero_match_warning.png")
    assert not _our_errors(page), _our_errors(page)


def test_report_in_nodes_2_mode(page, srv):
    """The same report with the frontend's Vue nodes ("Nodes 2.0"), which draw their own widgets."""
    _settings(srv, **{"Comfy.VueNodes.Enabled": True})
    try:
        page.goto(srv.url, wait_until="domcontentloaded")
        page.wait_for_function(READY, timeout=90_000)
        page.evaluate(QUEUE_AND_WAIT, [_preview_workflow(server.DEMO_LORA), 2])
        shown = _wait_report(page, 2, 60_000)
        assert re.search(r"(\d+) of \1 keys match", shown["text"]), shown
        page.wait_for_function("() => [...document.querySelectorAll('textarea')]"
                               ".some(t => t.value.includes('keys match') && t.readOnly && t.offsetHeight > 20)",
                               timeout=10_000)
        _shot(page, "nodes2_report.png")
        assert not _our_errors(page), _our_errors(page)
    finally:
        _settings(srv)


def _folder_workflow(folder: str) -> dict:
    """example_workflows/train_from_folder.json, made short for a CPU: 2 steps, a sample at step 2."""
    with open(os.path.join(server.REPO_ROOT, "example_workflows", "train_from_folder.json")) as fh:
        wf = json.load(fh)
    nodes = {n["type"]: n for n in wf["nodes"]}
    nodes["LoraLabTrainingDataset"]["widgets_values"][0] = folder
    train = nodes["LoraLabTrainLoraNode"]["widgets_values"]
    train[2] = 2                                                        # steps
    train[-4:] = [0, "LoRA-Lab/checkpoints/browser", 2, "sks, white square --s 2 --w 64 --h 64"]
    nodes["KSampler"]["widgets_values"][0] = int.from_bytes(os.urandom(4), "little")
    nodes["KSampler"]["widgets_values"][2] = 2
    return wf


SAMPLE_SHOWN = """(id) => {
  const node = app.graph.getNodeById(id);
  const out = app.nodeOutputs?.[String(id)] ?? null;
  const imgs = node?.imgs ?? [];
  return {outputs: out?.images?.length ?? 0, drawn: imgs.filter(i => i.complete && i.naturalWidth > 0).length};
}"""


def test_train_from_folder_shows_the_dataset_report_and_the_sample(page, srv):
    from support.datasets import kohya_folder

    folder = "browser_dataset"
    kohya_folder(os.path.join(srv.base, "input", folder))
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    _dismiss_banners(page)
    wf = _folder_workflow(folder)
    ids = {n["type"]: n["id"] for n in wf["nodes"]}
    page.evaluate("async (wf) => { await app.loadGraphData(wf); await app.queuePrompt(0); return true; }", wf)
    page.wait_for_function(f"() => ({REPORT_OF})({ids['LoraLabTrainingDataset']})?.text?.includes('images')",
                           timeout=300_000)
    report = page.evaluate(REPORT_OF, ids["LoraLabTrainingDataset"])
    assert "4 images, 7 samples with repeats" in report["text"] and report["visible"], report
    assert not report["warn"], "a dataset report is not a LoRA with 0 keys matched"
    train = ids["LoraLabTrainLoraNode"]
    page.wait_for_function(f"() => ({SAMPLE_SHOWN})({train}).drawn > 0", timeout=600_000)
    shown = page.evaluate(SAMPLE_SHOWN, train)
    assert shown["drawn"] == 1, shown
    _wait_idle(srv, 600)
    page.evaluate(f"() => {{ const n = app.graph.getNodeById({train}); app.canvas.centerOnNode?.(n); "
                  "app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(800)
    _shot(page, "train_from_folder.png")
    assert not _our_errors(page), _our_errors(page)
