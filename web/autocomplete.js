// `<lora:` in any prompt text box of the graph (the multiline text widgets of CLIP Text Encode and
// the like, on the classic canvas and in Nodes 2.0) suggests the LoRA files ComfyUI lists; taking
// a suggestion writes <lora:NAME:1> with the name the server says resolves back to that file
// (lib/lora_names.js, lora/names.py). Up/Down choose, Enter or Tab take, Escape closes.
import { app } from "../../scripts/app.js";
import { ensureStyle } from "./lib/info_panel.js";
import { loraNames } from "./lib/lora_names.js";

const OPEN_TAG = /<lora:([^:<>\n]*)$/i;
const REST_OF_TAG = /^([^:<>\n]*)(:[^<>\n]*)?>/; // what follows the caret inside an existing tag
const MAX_SHOWN = 50;

/** The tag being typed before ``caret``: {start, query} or null. */
export function openTag(text, caret) {
  const m = OPEN_TAG.exec(text.slice(0, caret));
  return m ? { start: m.index, query: m[1] } : null;
}

/** ``text`` with the tag at ``start`` (typed up to ``caret``) completed to ``tag``: [text, caret after it]. */
export function complete(text, start, caret, tag) {
  const rest = REST_OF_TAG.exec(text.slice(caret));
  const weight = rest?.[2] ?? ":1";
  const end = rest ? caret + rest[0].length : caret;
  const inserted = `<lora:${tag}${weight}>`;
  return [text.slice(0, start) + inserted + text.slice(end), start + inserted.length];
}

/** Suggestions for ``query``: names whose tag or path holds every token; tag prefix matches first. */
export function rank(loras, query) {
  const q = query.trim().toLowerCase();
  const tokens = q.split(/[\s/\\]+/).filter(Boolean);
  const hits = loras.filter(({ name, tag }) => {
    const hay = `${tag} ${name}`.toLowerCase();
    return tokens.every((t) => hay.includes(t));
  });
  const score = ({ tag }) => (tag.toLowerCase().startsWith(q) ? 0 : 1);
  return hits.sort((a, b) => score(a) - score(b) || a.tag.localeCompare(b.tag));
}

function isPromptBox(el) {
  return el?.tagName === "TEXTAREA" && !el.readOnly && !el.disabled &&
    (el.classList.contains("comfy-multiline-input") || !!el.closest("[data-node-id]"));
}

// where the caret is on screen: a hidden copy of the textarea, laid out the same, up to the caret
function caretPoint(ta, pos) {
  const mirror = document.createElement("div");
  const cs = getComputedStyle(ta);
  for (const p of ["boxSizing", "width", "fontFamily", "fontSize", "fontWeight", "lineHeight", "letterSpacing",
    "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "borderTopWidth", "borderLeftWidth",
    "borderRightWidth", "borderBottomWidth", "textTransform", "wordSpacing", "tabSize"]) mirror.style[p] = cs[p];
  Object.assign(mirror.style, { position: "fixed", visibility: "hidden", whiteSpace: "pre-wrap",
    overflowWrap: "break-word", top: "0", left: "0" });
  mirror.textContent = ta.value.slice(0, pos);
  const mark = document.createElement("span");
  mark.textContent = "\u200b";
  mirror.appendChild(mark);
  document.body.appendChild(mirror);
  const r = ta.getBoundingClientRect();
  const scale = r.width / (ta.offsetWidth || r.width); // the canvas may be zoomed (CSS transform)
  const x = r.left + (mark.offsetLeft - ta.scrollLeft) * scale;
  const y = r.top + (mark.offsetTop - ta.scrollTop + mark.offsetHeight) * scale;
  mirror.remove();
  return [Math.min(x, r.right), Math.min(y, r.bottom)];
}

class Suggestions {
  constructor() {
    this.box = null;
    this.ta = null;
    this.items = [];
    this.index = 0;
    this.tag = null;
  }

  get open() {
    return !!this.box;
  }

  async update(ta) {
    const tag = openTag(ta.value, ta.selectionStart);
    if (!tag || ta.selectionStart !== ta.selectionEnd) return this.close();
    const loras = await loraNames();
    if (document.activeElement !== ta) return this.close();
    const now = openTag(ta.value, ta.selectionStart);   // the text may have moved on meanwhile
    if (!now) return this.close();
    this.ta = ta;
    this.tag = now;
    this.items = rank(loras, now.query);
    this.index = 0;
    this.draw();
  }

  draw() {
    ensureStyle();
    if (!this.box) {
      this.box = document.createElement("div");
      this.box.className = "loralab-ac";
      this.box.setAttribute("role", "listbox");
      // keep the focus in the text box while clicking a suggestion
      this.box.addEventListener("pointerdown", (e) => e.preventDefault());
      this.box.addEventListener("click", (e) => {
        const row = e.target.closest("[data-i]");
        if (row) this.take(Number(row.dataset.i));
      });
      document.body.appendChild(this.box);
    }
    this.box.replaceChildren();
    if (!this.items.length) {
      const empty = document.createElement("div");
      empty.className = "loralab-empty";
      empty.textContent = this.tag.query ? `No LoRA matches "${this.tag.query}"` : "No LoRAs in the loras folders";
      this.box.appendChild(empty);
    }
    this.items.slice(0, MAX_SHOWN).forEach(({ name, tag }, i) => {
      const row = document.createElement("div");
      row.className = "loralab-row" + (i === this.index ? " loralab-active" : "");
      row.dataset.i = String(i);
      row.setAttribute("role", "option");
      const label = document.createElement("span");
      label.className = "loralab-label";
      label.textContent = tag;
      const dim = document.createElement("span");
      dim.className = "loralab-dim";
      dim.textContent = name.includes("/") || name.includes("\\") ? `  ${name}` : "";
      row.append(label, dim);
      this.box.appendChild(row);
    });
    if (this.items.length > MAX_SHOWN) {
      const more = document.createElement("div");
      more.className = "loralab-more";
      more.textContent = `+${this.items.length - MAX_SHOWN} more: type to narrow`;
      this.box.appendChild(more);
    }
    const [x, y] = caretPoint(this.ta, this.tag.start);
    const h = Math.min(260, this.box.scrollHeight + 4);
    const below = y + 4 + h < window.innerHeight;
    Object.assign(this.box.style, {
      left: `${Math.max(4, Math.min(x, window.innerWidth - this.box.offsetWidth - 4))}px`,
      top: `${below ? y + 4 : Math.max(4, y - h - 24)}px`,
    });
    this.box.querySelector(".loralab-active")?.scrollIntoView({ block: "nearest" });
  }

  move(delta) {
    const n = Math.min(this.items.length, MAX_SHOWN);
    if (!n) return;
    this.index = (this.index + delta + n) % n;
    this.draw();
  }

  take(i = this.index) {
    const item = this.items[i];
    const ta = this.ta;
    if (!item || !ta) return this.close();
    const [text, caret] = complete(ta.value, this.tag.start, ta.selectionStart, item.tag);
    this.close();
    ta.value = text;
    ta.setSelectionRange(caret, caret);
    // the widget (classic textarea or Vue's v-model) takes its value from this event
    ta.dispatchEvent(new Event("input", { bubbles: true }));
    ta.dispatchEvent(new Event("change", { bubbles: true }));
    app.graph?.setDirtyCanvas?.(true, false);
  }

  close() {
    this.box?.remove();
    this.box = null;
    this.items = [];
  }
}

const suggestions = new Suggestions();

app.registerExtension({
  name: "LoraLab.Autocomplete",
  setup() {
    document.addEventListener("input", (e) => {
      if (isPromptBox(e.target) && e.isTrusted) suggestions.update(e.target);
    }, true);
    document.addEventListener("keydown", (e) => {
      if (!suggestions.open || e.target !== suggestions.ta) return;
      const keys = { ArrowDown: () => suggestions.move(1), ArrowUp: () => suggestions.move(-1),
        Enter: () => suggestions.take(), Tab: () => suggestions.take(), Escape: () => suggestions.close() };
      const act = keys[e.key];
      if (!act || e.ctrlKey || e.metaKey || e.altKey || (e.key === "Enter" && e.shiftKey)) return;
      e.preventDefault();
      e.stopPropagation();
      act();
    }, true);
    document.addEventListener("focusout", (e) => {
      if (e.target === suggestions.ta) suggestions.close();
    }, true);
    document.addEventListener("selectionchange", () => {
      const ta = suggestions.ta;
      if (suggestions.open && document.activeElement === ta && !openTag(ta.value, ta.selectionStart)) {
        suggestions.close();
      }
    });
  },
});
