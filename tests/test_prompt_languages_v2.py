"""Issue 16: word lists for Arabic, Hindi, Hungarian, Ukrainian, Dutch and Danish, and what
their scripts need from the normaliser and the matcher (Arabic vowel marks, tatweel and
prefixes; Devanagari vowel signs after a wildcard; collisions with other languages)."""
from __future__ import annotations

import pytest

from consent_guard.prompts.check import check_prompt
from consent_guard.prompts.lexicon import Lexicon
from consent_guard.prompts.normalise import normalise
from consent_guard.verdict import Decision


def categories(text):
    return {h.category for h in Lexicon.load().find(normalise(text))}


def check(text):
    return check_prompt(text, lexicon=Lexicon.load(), classifier=None,
                        explicit_action=Decision.BLOCK, suggestive_action=Decision.ALLOW)


def test_new_language_files_load():
    assert {"ar", "hi", "hu", "uk", "nl", "da"} <= set(Lexicon.load().langs)


def test_arabic_marks_tatweel_and_alef_forms_are_read_away():
    assert normalise("عَارِيَة").text == "عارية"
    assert normalise("عـــارية").text == "عارية"
    assert normalise("أنثى").text == normalise("انثى").text


def test_arabic_and_devanagari_punctuation_are_phrase_breaks():
    assert normalise("صورة، منظر").text == "صورة , منظر"
    assert normalise("फोटो। लड़की").text == "फोटो , लड़की"


@pytest.mark.parametrize("text", [
    "صورة امرأة عارية",          # naked woman
    "صورة امرأة عَارِيَة",        # with vowel marks
    "فيلم بالسكس",               # with the prefix "with the"
    "صور اباحية",                # porn pictures
    "नंगी औरत की फोटो",          # naked woman
    "meztelen nő a strandon",     # hu: naked woman
    "гола жінка на пляжі",        # uk: naked woman
    "naakte vrouw op het strand",  # nl
    "nøgne kvinder på stranden",   # da
])
def test_explicit_words_of_the_new_lists(text):
    assert "explicit" in categories(text), text
    assert check(text).decision is Decision.BLOCK


def test_devanagari_wildcard_reaches_past_a_vowel_sign():
    # "चोद*" must match a form that ends in a vowel sign (a combining mark, not \w)
    assert "explicit" in categories("चोदू")


@pytest.mark.parametrize("text", [
    "a glass of piña colada",          # hu "pina" is Spanish piña without its tilde
    "a kind farmer next to a red barn",  # nl "kind", da "barn"
    "er der nogen hjemme",             # da "nøgen" folds onto "nogen" (anyone)
    "basszusgitár a színpadon",        # hu "basz-" inside "bass guitar"
    "rozkošná kurta bunda",            # hu "kúrta" is "kurta" (short)
    "صورة العائلة في الحديقة",          # Arabic: a family in the garden
    "بطاقة الجنسية",                    # Arabic "nationality" (جنسية), not sexual
    "लाल साइकिल और बच्चों की किताब",       # Hindi: a red bicycle and a children's book
    "школярка читає книгу",             # uk: a schoolgirl reads a book
])
def test_benign_prompts_are_not_explicit(text):
    assert not categories(text) & {"explicit", "undress"}, text
    assert check(text).decision is Decision.ALLOW, text


def test_insults_built_on_sexual_words_are_not_explicit():
    # RTP-LX annotators read these as insults: they are left out (see the file headers)
    for text in ("तू चूतिया है", "хуйня якась"):
        assert "explicit" not in categories(text), text


def test_minor_terms_of_the_new_lists_make_sexual_words_minor_sexual():
    for text in ("صورة طفلة عارية", "नंगी बच्ची", "meztelen kislány"):
        v = check(text)
        assert v.decision is Decision.BLOCK
        assert "minor_sexual" in {r.category for r in v.reasons}, text


def test_korean_round_two_forms():
    # a particle before the verb, a size adjective before the noun, 따먹다 with a woman
    for text in ("좆이나 빨아", "큰 자지", "그 여자를 따먹어"):
        assert "explicit" in categories(text), text
    # 따먹다 alone is picking fruit; 자지 않다 is "not sleep"
    for text in ("사과를 따먹다", "큰 소리에도 자지 않았다"):
        assert "explicit" not in categories(text), text
