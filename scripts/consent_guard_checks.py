"""Consent Guard's checks in AUTOMATIC1111's WebUI and Forge: one AlwaysVisible script (every
txt2img / img2img job), one Extras script, and the WebUI callbacks. Only wiring: what each hook
does is in a1111_adapter/checks.py, and the engine decides (consent_guard/engine.py).

Signatures followed: Forge dfdcbab6 modules/scripts.py (Script l.103-348, AlwaysVisible l.14,
PostprocessImageArgs(image, index) l.32; A1111: PostprocessImageArgs(image)),
modules/scripts_postprocessing.py (ScriptPostprocessing: name, order, ui(), process(pp, **args)),
modules/script_callbacks.py (on_before_image_saved l.499, on_app_started l.456).
"""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(_root) if _root not in sys.path else None

from a1111_adapter import check_imports  # noqa: E402

check_imports()

from modules import script_callbacks, scripts, scripts_postprocessing  # noqa: E402

from a1111_adapter import checks  # noqa: E402


class ConsentGuardChecks(scripts.Script):
    """Runs for every job, with no controls: the policy decides, not a checkbox."""

    def title(self):
        return "Consent Guard"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def before_process(self, p, *args):
        checks.before_job(p)

    def process(self, p, *args):
        checks.after_prompts(p)

    def before_process_batch(self, p, *args, **kwargs):
        checks.before_batch(p)

    def process_batch(self, p, *args, **kwargs):
        checks.before_sampling(p)

    def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only
        checks.before_sampling(p)

    def postprocess_image(self, p, pp, *args):
        checks.postprocess_image(p, pp)

    def postprocess_image_after_composite(self, p, pp, *args):  # Forge, A1111 >= 1.10
        checks.postprocess_image(p, pp)

    def postprocess(self, p, processed, *args):
        checks.postprocess(p, processed)


class ConsentGuardExtras(scripts_postprocessing.ScriptPostprocessing):
    """Extras: the picture it shows, saves and returns (the API never saves) is checked last."""

    name = checks.EXTRAS_SCRIPT_NAME
    order = 1_000_000  # after every other Extras step

    def ui(self):
        return {}

    def process(self, pp, **args):
        checks.gate_extras(pp)


def _on_app_started(demo, app):
    try:  # the first prompt check after start should not wait for the encoder (issue 17)
        from consent_guard.prompts.classifier import start_loading
        start_loading()
    except Exception:  # the first check loads it again and fails closed with the message
        pass
    try:
        checks.install_api_guard(app)
    except Exception as exc:  # shown in the tab's status; the jobs are still stopped
        checks.bridge.HOOKS["api guard (/sdapi/v1/txt2img, img2img)"] = f"not installed: {exc}"
        raise
    checks.apply_enforce_settings()


script_callbacks.on_before_image_saved(checks.before_image_saved, name="consent_guard")
script_callbacks.on_app_started(_on_app_started, name="consent_guard")
checks.bridge.HOOKS.update({"script (prompts, sources, outputs)": "installed",
                            "Extras gate": "installed", "save gate": "installed"})
checks.apply_enforce_settings()
