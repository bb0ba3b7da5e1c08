"""Train LoRA's ``algorithm`` in the browser: a workflow saved with the earlier lowercase names
(lora, loha, …) loads with core's matching option selected (web/loralab.js), so the frontend does
not show a value its list lacks, and saving or queueing it carries the new name (issue 8.5)."""
from __future__ import annotations

import json

import browser_ui as ui
from browser_ui import READY

WORKFLOW = ui.TRAIN_WORKFLOW

LOAD_AND_READ = """async (wf) => {
  await app.loadGraphData(wf);
  const node = app.graph.nodes.find(n => n.type === 'LoraLabTrainLoraNode');
  const w = node.widgets.find(w => w.name === 'algorithm');
  const prompt = await app.graphToPrompt();
  return {value: w.value, options: w.options.values,
          saved: app.graph.serialize().nodes.find(n => n.id === node.id).widgets_values,
          queued: prompt.output[String(node.id)].inputs.algorithm};
}"""


def test_a_workflow_saved_with_a_lowercase_algorithm_loads_with_the_core_name(page, srv):
    with open(WORKFLOW) as fh:
        wf = json.load(fh)
    node = next(n for n in wf["nodes"] if n["type"] == "LoraLabTrainLoraNode")
    node["widgets_values"][node["widgets_values"].index("LoRA")] = "loha"      # as saved before
    page.goto(srv.url, wait_until="domcontentloaded")
    page.wait_for_function(READY, timeout=90_000)
    got = page.evaluate(LOAD_AND_READ, wf)
    assert got["options"] == ["LoRA", "LoHa", "LoKr", "OFT"], got
    assert got["value"] == "LoHa" and got["queued"] == "LoHa", got
    assert "LoHa" in got["saved"] and "loha" not in got["saved"], got
    page.wait_for_timeout(300)
    ui.shot(page, "train_algorithm_migrated.png")
    assert not ui.our_errors(page), ui.our_errors(page)
