// Old workflows keep loading: widget values saved by earlier versions of LoRA Lab's nodes are
// translated when a node is configured from a workflow (widgets_values are positional, so a
// renamed input receives the old input's value).
//   loaders: the boolean `bypass` became `mode` ("merge weights" / "forward pass")
// Old API prompts with "bypass": true need nothing here: the server still accepts that input.
import { app } from "../../scripts/app.js";

const LOADERS = ["LoraLabLoadLoRA", "LoraLabLoraLoaderModelOnly", "LoraLabLoraModelLoader"];
const MIGRATIONS = Object.fromEntries(
  LOADERS.map((type) => [type, { mode: (v) => (typeof v === "boolean" ? (v ? "forward pass" : "merge weights") : v) }]),
);

export function migrateNode(node) {
  const rules = MIGRATIONS[node.comfyClass ?? node.type];
  if (!rules) return;
  for (const widget of node.widgets ?? []) {
    const rule = rules[widget.name];
    if (rule) widget.value = rule(widget.value);
  }
}

app.registerExtension({
  name: "LoraLab.Migrate",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!MIGRATIONS[nodeData.name]) return;
    // before the original: anything that reads the widgets on configure sees migrated values
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      migrateNode(this);
      return onConfigure?.apply(this, args);
    };
  },
});
