"""Consent Guard engine: decides whether an image may be saved. Imports no UI module.

The names below are imported on first use (PEP 562 module __getattr__), so that importing a
submodule (the command line's argparse front, `consent_guard.home`) does not pull in numpy,
Pillow and the engine: `consent-guard --help` starts in about 0.1 s instead of 0.35 s."""
__version__ = "0.1.0"
__all__ = ["Engine", "ModelError", "Policy", "PolicyError", "load_policy", "Decision", "Reason",
           "Verdict", "__version__"]
_WHERE = {"Engine": ".engine", "ModelError": ".models", "Policy": ".policy",
          "PolicyError": ".policy", "load_policy": ".policy", "Decision": ".verdict",
          "Reason": ".verdict", "Verdict": ".verdict"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
