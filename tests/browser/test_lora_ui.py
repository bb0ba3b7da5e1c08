"""The UI of issue 10 as a user meets it, in Chromium against the session's real ComfyUI server:
the LoRA browser (folder tree, search, info panel), <lora: autocomplete, the live loss chart,
results that stay through tab switches and cached re-runs, Save LoRA's file in every list without R,
old workflows' `bypass`, a checkpoint in loras/, every node's help page and the templates.
Screenshots go to $TMPDIR/loralab-browser/ (printed with -s); look at them.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import time

import pytest
from safetensors.torch import load_file, save_file

import browser_ui as ui
from loralab_testkit import server

LORAS = {  # name in the loras folder -> (metadata, preview sidecar)
    "styles/watercolor/watercolor_v2.safetensors": ("rich", "png"),
    "styles/ink/ink_sketch.safetensors": ("rich", "not an image"),
    "characters/alice.safetensors": ("plain", None),
    "characters/big_tags.safetensors": ("big tags", None),
}
BIG_TAGS = 200_000
RICH = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
        "ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": "ohwx style, watercolor", "ss_steps": "1500",
        "ss_learning_rate": "0.0001", "ss_resolution": "(512, 512)", "ss_optimizer": "torch.optim.AdamW",
        "ss_num_train_images": "42", "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx style": 42, "paper": 7}})}


def _png() -> bytes:
    from PIL import Image

    img = Image.new("RGB", (64, 64))
    img.putdata([(4 * x, 4 * y, 128) for y in range(64) for x in range(64)])
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def ui_loras(srv):
    """LoRAs in subfolders of the server's loras folder, with metadata and sidecars (written once)."""
    root = os.path.join(srv.base, "models", "loras")
    sd = dict(list(load_file(os.path.join(root, *server.DEMO_LORA.split("/"))).items())[:30])
    for name, (meta, preview) in LORAS.items():
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        header = {"rich": RICH, "plain": {},
                  "big tags": {"ss_tag_frequency": json.dumps({"d": {f"tag_{i:06d}": BIG_TAGS - i for i in range(BIG_TAGS)}})}}
        save_file(sd, path, metadata=header[meta])
        if preview == "png":
            with open(path[: -len(".safetensors")] + ".png", "wb") as fh:
                fh.write(_png())
        elif preview:
            with open(path[: -len(".safetensors")] + ".png", "w") as fh:
                fh.write(preview)
    return LORAS


PANEL = """() => {
  const box = document.querySelector('.loralab-picker .loralab-info');
  if (!box) return null;
  const img = box.querySelector('img.loralab-preview');
  const rows = Object.fromEntries([...box.querySelectorAll('table.loralab-kv tr')].map(tr => [tr.cells[0].textContent, tr.cells[1].textContent]));
  return {title: box.querySelector('h3')?.textContent, rows,
          triggers: [...box.querySelectorAll('.loralab-trigger')].map(e => e.textContent),
          tags: box.querySelectorAll('.loralab-tags .loralab-chip').length,
          more: box.querySelector('.loralab-tags .loralab-more')?.textContent ?? null,
          preview: img ? {loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth} : null,
          nopreview: box.querySelector('.loralab-nopreview')?.textContent ?? null,
          error: box.querySelector('.loralab-error')?.textContent ?? null,
          overflow: box.scrollWidth > box.clientWidth + 1};
}"""
ROWS = """() => [...document.querySelectorAll('.loralab-picker .loralab-tree .loralab-row')].map(r =>
  (r.classList.contains('loralab-folder') ? 'folder:' + r.dataset.folder : 'file:' + r.dataset.name))"""


def _panel_for(page, title: str) -> dict:
    page.wait_for_function(f"() => ({PANEL})()?.title === {json.dumps(title)} && ({PANEL})().rows['Base model']",
                           timeout=15_000)
    page.wait_for_timeout(300)   # the preview image decodes
    return page.evaluate(PANEL)


def test_lora_browser_tree_search_and_info_panel(page, srv, ui_loras):
    ui.goto(page, srv)
    page.evaluate("() => app.graph.clear()")
    nid = ui.add_node(page, "LoraLabLoadLoRA", (120, 140), 360)
    page.evaluate("(id) => { app.graph.getNodeById(id).widgets[0].value = 'characters/alice.safetensors'; }", nid)

    # a click in the middle of lora_name opens the browser, opened down to the current file
    page.mouse.click(*ui.widget_point(page, nid, "lora_name"))
    page.wait_for_selector(".loralab-picker", timeout=5_000)
    rows = page.evaluate(ROWS)
    # the session server is shared with tests/server, whose files may sit beside ours: look at our folder
    at = rows.index("folder:characters")
    assert rows[at:at + 3] == ["folder:characters", "file:characters/alice.safetensors",
                               "file:characters/big_tags.safetensors"], rows
    assert "folder:styles" in rows and "folder:styles/watercolor" not in rows        # closed folders hide theirs
    assert "file:" + server.DEMO_LORA not in rows and "folder:loralab_demo" in rows
    base = _panel_for(page, "alice")["rows"]["Base model"]
    assert base.startswith("SD1") and base.endswith("(from its keys)"), base     # no metadata: from key names

    # walk the tree: styles -> watercolor -> the file; its panel has everything from the header
    page.locator(".loralab-folder[data-folder='styles']").click()
    page.locator(".loralab-folder[data-folder='styles/watercolor']").click()
    row = page.locator(".loralab-file-row[data-name='styles/watercolor/watercolor_v2.safetensors']")
    row.hover()
    panel = _panel_for(page, "watercolor_v2")
    assert panel["rows"]["Base model"] == "SD1.5" and panel["rows"]["Algorithm"] == "LoRA"
    assert panel["rows"]["Rank / alpha"] == "4 / 2" and panel["rows"]["steps"] == "1500"
    assert panel["rows"]["learning rate"] == "0.0001" and panel["rows"]["resolution"] == "512×512"
    assert panel["triggers"] == ["ohwx style", "watercolor"] and panel["tags"] == 2
    assert panel["preview"] == {"loaded": True, "width": 64} and not panel["overflow"]
    ui.shot(page, "lora_browser_tree_info.png")

    # search narrows to matching files, folder shown beside each; a preview that is no image: no preview
    page.locator(".loralab-picker-search").fill("ink")
    page.wait_for_timeout(200)
    # (the shared server's demo LoRAs may match too: look at our folders)
    rows = page.evaluate(ROWS)
    found = [r for r in rows if not r.startswith("file:loralab_demo/")]
    assert found == ["file:styles/ink/ink_sketch.safetensors"]
    assert page.locator(".loralab-picker-count").text_content() == "%d of %d" % (
        sum(r.startswith("file:") for r in rows), len(srv.get("/loralab/loras")["loras"]))
    page.locator(".loralab-file-row[data-name='styles/ink/ink_sketch.safetensors']").hover()
    panel = _panel_for(page, "ink_sketch")
    assert panel["preview"] is None and "No preview" in panel["nopreview"] and panel["triggers"]
    ui.shot(page, "lora_browser_search_no_preview.png")

    # a huge tag table: the panel shows 40 tags and counts the rest
    page.locator(".loralab-picker-search").fill("characters big")
    panel = _panel_for(page, "big_tags")
    assert panel["tags"] == 40 and panel["more"] == f"+{BIG_TAGS - 40} more" and not panel["overflow"]
    assert panel["triggers"] == ["tag_000000", "tag_000001", "tag_000002", "tag_000003", "tag_000004"]
    ui.shot(page, "lora_browser_big_tags.png")

    # Enter takes the highlighted file; Escape closes without changing anything
    page.keyboard.press("Enter")
    page.wait_for_selector(".loralab-picker", state="detached")
    value = "() => app.graph.nodes[0].widgets.find(w => w.name === 'lora_name').value"
    assert page.evaluate(value) == "characters/big_tags.safetensors"
    page.mouse.click(*ui.widget_point(page, nid, "lora_name"))
    page.wait_for_selector(".loralab-picker")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Escape")
    page.wait_for_selector(".loralab-picker", state="detached")
    assert page.evaluate(value) == "characters/big_tags.safetensors"
    # the arrows at the widget's ends still step through the list
    page.mouse.click(*ui.widget_point(page, nid, "lora_name", at=0.05))
    assert page.evaluate(value) == "characters/alice.safetensors"
    assert not ui.our_errors(page), ui.our_errors(page)


def test_lora_autocomplete_in_a_prompt_box(page, srv, ui_loras):
    ui.goto(page, srv)
    page.evaluate("() => app.graph.clear()")
    nid = ui.add_node(page, "CLIPTextEncode", (120, 140), 420)
    text = f"() => app.graph.getNodeById({nid}).widgets[0].value"
    page.locator("textarea.comfy-multiline-input").first.click()
    page.keyboard.type("a lighthouse, <lora:water")
    page.wait_for_selector(".loralab-ac .loralab-row")
    shown = page.locator(".loralab-ac .loralab-row .loralab-label").all_text_contents()
    assert shown == ["watercolor_v2"], shown
    ui.shot(page, "autocomplete.png")
    page.keyboard.press("Enter")
    assert page.evaluate(text) == "a lighthouse, <lora:watercolor_v2:1>"
    page.wait_for_selector(".loralab-ac", state="detached")

    # every file is offered after "<lora:"; the mouse takes one too
    page.keyboard.type(" <lora:")
    page.wait_for_selector(".loralab-ac .loralab-row")
    listed = page.locator(".loralab-ac .loralab-label").all_text_contents()
    assert {"alice", "ink_sketch", "watercolor_v2", "tiny_sd15_demo_lora"} <= set(listed), listed
    # a file of the same stem elsewhere (tests/server shares this server) makes the tag name the path
    assert "big_tags" in listed or "characters/big_tags" in listed, listed
    page.locator(".loralab-ac .loralab-row", has_text="alice").click()
    assert page.evaluate(text) == "a lighthouse, <lora:watercolor_v2:1> <lora:alice:1>"

    # Escape closes without writing; what was written resolves on the server to the right files
    page.keyboard.type(" <lora:ink")
    page.wait_for_selector(".loralab-ac .loralab-row")
    page.keyboard.press("Escape")
    page.wait_for_selector(".loralab-ac", state="detached")
    assert page.evaluate(text).endswith("<lora:alice:1> <lora:ink")
    tags = re.findall(r"<lora:([^:>]+):", page.evaluate(text))
    resolved = srv.get("/loralab/resolve?" + "&".join(f"tag={t}" for t in tags))
    assert resolved == {"watercolor_v2": "styles/watercolor/watercolor_v2.safetensors",
                        "alice": "characters/alice.safetensors"}
    # completing inside an existing tag keeps its weight
    completed = page.evaluate("""async () => {
      const m = await import('/extensions/ComfyUI-LoRA-Lab/autocomplete.js');
      return m.complete('x <lora:wat:0.6> y', 2, 9, 'watercolor_v2');
    }""")
    assert completed == ["x <lora:watercolor_v2:0.6> y", len("x <lora:watercolor_v2:0.6>")]
    assert not ui.our_errors(page), ui.our_errors(page)


LOSS = """(id) => { const n = app.graph.getNodeById(id); const d = n?.properties?.loralab?.loss;
  const w = n?.widgets?.find(w => w.name === 'loralab_loss_chart');
  return {points: d?.points?.length ?? 0, done: !!d?.done, total: d?.total ?? null, steps: d?.steps ?? null,
          widget: w?.value?.points?.length ?? 0, drawn: !!w && w.canvas.width > 0 && w.canvas.isConnected}; }"""
TEXT_OF = "([id]) => app.graph.getNodeById(id)?.widgets?.find(w => w.name === 'loralab_report')?.value ?? null"
INK = """(id) => { const c = app.graph.getNodeById(id).widgets.find(w => w.name === 'loralab_loss_chart').canvas;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 160) n++;   // the blue loss lines
  return n; }"""


def test_training_chart_grows_stays_across_tabs_and_the_saved_lora_is_listed(page, srv):
    steps = 10
    ui.goto(page, srv)
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'training run'); }", ui.train_workflow(steps))
    ids = page.evaluate("""() => Object.fromEntries(app.graph.nodes.filter(n => n.type.startsWith('LoraLab'))
                             .map(n => [n.type, n.id]))""")
    train, save, load = ids["LoraLabTrainLoraNode"], ids["LoraLabSaveLoRA"], ids["LoraLabLoadLoRA"]
    # a loader that is not linked to Save LoRA: its list must show the new file without R
    other = page.evaluate("""() => { const n = LiteGraph.createNode('LoraLabLoraLoaderModelOnly'); n.pos = [40, 900];
                                     app.graph.add(n); return n.id; }""")
    folder = os.path.join(srv.base, "models", "loras", "LoRA-Lab")
    before = set(glob.glob(os.path.join(folder, "*.safetensors")))
    assert page.evaluate(LOSS, train)["points"] == 0

    page.evaluate("() => app.queuePrompt(0)")
    seen, t0, switched = [], time.monotonic(), False
    while time.monotonic() - t0 < 300:
        state = page.evaluate(LOSS, train)
        if not seen or state["points"] != seen[-1]:
            seen.append(state["points"])
        if state["points"] >= 3 and not switched:
            # mid-run: look at another workflow for a while, then come back
            ui.shot(page, "loss_chart_growing.png")
            page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
            page.wait_for_timeout(2500)
            ui.open_tab(page, "training run")
            switched = True
        if state["done"]:
            break
        page.wait_for_timeout(150)
    state = page.evaluate(LOSS, train)
    assert state["done"] and state["points"] == steps == state["steps"] and state["widget"] == steps, (state, seen)
    grew = [n for n in seen if 0 < n < steps]
    assert len(grew) >= 3 and grew == sorted(grew), f"the chart did not grow step by step: {seen}"
    ui.wait_idle(srv)
    ui.frame(page, [train, save, load])
    assert state["drawn"] and page.evaluate(INK, train) > 50, "nothing drawn on the chart"

    report = page.evaluate(TEXT_OF, [load])
    saved = page.evaluate(TEXT_OF, [save])
    new = set(glob.glob(os.path.join(folder, "*.safetensors"))) - before
    assert len(new) == 1, new
    name = "LoRA-Lab/" + os.path.basename(new.pop())
    assert re.search(r"(\d+) of \1 keys match", report or ""), report
    assert saved.startswith(f"saved {name}\nfile: ") and saved.endswith(name.split("/")[-1]), saved
    # in every loader's list without R: an existing one, and one added now
    assert name in page.evaluate("(id) => app.graph.getNodeById(id).widgets[0].options.values", other)
    assert name in page.evaluate("""() => { const n = LiteGraph.createNode('LoraLabLoadLoRA');
                                            return n.widgets[0].options.values; }""")
    ui.frame(page, [train, save, load])
    ui.shot(page, "loss_chart_after_run.png")

    # switch tabs and come back: report, saved path and chart are all still on their nodes
    ui.open_tab(page, "Unsaved Workflow")
    ui.open_tab(page, "training run")
    assert page.evaluate(TEXT_OF, [load]) == report and page.evaluate(TEXT_OF, [save]) == saved
    back = page.evaluate(LOSS, train)
    assert back["points"] == back["widget"] == steps and back["done"], back
    ui.frame(page, [train, save, load])
    assert page.evaluate(INK, train) > 50
    ui.shot(page, "after_tab_switch.png")

    # a page reload: the open workflow comes back from the browser's storage with its results
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(ui.READY, timeout=90_000)
    page.wait_for_function("() => app.extensionManager.workflow.activeWorkflow?.filename === 'training run'",
                           timeout=20_000)
    page.wait_for_timeout(500)
    assert page.evaluate(TEXT_OF, [load]) == report and page.evaluate(TEXT_OF, [save]) == saved
    assert page.evaluate(LOSS, train)["widget"] == steps

    # a fully cached re-run sends nothing for the loader: its report stays
    page.evaluate("() => app.queuePrompt(0)")
    page.wait_for_timeout(1000)
    ui.wait_idle(srv)
    page.wait_for_timeout(500)
    assert page.evaluate(TEXT_OF, [load]) == report
    assert page.evaluate(LOSS, train)["points"] == steps
    # the results are in the saved workflow (node properties), not in widget values
    saved_wf = page.evaluate("() => app.graph.serialize()")
    by_id = {n["id"]: n for n in saved_wf["nodes"]}
    assert by_id[load]["properties"]["loralab"]["report"] == report
    assert len(by_id[train]["properties"]["loralab"]["loss"]["points"]) == steps
    assert not any("keys match" in str(v) for v in by_id[load]["widgets_values"])
    assert not ui.our_errors(page), ui.our_errors(page)


def test_old_workflows_with_the_bypass_flag_still_load_and_run(page, srv):
    """Workflows saved before `mode` have a boolean where `mode` now is (widgets_values are positional)."""
    ui.goto(page, srv)
    for old, expected, how in ((True, "forward pass", "bypassed (applied in the forward pass)"),
                               (False, "merge weights", "patched")):
        wf = ui.preview_workflow(server.DEMO_LORA)
        loader = next(n for n in wf["nodes"] if n["type"] == "LoraLabLoadLoRA")
        loader["widgets_values"] = [server.DEMO_LORA, 0.7 if old else 0.6, 1.0, 0, old]
        page.evaluate(ui.QUEUE_AND_WAIT, [wf, 2])
        shown = ui.wait_report(page, 2, 60_000)
        widgets = page.evaluate("() => Object.fromEntries(app.graph.getNodeById(2).widgets.map(w => [w.name, w.value]))")
        assert widgets["mode"] == expected and widgets["on_no_match"] == "warn", widgets
        assert f"\n{how} " in shown["text"], shown
        ui.wait_idle(srv)
    assert not ui.our_errors(page), ui.our_errors(page)


def test_a_checkpoint_in_loras_says_it_is_a_checkpoint(page, srv):
    ckpt = os.path.join(srv.base, "models", "checkpoints", server.DEMO_CHECKPOINT)
    name = "dropped_here/" + server.DEMO_CHECKPOINT
    dest = os.path.join(srv.base, "models", "loras", *name.split("/"))
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.link(ckpt, dest)
    ui.goto(page, srv)
    page.evaluate(ui.QUEUE_AND_WAIT, [ui.preview_workflow(name), 2])
    shown = ui.wait_report(page, 2, 90_000)
    ui.shot(page, "checkpoint_in_loras.png")
    assert "checkpoint, not a LoRA" in shown["text"] and shown["warn"], shown


def test_every_node_has_its_help_page_and_it_fits_the_sidebar(page, srv):
    info = srv.object_info(refresh=True)
    ours = {k: d["display_name"] for k, d in info.items() if d["python_module"].endswith(server.PACK_DIR_NAME)}
    assert len(ours) >= 5, ours
    ui.goto(page, srv)
    page.get_by_role("button", name="Node Library (n)").click()
    for node_id, title in sorted(ours.items()):
        page.locator(".node-lib-search-box input").first.fill(title)
        leaf = page.locator(".node-lib-node-container", has_text=title).first
        leaf.wait_for(timeout=10_000)
        leaf.hover()
        leaf.locator(".help-button").click()
        page.wait_for_selector(".node-help-content .markdown-content h1", timeout=10_000)
        page.wait_for_timeout(200)
        got = page.evaluate("""() => { const c = document.querySelector('.node-help-content');
          const wide = [...c.querySelectorAll('*')].filter(e => e.scrollWidth > c.clientWidth + 1 ||
                                                                 e.getBoundingClientRect().right > c.getBoundingClientRect().right + 1);
          return {h1: c.querySelector('h1').textContent, fallback: !!c.querySelector('.fallback-content'),
                  width: c.clientWidth, scroll: c.scrollWidth, wide: wide.map(e => e.tagName + ': ' + e.textContent.slice(0, 40)),
                  text: c.textContent}; }""")
        assert got["h1"] == title and not got["fallback"], (node_id, got["h1"])
        assert got["scroll"] <= got["width"] + 1 and not got["wide"], (node_id, got["width"], got["scroll"], got["wide"])
        for name in {**info[node_id]["input"]["required"], **info[node_id]["input"].get("optional", {})}:
            assert name in got["text"], f"{node_id}'s help page does not mention its input {name}"
        if node_id == "LoraLabTrainLoraNode":
            ui.shot(page, "help_train_lora.png")
        page.locator(".node-help-content").locator("xpath=..").get_by_role("button").first.click()
    assert not ui.our_errors(page), ui.our_errors(page)


def test_templates_have_thumbnails_and_a_description(page, srv):
    names = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(server.REPO_ROOT, "example_workflows", "*.json")))
    ui.goto(page, srv)
    page.get_by_role("button", name="Templates").click()
    page.get_by_text(server.PACK_DIR_NAME).first.click()
    page.wait_for_function("(n) => document.querySelectorAll('[data-testid^=\"template-workflow-\"] img').length >= n "
                           "&& [...document.querySelectorAll('[data-testid^=\"template-workflow-\"] img')]"
                           ".every(i => i.complete && i.naturalWidth >= 256)", arg=len(names), timeout=20_000)
    cards = page.evaluate("""() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map(c => ({
        name: c.dataset.testid.slice('template-workflow-'.length), text: c.textContent,
        img: c.querySelector('img')?.naturalWidth ?? 0}))""")
    assert sorted(c["name"] for c in cards) == names, cards
    for c in cards:
        # a sentence, not an identifier (the frontend shows a custom template's name as its description, _ and - as spaces)
        assert c["img"] >= 256 and c["name"] in c["text"] and " " in re.sub("[-_]", " ", c["name"]), c
    ui.shot(page, "templates.png")


def test_stored_results_and_autocomplete_in_nodes_2_mode(page, srv, ui_loras):
    """With the frontend's Vue nodes ("Nodes 2.0"): a saved workflow's chart and report come back
    from the node's saved state, and <lora: completes in a Vue prompt box."""
    wf = ui.train_workflow(5)
    curve = {"prompt": "earlier", "total": 5, "steps": 5, "done": True,
             "points": [[i + 1, v] for i, v in enumerate([0.9, 0.7, 0.75, 0.5, 0.45])]}
    for n in wf["nodes"]:
        if n["type"] == "LoraLabTrainLoraNode":
            n.setdefault("properties", {})["loralab"] = {"loss": curve}
            train = n["id"]
        if n["type"] == "LoraLabLoadLoRA":
            n.setdefault("properties", {})["loralab"] = {"report": "x.safetensors: 3 of 3 keys match this model"}
    ui.settings(srv, **{"Comfy.VueNodes.Enabled": True})
    try:
        ui.goto(page, srv)
        page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
        ui.frame(page, [train], scale=1.0)
        page.wait_for_function(f"() => ({INK})({train}) > 50", timeout=15_000)
        assert page.evaluate(LOSS, train)["widget"] == 5
        page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('3 of 3 keys'))",
                               timeout=10_000)
        ui.shot(page, "nodes2_chart.png")
        # Vue nodes draw their own select: a button opens the LoRA browser (here for existing_lora)
        # the node is taller than the viewport with the recipe inputs: pan its button on screen first
        ui.pan_to(page, f"[...document.querySelectorAll(`[data-node-id='{train}'] button`)]"
                        ".find(b => b.textContent.includes('Browse LoRAs'))")
        page.locator(f"[data-node-id='{train}'] button", has_text="Browse LoRAs").click()
        page.wait_for_selector(".loralab-picker")
        page.locator(".loralab-picker-search").fill("alice")
        _panel_for(page, "alice")
        ui.shot(page, "nodes2_browser.png")
        page.keyboard.press("Enter")
        page.wait_for_selector(".loralab-picker", state="detached")
        assert page.evaluate(f"() => app.graph.getNodeById({train}).widgets.find(w => w.name === 'existing_lora').value"
                             ) == "characters/alice.safetensors"
        page.wait_for_function(f"() => document.querySelector(\"[data-node-id='{train}']\").textContent"
                               ".includes('characters/alice.safetensors')", timeout=5_000)   # the Vue select shows it
        assert "Browse LoRAs…" not in json.dumps(page.evaluate("() => app.graph.serialize()"))
        boxes = page.locator("[data-node-id] textarea")
        i = page.evaluate("() => [...document.querySelectorAll('[data-node-id] textarea')]"
                          ".findIndex(t => t.value.includes('a photo of sks'))")
        assert i >= 0
        ui.pan_to(page, f"document.querySelectorAll('[data-node-id] textarea')[{i}]")
        boxes.nth(i).click()
        page.keyboard.press("End")
        page.keyboard.type(", <lora:alic")
        page.wait_for_selector(".loralab-ac .loralab-row")
        page.keyboard.press("Tab")
        page.wait_for_function("() => app.graph.nodes.some(n => n.widgets?.some(w => typeof w.value === 'string' "
                               "&& w.value.endsWith('<lora:alice:1>')))", timeout=5_000)
        assert not ui.our_errors(page), ui.our_errors(page)
    finally:
        ui.settings(srv)
