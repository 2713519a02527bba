"""ComfyUI adapter: nodes that turn the engine's verdicts into UI actions, and the HTTP routes
of the front end's enrol dialog (registered only when a ComfyUI server is running)."""
import logging

from .image_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

try:  # the nodes must load even if the dialog's routes cannot be added
    from .routes import register_with_comfyui

    register_with_comfyui()
except Exception:  # pragma: no cover - register_with_comfyui catches its own errors
    logging.getLogger("consent_guard").exception("Consent Guard: enrolment routes not added")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
