"""LoRA Stack and prompt tags as a user meets them (issue 7; issue 10 part 3), in Chromium against the
session's real ComfyUI server: a stack node added to a workflow, rows added from the LoRA browser,
toggled, reordered, re-picked and edited; queued, with each file's report and the trigger words on
the node; the workflow saved and reloaded with identical widgets, its API form queued through
POST /prompt. In the prompt node, a tag whose name does not resolve is marked as it is typed.
Screenshots go to $TMPDIR/loralab-browser/ (printed with -s); look at them.
"""
from __future__ import annotations

import json
import os

import browser_ui as ui
from loralab_testkit import server

STACK_WORKFLOW = os.path.join(server.REPO_ROOT, "example_workflows", "Stack several LoRAs and sample.json")
DEMO, INK, DETAIL = (server.DEMO_LORA, *server.DEMO_STACK_LORAS)

ROWS = "(id) => JSON.parse(app.graph.getNodeById(id).widgets.find(w => w.name === 'rows').value)"
WIDGETS = """(id) => { const n = app.graph.getNodeById(id);
  return Object.fromEntries(n.widgets.filter(w => w.serialize !== false).map(w => [w.name, w.value])); }"""
EDITOR_ROWS = """(id) => [...app.graph.getNodeById(id).loralabRows.el.querySelectorAll('.loralab-srow')].map(r => ({
  name: r.querySelector('.loralab-pick').textContent, on: r.querySelector('.loralab-on').checked,
              strength: r.querySelector('.loralab-sm').value}))"""


def _pick(page, name: str) -> None:
    """In the open LoRA browser: search for the file, then click it."""
    page.wait_for_selector(".loralab-picker", timeout=10_000)
    page.locator(".loralab-picker-search").fill(os.path.splitext(os.path.basename(name))[0])
    page.locator(f".loralab-file-row[data-name='{name}']").click()
    page.wait_for_selector(".loralab-picker", state="detached", timeout=5_000)


def _new_stack_in_example(page) -> int:
    """The stack example with its stack node replaced by a NEW LoRA Stack node, wired the same way."""
    with open(STACK_WORKFLOW) as fh:
        wf = json.load(fh)
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
    return page.evaluate("""() => {
      const old = app.graph.getNodeById(2);
      const links = old.outputs.map(o => (o.links ?? []).map(id => app.graph.links[id])
        .map(l => [l.origin_slot, l.target_id, l.target_slot]));
      const ckpt = app.graph.getNodeById(1);
      const n = LiteGraph.createNode('LoraLabLoraStack');
      n.pos = [old.pos[0], old.pos[1]];
      app.graph.remove(old);
      app.graph.add(n);
      n.setSize([460, 560]);
      ckpt.connect(0, n, 0); ckpt.connect(1, n, 1);
      for (const out of links) {
        for (const [slot, target, tslot] of out) n.connect(slot, app.graph.getNodeById(target), tslot);
      }
      const r = app.canvas.canvas.getBoundingClientRect();
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [r.width / 2 - n.pos[0] - 230, 70 - n.pos[1]];
      app.canvas.setDirty(true, true);
      return n.id;
    }""")


def test_stack_rows_queue_save_and_reload(page, srv):
    ui.goto(page, srv)
    nid = _new_stack_in_example(page)
    page.wait_for_timeout(500)
    assert page.evaluate(ROWS, nid) == []                                # a new node has no rows
    assert page.locator(".loralab-stack-empty").is_visible()

    # add three rows from the LoRA browser
    for name in (INK, DETAIL, DEMO):
        page.locator(".loralab-add").click()
        _pick(page, name)
    assert [r["lora"] for r in page.evaluate(ROWS, nid)] == [INK, DETAIL, DEMO]
    # toggle the last one off, move the detail LoRA to the top, re-pick the (now second) inkwash row
    page.locator(".loralab-srow[data-i='2'] .loralab-on").uncheck()
    page.locator(".loralab-srow[data-i='1'] .loralab-up").click()
    page.locator(".loralab-srow[data-i='1'] .loralab-pick").click()
    _pick(page, DEMO)
    # a strength typed into a row; separate CLIP strength and block weights under ⋯
    box = page.locator(".loralab-srow[data-i='0'] .loralab-sm")
    box.fill("0.7")
    box.press("Tab")
    page.locator(".loralab-srow[data-i='1'] .loralab-more").click()
    page.locator(".loralab-sdetail[data-i='1'] .loralab-split").check()
    sc = page.locator(".loralab-srow[data-i='1'] .loralab-sc")
    sc.fill("0.4")
    sc.press("Tab")
    blocks = page.locator(".loralab-sdetail[data-i='1'] .loralab-blocks")
    blocks.fill("OUTALL")
    blocks.press("Tab")
    rows = page.evaluate(ROWS, nid)
    assert rows == [{"on": True, "lora": DETAIL, "strength": 0.7},
                    {"on": True, "lora": DEMO, "strength_model": 1, "strength_clip": 0.4, "blocks": "OUTALL"},
                    {"on": False, "lora": DEMO, "strength": 1}], rows
    # toggle all: on, then off, then on again
    for want in (True, False, True):
        page.locator(".loralab-all").click()
        assert {r["on"] for r in page.evaluate(ROWS, nid)} == {want}
    page.locator(".loralab-srow[data-i='2'] .loralab-del").click()
    assert len(page.evaluate(ROWS, nid)) == 2
    ui.shot(page, "stack_rows_edited.png")

    # queue from the UI: the report (one part per row) and the trigger words appear on the node
    page.evaluate("() => app.queuePrompt(0)")
    page.wait_for_function(f"""() => app.graph.getNodeById({nid}).widgets.find(w => w.name === 'loralab_report')
                                   ?.value?.includes('row 2:')""", timeout=150_000)
    report = page.evaluate(f"() => app.graph.getNodeById({nid}).widgets.find(w => w.name === 'loralab_report').value")
    triggers = page.evaluate(f"() => app.graph.getNodeById({nid}).widgets.find(w => w.name === 'loralab_triggers').value")
    assert report.startswith("2 LoRA(s) on one clone, merged") and "block weights OUTALL" in report, report
    assert "row 1: tiny_sd15_fine_detail.safetensors" in report and "row 2: tiny_sd15_demo_lora" in report, report
    assert triggers == "fine detail, sharp focus", triggers
    ui.wait_idle(srv)
    page.wait_for_timeout(500)
    ui.shot(page, "stack_after_run.png")

    # save the workflow from the UI, reload the page and the workflow: identical widgets and rows
    saved = page.evaluate("() => app.graph.serialize()")
    widgets = page.evaluate(WIDGETS, nid)
    shown = page.evaluate(EDITOR_ROWS, nid)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(ui.READY, timeout=90_000)
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", saved)
    page.wait_for_timeout(800)
    assert page.evaluate(WIDGETS, nid) == widgets
    assert page.evaluate(EDITOR_ROWS, nid) == shown and len(shown) == 2, shown
    # its API form (the frontend's own, and scripts/workflow_api.py's) queues through POST /prompt
    api_form = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert api_form[str(nid)]["inputs"]["rows"] == widgets["rows"] and len(json.loads(widgets["rows"])) == 2
    for prompt in (api_form, srv.to_api(saved)):
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["seed"] = int.from_bytes(os.urandom(4), "little")
        entry = srv.run(prompt)
        assert entry["status"]["status_str"] == "success", server.error_text(entry)
    assert not ui.our_errors(page), ui.our_errors(page)


def test_tag_highlighting_marks_names_that_do_not_resolve(page, srv):
    ui.goto(page, srv)
    page.evaluate("() => app.graph.clear()")
    nid = ui.add_node(page, "LoraLabPromptLoRA", (120, 100), 520)
    box = page.locator("textarea.loralab-tag-text").first
    box.click()
    good, alias, bad, broken = ("<lora:tiny_sd15_demo_lora:0.8>", "<lora:Inkwash Style:0.5>",
                                "<lora:no_such_lora_anywhere:1>", "<lora:tiny_sd15_demo_lora:abc>")
    page.keyboard.type(f"a lighthouse at dawn {good}, {bad} ink {alias}\n{broken} mist")
    marks = """() => [...document.querySelectorAll('.loralab-tag-backdrop mark')].map(m => [m.className, m.textContent])"""
    page.wait_for_function(f"() => ({marks})().length === 4", timeout=15_000)
    page.wait_for_timeout(300)
    assert page.evaluate(marks) == [["loralab-tag-ok", good], ["loralab-tag-bad", bad], ["loralab-tag-ok", alias],
                                    ["loralab-tag-bad", broken]]
    status = page.evaluate("() => [...document.querySelectorAll('.loralab-tag-status div')].map(d => d.textContent)")
    assert status[0] == f"✓ {good} → {server.DEMO_LORA}" and status[2] == f"✓ {alias} → {INK}", status
    assert "no LoRA named 'no_such_lora_anywhere'" in status[1] and "'abc' is not a number" in status[3], status
    # the marks sit exactly under the text box's characters: same box, same scroll
    geometry = page.evaluate("""() => { const ta = document.querySelector('textarea.loralab-tag-text');
      const bd = ta.parentElement.querySelector('.loralab-tag-backdrop');
      const a = ta.getBoundingClientRect(), b = bd.getBoundingClientRect();
      return [Math.abs(a.left - b.left), Math.abs(a.top - b.top), Math.abs(a.height - b.height),
              bd.scrollTop - ta.scrollTop]; }""")
    assert all(abs(v) <= 1 for v in geometry), geometry
    ui.shot(page, "prompt_tag_highlighting.png")

    # fixing the name (typed at the end, the bad tag removed) clears its mark
    page.evaluate(f"""() => {{ const ta = document.querySelector('textarea.loralab-tag-text');
      ta.value = ta.value.replace({json.dumps(bad)}, '<lora:tiny_sd15_fine_detail:1>');
      ta.dispatchEvent(new Event('input', {{bubbles: true}})); }}""")
    page.wait_for_function(f"() => ({marks})().filter(m => m[0] === 'loralab-tag-bad').length === 1", timeout=15_000)
    text = page.evaluate(f"() => app.graph.getNodeById({nid}).widgets.find(w => w.name === 'text').value")
    assert text.count("<lora:") == 4 and "no_such_lora_anywhere" not in text, text
    assert not ui.our_errors(page), ui.our_errors(page)
