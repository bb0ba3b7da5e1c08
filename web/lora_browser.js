// The LoRA picker: clicking a LoRA Lab node's lora_name (or Train LoRA's existing_lora) opens a
// browser of the loras folders instead of a flat menu: subfolders as a tree, a search box, and the
// info panel of the LoRA under the cursor (preview, base model, algorithm, rank/alpha, trigger
// words, training settings: lib/info_panel.js). The arrows at the widget's ends still step through
// the list; "Browse LoRAs…" in the node's menu opens the same picker. With Nodes 2.0 (Vue nodes),
// which draw their own select, a "Browse LoRAs…" button on the node opens it.
import { app } from "../../scripts/app.js";
import { after } from "./lib/hooks.js";
import { ensureStyle, renderInfo } from "./lib/info_panel.js";
import { loraInfo } from "./lib/lora_names.js";

const WIDGETS = { lora_name: true, existing_lora: true };
const NONE = "[None]";
const BROWSE = "Browse LoRAs…";
const expanded = new Set(); // folders the user opened, kept while the page lives

const norm = (name) => String(name).replaceAll("\\", "/");

/** Folder tree of listed names: {folders: Map(name -> tree), files: [name]} (files keep their listed form). */
export function buildTree(names) {
  const root = { folders: new Map(), files: [] };
  for (const name of names) {
    const parts = norm(name).split("/");
    let node = root;
    for (const part of parts.slice(0, -1)) {
      if (!node.folders.has(part)) node.folders.set(part, { folders: new Map(), files: [] });
      node = node.folders.get(part);
    }
    node.files.push(name);
  }
  return root;
}

/** Names whose path contains every whitespace-separated token of ``query`` (any case). */
export function search(names, query) {
  const tokens = query.toLowerCase().split(/\s+/).filter(Boolean);
  return names.filter((n) => {
    const hay = norm(n).toLowerCase();
    return tokens.every((t) => hay.includes(t));
  });
}

function count(tree) {
  let n = tree.files.length;
  for (const sub of tree.folders.values()) n += count(sub);
  return n;
}

class Picker {
  constructor(widget, node, at, onPick) {
    ensureStyle();
    this.widget = widget;
    this.node = node;
    this.onPick = onPick;
    this.values = [...(widget.options?.values ?? [])];
    this.files = this.values.filter((v) => v !== NONE);
    this.current = widget.value;
    this.active = null;
    this.infoTimer = null;
    // open the folders leading to the current value
    const parts = norm(this.current ?? "").split("/").slice(0, -1);
    parts.forEach((_, i) => expanded.add(parts.slice(0, i + 1).join("/")));

    const root = (this.root = document.createElement("div"));
    root.className = "loralab-picker";
    root.setAttribute("role", "dialog");
    root.innerHTML = `<div class="loralab-picker-head"><input class="loralab-picker-search" type="search"
      placeholder="Search LoRAs (name or folder)" aria-label="Search LoRAs"><span class="loralab-picker-count"></span></div>
      <div class="loralab-picker-body"><div class="loralab-tree" role="tree"></div><div class="loralab-info"></div></div>`;
    this.input = root.querySelector("input");
    this.list = root.querySelector(".loralab-tree");
    this.info = root.querySelector(".loralab-info");
    this.countEl = root.querySelector(".loralab-picker-count");
    const w = Math.min(780, window.innerWidth - 16);
    const h = Math.min(500, window.innerHeight - 16);
    Object.assign(root.style, {
      width: `${w}px`, height: `${h}px`,
      left: `${Math.max(8, Math.min(at[0], window.innerWidth - w - 8))}px`,
      top: `${Math.max(8, Math.min(at[1], window.innerHeight - h - 8))}px`,
    });
    document.body.appendChild(root);

    this.input.addEventListener("input", () => this.render());
    this.input.addEventListener("keydown", (e) => this.key(e));
    this.list.addEventListener("click", (e) => this.click(e));
    this.list.addEventListener("mousemove", (e) => {
      const row = e.target.closest(".loralab-file-row");
      if (row && row.dataset.name !== this.active) this.highlight(row.dataset.name, false);
    });
    this.outside = (e) => {
      if (!root.contains(e.target)) this.close();
    };
    setTimeout(() => document.addEventListener("pointerdown", this.outside, true));
    this.render();
    this.highlight(this.files.includes(this.current) ? this.current : null, true);
    this.input.focus();
  }

  close() {
    document.removeEventListener("pointerdown", this.outside, true);
    clearTimeout(this.infoTimer);
    this.root.remove();
    if (Picker.open === this) Picker.open = null;
  }

  rows() {
    return [...this.list.querySelectorAll(".loralab-row")];
  }

  render() {
    const q = this.input.value.trim();
    this.list.replaceChildren();
    if (this.values.includes(NONE)) this.list.appendChild(this.fileRow(NONE, NONE, 0));
    if (q) {
      const hits = search(this.files, q);
      this.countEl.textContent = `${hits.length} of ${this.files.length}`;
      for (const name of hits) {
        const parts = norm(name).split("/");
        this.list.appendChild(this.fileRow(name, parts.pop(), 0, parts.join("/")));
      }
      if (!hits.length) this.list.appendChild(Object.assign(document.createElement("div"), {
        className: "loralab-empty", textContent: `No LoRA matches "${q}"`,
      }));
      if (hits.length && !hits.includes(this.active)) this.highlight(hits[0], false);
    } else {
      this.countEl.textContent = `${this.files.length} LoRAs`;
      this.walk(buildTree(this.files), "", 0);
    }
    this.markActive();
  }

  walk(tree, path, depth) {
    for (const [name, sub] of [...tree.folders].sort(([a], [b]) => a.localeCompare(b))) {
      const full = path ? `${path}/${name}` : name;
      const open = expanded.has(full);
      const row = document.createElement("div");
      row.className = "loralab-row loralab-folder";
      row.dataset.folder = full;
      row.setAttribute("role", "treeitem");
      row.setAttribute("aria-expanded", String(open));
      row.style.paddingLeft = `${8 + depth * 14}px`;
      row.innerHTML = `<span class="loralab-twisty">${open ? "▾" : "▸"}</span><i class="pi ${open ? "pi-folder-open" : "pi-folder"}"></i><span class="loralab-label"></span><span class="loralab-dim"></span>`;
      row.querySelector(".loralab-label").textContent = name;
      row.querySelector(".loralab-dim").textContent = `(${count(sub)})`;
      this.list.appendChild(row);
      if (open) this.walk(sub, full, depth + 1);
    }
    for (const name of tree.files) this.list.appendChild(this.fileRow(name, norm(name).split("/").pop(), depth));
  }

  fileRow(name, label, depth, folder = "") {
    const row = document.createElement("div");
    row.className = "loralab-row loralab-file-row";
    row.dataset.name = name;
    row.setAttribute("role", "treeitem");
    row.style.paddingLeft = `${8 + depth * 14 + 16}px`;
    if (name === this.current) row.classList.add("loralab-current");
    const l = document.createElement("span");
    l.className = "loralab-label";
    const dot = label.lastIndexOf(".");
    l.textContent = dot > 0 ? label.slice(0, dot) : label;
    row.appendChild(l);
    if (dot > 0) {
      const ext = document.createElement("span");
      ext.className = "loralab-dim";
      ext.textContent = label.slice(dot);
      row.appendChild(ext);
    }
    if (folder) {
      const d = document.createElement("span");
      d.className = "loralab-dim";
      d.textContent = `  ${folder}`;
      row.appendChild(d);
    }
    row.title = name;
    return row;
  }

  click(e) {
    const folder = e.target.closest(".loralab-folder");
    if (folder) {
      const f = folder.dataset.folder;
      expanded.has(f) ? expanded.delete(f) : expanded.add(f);
      this.render();
      return;
    }
    const row = e.target.closest(".loralab-file-row");
    if (row) this.pick(row.dataset.name);
  }

  key(e) {
    const files = this.rows().filter((r) => r.classList.contains("loralab-file-row"));
    const i = files.findIndex((r) => r.dataset.name === this.active);
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      const next = files[Math.max(0, Math.min(files.length - 1, i + (e.key === "ArrowDown" ? 1 : -1)))];
      if (next) this.highlight(next.dataset.name, true);
    } else if (e.key === "Enter") {
      e.preventDefault();
      if (this.active != null) this.pick(this.active);
    } else if (e.key === "Escape") {
      e.preventDefault();
      this.close();
    }
    e.stopPropagation(); // typing here is not a canvas shortcut
  }

  highlight(name, scroll) {
    this.active = name;
    this.markActive(scroll);
    clearTimeout(this.infoTimer);
    if (name == null || name === NONE) {
      this.info.replaceChildren();
      return;
    }
    renderInfo(this.info, name, null);
    this.infoTimer = setTimeout(async () => {
      const info = await loraInfo(name);
      if (this.active === name && this.root.isConnected) renderInfo(this.info, name, info);
    }, 80);
  }

  markActive(scroll = false) {
    for (const row of this.rows()) {
      const on = row.dataset.name != null && row.dataset.name === this.active;
      row.classList.toggle("loralab-active", on);
      if (on && scroll) row.scrollIntoView({ block: "nearest" });
    }
  }

  pick(name) {
    this.close();
    this.onPick(name);
  }
}

/** Open the picker for ``widget`` of ``node`` at the screen point ``at``. */
export function openPicker(widget, node, at) {
  Picker.open?.close();
  Picker.open = new Picker(widget, node, at, (name) => {
    if (widget.setValue) {
      widget.setValue(name, { e: undefined, node, canvas: app.canvas });
    } else {
      const old = widget.value;
      widget.value = name;
      widget.callback?.(name, app.canvas, node);
      node.onWidgetChanged?.(widget.name, name, old, widget);
    }
    node.setDirtyCanvas?.(true, true);
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState();
  });
  return Picker.open;
}

function nodeScreenPoint(node) {
  const el = document.querySelector(`[data-node-id="${node.id}"]`); // Nodes 2.0 draws nodes as elements
  if (el) {
    const r = el.getBoundingClientRect();
    return [r.left + 16, r.top + 40];
  }
  const [x, y] = app.canvas.ds.convertCanvasToOffset?.(node.pos) ?? [100, 100];
  const rect = app.canvas.canvas.getBoundingClientRect();
  return [rect.left + x, rect.top + y];
}

const vueNodes = () => !!app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled");

function attach(node) {
  // Nodes 2.0 draws its own select for combos (no click to take over): a button opens the browser
  const combo = node.widgets?.find((w) => WIDGETS[w.name] && w.type === "combo");
  if (combo && vueNodes() && !node.widgets.some((w) => w.name === BROWSE)) {
    const button = node.addWidget("button", BROWSE, null, () => openPicker(combo, node, nodeScreenPoint(node)),
      { serialize: false });
    button.serialize = false;
  }
  for (const widget of node.widgets ?? []) {
    if (!WIDGETS[widget.name] || widget.type !== "combo" || widget.loralabPicker) continue;
    widget.loralabPicker = true;
    const onClick = widget.onClick?.bind(widget);
    // The ComboWidget's own onClick: arrows at both ends step; the middle opened a flat menu.
    widget.onClick = function (options) {
      const { e, node: n } = options;
      const x = e.canvasX - n.pos[0];
      const width = this.width || n.size[0];
      if (x < 40 || x > width - 40 || !onClick) return onClick?.(options);
      openPicker(this, n, [e.clientX, e.clientY]);
    };
  }
}

app.registerExtension({
  name: "LoraLab.LoraBrowser",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("LoraLab")) return;
    const inputs = { ...(nodeData.input?.required ?? {}), ...(nodeData.input?.optional ?? {}) };
    if (!Object.keys(WIDGETS).some((w) => w in inputs)) return;
    after(nodeType.prototype, "onNodeCreated", function () {
      attach(this);
    });
    after(nodeType.prototype, "getExtraMenuOptions", function (canvas, options) {
      const widget = this.widgets?.find((w) => WIDGETS[w.name] && w.type === "combo");
      if (widget) {
        options.unshift({ content: BROWSE, callback: () => openPicker(widget, this, nodeScreenPoint(this)) }, null);
      }
    });
  },
});
