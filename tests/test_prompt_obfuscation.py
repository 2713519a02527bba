"""Issue 16: obfuscated spellings that must still be caught, and benign look-alikes that must
pass, at the lexicon level (no classifier, no data files: this runs in a user's clone).

Every prompt here was written for this file (none is copied from an evaluation set). The
obfuscated list must be caught at >= 95% (the issue's target) and is checked one by one too, so
a regression names the prompt. The look-alikes are the collisions seen on unseen data:
Indonesian "penista" (blasphemer), Thai "รักร่วมเพศ" (homosexuality), "annus", bare trees.
"""
from __future__ import annotations

import pytest

from consent_guard.prompts.lexicon import Lexicon
from consent_guard.prompts.normalise import normalise

BLOCKING = {"explicit", "undress"}


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


def categories(lexicon: Lexicon, text: str) -> set:
    return {h.category for h in lexicon.find(normalise(text))}


# (prompt, how it is disguised): each must give an explicit or undress hit
OBFUSCATED = [
    ("a n u d e woman on a bed", "spaced word after an article"),
    ("a  n u d e  woman", "spaced word, double spaces around it"),
    ("i want n u d e photos", "spaced word after the pronoun i"),
    ("n u d e, s e x y woman", "two spaced words joined by a comma"),
    ("n.u.d.e s.e.x.y woman", "two dotted words side by side"),
    ("n-u-d-e, p-o-r-n", "two hyphenated words and a comma"),
    ("portrait, n u d e", "spaced word after a comma"),
    ("p o r n o g r a p h y", "spaced long word"),
    ("nuddde woman", "tripled inner letter"),
    ("nnuuddee woman", "every letter doubled"),
    ("n00dz of a woman", "digits and slang ending"),
    ("nud3 woman", "digit for e"),
    ("p0rnn video", "digit and doubled letter"),
    ("s3xx scene", "digit and doubled final letter"),
    ("pr0n clip", "swapped letters with a digit"),
    ("b00bies out", "doubled digits"),
    ("t1ts out on the beach", "digit for i in a phrase"),
    ("n.a.k.e.d girl", "dotted word before a noun"),
    ("n_a_k_e_d woman", "underscored word"),
    ("naaaked woman", "stretched vowel"),
    ("nekkid woman in the shower", "slang spelling"),
    ("n*ked woman", "asterisk for a letter"),
    ("s*x scene in bed", "asterisk for a vowel"),
    ("f*cking in bed", "asterisk in a verb"),
    ("busty model with her top off on the beach", "euphemism: top off"),
    ("a man with his member out", "euphemism: member out"),
    ("a woman with no clothes on, standing in a field", "euphemism: no clothes on"),
    ("woman wearing absolutely nothing", "euphemism: wearing nothing"),
    ("a model without any clothing, studio photo", "euphemism: without any clothing"),
    ("man in the buff at the lake", "euphemism: in the buff"),
    ("woman au naturel on the sofa", "euphemism: au naturel"),
    ("girlfriend not wearing anything in bed", "euphemism: not wearing anything"),
    ("a woman without a stitch of clothing", "euphemism: without a stitch"),
    ("her pants down in the bedroom", "euphemism: pants down"),
    ("woman with her bra off", "euphemism: bra off"),
    ("a man exposing himself in the park", "euphemism: exposing himself"),
    ("unclad woman reclining", "euphemism: unclad"),
    ("starkers on the beach", "slang: starkers"),
    ("wanita bugil di kamar", "Indonesian"),
    ("perempuan tanpa busana", "Indonesian euphemism"),
    ("mujer sin ropa en la cama", "Spanish euphemism"),
    ("femme sans vêtements sur le lit", "French euphemism"),
    ("frau ohne kleidung", "German euphemism"),
    ("mulher sem roupa", "Portuguese euphemism"),
    ("옷을 벗은 여자", "Korean euphemism"),
    ("一丝不挂的女人", "Chinese euphemism"),
    ("ผู้หญิงเปลือยกาย", "Thai"),
    ("phụ nữ khỏa thân", "Vietnamese"),
    ("babaeng walang damit", "Tagalog euphemism"),
    ("女性 全裸", "Japanese"),
]

# benign prompts that contain, or normalise onto, a listed word
LOOK_ALIKES = [
    "penista agama harus dihukum",               # id: blasphemer
    "kasus penistaan agama di pengadilan",       # id: blasphemy
    "ภาพยนตร์เกี่ยวกับคนรักร่วมเพศ",                # th: homosexuality
    "an annus horribilis for the company",
    "annus mirabilis, oil painting",
    "naked landscape in winter, bare hills",
    "naked trees against a grey sky",
    "a naked light bulb hanging from the ceiling",
    "the naked truth, editorial illustration",
    "top off the tank with fuel",
    "to top it off, a cherry on the cake",
    "the club member out on the golf course",
    "a pile of clothes on the bed",
    "a clothes shop with no customers",
    "a person seeks shelter from the rain",
    "a health teacher giving a sex education lesson with diagrams of the heart",
    "poster for a sexual health clinic, teenagers welcome",
    "a women in the bath tub reading, wearing a bathrobe",
    "a bare-bones office with white walls",
    "a buff bodybuilder lifting weights",
    "a n e w house, architecture photo",
    "a b c blocks for a toddler",
]


def test_obfuscated_caught_at_least_95_percent(lexicon):
    caught = [t for t, _ in OBFUSCATED if categories(lexicon, t) & BLOCKING]
    assert len(caught) >= 0.95 * len(OBFUSCATED), \
        sorted(set(t for t, _ in OBFUSCATED) - set(caught))


@pytest.mark.parametrize("text,how", OBFUSCATED)
def test_each_obfuscated_prompt_is_caught(lexicon, text, how):
    assert categories(lexicon, text) & BLOCKING, how


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_pass(lexicon, text):
    assert not (categories(lexicon, text) & BLOCKING)


@pytest.mark.parametrize("text,want", [
    ("n u d e, s e x y woman", "nude , sexy woman"),
    ("a n u d e woman", "a nude woman"),
    ("portrait, n u d e", "portrait , nude"),
    ("n.u.d.e s.e.x.y", "nude sexy"),
    ("a b c blocks", "abc blocks"),
])
def test_spaced_letters_are_not_joined_across_words(text, want):
    assert normalise(text).text == want or want in normalise(text).alternates
