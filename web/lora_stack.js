// LoRA Stack (LoRA Lab): the node's rows as an editor. Each row: on/off, the LoRA (click to pick it in
// the LoRA browser), its strength (or separate model / CLIP strengths), block weights (a preset or a
// vector) and DyLoRA rank; rows can be added, removed, moved up and down, and toggled all at once.
//
// The rows live in the node's `rows` input, a JSON string (its documented API form, lora/stack.py):
// that widget is hidden and the editor writes it on every change, so the saved workflow, its API
// form and POST /prompt all carry exactly what the editor shows. Both stack and prompt nodes show
// their trigger words after a run (lib/results.js keeps them on the node).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { after } from "./lib/hooks.js";
import { ensureStyle } from "./lib/info_panel.js";
import { loraNames } from "./lib/lora_names.js";
import { deliver, install, onResult, renderStored } from "./lib/results.js";
import { openPicker } from "./lora_browser.js";
import { readonlyText } from "./loralab.js";

const STACK = "LoraLabLoraStack";
const TRIGGER_NODES = new Set([STACK, "LoraLabPromptLoRA"]);
const ROWS = "rows";
const EDITOR = "loralab_rows";
const TRIGGERS = "loralab_triggers";
const PRESETS_ID = "loralab-block-presets";

/** The rows of a `rows` value (JSON list); [] for anything else. */
export function parseRows(text) {
  try {
    const rows = JSON.parse(text || "[]");
    return Array.isArray(rows) ? rows.filter((r) => r && typeof r === "object") : [];
  } catch {
    return [];
  }
}

const num = (v, d = 1) => (typeof v === "number" && Number.isFinite(v) ? v : d);

/** [strength_model, strength_clip] of a row (the JSON form's defaults). */
export function strengths(row) {
  const both = num(row.strength);
  return [num(row.strength_model, both), num(row.strength_clip, both)];
}

/** A row with its strengths written as one `strength` when they are equal, else as the two. */
export function withStrengths(row, model, clip, split) {
  const out = { ...row };
  delete out.strength;
  delete out.strength_model;
  delete out.strength_clip;
  if (split || model !== clip) Object.assign(out, { strength_model: model, strength_clip: clip });
  else out.strength = model;
  return out;
}

let presets = null;
function presetList() {
  if (!presets) {
    presets = api.fetchApi("/loralab/blocks", { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : { layouts: {} }))
      .then(({ layouts }) => [...new Set(Object.values(layouts ?? {}).flatMap((l) => Object.keys(l.presets ?? {})))])
      .catch(() => []);
  }
  return presets;
}

async function ensurePresetList() {
  if (document.getElementById(PRESETS_ID)) return;
  const list = document.createElement("datalist");
  list.id = PRESETS_ID;
  document.body.appendChild(list);
  for (const name of await presetList()) list.appendChild(Object.assign(document.createElement("option"), { value: name }));
}

const STYLE = `
.loralab-stack { display: flex; flex-direction: column; gap: 3px; font: 12px sans-serif; color: var(--fg-color, #ddd);
  box-sizing: border-box; padding: 2px 0; overflow: hidden; }
.loralab-stack-head { display: flex; align-items: center; gap: 6px; }
.loralab-stack-head .loralab-count { flex: 1; opacity: .7; }
.loralab-stack button { background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid var(--border-color, #444);
  border-radius: 4px; font: inherit; padding: 1px 6px; cursor: pointer; }
.loralab-stack button:hover { border-color: #888; }
.loralab-srow { display: flex; align-items: center; gap: 3px; background: rgba(255,255,255,.04); border-radius: 4px; padding: 2px 3px; }
.loralab-srow.loralab-off { opacity: .45; }
.loralab-srow .loralab-pick { flex: 1; min-width: 60px; text-align: left; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.loralab-srow .loralab-pick.loralab-missing { color: #ff8a80; border-color: #a33; }
.loralab-stack input[type=number], .loralab-stack input[type=text] { background: var(--comfy-input-bg, #111); color: inherit;
  border: 1px solid var(--border-color, #444); border-radius: 4px; font: inherit; padding: 1px 3px; box-sizing: border-box; }
.loralab-stack input[type=number] { width: 52px; }
.loralab-stack .loralab-x { padding: 1px 4px; }
.loralab-sdetail { display: flex; align-items: center; gap: 4px; padding: 0 3px 3px 22px; }
.loralab-sdetail input.loralab-blocks { flex: 1; min-width: 60px; }
.loralab-sdetail label { display: flex; align-items: center; gap: 2px; white-space: nowrap; opacity: .85; }
.loralab-stack-empty { opacity: .6; padding: 4px 2px; }
`;

function ensureStackStyle() {
  ensureStyle();
  if (document.getElementById("loralab-stack-style")) return;
  const style = Object.assign(document.createElement("style"), { id: "loralab-stack-style", textContent: STYLE });
  document.head.appendChild(style);
}

class RowsEditor {
  constructor(node, storage) {
    this.node = node;
    this.storage = storage;
    this.open = new Set(); // rows whose details are shown (display only, not saved)
    this.known = null; // listed LoRA names, to mark files that are missing here
    this.el = document.createElement("div");
    this.el.className = "loralab-stack";
    this.el.addEventListener("click", (e) => this.click(e));
    this.el.addEventListener("change", (e) => this.edit(e, true));
    this.el.addEventListener("input", (e) => this.edit(e, false));
    loraNames().then((l) => {
      this.known = new Set(l.map((x) => x.name));
      this.render();
    });
    ensurePresetList();
  }

  get rows() {
    return parseRows(this.storage.value);
  }

  /** Write rows into the `rows` widget (its value is what is saved and queued). */
  save(rows, rerender = true) {
    const old = this.storage.value;
    this.storage.value = JSON.stringify(rows);
    this.storage.callback?.(this.storage.value, app.canvas, this.node);
    this.node.onWidgetChanged?.(ROWS, this.storage.value, old, this.storage);
    if (rerender) this.render();
    this.node.setDirtyCanvas?.(true, true);
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState();
  }

  render() {
    ensureStackStyle();
    const rows = this.rows;
    const on = rows.filter((r) => r.on !== false).length;
    this.el.replaceChildren();
    const head = document.createElement("div");
    head.className = "loralab-stack-head";
    head.innerHTML = `<label title="Turn every row on or off"><input type="checkbox" class="loralab-all"> all</label>
      <span class="loralab-count"></span><button class="loralab-add" title="Add a LoRA (opens the LoRA browser)">+ Add LoRA</button>`;
    const all = head.querySelector(".loralab-all");
    all.checked = rows.length > 0 && on === rows.length;
    all.indeterminate = on > 0 && on < rows.length;
    all.disabled = !rows.length;
    head.querySelector(".loralab-count").textContent = rows.length ? `${on} of ${rows.length} on` : "";
    this.el.appendChild(head);
    if (!rows.length) {
      this.el.appendChild(Object.assign(document.createElement("div"), {
        className: "loralab-stack-empty", textContent: "No rows: only the lora_stack input is applied. Add a LoRA.",
      }));
    }
    rows.forEach((row, i) => this.el.append(...this.rowElements(row, i, rows.length)));
    this.fit();
  }

  rowElements(row, i, n) {
    const [sm, sc] = strengths(row);
    const split = "strength_model" in row || "strength_clip" in row;
    const el = document.createElement("div");
    el.className = "loralab-srow" + (row.on === false ? " loralab-off" : "");
    el.dataset.i = String(i);
    el.innerHTML = `<input type="checkbox" class="loralab-on" title="On / off">
      <button class="loralab-pick"></button>
      <input type="number" class="loralab-sm" step="0.05">
      <input type="number" class="loralab-sc" step="0.05" title="CLIP strength">
      <button class="loralab-more loralab-x" title="CLIP strength, block weights, DyLoRA rank">⋯</button>
      <button class="loralab-up loralab-x" title="Move up">▲</button>
      <button class="loralab-down loralab-x" title="Move down">▼</button>
      <button class="loralab-del loralab-x" title="Remove">✕</button>`;
    el.querySelector(".loralab-on").checked = row.on !== false;
    const pick = el.querySelector(".loralab-pick");
    const name = String(row.lora ?? "");
    pick.textContent = name.split("/").pop().replace(/\.[^.]+$/, "") || "(pick a LoRA)";
    const missing = this.known && name && !this.known.has(name);
    pick.classList.toggle("loralab-missing", !!missing);
    pick.title = missing ? `${name}: not in this machine's loras folders (click to pick another)` : name;
    const smIn = el.querySelector(".loralab-sm");
    smIn.value = String(sm);
    smIn.title = split ? "Model strength" : "Strength (model and CLIP)";
    const scIn = el.querySelector(".loralab-sc");
    scIn.value = String(sc);
    scIn.style.display = split ? "" : "none";
    el.querySelector(".loralab-up").disabled = i === 0;
    el.querySelector(".loralab-down").disabled = i === n - 1;
    const out = [el];
    if (this.open.has(i) || row.blocks || row.dyn_rank) {
      const d = document.createElement("div");
      d.className = "loralab-sdetail";
      d.dataset.i = String(i);
      d.innerHTML = `<label title="Separate strengths for the model and the text encoder"><input type="checkbox"
        class="loralab-split"> CLIP</label><input type="text" class="loralab-blocks" list="${PRESETS_ID}"
        placeholder="block weights: preset or 17/26… values" title="Block weights (A1111 LoRA Block Weight): a preset
        name (OUTALL, SDXL-INALL, FLUX-DBL-ALL…) or one number per block"><label title="DyLoRA: the rank to use (0: all)">dyn
        <input type="number" class="loralab-dyn" min="0" step="1"></label>`;
      d.querySelector(".loralab-split").checked = split;
      d.querySelector(".loralab-blocks").value = row.blocks ?? "";
      d.querySelector(".loralab-dyn").value = String(row.dyn_rank ?? 0);
      out.push(d);
    }
    return out;
  }

  fit() {
    const h = this.height();
    const node = this.node;
    const min = node.computeSize?.();
    if (min && (node.size[1] < min[1] || node.size[0] < min[0])) {
      node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    }
    return h;
  }

  height() {
    const rows = this.rows;
    const details = rows.filter((r, i) => this.open.has(i) || r.blocks || r.dyn_rank).length;
    return 50 + Math.max(1, rows.length) * 27 + details * 25;   // + the 20 px margin of a DOM widget
  }

  index(e) {
    const at = e.target.closest("[data-i]");
    return at ? Number(at.dataset.i) : -1;
  }

  async click(e) {
    const t = e.target;
    const rows = this.rows;
    const i = this.index(e);
    if (t.classList.contains("loralab-add")) return this.pick(-1, e);
    if (t.classList.contains("loralab-all")) {
      const value = rows.some((r) => r.on === false);
      return this.save(rows.map((r) => ({ ...r, on: value })));
    }
    if (i < 0) return;
    if (t.classList.contains("loralab-pick")) return this.pick(i, e);
    if (t.classList.contains("loralab-more")) {
      this.open.has(i) ? this.open.delete(i) : this.open.add(i);
      return this.render();
    }
    const j = t.classList.contains("loralab-up") ? i - 1 : t.classList.contains("loralab-down") ? i + 1 : null;
    if (j !== null && j >= 0 && j < rows.length) {
      [rows[i], rows[j]] = [rows[j], rows[i]];
      const oi = this.open.has(i), oj = this.open.has(j);
      this.open.delete(i); this.open.delete(j);
      if (oi) this.open.add(j);
      if (oj) this.open.add(i);
      return this.save(rows);
    }
    if (t.classList.contains("loralab-del")) {
      rows.splice(i, 1);
      this.open = new Set([...this.open].filter((k) => k !== i).map((k) => (k > i ? k - 1 : k)));
      return this.save(rows);
    }
  }

  edit(e, final) {
    const t = e.target;
    const i = this.index(e);
    const rows = this.rows;
    const row = rows[i];
    if (!row) return;
    const [sm, sc] = strengths(row);
    const split = "strength_model" in row || "strength_clip" in row;
    const value = Number(t.value);
    if (t.classList.contains("loralab-on")) {
      rows[i] = { ...row, on: t.checked };
    } else if (t.classList.contains("loralab-sm") || t.classList.contains("loralab-sc")) {
      if (t.value === "" || !Number.isFinite(value)) return;
      rows[i] = t.classList.contains("loralab-sm") ? withStrengths(row, value, split ? sc : value, split)
        : withStrengths(row, sm, value, true);
    } else if (t.classList.contains("loralab-split")) {
      rows[i] = withStrengths(row, sm, sc, t.checked);
    } else if (t.classList.contains("loralab-blocks")) {
      rows[i] = { ...row, blocks: t.value.trim() };
      if (!rows[i].blocks) delete rows[i].blocks;
      this.open.add(i);
    } else if (t.classList.contains("loralab-dyn")) {
      if (!Number.isInteger(value) || value < 0) return;
      rows[i] = { ...row, dyn_rank: value };
      if (!value) delete rows[i].dyn_rank;
      this.open.add(i);
    } else {
      return;
    }
    // typing in a box keeps its focus: re-render only when the edit is complete
    this.save(rows, final || t.type === "checkbox");
  }

  async pick(i, e) {
    const names = (await loraNames()).map((l) => l.name);
    const rows = this.rows;
    const node = this.node;
    const proxy = {
      name: "lora_name",
      value: i >= 0 ? rows[i].lora : names[0],
      options: { values: names },
      callback: (name) => {
        const now = this.rows;
        if (i >= 0 && now[i]) now[i] = { ...now[i], lora: name };
        else now.push({ on: true, lora: name, strength: 1 });
        this.save(now);
      },
    };
    openPicker(proxy, node, [e.clientX ?? 100, e.clientY ?? 100]);
  }
}

function hideStorage(widget) {
  widget.hidden = true; // the classic canvas skips it
  widget.options = { ...(widget.options ?? {}), hidden: true }; // Nodes 2.0 too
  widget.computeSize = () => [0, -4]; // older frontends
}

function attachEditor(node) {
  const storage = node.widgets?.find((w) => w.name === ROWS);
  if (!storage || node.widgets.some((w) => w.name === EDITOR)) return;
  hideStorage(storage);
  const editor = new RowsEditor(node, storage);
  const widget = node.addDOMWidget(EDITOR, "loralab_rows", editor.el, {
    getValue: () => storage.value,
    setValue: () => {},
    getMinHeight: () => editor.height(),
    serialize: false,
  });
  widget.serialize = false;
  node.loralabRows = editor;
  editor.render();
}

// Widgets that are not values (the editor, trigger words, report) stay after every widget that is:
// widgets_values is positional (a hole would shift every value after it). Among themselves: editor,
// trigger words, report.
const SHOWN_LAST = [EDITOR, "loralab_tags", TRIGGERS, "loralab_report"];
function orderWidgets(node) {
  const ws = node.widgets ?? [];
  for (const name of SHOWN_LAST) {   // in place: the frontend keeps references to this array
    const i = ws.findIndex((w) => w.name === name);
    if (i >= 0) ws.push(...ws.splice(i, 1));
  }
}

function showTriggers(node, text) {
  const w = readonlyText(node, TRIGGERS, { placeholder: "Trigger words appear after this node runs", minHeight: 40,
                                           maxHeight: 64, className: "loralab-triggers-text" });
  w.value = text ?? "";
  w.element.title = text ?? "";
  node.setDirtyCanvas?.(true, true);
}

onResult("triggers", (node, text) => showTriggers(node, text));

app.registerExtension({
  name: "LoraLab.Stack",
  setup() {
    install();
    api.addEventListener("executed", ({ detail }) => {
      const words = detail?.output?.loralab_triggers;
      if (words == null) return;
      const value = Array.isArray(words) ? words.join(", ") : String(words);
      deliver(detail.display_node ?? detail.node, detail.prompt_id, "triggers", () => value, {
        isOurs: (type) => TRIGGER_NODES.has(type),
      });
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRIGGER_NODES.has(nodeData.name)) return;
    after(nodeType.prototype, "onNodeCreated", function () {
      this.setSize([Math.max(this.size[0], 440), this.size[1]]);
      if (nodeData.name === STACK) attachEditor(this);
      showTriggers(this, "");
      orderWidgets(this);
      queueMicrotask(() => orderWidgets(this)); // after other extensions' onNodeCreated (the report)
    });
    after(nodeType.prototype, "onConfigure", function () {
      this.loralabRows?.render();
      renderStored(this, "triggers");
    });
  },
});
