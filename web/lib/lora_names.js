// The LoRA files ComfyUI lists, with the name to write in <lora:NAME:weight> (the server decides
// both, lora/names.py, so what we suggest always resolves). Shared by the picker, the
// autocomplete and, later, tag highlighting; refreshed after Save LoRA and after R (refresh).
import { api } from "../../../scripts/api.js";

let cached = null;

/** Promise of [{name, tag}], fetched once until forgotten. */
export function loraNames() {
  if (!cached) {
    cached = api
      .fetchApi("/loralab/loras", { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : { loras: [] }))
      .then((body) => body.loras ?? [])
      .catch(() => {
        cached = null;
        return [];
      });
  }
  return cached;
}

export function forgetLoraNames() {
  cached = null;
  infoCache.clear();
}

/** {tag: listed name or null} for the names written in <lora:…> tags. */
export async function resolveTags(tags) {
  if (!tags.length) return {};
  const q = new URLSearchParams(tags.map((t) => ["tag", t]));
  const r = await api.fetchApi(`/loralab/resolve?${q}`, { cache: "no-store" });
  return r.ok ? r.json() : {};
}

const infoCache = new Map();

/** The info panel's JSON for a listed name (cached until the lists are refreshed). */
export function loraInfo(name) {
  if (!infoCache.has(name)) {
    const p = api
      .fetchApi(`/loralab/info?${new URLSearchParams({ name })}`, { cache: "no-store" })
      .then(async (r) => {
        const body = await r.json().catch(() => ({}));
        return r.ok ? body : { error: body.error ?? `${r.status} ${r.statusText}` };
      })
      .catch((e) => ({ error: String(e) }));
    infoCache.set(name, p);
  }
  return infoCache.get(name);
}
