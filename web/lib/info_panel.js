// The info panel of one LoRA: preview image, base model, algorithm, rank/alpha, trigger words,
// training settings and dataset tags, from GET /loralab/info (the file's header and sidecars;
// see lora/info.py). Everything is built with textContent: file metadata is never HTML.
import { api } from "../../../scripts/api.js";

const STYLE_ID = "loralab-style";
const MAX_TAG_CHIPS = 40; // the server sends at most this many; the rest is a count

export function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = `
.loralab-picker { position: fixed; z-index: 10000; display: flex; flex-direction: column;
  background: var(--comfy-menu-bg, #202020); color: var(--fg-color, #ddd); border: 1px solid var(--border-color, #444);
  border-radius: 8px; box-shadow: 0 8px 32px rgba(0,0,0,.5); font: 13px sans-serif; overflow: hidden; }
.loralab-picker-head { display: flex; gap: 8px; align-items: center; padding: 8px; border-bottom: 1px solid var(--border-color, #444); }
.loralab-picker-search { flex: 1; padding: 6px 8px; border-radius: 4px; border: 1px solid var(--border-color, #555);
  background: var(--comfy-input-bg, #111); color: inherit; font: inherit; outline: none; }
.loralab-picker-count { opacity: .6; font-size: 12px; white-space: nowrap; }
.loralab-picker-body { display: flex; flex: 1; min-height: 0; }
.loralab-tree { width: 42%; min-width: 220px; overflow: auto; padding: 4px 0; border-right: 1px solid var(--border-color, #444); }
.loralab-row { display: flex; align-items: center; gap: 4px; padding: 3px 8px; cursor: pointer; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.loralab-row:hover { background: rgba(255,255,255,.06); }
.loralab-row.loralab-active { background: rgba(90,150,255,.35); }
.loralab-row.loralab-current .loralab-label { font-weight: bold; }
.loralab-twisty { width: 12px; flex: none; opacity: .7; }
.loralab-row .pi { font-size: 12px; opacity: .75; flex: none; }
.loralab-folder .loralab-label { opacity: .9; }
.loralab-dim { opacity: .5; font-size: 11px; overflow: hidden; text-overflow: ellipsis; }
.loralab-info { flex: 1; min-width: 0; overflow: auto; padding: 10px 12px; }
.loralab-info h3 { margin: 0 0 2px; font-size: 14px; word-break: break-word; }
.loralab-info .loralab-file { opacity: .6; font-size: 11px; margin-bottom: 8px; word-break: break-all; }
.loralab-preview { display: block; max-width: 100%; max-height: 220px; margin: 0 0 8px; border-radius: 4px; object-fit: contain; }
.loralab-nopreview { height: 56px; display: flex; align-items: center; justify-content: center; margin-bottom: 8px;
  border: 1px dashed var(--border-color, #555); border-radius: 4px; opacity: .6; font-size: 12px; text-align: center; padding: 0 6px; }
.loralab-kv { border-collapse: collapse; width: 100%; margin-bottom: 8px; table-layout: fixed; }
.loralab-kv td { padding: 2px 4px; vertical-align: top; word-break: break-word; }
.loralab-kv td:first-child { width: 34%; opacity: .65; }
.loralab-section { margin: 8px 0 4px; font-weight: bold; font-size: 12px; opacity: .85; }
.loralab-chips { display: flex; flex-wrap: wrap; gap: 4px; }
.loralab-chip { padding: 1px 6px; border-radius: 10px; background: rgba(255,255,255,.1); font-size: 12px; max-width: 100%;
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.loralab-chip.loralab-trigger { background: rgba(90,150,255,.3); cursor: copy; }
.loralab-more { opacity: .6; font-size: 12px; padding: 1px 4px; }
.loralab-error { color: #ff8a80; word-break: break-word; }
.loralab-empty { opacity: .6; padding: 8px; }
.loralab-ac { position: fixed; z-index: 10001; min-width: 220px; max-width: 420px; max-height: 260px; overflow: auto;
  background: var(--comfy-menu-bg, #202020); color: var(--fg-color, #ddd); border: 1px solid var(--border-color, #444);
  border-radius: 6px; box-shadow: 0 6px 20px rgba(0,0,0,.5); font: 12px sans-serif; padding: 2px 0; }
`;
  document.head.appendChild(style);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  return e;
}

function size(bytes) {
  if (!Number.isFinite(bytes)) return null;
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) {
    bytes /= 1024;
    i++;
  }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function table(rows) {
  const t = el("table", "loralab-kv");
  for (const [k, v] of rows) {
    if (v == null || v === "") continue;
    const tr = t.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = String(v);
  }
  return t.rows.length ? t : null;
}

/** Fill ``box`` with the panel for ``name``; ``info`` is /loralab/info's JSON (or {error}). */
export function renderInfo(box, name, info) {
  box.replaceChildren();
  const stem = name.split(/[\\/]/).pop().replace(/\.[^.]+$/, "");
  box.appendChild(el("h3", null, info?.title || stem));
  box.appendChild(el("div", "loralab-file", name));
  if (!info) {
    box.appendChild(el("div", "loralab-empty", "Loading…"));
    return;
  }
  if (info.error) {
    box.appendChild(el("div", "loralab-error", info.error));
    return;
  }
  if (info.preview) {
    const img = el("img", "loralab-preview");
    img.alt = `preview of ${stem}`;
    img.onerror = () => img.replaceWith(el("div", "loralab-nopreview", "The preview image could not be shown"));
    img.src = api.apiURL(info.preview);
    box.appendChild(img);
  } else {
    box.appendChild(el("div", "loralab-nopreview", `No preview (put ${stem}.png beside the file)`));
  }
  const rank = info.ranks ? `${info.rank} (${info.ranks.join(", ")})` : info.rank;
  const basics = table([
    ["Base model", info.base_model ? info.base_model + (info.base_model_from === "keys" ? " (from its keys)" : "") : "unknown"],
    ["Algorithm", info.algorithm ?? "no LoRA keys"],
    ["Rank / alpha", rank == null && info.alpha == null ? null : `${rank ?? "?"} / ${info.alpha ?? "per module"}`],
    ["File", [size(info.size), info.tensors != null ? `${info.tensors} tensors` : null].filter(Boolean).join(" · ")],
    ["Author", info.author],
  ]);
  if (basics) box.appendChild(basics);
  if (info.description) box.appendChild(el("div", "loralab-file", info.description));

  box.appendChild(el("div", "loralab-section", "Trigger words"));
  const triggers = el("div", "loralab-chips loralab-triggers");
  for (const w of info.trigger_words ?? []) {
    const chip = el("span", "loralab-chip loralab-trigger", w);
    chip.title = "Click to copy";
    chip.onclick = (e) => {
      e.stopPropagation();
      navigator.clipboard?.writeText(w).catch(() => {});
    };
    triggers.appendChild(chip);
  }
  if (!triggers.childElementCount) triggers.appendChild(el("span", "loralab-more", "none in the file"));
  box.appendChild(triggers);

  const training = table(Object.entries(info.training ?? {}));
  if (training) {
    box.appendChild(el("div", "loralab-section", "Training"));
    box.appendChild(training);
  }
  if (info.tags_total) {
    box.appendChild(el("div", "loralab-section", `Dataset tags (${info.tags_total})`));
    const tags = el("div", "loralab-chips loralab-tags");
    const shown = (info.tags ?? []).slice(0, MAX_TAG_CHIPS);
    for (const [tag, n] of shown) tags.appendChild(el("span", "loralab-chip", `${tag} ×${n}`));
    if (info.tags_total > shown.length) tags.appendChild(el("span", "loralab-more", `+${info.tags_total - shown.length} more`));
    box.appendChild(tags);
  }
  for (const note of info.notes ?? []) box.appendChild(el("div", "loralab-file", note));
}
