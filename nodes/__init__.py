"""ComfyUI adapter: nodes that turn the engine's verdicts into UI actions, the on-prompt
handler that refuses a blocked prompt before it is queued, and the HTTP routes of the front
end's enrol dialog (handler and routes registered only when a ComfyUI server is running)."""
import logging

from . import image_nodes, prompt_guard

NODE_CLASS_MAPPINGS = {**image_nodes.NODE_CLASS_MAPPINGS, **prompt_guard.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**image_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **prompt_guard.NODE_DISPLAY_NAME_MAPPINGS}

try:  # the nodes must load even if the prompt handler cannot be added
    prompt_guard.register_prompt_handler()
except Exception:  # pragma: no cover - a server that is not ComfyUI's
    logging.getLogger("consent_guard").exception("Consent Guard: prompt handler not added")

try:  # the nodes must load even if the dialog's routes cannot be added
    from .routes import register_with_comfyui

    register_with_comfyui()
except Exception:  # pragma: no cover - register_with_comfyui catches its own errors
    logging.getLogger("consent_guard").exception("Consent Guard: enrolment routes not added")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
