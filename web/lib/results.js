// What LoRA Lab nodes show after a run (a loader's report, the saved path, the loss chart) is kept
// in the node's serialized state, node.properties.loralab, so it survives switching workflow tabs,
// saving and reopening the workflow, and a fully cached re-run (which sends nothing for most
// nodes); the next run replaces it.
//
// Results go to the workflow that queued the prompt, not to whatever tab is open when they arrive:
//   - the prompt -> workflow map is taken when the prompt is queued (api.queuePrompt), as the
//     frontend itself does for its own outputs;
//   - if that workflow is on screen, its live node is updated and redrawn;
//   - its stored state (changeTracker.activeState, what a tab switch loads) is updated in place,
//     so a tab opened later shows the result. This adds no undo step;
//   - once a run's final results are in, the open graph is persisted the way the frontend does it
//     after any change (a "graphChanged" event), so a page reload keeps them too. Not in the
//     "queue on change" auto-queue mode, where that event would queue the workflow again.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export const PROP = "loralab";

const renderers = new Map(); // field -> [(node, value) => void]
const byPrompt = new Map(); // prompt id -> ComfyWorkflow that queued it
let currentPrompt = null;

export function resultOf(node, field) {
  return node?.properties?.[PROP]?.[field];
}

/** Draw ``field`` on nodes whenever it changes, and when a node is loaded with one stored. */
export function onResult(field, render) {
  if (!renderers.has(field)) renderers.set(field, []);
  renderers.get(field).push(render);
}

/** Draw a node's stored ``field`` (after it was loaded from a workflow). */
export function renderStored(node, field) {
  const value = resultOf(node, field);
  if (value === undefined) return;
  for (const render of renderers.get(field) ?? []) render(node, value);
}

function workflows() {
  return app.extensionManager?.workflow;
}

/** The live node an execution id ("12" or "12:5" inside a subgraph) names in ``graph``. */
export function liveNode(graph, executionId) {
  let g = graph;
  let node = null;
  for (const part of String(executionId).split(":")) {
    node = g?.getNodeById?.(Number(part)) ?? g?.getNodeById?.(part);
    if (!node) return null;
    g = node.subgraph;
  }
  return node;
}

/** The same node in a serialized workflow (root nodes, then subgraph definitions). */
export function storedNode(state, executionId) {
  let nodes = state?.nodes;
  let node = null;
  const defs = state?.definitions?.subgraphs ?? [];
  for (const part of String(executionId).split(":")) {
    node = nodes?.find((n) => String(n.id) === part);
    if (!node) return null;
    nodes = defs.find((d) => d.id === node.type)?.nodes;
  }
  return node;
}

/**
 * Set ``field`` of the node ``executionId`` of the workflow that queued ``promptId`` to
 * ``next(previous value)``. Returns the live node when it is on screen (already redrawn), else null.
 * ``final``: the run's last word on this field (not a live update): the open graph is persisted.
 */
export function deliver(executionId, promptId, field, next,
                        { isOurs = (type) => type?.startsWith("LoraLab"), final = true } = {}) {
  const store = workflows();
  const active = store?.activeWorkflow ?? null;
  const target = (promptId && byPrompt.get(promptId)) || active;
  const onScreen = !store || target === active;
  const node = onScreen ? liveNode(app.graph, executionId) : null;
  const saved = storedNode(target?.changeTracker?.activeState, executionId);
  const live = node && isOurs(node.type) ? node : null;
  const kept = saved && isOurs(saved.type) ? saved : null;
  if (!live && !kept) return null;
  const value = next(live ? resultOf(live, field) : kept.properties?.[PROP]?.[field]);
  if (live) {
    live.properties ??= {};
    live.properties[PROP] = { ...(live.properties[PROP] ?? {}), [field]: value };
    for (const render of renderers.get(field) ?? []) render(live, value);
    live.setDirtyCanvas?.(true, true);
  }
  if (kept) {
    kept.properties ??= {};
    kept.properties[PROP] = { ...(kept.properties[PROP] ?? {}), [field]: structuredClone(value) };
  }
  if (live && final) persistSoon();
  return live;
}

let persistTimer = null;

/** Persist the open workflow soon (a run's final results arrived); see the header comment. */
export function persistSoon() {
  clearTimeout(persistTimer);
  persistTimer = setTimeout(() => {
    if (app.extensionManager?.queueSettings?.mode === "change") return;
    if (app.ui?.autoQueueEnabled && app.ui?.autoQueueMode === "change") return; // the legacy menu's
    const active = workflows()?.activeWorkflow;
    api.dispatchCustomEvent("graphChanged", active?.changeTracker?.activeState ?? app.graph.serialize());
  }, 300);
}

/** The prompt being executed now (the server runs one at a time). */
export function runningPrompt() {
  return currentPrompt;
}

let installed = false;
export function install() {
  if (installed) return;
  installed = true;
  const queuePrompt = api.queuePrompt;
  api.queuePrompt = async function (...args) {
    const queuedFrom = workflows()?.activeWorkflow ?? null;
    const res = await queuePrompt.apply(this, args);
    if (res?.prompt_id && queuedFrom) {
      byPrompt.set(res.prompt_id, queuedFrom);
      if (byPrompt.size > 500) byPrompt.delete(byPrompt.keys().next().value); // oldest first
    }
    return res;
  };
  api.addEventListener("execution_start", ({ detail }) => {
    currentPrompt = detail?.prompt_id ?? null;
  });
}
