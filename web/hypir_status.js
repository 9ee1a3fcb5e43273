// Shows the status line of HYPIR Restore / HYPIR Advanced Restoration on the node after each run
// (FlashAttention state, backend per module, size, tiles, time). Display only: never sent with the prompt.
import { app } from "../../scripts/app.js";
import { migrateWidgetValues, REMOVED_WIDGETS } from "./hypir_migrate.js";

const NODES = ["HYPIRRestore", "HYPIRAdvancedRestoration"];

app.registerExtension({
  name: "HYPIR.StatusText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "hypir_status");
      if (!widget) {
        widget = this.addWidget("text", "hypir_status", text, () => {}, { serialize: false });
        widget.serialize = false;
        widget.computeSize = () => [this.size[0], 24];
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});

// Workflows saved before a HYPIR input was removed: their widget values are moved back into place on loading.
app.registerExtension({
  name: "HYPIR.WidgetMigration",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData.name in REMOVED_WIDGETS)) return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const widgets = this.widgets ?? [];
      const values = migrateWidgetValues(nodeData.name, widgets.map((w) => w.name), info?.widgets_values);
      if (values) {
        widgets.forEach((widget, i) => { widget.value = values[i]; });
        info.widgets_values = values;
        console.info(`[HYPIR] ${nodeData.name}: a workflow saved with removed inputs was updated`);
      }
      return onConfigure?.apply(this, arguments);
    };
  },
});
