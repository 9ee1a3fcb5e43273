// Shows the status line of HYPIR Restore / HYPIR Advanced Restoration on the node after each run
// (FlashAttention state, backend per module, size, tiles, time). Display only: never sent with the prompt.
import { app } from "../../scripts/app.js";

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
