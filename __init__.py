"""Consent Guard for ComfyUI: this folder is the custom node (ComfyUI imports this file)."""
# ComfyUI serves this folder as /extensions/<this folder's name>/ (nodes.py, load_custom_node:
# EXTENSION_WEB_DIRS) and the front end loads every .js file in it.
WEB_DIRECTORY = "./web"

try:
    import folder_paths  # noqa: F401  (ComfyUI's module: present whenever ComfyUI loads us)
except ImportError:  # imported outside ComfyUI (pytest collects this folder): no nodes to offer
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
