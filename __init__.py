"""ComfyUI entry point of the HYPIR node pack: wires in the node layer, nothing else.

Imported by ComfyUI as a package (the folder under custom_nodes/); the engine is the `hypir` subpackage,
reached by relative imports, so no generic module name is put on sys.path.
"""

if __package__:  # a package import (ComfyUI). pytest also imports this file, as a plain module, when it
    # collects the tests of a checkout whose folder name is no Python identifier; there is nothing to wire.
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./web"  # shows the restore nodes' status text on the node

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
