"""The refusal messages (consent_guard/messages.py) and the admin's line in the policy."""
import re

import pytest

from consent_guard import messages
from consent_guard.policy import DEFAULT_POLICY_TOML, PolicyError, policy_from_dict
from consent_guard.verdict import Decision, Reason, Verdict


def test_every_kind_has_a_sentence_and_a_next_step_in_every_language():
    for lang in messages.LANGUAGES:
        assert set(messages.CATALOGUE[lang]) == set(messages.KINDS), lang
        for kind, (said, next_step) in messages.CATALOGUE[lang].items():
            assert said.strip() and next_step.strip(), (lang, kind)
            assert said != next_step
            # plain words: no codes such as sexual_explicit, no {placeholders}
            assert not re.search(r"[a-z]+_[a-z]+|[{}]", said + next_step), (lang, kind)
        assert set(messages.PLACEHOLDER[lang]) == set(messages.PLACEHOLDER["en"])


def test_translations_are_not_english_copies():
    for kind in messages.KINDS:
        en = messages.CATALOGUE["en"][kind]
        assert messages.CATALOGUE["id"][kind] != en and messages.CATALOGUE["ko"][kind] != en
        assert re.search("[\uac00-\ud7a3]", "".join(messages.CATALOGUE["ko"][kind]))


@pytest.mark.parametrize("locale, lang", [("ko", "ko"), ("ko-KR", "ko"), ("id_ID", "id"),
                                          ("in", "id"), ("en-GB", "en"), ("fr", "en"),
                                          ("", "en"), (None, "en"), (3, "en")])
def test_language_of_a_locale(locale, lang):
    assert messages.language(locale) == lang


def test_message_text_has_the_admins_line_last():
    said = messages.message(messages.INPUT_PROTECTED, "ko", contact=" 선생님께 말씀하세요. ")
    assert said.language == "ko" and said.contact == "선생님께 말씀하세요."
    assert said.text() == " ".join(messages.CATALOGUE["ko"][messages.INPUT_PROTECTED]) + \
        " 선생님께 말씀하세요."
    assert messages.message("no such kind").kind == messages.CHECK_FAILED


def test_payload_carries_every_language_for_the_browser():
    data = messages.payload(messages.OUTPUT_MINOR, "Ask Ms Rivera.", "id", node="9",
                            missing=None)
    assert data["kind"] == "output_minor" and data["language"] == "id"
    assert data["message"] == messages.CATALOGUE["id"]["output_minor"][0]
    assert data["contact"] == "Ask Ms Rivera." and data["node"] == "9"
    assert "missing" not in data
    assert {lang: t["message"] for lang, t in data["texts"].items()} == {
        lang: messages.CATALOGUE[lang]["output_minor"][0] for lang in messages.LANGUAGES}


def reason(category, action=Decision.BLOCK, check="x", label="id_0123abcd"):
    return Reason(check, label, 1.0, category, action)


@pytest.mark.parametrize("categories, stage, kind", [
    (["sexual_explicit"], "prompt", "prompt_explicit"),
    (["undress_request"], "prompt", "prompt_explicit"),
    (["protected_identity"], "prompt", "prompt_explicit"),  # reads like any other (issue 12)
    (["protected_identity", "sexual_explicit"], "prompt", "prompt_explicit"),  # never tells
    (["minor_sexual", "protected_identity"], "prompt", "prompt_minor"),
    (["protected_identity"], "input", "input_protected"),
    (["sexual"], "input", "input_explicit"),
    (["protected_identity", "nudity"], "input", "input_explicit"),
    (["sexual"], "output", "output_explicit"),
    (["protected_identity"], "output", "output_protected"),
    (["minor_explicit", "sexual"], "output", "output_minor"),
])
def test_kind_for_a_verdict(categories, stage, kind):
    verdict = Verdict(Decision.BLOCK, tuple(reason(c) for c in categories))
    assert messages.kind_for(verdict, stage) == kind


def test_an_allowed_finding_is_not_the_reason():
    """A suggestive word the policy allows, with a protected name that blocks: the block is
    for the person, and the allowed finding must not turn it into "sexual content"."""
    verdict = Verdict(Decision.BLOCK, (reason("sexual_suggestive", Decision.ALLOW),
                                       reason("protected_identity")))
    assert messages.kind_for(verdict, "output") == "output_protected"
    # a prompt never says it named someone enrolled: it reads like a sexual prompt's refusal
    assert messages.kind_for(verdict, "prompt") == "prompt_explicit"


def test_a_failed_check_is_its_own_kind():
    assert messages.kind_for(Verdict.failed("model missing"), "output") == "check_failed"
    with pytest.raises(ValueError):
        messages.kind_for(Verdict(Decision.BLOCK), "somewhere")


def test_placeholder_words():
    assert messages.placeholder_words("output_explicit", "en") == ("Blocked", "by Consent Guard",
                                                                   "sexual content")
    assert messages.placeholder_words("output_protected", "id")[0] == "Diblokir"
    assert messages.placeholder_words(None, "ko")[2] == ""


# -- the policy key ----------------------------------------------------------------------------

def test_contact_default_is_empty_and_documented():
    assert policy_from_dict({}).contact == ""
    assert "[messages]" in DEFAULT_POLICY_TOML and 'contact = ""' in DEFAULT_POLICY_TOML


def test_contact_is_read_and_trimmed():
    policy = policy_from_dict({"messages": {"contact": "  Talk to your teacher. "}})
    assert policy.contact == "Talk to your teacher."


@pytest.mark.parametrize("bad, why", [(3, "must be text"), ("a\nb", "one line"),
                                      ("x" * 201, "at most 200")])
def test_contact_is_validated(bad, why):
    with pytest.raises(PolicyError, match=why):
        policy_from_dict({"messages": {"contact": bad}})


def test_unknown_messages_key_is_named():
    with pytest.raises(PolicyError, match="unknown key 'contacts' in \\[messages\\].*'contact'"):
        policy_from_dict({"messages": {"contacts": "x"}})
