// Prompt with LoRA tags (LoRA Lab): every <lora:…> tag in the node's text is checked as you type, by the
// server, with the node's own reading (POST /loralab/resolve: lora/tags.py and lora/names.py), so a
// tag is marked before the prompt is queued: red when its name does not resolve (unknown, ambiguous),
// when it cannot be read (<lora:x:abc>, unclosed) or its lbw= fits no model; green when it loads a file.
// The marks sit in a layer behind the (transparent) text box, aligned with its text; a line under the
// box lists each tag with the file it loads or what is wrong with it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { after } from "./lib/hooks.js";
import { ensureStyle } from "./lib/info_panel.js";

const NODE = "LoraLabPromptLoRA";
const STATUS = "loralab_tags";
const DEBOUNCE_MS = 250;

const STYLE = `
.loralab-tag-backdrop { position: absolute; pointer-events: none; overflow: hidden; color: transparent;
  white-space: pre-wrap; overflow-wrap: break-word; word-break: normal; box-sizing: border-box; margin: 0;
  border-color: transparent !important; }
.loralab-tag-backdrop mark { color: transparent; border-radius: 3px; padding: 0; }
.loralab-tag-backdrop mark.loralab-tag-bad { background: rgba(230, 60, 60, .45); box-shadow: 0 2px 0 #ff5a5a; }
.loralab-tag-backdrop mark.loralab-tag-ok { background: rgba(80, 180, 110, .25); }
.loralab-tag-status { font: 11px sans-serif; line-height: 1.35; overflow: auto; color: var(--fg-color, #ddd);
  box-sizing: border-box; padding: 1px 2px; }
.loralab-tag-status .loralab-tag-bad { color: #ff8a80; }
.loralab-tag-status .loralab-tag-ok { color: #8fd19e; }
.loralab-tag-status div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
`;

function ensureTagStyle() {
  ensureStyle();
  if (document.getElementById("loralab-tag-style")) return;
  document.head.appendChild(Object.assign(document.createElement("style"), { id: "loralab-tag-style", textContent: STYLE }));
}

/** The server's reading of ``text``: [{start, end, text, name, error}]. */
export async function checkTags(text) {
  if (!/<(lora|lyco):/i.test(text)) return [];
  const r = await api.fetchApi("/loralab/resolve", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }),
  });
  if (!r.ok) return [];
  return (await r.json()).tags ?? [];
}

/** ``text`` cut at the tags: [[piece, tag or null]] in order. */
export function segments(text, tags) {
  const out = [];
  let at = 0;
  for (const t of [...tags].sort((a, b) => a.start - b.start)) {
    if (t.start < at || t.end > text.length) continue;
    if (t.start > at) out.push([text.slice(at, t.start), null]);
    out.push([text.slice(t.start, t.end), t]);
    at = t.end;
  }
  if (at < text.length) out.push([text.slice(at), null]);
  return out;
}

const COPIED = ["fontFamily", "fontSize", "fontWeight", "fontStyle", "lineHeight", "letterSpacing", "wordSpacing",
  "textTransform", "tabSize", "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "borderTopWidth",
  "borderRightWidth", "borderBottomWidth", "borderLeftWidth", "borderTopStyle", "borderRightStyle",
  "borderBottomStyle", "borderLeftStyle", "borderRadius", "textAlign", "direction"];

class Highlighter {
  constructor(node) {
    this.node = node;
    this.tags = [];
    this.text = null; // the text the tags were read from
    this.seq = 0;
    this.timer = null;
    this.status = document.createElement("div");
    this.status.className = "loralab-tag-status";
    const widget = node.addDOMWidget(STATUS, "loralab_tags", this.status, {
      getValue: () => "", setValue: () => {}, getMinHeight: () => this.statusHeight(),
      getMaxHeight: () => this.statusHeight(), serialize: false,
    });
    widget.serialize = false;
  }

  get widget() {
    return this.node.widgets?.find((w) => w.name === "text");
  }

  /** The text boxes showing this node's text: the classic widget's, and Nodes 2.0's. */
  boxes() {
    const out = [];
    const el = this.widget?.element;
    if (el?.tagName === "TEXTAREA" && el.isConnected) out.push(el);
    for (const ta of document.querySelectorAll(`[data-node-id="${this.node.id}"] textarea`)) {
      if (!ta.readOnly && !out.includes(ta)) out.push(ta);
    }
    return out;
  }

  schedule() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.check(), DEBOUNCE_MS);
    this.paint();
  }

  async check() {
    const text = String(this.widget?.value ?? "");
    const seq = ++this.seq;
    let tags = [];
    try {
      tags = await checkTags(text);
    } catch {
      tags = [];
    }
    if (seq !== this.seq) return; // a newer check is on its way
    this.text = text;
    this.tags = tags;
    this.node.loralabTagProblems = tags.filter((t) => t.error).length;
    this.paint();
    this.renderStatus();
  }

  paint() {
    ensureTagStyle();
    for (const ta of this.boxes()) this.paintBox(ta);
  }

  paintBox(ta) {
    const host = ta.parentElement;
    if (!host) return;
    let bd = host.querySelector(":scope > .loralab-tag-backdrop");
    if (!bd) {
      bd = document.createElement("div");
      bd.className = "loralab-tag-backdrop";
      host.insertBefore(bd, ta);
      ta.addEventListener("scroll", () => { bd.scrollTop = ta.scrollTop; bd.scrollLeft = ta.scrollLeft; });
    }
    // the text box goes transparent, above the marks; inline and on every paint, as Nodes 2.0 redraws
    // its text box's classes
    ta.classList.add("loralab-tag-text");
    const cs = getComputedStyle(ta);
    const bg = (ta.dataset.loralabBg ??= cs.backgroundColor);
    ta.style.setProperty("background", "transparent", "important");
    ta.style.setProperty("position", "relative");
    ta.style.setProperty("z-index", "1");
    for (const p of COPIED) bd.style[p] = cs[p];
    bd.style.backgroundColor = bg; // the box's own background, seen through the text box
    Object.assign(bd.style, {
      left: `${ta.offsetLeft}px`, top: `${ta.offsetTop}px`,
      width: `${ta.clientWidth + parseFloat(cs.borderLeftWidth) + parseFloat(cs.borderRightWidth)}px`,
      height: `${ta.offsetHeight}px`,
    });
    bd.replaceChildren();
    const current = this.text === ta.value ? this.tags : []; // marks only for the text they were read from
    for (const [piece, tag] of segments(ta.value, current)) {
      if (!tag) {
        bd.appendChild(document.createTextNode(piece));
        continue;
      }
      const mark = document.createElement("mark");
      mark.className = tag.error ? "loralab-tag-bad" : "loralab-tag-ok";
      mark.textContent = piece;
      bd.appendChild(mark);
    }
    bd.appendChild(document.createTextNode("\u200b")); // a trailing newline keeps its line
    bd.scrollTop = ta.scrollTop;
  }

  statusHeight() {
    // 15 px a line, 4 px padding, and the 20 px margin the frontend takes off a DOM widget's height
    return 24 + 15 * Math.min(6, Math.max(1, this.tags.length));
  }

  renderStatus() {
    ensureTagStyle();
    this.status.replaceChildren();
    if (!this.tags.length) {
      this.status.appendChild(Object.assign(document.createElement("div"), {
        textContent: "No <lora:…> tags", style: "opacity:.55",
      }));
    }
    for (const t of this.tags) {
      const line = document.createElement("div");
      line.className = t.error ? "loralab-tag-bad" : "loralab-tag-ok";
      line.textContent = t.error ? `✗ ${t.error}` : `✓ ${t.text} → ${t.name}`;
      line.title = line.textContent;
      this.status.appendChild(line);
    }
    // lay the widgets out again (the status' height changed); grow the node when they no longer fit
    const min = this.node.computeSize?.();
    this.node.setSize([this.node.size[0], Math.max(this.node.size[1], min?.[1] ?? 0)]);
    this.node.setDirtyCanvas?.(true, true);
  }
}

function attach(node) {
  if (node.loralabTags) return;
  const h = (node.loralabTags = new Highlighter(node));
  const widget = h.widget;
  if (widget) {
    const callback = widget.callback;
    widget.callback = function (...args) {
      const r = callback?.apply(this, args);
      h.schedule();
      return r;
    };
  }
  h.schedule();
}

app.registerExtension({
  name: "LoraLab.TagHighlight",
  setup() {
    // typing in either kind of text box (classic or Nodes 2.0): re-check that node's tags
    document.addEventListener("input", (e) => {
      const ta = e.target;
      if (ta?.tagName !== "TEXTAREA") return;
      for (const node of app.graph?.nodes ?? []) {
        if (node.loralabTags && node.loralabTags.boxes().includes(ta)) node.loralabTags.schedule();
      }
    }, true);
    // the canvas moved or zoomed: the text boxes were laid out again
    api.addEventListener("graphChanged", () => {
      for (const node of app.graph?.nodes ?? []) node.loralabTags?.paint();
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    after(nodeType.prototype, "onNodeCreated", function () {
      attach(this);
      this.setSize([Math.max(this.size[0], 440), Math.max(this.size[1], 520)]);   // room for a prompt
    });
    after(nodeType.prototype, "onConfigure", function () {
      this.loralabTags?.schedule();
    });
    after(nodeType.prototype, "onResize", function () {
      requestAnimationFrame(() => this.loralabTags?.paint());
    });
  },
});
