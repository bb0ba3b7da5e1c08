// LoRA Lab frontend extension: shows a loader's report (how many of the file's keys matched
// this model, what was patched) on the node after it runs, and turns the node red with a
// title badge when none of the file's keys matched, so a LoRA for the wrong model is never silent.
//
// The report arrives as the node's `ui.text` output. It lives in a read-only textarea widget that
// is not a widget value (not in widgets_values, not in the API prompt); the text is kept in the
// node's properties (lib/results.js), so it stays through tab switches and cached re-runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { deliver, install, onResult, renderStored } from "./lib/results.js";

const EXTENSION = "LoraLab.Report";
// every LoRA Lab node with a "report" output (the loaders) gets the report widget, and Save LoRA
// shows where it saved
const hasReport = (nodeData) =>
  nodeData.name?.startsWith("LoraLab") &&
  ((nodeData.output_name ?? []).includes("report") || nodeData.name === "LoraLabSaveLoRA");
const WIDGET = "loralab_report";
const reportTypes = new Set();
const WARN_COLOR = "#6b2020";
const WARN_BGCOLOR = "#3d1818";
const BADGE = "\u26a0 0 keys matched";
const COUNTS = /(\d+) of (\d+) keys match/;

// {matched, total} from a report's "N of M keys match" line; null when there is none (e.g.
// "strengths are 0, passed through unchanged"). A stack's report has one line per LoRA: the first
// that matched nothing is returned, so one LoRA for another model is never hidden among the others.
export function matchCounts(text) {
  const all = [...(text ?? "").matchAll(new RegExp(COUNTS, "g"))].map((m) => ({ matched: Number(m[1]), total: Number(m[2]) }));
  return all.find((c) => c.matched === 0) ?? all[0] ?? null;
}

/** A read-only text box on ``node`` (a result it shows), not a widget value: not in widgets_values, not in
 * the API prompt. Created once per name. */
export function readonlyText(node, name, { placeholder = "Appears after this node runs", minHeight = 64,
                                          maxHeight = undefined, className = "" } = {}) {
  const existing = node.widgets?.find((w) => w.name === name);
  if (existing) return existing;
  const el = document.createElement("textarea");
  el.readOnly = true;
  el.className = `comfy-multiline-input ${className}`.trim();
  el.placeholder = placeholder;
  el.spellcheck = false;
  el.style.fontSize = "11px";
  el.style.opacity = "0.85";
  el.style.resize = "none";
  // type "customtext": the classic canvas shows this textarea; Nodes 2.0 (Vue nodes) draws its
  // own read-only textarea for that type from the widget's value
  let value = "";
  const widget = node.addDOMWidget(name, "customtext", el, {
    getValue: () => value,
    setValue: (v) => {
      value = v == null ? "" : String(v);
      el.value = value;
    },
    getMinHeight: () => minHeight,
    ...(maxHeight ? { getMaxHeight: () => maxHeight } : {}),
    read_only: true,
    serialize: false, // not part of the API prompt
  });
  widget.serialize = false; // not part of the saved workflow's widgets_values
  return widget;
}

function reportWidget(node) {
  return readonlyText(node, WIDGET, { className: "loralab-report" });
}

function setWarning(node, on) {
  if (on && !node.loralabWarning) {
    // a node loaded from a workflow saved while red already has the warning colours: keep none
    node.loralabSavedColors = node.color === WARN_COLOR ? {} : { color: node.color, bgcolor: node.bgcolor };
    node.color = WARN_COLOR;
    node.bgcolor = WARN_BGCOLOR;
  } else if (!on && node.loralabWarning) {
    const saved = node.loralabSavedColors ?? {};
    node.color = saved.color;
    node.bgcolor = saved.bgcolor;
  }
  node.loralabWarning = on;
}

function showReport(node, text) {
  const widget = reportWidget(node);
  widget.value = text;
  widget.element.title = text;
  const counts = matchCounts(text);
  setWarning(node, counts !== null && counts.matched === 0);
  const min = node.computeSize();
  if (node.size[1] < min[1] || node.size[0] < min[0]) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
  node.setDirtyCanvas(true, true);
}

function drawBadge(node, ctx) {
  if (!node.loralabWarning || node.flags?.collapsed) return;
  const h = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "bold 12px sans-serif";
  const w = ctx.measureText(BADGE).width + 12;
  const x = node.size[0] - w - 6;
  const y = -h + 6;
  ctx.fillStyle = "#d9534f";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h - 12, 4);
  else ctx.rect(x, y, w, h - 12);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(BADGE, x + 6, y + (h - 12) / 2);
  ctx.restore();
}

onResult("report", (node, text) => showReport(node, text));

app.registerExtension({
  name: EXTENSION,
  setup() {
    install();
    api.addEventListener("executed", ({ detail }) => {
      const text = detail?.output?.text;
      if (text == null) return;
      const value = Array.isArray(text) ? text.join("\n") : String(text);
      deliver(detail.display_node ?? detail.node, detail.prompt_id, "report", () => value, {
        isOurs: (type) => type?.startsWith("LoraLab") && reportTypes.has(type),
      });
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!hasReport(nodeData)) return;
    reportTypes.add(nodeData.name);
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      reportWidget(this);
      return r;
    };

    const onConfigure = proto.onConfigure;
    proto.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      renderStored(this, "report");
      return r;
    };

    const onDrawForeground = proto.onDrawForeground;
    proto.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      drawBadge(this, ctx);
      return r;
    };
  },
});

// Train LoRA: `algorithm` takes core TrainLoraNode's names (LoRA, LoHa, LoKr, OFT). A workflow saved
// with the earlier lowercase names (lora, loha, …) loads with the matching option selected, instead
// of a value the list does not hold.
export function currentAlgorithm(value, options) {
  if (!Array.isArray(options) || options.includes(value)) return value;
  return options.find((o) => o.toLowerCase() === String(value).toLowerCase()) ?? value;
}

app.registerExtension({
  name: "LoraLab.TrainAlgorithmNames",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoraLabTrainLoraNode") return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      const w = this.widgets?.find((w) => w.name === "algorithm");
      if (w) w.value = currentAlgorithm(w.value, w.options?.values);
      return r;
    };
  },
});
