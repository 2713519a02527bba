"""ComfyUI adapter: nodes that turn the engine's verdicts into UI actions, the on-prompt
handler that refuses a blocked prompt before it is queued, enforce mode's hooks on ComfyUI's
own output paths, and the HTTP routes of the front end (handler, hooks and routes are added
only when a ComfyUI server is running)."""
import logging

from . import image_nodes, prompt_guard

log = logging.getLogger("consent_guard")

NODE_CLASS_MAPPINGS = {**image_nodes.NODE_CLASS_MAPPINGS, **prompt_guard.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**image_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **prompt_guard.NODE_DISPLAY_NAME_MAPPINGS}

handler_added = False
try:  # the nodes must load even if the prompt handler cannot be added
    prompt_guard.register_prompt_handler()
    handler_added = prompt_guard.handler_registered()
except Exception:  # pragma: no cover - a server that is not ComfyUI's
    log.exception("Consent Guard: prompt handler not added")

try:  # enforce mode: every output path of ComfyUI; arms only when every hook is in place
    from . import enforce

    if prompt_guard.server_running():
        enforce.install(handler_added)
except Exception:  # pragma: no cover - enforce.install catches its own errors
    log.exception("Consent Guard: enforce hooks not installed")

try:  # the nodes must load even if the dialog's routes cannot be added
    from .routes import register_with_comfyui

    register_with_comfyui()
except Exception:  # pragma: no cover - register_with_comfyui catches its own errors
    log.exception("Consent Guard: routes not added")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
