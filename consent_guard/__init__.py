"""Consent Guard engine: decides whether an image may be saved. Imports no UI module."""
from .engine import Engine
from .models import ModelError
from .policy import Policy, PolicyError, load_policy
from .verdict import Decision, Reason, Verdict

__version__ = "0.1.0"
__all__ = ["Engine", "ModelError", "Policy", "PolicyError", "load_policy", "Decision", "Reason",
           "Verdict", "__version__"]
