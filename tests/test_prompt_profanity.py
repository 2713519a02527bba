"""Issue 16, round two: "fuck" as an insult or an intensifier is not a sex act (RTP-LX's
non-sexual rows in en, da and nl were blocked for it); its sexual uses still are explicit, and
the word alone still makes a minor term minor_sexual."""
from __future__ import annotations

import pytest

from consent_guard.prompts.lexicon import Lexicon
from consent_guard.prompts.normalise import normalise
from consent_guard.verdict import Decision
from prompt_checks import check


def categories(text):
    return {h.category for h in Lexicon.load().find(normalise(text))}



@pytest.mark.parametrize("text", [
    "fuck the referee and his stupid whistle",
    "this fucking traffic again",
    "fuck det, vi tager bussen",        # da: "fuck it, we take the bus"
    "wat een fucking gedoe",            # nl: "what a fucking hassle"
    "he is a motherfucking genius",
])
def test_profanity_is_not_explicit(text):
    assert "explicit" not in categories(text), text
    assert check(text).decision is Decision.ALLOW, text


@pytest.mark.parametrize("text", [
    "a couple fucking on the bed",
    "a woman getting fucked",
    "he is fucking her from behind",
    "fuck a blonde woman",
    "they want to fuck",
])
def test_sexual_uses_are_explicit(text):
    assert "explicit" in categories(text), text
    assert check(text).decision is Decision.BLOCK, text


def test_the_word_alone_with_a_minor_term_is_minor_sexual():
    v = check("schoolgirl, fuck")
    assert v.decision is Decision.BLOCK
    assert "minor_sexual" in {r.category for r in v.reasons}
