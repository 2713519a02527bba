"""Consent Guard for ComfyUI: this folder is the custom node (ComfyUI imports this file)."""
import importlib.util

if importlib.util.find_spec("folder_paths") is not None:  # inside ComfyUI
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported outside ComfyUI (pytest collects this folder as a package): no nodes to offer
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
