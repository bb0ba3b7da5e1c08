"""The ComfyUI frontend in Debian's chromium (Playwright) against the real server: our extension
loads without errors, our nodes can be added, and a loader shows its report after a run (and turns
red when no key matched). Screenshots go to $TMPDIR/loralab-browser/ (printed with -s).
"""
from __future__ import annotations

import json
import os
import re

import browser_ui as ui
from browser_ui import QUEUE_AND_WAIT, READY, REPORT_OF
from loralab_testkit import server


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
    assert not ui.our_errors(page), ui.our_errors(page)


def test_report_shown_after_run_and_zero_match_warns(page, srv):
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    ui.dismiss_banners(page)

    # the example workflow, queued from the UI: the loader (node 2) shows its report
    page.evaluate(QUEUE_AND_WAIT, [ui.example(seed=int.from_bytes(os.urandom(4), "little")), 2])
    shown = ui.wait_report(page, 2)
    m = re.search(r"(\d+) of (\d+) keys match", shown["text"])
    assert m and int(m[1]) == int(m[2]) > 0, shown
    assert not shown["warn"] and shown["visible"], shown
    ui.wait_idle(srv)
    page.wait_for_timeout(500)
    ui.shot(page, "example_report.png")
    # the report widget is never saved into the workflow
    saved = page.evaluate("() => app.graph.serialize().nodes.find(n => n.id === 2).widgets_values")
    assert not any(isinstance(v, str) and "keys match" in v for v in saved), saved

    # a LoRA for another model: 0 keys match -> the node turns red (and gets a title badge)
    page.evaluate(QUEUE_AND_WAIT, [ui.preview_workflow(ui.mismatch_lora(srv)), 2])
    warned = ui.wait_report(page, 2, 60_000)
    m = re.search(r"(\d+) of (\d+) keys match", warned["text"])
    assert m and int(m[1]) == 0 < int(m[2]), warned
    assert warned["warn"] and warned["color"] and warned["bgcolor"], warned
    ui.shot(page, "zero_match_warning.png")
    ui.wait_idle(srv)

    # the warning comes back with the workflow (tab switch), and goes when a matching LoRA runs
    tab = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.filename")
    page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_timeout(1000)
    ui.open_tab(page, tab)
    again = page.evaluate(REPORT_OF, 2)
    assert again["warn"] and again["text"] == warned["text"], again
    page.evaluate("""async (name) => { const n = app.graph.getNodeById(2); n.widgets[0].value = name;
                                        n.widgets[1].value = 0.9; await app.queuePrompt(0); }""", server.DEMO_LORA)
    page.wait_for_function(f"() => ({REPORT_OF})(2)?.text?.includes('tiny_sd15_demo_lora')", timeout=60_000)
    fine = page.evaluate(REPORT_OF, 2)
    assert not fine["warn"] and fine["color"] is None and fine["bgcolor"] is None, fine
    assert not ui.our_errors(page), ui.our_errors(page)


def test_report_in_nodes_2_mode(page, srv):
    """The same report with the frontend's Vue nodes ("Nodes 2.0"), which draw their own widgets."""
    ui.settings(srv, **{"Comfy.VueNodes.Enabled": True})
    try:
        page.goto(srv.url, wait_until="domcontentloaded")
        page.wait_for_function(READY, timeout=90_000)
        page.evaluate(QUEUE_AND_WAIT, [ui.preview_workflow(server.DEMO_LORA), 2])
        shown = ui.wait_report(page, 2, 60_000)
        assert re.search(r"(\d+) of \1 keys match", shown["text"]), shown
        page.wait_for_function("() => [...document.querySelectorAll('textarea')]"
                               ".some(t => t.value.includes('keys match') && t.readOnly && t.offsetHeight > 20)",
                               timeout=10_000)
        ui.shot(page, "nodes2_report.png")
        assert not ui.our_errors(page), ui.our_errors(page)
    finally:
        ui.settings(srv)


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
    from loralab_testkit.datasets import kohya_folder

    folder = "browser_dataset"
    kohya_folder(os.path.join(srv.base, "input", folder))
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    ui.dismiss_banners(page)
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
    ui.wait_idle(srv, 600)
    page.evaluate(f"() => {{ const n = app.graph.getNodeById({train}); app.canvas.centerOnNode?.(n); "
                  "app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(800)
    ui.shot(page, "train_from_folder.png")
    assert not ui.our_errors(page), ui.our_errors(page)
