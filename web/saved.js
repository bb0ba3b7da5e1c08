// After Save LoRA (LoRA Lab) writes a file, every loader's lora_name list (ours, core's, any
// pack's) shows it at once: the same refresh as pressing R (app.refreshComboInNodes re-reads the
// node definitions, so nodes added later list it too), plus our own name cache.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { forgetLoraNames } from "./lib/lora_names.js";

app.registerExtension({
  name: "LoraLab.SavedLoRAs",
  setup() {
    api.addEventListener("executed", async ({ detail }) => {
      if (!detail?.output?.loralab_saved?.length) return;
      forgetLoraNames();
      try {
        await app.refreshComboInNodes();
      } catch (e) {
        console.warn("LoRA Lab: could not refresh the LoRA lists after saving", e);
      }
    });
  },
});
