"""The prompt tests' one way to check a prompt: check_prompt at the default policy (explicit
blocked, suggestive allowed), with the shipped word lists and an optional classifier (a test
double, or None for the word lists alone)."""
from __future__ import annotations

from consent_guard.prompts.check import check_prompt
from consent_guard.prompts.lexicon import Lexicon
from consent_guard.verdict import Decision


def check(text, classifier=None):
    return check_prompt(text, lexicon=Lexicon.load(), classifier=classifier,
                        explicit_action=Decision.BLOCK, suggestive_action=Decision.ALLOW)
