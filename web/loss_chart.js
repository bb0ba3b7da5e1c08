// Train LoRA (LoRA Lab) draws its loss on the node: the chart grows step by step while training
// runs (the node sends "loralab.loss" websocket messages, nodes/train.py) and keeps the whole
// curve after the run (the node's ui output), in the node's saved state (lib/results.js) until
// the next run replaces it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { after } from "./lib/hooks.js";
import { deliver, install, onResult, renderStored } from "./lib/results.js";

const TYPE = "LoraLabTrainLoraNode";
const EVENT = "loralab.loss";
const FIELD = "loss";
const WIDGET = "loralab_loss_chart";
const MAX_LIVE_POINTS = 2000; // live points kept per run; pairs are averaged beyond that
const isOurs = (type) => type === TYPE;

/** {total, points: [[step, loss|null], ...], done} -> what the caption says. */
export function caption(data) {
  const points = data?.points ?? [];
  const finite = points.filter(([, v]) => Number.isFinite(v));
  if (!finite.length) return data?.done ? "no finite loss" : "";
  const [step, last] = finite[finite.length - 1];
  const min = Math.min(...finite.map(([, v]) => v));
  const steps = data.done ? `${data.steps ?? step} steps` : `step ${step}/${data.total}`;
  return `${steps} · loss ${fmt(last)} · min ${fmt(min)}`;
}

function fmt(v) {
  return Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(4) : v.toExponential(2);
}

/** Average neighbouring pairs until at most ``max`` points remain (keeps the curve's shape). */
export function thin(points, max = MAX_LIVE_POINTS) {
  while (points.length > max) {
    const out = [];
    for (let i = 0; i < points.length; i += 2) {
      const pair = points.slice(i, i + 2);
      const vals = pair.map(([, v]) => v).filter(Number.isFinite);
      out.push([pair[pair.length - 1][0], vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null]);
    }
    points = out;
  }
  return points;
}

function chartWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (existing) return existing;
  const el = document.createElement("div");
  el.className = "loralab-loss-chart";
  Object.assign(el.style, { position: "relative", width: "100%", height: "100%", minHeight: "120px" });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { position: "absolute", inset: "0", width: "100%", height: "100%" });
  el.appendChild(canvas);
  let data = null;
  const widget = node.addDOMWidget(WIDGET, "loralab_chart", el, {
    getValue: () => data,
    setValue: (v) => {
      data = v;
      draw(canvas, data);
    },
    getMinHeight: () => 140,
    serialize: false,
  });
  widget.serialize = false; // the data lives in node.properties, not in widgets_values
  widget.canvas = canvas;
  new ResizeObserver(() => draw(canvas, data)).observe(el);
  return widget;
}

function draw(canvas, data) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  const points = (data?.points ?? []).filter(([, v]) => Number.isFinite(v));
  if (!points.length) {
    ctx.fillStyle = "#999";
    ctx.fillText(data?.done ? "no finite loss to draw" : "The loss appears here while training runs", 8, 8);
    return;
  }
  const pad = { l: 46, r: 8, t: 20, b: 16 };
  const total = Math.max(data.total || 0, points[points.length - 1][0], 1);
  let lo = Math.min(...points.map(([, v]) => v));
  let hi = Math.max(...points.map(([, v]) => v));
  if (hi - lo < 1e-12) {
    hi += Math.abs(hi) * 0.05 + 1e-6;
    lo -= Math.abs(lo) * 0.05 + 1e-6;
  }
  const x = (s) => pad.l + ((w - pad.l - pad.r) * s) / total;
  const y = (v) => pad.t + ((h - pad.t - pad.b) * (hi - v)) / (hi - lo);
  // grid and axis labels
  ctx.strokeStyle = "rgba(255,255,255,0.12)";
  ctx.fillStyle = "#999";
  ctx.lineWidth = 1;
  for (const v of [hi, (hi + lo) / 2, lo]) {
    ctx.beginPath();
    ctx.moveTo(pad.l, y(v) + 0.5);
    ctx.lineTo(w - pad.r, y(v) + 0.5);
    ctx.stroke();
    ctx.fillText(fmt(v), 4, Math.min(h - 12, Math.max(0, y(v) - 6)));
  }
  ctx.textAlign = "right";
  ctx.fillText(String(total), w - pad.r, h - 13);
  ctx.textAlign = "left";
  // the raw loss, then a smoothed line (exponential moving average) over it
  line(ctx, points, x, y, "rgba(110,170,255,0.45)", 1);
  const smooth = [];
  let ema = points[0][1];
  const k = Math.min(1, 10 / points.length + 0.05);
  for (const [s, v] of points) smooth.push([s, (ema = ema + k * (v - ema))]);
  line(ctx, smooth, x, y, "#7fd1ff", 2);
  ctx.fillStyle = "#ddd";
  ctx.fillText(caption(data), pad.l, 4);
}

function line(ctx, points, x, y, color, width) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.beginPath();
  points.forEach(([s, v], i) => (i ? ctx.lineTo(x(s), y(v)) : ctx.moveTo(x(s), y(v))));
  if (points.length === 1) ctx.arc(x(points[0][0]), y(points[0][1]), 2, 0, 2 * Math.PI);
  ctx.stroke();
}

function show(node, data) {
  const widget = chartWidget(node);
  widget.value = data;
  const min = node.computeSize();
  if (node.size[1] < min[1]) node.setSize([Math.max(node.size[0], min[0]), min[1]]);
}

onResult(FIELD, show);

app.registerExtension({
  name: "LoraLab.LossChart",
  setup() {
    install();
    // live: points of the running prompt are appended; the first message of a new run starts over
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail?.node || !Array.isArray(detail.points)) return;
      deliver(detail.node, detail.prompt_id, FIELD, (prev) => {
        const same = prev && !prev.done && prev.prompt === detail.prompt_id;
        const points = thin([...(same ? prev.points : []), ...detail.points]);
        return { prompt: detail.prompt_id, total: detail.total, points, done: false };
      }, { isOurs, final: false });
    });
    // the end of the run: the node's own record of every step (downsampled on the server)
    api.addEventListener("executed", ({ detail }) => {
      const curve = detail?.output?.loralab_loss?.[0];
      if (!curve) return;
      deliver(detail.display_node ?? detail.node, detail.prompt_id, FIELD,
        () => ({ prompt: detail.prompt_id, ...curve, done: true }), { isOurs });
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TYPE) return;
    after(nodeType.prototype, "onNodeCreated", function () {
      chartWidget(this);
    });
    after(nodeType.prototype, "onConfigure", function () {
      renderStored(this, FIELD);
    });
  },
});
