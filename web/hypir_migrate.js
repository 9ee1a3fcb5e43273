// Saved workflows hold a node's widget values by position. When an input of a HYPIR node is removed, a workflow
// saved before would hand each later value to the widget before it (a removed switch's true/false would become
// the VRAM budget). migrateWidgetValues maps saved values onto today's widgets; null means nothing to change.
// Values beyond today's widgets (older frontends also saved the display-only status widget) are dropped.
// Pure, so that tests/test_web_migration.py runs it under Node.

// Per node type: the removed widgets, each with the widget it followed and the type of value it held.
export const REMOVED_WIDGETS = {
  HYPIRModelLoader: [{ name: "torch_compile", after: "cuda_graphs", type: "boolean" }],
  HYPIRAdvancedRestoration: [{ name: "torch_compile", after: "cuda_graphs", type: "boolean" }],
};

export function migrateWidgetValues(nodeType, widgetNames, values) {
  const removed = REMOVED_WIDGETS[nodeType];
  if (!removed || !Array.isArray(values) || values.length < widgetNames.length + removed.length) return null;
  const migrated = values.slice();
  for (const { after, type } of removed) {
    const i = widgetNames.indexOf(after);
    if (i < 0 || typeof migrated[i + 1] !== type) return null;  // not the layout it was saved with: leave it
    migrated.splice(i + 1, 1);
  }
  return migrated.slice(0, widgetNames.length);
}
