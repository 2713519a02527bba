"""What a person is told when Consent Guard refuses something: a short sentence, what to do
next, in their UI language (English, Indonesian, Korean; English for any other), and the
admin's own line from the policy (`[messages] contact`, e.g. "Talk to your teacher.").

Every refusal has a *kind* (KINDS). The adapters pick the kind from a verdict (kind_for) and
hand the message on; they never write their own wording, so the words live in one place and a
translation is a table here. The messages never name a protected person, a registry id, a
label or a score: the audit log keeps those for the admin.

Which reason is shown when a verdict has several: minors first, then explicit content, then a
protected person. A prompt that is refused for being explicit anyway is never told that it
also named someone enrolled (that would tell who is enrolled, see nodes/prompt_guard.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

DEFAULT_LANGUAGE = "en"
LANGUAGES = ("en", "id", "ko")

PROMPT_EXPLICIT = "prompt_explicit"
PROMPT_MINOR = "prompt_minor"
INPUT_PROTECTED = "input_protected"
INPUT_EXPLICIT = "input_explicit"
OUTPUT_EXPLICIT = "output_explicit"
OUTPUT_PROTECTED = "output_protected"
OUTPUT_MINOR = "output_minor"
CHECK_FAILED = "check_failed"
KINDS = (PROMPT_EXPLICIT, PROMPT_MINOR, INPUT_PROTECTED, INPUT_EXPLICIT,
         OUTPUT_EXPLICIT, OUTPUT_PROTECTED, OUTPUT_MINOR, CHECK_FAILED)

# kind -> (what happened, what to do next), per language. Plain words, no codes, no names.
CATALOGUE: Dict[str, Dict[str, Tuple[str, str]]] = {
    "en": {
        PROMPT_EXPLICIT: ("This prompt asks for sexual content, which is not allowed here.",
                          "Change the prompt and run it again."),
        PROMPT_MINOR: ("This prompt asks for sexual content involving children. That is "
                       "never allowed.",
                       "Nothing was made. No setting can change this."),
        INPUT_PROTECTED: ("This picture shows a protected person, who has asked that their "
                          "photos not be used.",
                          "Use a different picture."),
        INPUT_EXPLICIT: ("This picture has sexual content, so it cannot be used here.",
                         "Use a different picture."),
        OUTPUT_EXPLICIT: ("The picture that was made has sexual content, so it was not saved "
                          "or shown.",
                          "Change the prompt or the settings and try again."),
        OUTPUT_PROTECTED: ("The picture that was made shows a protected person, so it was "
                           "not saved or shown.",
                           "Change the prompt or the source pictures and try again."),
        OUTPUT_MINOR: ("The picture that was made looks sexual and shows someone who may be "
                       "under 18, so it was not saved or shown.",
                       "This is never allowed. Change the prompt."),
        CHECK_FAILED: ("Consent Guard could not run its check, so nothing was made or saved.",
                       "Ask the person who set up this computer to look at the log."),
    },
    "id": {
        PROMPT_EXPLICIT: ("Prompt ini meminta konten seksual, dan itu tidak diizinkan di sini.",
                          "Ubah prompt-nya, lalu jalankan lagi."),
        PROMPT_MINOR: ("Prompt ini meminta konten seksual yang melibatkan anak-anak. Itu "
                       "tidak pernah diizinkan.",
                       "Tidak ada yang dibuat. Aturan ini tidak bisa diubah lewat pengaturan."),
        INPUT_PROTECTED: ("Foto ini menampilkan orang yang dilindungi, yang meminta agar "
                          "fotonya tidak dipakai.",
                          "Pakai gambar lain."),
        INPUT_EXPLICIT: ("Gambar ini berisi konten seksual, jadi tidak bisa dipakai di sini.",
                         "Pakai gambar lain."),
        OUTPUT_EXPLICIT: ("Gambar yang dihasilkan berisi konten seksual, jadi tidak disimpan "
                          "dan tidak ditampilkan.",
                          "Ubah prompt atau pengaturannya, lalu coba lagi."),
        OUTPUT_PROTECTED: ("Gambar yang dihasilkan menampilkan orang yang dilindungi, jadi "
                           "tidak disimpan dan tidak ditampilkan.",
                           "Ubah prompt atau gambar sumbernya, lalu coba lagi."),
        OUTPUT_MINOR: ("Gambar yang dihasilkan tampak seksual dan menampilkan seseorang yang "
                       "mungkin berusia di bawah 18 tahun, jadi tidak disimpan dan tidak "
                       "ditampilkan.",
                       "Ini tidak pernah diizinkan. Ubah prompt-nya."),
        CHECK_FAILED: ("Consent Guard tidak bisa menjalankan pemeriksaannya, jadi tidak ada "
                       "yang dibuat atau disimpan.",
                       "Minta orang yang menyiapkan komputer ini untuk memeriksa log-nya."),
    },
    "ko": {
        PROMPT_EXPLICIT: ("이 프롬프트는 성적인 내용을 요청하고 있어서 여기서는 쓸 수 없어요.",
                          "프롬프트를 고친 뒤 다시 실행해 주세요."),
        PROMPT_MINOR: ("이 프롬프트는 아동이 관련된 성적인 내용을 요청하고 있어요. 이런 요청은 "
                       "절대 허용되지 않아요.",
                       "아무것도 만들지 않았어요. 이 규칙은 설정으로 바꿀 수 없어요."),
        INPUT_PROTECTED: ("이 사진에는 보호 대상인 사람이 있어요. 이 사람은 자기 사진이 "
                          "쓰이지 않기를 요청했어요.",
                          "다른 사진을 사용해 주세요."),
        INPUT_EXPLICIT: ("이 사진에는 성적인 내용이 있어서 여기서는 쓸 수 없어요.",
                         "다른 사진을 사용해 주세요."),
        OUTPUT_EXPLICIT: ("만들어진 이미지에 성적인 내용이 있어서 저장하거나 보여 주지 않았어요.",
                          "프롬프트나 설정을 바꾼 뒤 다시 시도해 주세요."),
        OUTPUT_PROTECTED: ("만들어진 이미지에 보호 대상인 사람이 나와서 저장하거나 보여 주지 "
                           "않았어요.",
                           "프롬프트나 원본 사진을 바꾼 뒤 다시 시도해 주세요."),
        OUTPUT_MINOR: ("만들어진 이미지가 성적인 내용이고 18세 미만일 수 있는 사람이 나와서 "
                       "저장하거나 보여 주지 않았어요.",
                       "이런 이미지는 절대 허용되지 않아요. 프롬프트를 바꿔 주세요."),
        CHECK_FAILED: ("Consent Guard가 검사를 실행하지 못해서 아무것도 만들거나 저장하지 "
                       "않았어요.",
                       "이 컴퓨터를 설정한 사람에게 로그를 확인해 달라고 해 주세요."),
    },
}

# The few words written on a blocked image's placeholder: a title and the reason, short
# enough to be drawn large (consent_guard/censor.py).
PLACEHOLDER: Dict[str, Dict[str, str]] = {
    "en": {"title": "Blocked", "by": "by Consent Guard",
           "explicit": "sexual content", "protected": "a protected person",
           "minor": "may show a minor", "failed": "could not be checked"},
    "id": {"title": "Diblokir", "by": "oleh Consent Guard",
           "explicit": "konten seksual", "protected": "orang yang dilindungi",
           "minor": "mungkin anak di bawah umur", "failed": "tidak bisa diperiksa"},
    "ko": {"title": "차단됨", "by": "Consent Guard",
           "explicit": "성적인 내용", "protected": "보호 대상인 사람",
           "minor": "미성년자일 수 있음", "failed": "검사할 수 없음"},
}
_PLACEHOLDER_REASON = {OUTPUT_EXPLICIT: "explicit", INPUT_EXPLICIT: "explicit",
                       PROMPT_EXPLICIT: "explicit", OUTPUT_PROTECTED: "protected",
                       INPUT_PROTECTED: "protected",
                       OUTPUT_MINOR: "minor", PROMPT_MINOR: "minor", CHECK_FAILED: "failed"}

TITLE = {"en": "Consent Guard", "id": "Consent Guard", "ko": "Consent Guard"}


def language(locale: Optional[str]) -> str:
    """The catalogue language for a UI locale ("ko", "ko-KR", "id_ID", "in"): its first part
    when we have it, else English."""
    if not isinstance(locale, str) or not locale.strip():
        return DEFAULT_LANGUAGE
    first = locale.strip().replace("_", "-").split("-")[0].lower()
    first = {"in": "id"}.get(first, first)  # Java's old code for Indonesian
    return first if first in CATALOGUE else DEFAULT_LANGUAGE


@dataclass(frozen=True)
class Message:
    """One refusal as shown: kind, language, sentence, what to do next, the admin's line."""
    kind: str
    language: str
    message: str
    next: str
    contact: str = ""

    def text(self) -> str:
        """All of it as one paragraph: for logs seen by the user, API clients, dialogs."""
        return " ".join(p for p in (self.message, self.next, self.contact) if p)


def message(kind: str, locale: Optional[str] = None, contact: str = "") -> Message:
    """The message for a refusal kind (an unknown kind reads as a failed check)."""
    lang = language(locale)
    kind = kind if kind in KINDS else CHECK_FAILED
    said, next_step = CATALOGUE[lang][kind]
    return Message(kind, lang, said, next_step, (contact or "").strip())


def payload(kind: str, contact: str = "", locale: Optional[str] = None, **extra) -> dict:
    """What the server sends the front end (web/js/refusals.js) and API clients: the English
    (or `locale`) message, and every language's, so the browser picks its own UI language."""
    chosen = message(kind, locale, contact)
    data = {"kind": chosen.kind, "language": chosen.language, "message": chosen.message,
            "next": chosen.next, "contact": chosen.contact, "title": TITLE[chosen.language],
            "texts": {lang: {"message": CATALOGUE[lang][chosen.kind][0],
                             "next": CATALOGUE[lang][chosen.kind][1], "title": TITLE[lang]}
                      for lang in LANGUAGES}}
    data.update({k: v for k, v in extra.items() if v is not None})
    return data


def placeholder_words(kind: Optional[str], locale: Optional[str] = None) -> Tuple[str, str, str]:
    """(title, by-line, reason) for a placeholder image, in the locale's language."""
    words = PLACEHOLDER[language(locale)]
    reason = _PLACEHOLDER_REASON.get(kind or "")
    return words["title"], words["by"], words[reason] if reason else ""


# -- from a verdict to a kind ------------------------------------------------------------------

MINOR_CATEGORIES = ("minor_explicit", "minor_sexual")
PROTECTED_CATEGORIES = ("protected_identity",)
STAGES = ("prompt", "input", "output")


def kind_for(verdict, stage: str) -> str:
    """The refusal kind of a verdict that is not allowed, at a stage ("prompt": a text,
    "input": a source picture, "output": a picture that was made). Minors come first, then
    explicit content, then a protected person (see the module's docstring)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if getattr(verdict, "error", None):
        return CHECK_FAILED
    reasons = tuple(getattr(verdict, "reasons", ()))
    # only what refused: an allowed finding (a suggestive word the policy allows) is no reason
    refusing = [r for r in reasons if getattr(getattr(r, "action", None), "value", "block")
                != "allow"] or list(reasons)
    return kind_for_categories((r.category for r in refusing), stage)


def kind_for_categories(categories: Iterable[str], stage: str) -> str:
    cats = {str(c) for c in categories}
    if "error" in cats and len(cats) == 1:
        return CHECK_FAILED
    protected_only = cats and cats <= set(PROTECTED_CATEGORIES)
    if stage == "input":
        return INPUT_PROTECTED if protected_only or not cats & _EXPLICIT else INPUT_EXPLICIT
    if cats & set(MINOR_CATEGORIES):
        return PROMPT_MINOR if stage == "prompt" else OUTPUT_MINOR
    if protected_only and stage != "prompt":
        return OUTPUT_PROTECTED
    # A prompt refused only for naming someone enrolled reads word for word like a sexual
    # prompt's refusal (issue 12, item 10): the wording must not confirm who is enrolled.
    return PROMPT_EXPLICIT if stage == "prompt" else OUTPUT_EXPLICIT


# categories that are about sexual content (images: explicit.py; prompts: prompts/check.py)
_EXPLICIT = {"sexual", "nudity", "sexual_explicit", "sexual_suggestive", "undress_request",
             "minor_explicit", "minor_sexual"}
