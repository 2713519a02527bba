"""Prompt text -> NormalisedPrompt: the one canonical form the lexicon matcher reads.

Every step undoes a way of writing the same word differently, in this order:

1. HTML character references are decoded ("n&#224;ked" is "nàked", "man&#39;s" is "man's":
   prompts copied from web pages and scraped sets carry them, and they cut a word in two);
   zero-width and bidi control characters are deleted; Unicode NFKC (full-width, circled,
   mathematical and other compatibility letters become plain ones);
2. prompt syntax: ``<lora:name:0.8>``, ``<lyco:..>``, ``<hypernet:..>`` and ComfyUI's
   ``embedding:name`` become the name's words (camelCase, ``_``, ``-`` and paths split), and
   the names are returned apart as well; ``BREAK`` and ``AND`` (upper case, A1111 keywords)
   become phrase breaks; ``(word:1.3)`` weights, ``[a:b:0.5]`` schedules, ``[a|b]``
   alternations, ``{a|b}`` wildcards and all brackets are removed, keeping every word;
3. casefold;
4. combining marks of the generic combining blocks (accents on Latin, Greek and Cyrillic
   letters, Vietnamese tones, "zalgo" marks) are removed, so "nüde" is "nude" and
   Russian "ё" is "е"; Arabic short-vowel marks, hamza and madda on alef and the tatweel
   are removed too ("عَارِيَة" is "عارية", "أ" is "ا"); the marks of Thai, Indic scripts and
   Japanese kana are part of the letters and stay; Hangul stays precomposed. A few letters without a decomposition are
   folded (đ->d, ø->o, ł->l, æ->ae, small capitals ᴀ->a, ...);
5. homoglyphs: inside a word that mixes Latin with Cyrillic or Greek letters ("nudе" with a
   Cyrillic е, "пude"), the Cyrillic and Greek look-alikes become Latin; Greek words are
   folded whole (Greek is not a supported language). Words written only in Cyrillic stay
   Russian;
6. runs of three or more single letters separated by separators or spaces are joined:
   "n.u.d.e", "n u d e", "n_u_d_e", "s 3 x" (so "a b c" becomes "abc": accepted), and
   single digits separated by spaces are joined ("1 6 years old" -> "16 years old"). A run
   is cut where its separator changes or holds a phrase break, so two spaced words stay two
   ("n.u.d.e s.e.x.y" -> "nude sexy", "n u d e, s e x y" -> "nude , sexy", "a  n u d e" ->
   "a nude"). A run that starts with "a" or "i" may start with that word ("a n u d e woman"):
   the text keeps the joined reading ("anude") and ``alternates`` holds the one with the word
   apart ("a nude woman"). A letter hidden by an asterisk inside a word ("n*ked", "f*cking")
   is read as each vowel in turn, in ``alternates`` as well. A few words that are never
   part of an ordinary word (``FUSED_TOKEN_WORDS``: naked, nsfw, hentai, ...) are also read
   apart when glued to other letters in an ordinary word, as token-soup prompts write them
   ("bairnaked", "nakedance", "sensunsfw"), in ``alternates`` too;
7. leetspeak in words that mix letters and 4 3 1 0 5 7 @ $ ! (a e i o s t a s i): "p0rn",
   "s3x", "pu$$y", "n!pple". Numbers ("1920"), numbers with a unit or suffix ("4k", "8k",
   "3d", "35mm", "1080p", "1990s") are left alone, and Danbooru count tags are split:
   "1girl" -> "1 girl", "2boys" -> "2 boys", "5yo" -> "5 yo";
8. punctuation: sentence and tag punctuation (, . ; ! ?, their CJK and Arabic forms and the
   Devanagari danda) becomes a
   phrase break written " , "; every other non-letter becomes a space, except the few emoji
   that sexual prompts use as words (🍆 🍑 💦 👅 👉 👌 👈 🔞, see ``EMOJI``), which stay,
   each as a word of its own, a run of the same one written once ("🍆🍆🍆💦💦" -> "🍆 💦";
   skin-tone modifiers are deleted); spaces collapse;
9. stretched letters: runs of three or more identical letters become two ("nuuuude" ->
   "nuude", "boooobs" -> "boobs"); the matcher also reads a copy with every run collapsed
   to one letter (see lexicon.py).

Lexicon entries go through the same function (``normalise_term``), so both sides agree.
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

__all__ = ["NormalisedPrompt", "normalise", "normalise_term", "collapse_runs",
           "drop_safety_tags"]


@dataclass(frozen=True)
class NormalisedPrompt:
    """``text``: the normalised running text (syntax removed, LoRA and embedding names
    included as words). ``names``: the LoRA / embedding / hypernetwork names found, each
    normalised to words ("nsfw_nudify-v2" -> "nsfw nudify v2"). ``alternates``: other
    readings of an ambiguous spelling (step 6), which the lexicon reads as well; the
    classifier reads ``text`` only."""

    text: str
    names: Tuple[str, ...] = ()
    alternates: Tuple[str, ...] = ()


# --- 1. invisible characters ------------------------------------------------------------
_INVISIBLE = (
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0]
    + list(range(0x200B, 0x2010))      # zero-width space/joiners, LRM, RLM
    + list(range(0x202A, 0x202F))      # bidi embeddings and overrides
    + list(range(0x2060, 0x2070))      # word joiner, invisible operators, bidi isolates
    + list(range(0xFE00, 0xFE10))      # variation selectors
    + list(range(0xE0000, 0xE0080))    # tag characters
    + list(range(0x1F3FB, 0x1F400))    # emoji skin-tone modifiers
)
_DELETE_INVISIBLE: Dict[int, None] = {cp: None for cp in _INVISIBLE}

# --- 4. combining marks (generic blocks only) and letters without a decomposition -------
# (and Arabic: the optional short-vowel marks and the tatweel that stretches a word, so
# "عَارِيَة" and "عـــارية" are "عارية"; the hamza and madda of alef go with them, so أ إ آ are ا)
_MARK_RANGES = [(0x0300, 0x036F), (0x0483, 0x0489), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF),
                (0x20D0, 0x20FF), (0xFE20, 0xFE2F), (0x0610, 0x061A), (0x064B, 0x065F),
                (0x0670, 0x0670), (0x06D6, 0x06ED), (0x0640, 0x0640)]
_DELETE_MARKS: Dict[int, object] = {cp: None for lo, hi in _MARK_RANGES
                                    for cp in range(lo, hi + 1)}
_DELETE_MARKS.update(_DELETE_INVISIBLE)
_LETTER_FOLD = {
    "đ": "d", "ð": "d", "ø": "o", "ł": "l", "ħ": "h", "ŧ": "t", "ı": "i", "ƒ": "f",
    "æ": "ae", "œ": "oe", "þ": "th", "ɑ": "a", "ɡ": "g", "ɩ": "i", "ʃ": "s",
    # small capitals (Latin script; NFKC leaves them)
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h",
    "ɪ": "i", "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p",
    "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z",
}
_DELETE_MARKS.update({ord(k): v for k, v in _LETTER_FOLD.items()})

# --- 5. homoglyphs (applied to mixed-script words, and to Greek words) -------------------
_HOMOGLYPHS = {
    # Cyrillic (after casefold)
    "а": "a", "в": "b", "г": "r", "е": "e", "ё": "e", "и": "u", "й": "u", "к": "k",
    "м": "m", "н": "h", "о": "o", "п": "n", "р": "p", "с": "c", "т": "t", "у": "y",
    "х": "x", "ш": "w", "ь": "b", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ӏ": "l", "һ": "h", "ү": "y", "ҳ": "x", "ҫ": "c",
    # Greek
    "α": "a", "β": "b", "γ": "y", "δ": "d", "ε": "e", "ζ": "z", "η": "n", "ι": "i",
    "κ": "k", "μ": "u", "ν": "v", "ο": "o", "π": "n", "ρ": "p", "σ": "o", "ς": "s",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    # Armenian
    "օ": "o", "ո": "n", "ս": "u", "հ": "h", "ց": "g", "զ": "q",
}
_HOMOGLYPH_TABLE = {ord(k): v for k, v in _HOMOGLYPHS.items()}
_HAS_CONFUSABLE_SCRIPT = re.compile(r"[\u0370-\u058f\u1f00-\u1fff]")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_LATIN_LETTER = re.compile(r"[a-z]")
_GREEK = re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]")
_CYR_ARM = re.compile(r"[\u0400-\u058f]")

# --- 2. prompt syntax ---------------------------------------------------------------------
# <lora:name:0.8>, <lyco:..>, <hypernet:..> (group 1) and ComfyUI's embedding:name (group 2)
_NAMED = re.compile(
    r"<\s*(?:lora|lyco|locon|loha|lokr|hypernet|hypernetwork|embedding|ti)\s*:\s*([^:<>]+?)"
    r"\s*(?::[^<>]*)?>"
    r"|(?<![\w])embedding\s*:\s*([^\s,()\[\]{}<>|:]+)", re.IGNORECASE)
_KEYWORDS = re.compile(r"\b(?:BREAK|AND)\b")
_WEIGHT = re.compile(r":\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?=\s*(?:[)\]}>,]|$))")
_NAME_EXT = re.compile(r"\.(?:safetensors|ckpt|pt|pth|bin|onnx|gguf)$", re.IGNORECASE)
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[0-9])(?=[A-Z][a-z])")

# --- 6. single letters with separators ----------------------------------------------------
_SINGLE = r"[a-z0-9@$\u00df-\u024f\u0400-\u04ff]"
_SEP = r"[\s._\-*·•/\\|,+~'\"^=:;]{1,3}"
_SPLIT_WORD = re.compile(rf"(?<![\w@$]){_SINGLE}(?:{_SEP}{_SINGLE}){{2,}}(?![\w@$])")
_SEP_CHARS = re.compile(_SEP)
_ALPHA = re.compile(r"[^\W\d_]")
_SPLIT_NUMBER = re.compile(r"(?<![\w.])\d(?: \d)+(?![\w.])")

# --- 7. leetspeak -------------------------------------------------------------------------
_LEET_TABLE = str.maketrans({"4": "a", "3": "e", "1": "i", "0": "o", "5": "s", "7": "t",
                             "@": "a", "$": "s", "!": "i"})
# a word (letters, digits, @ $ !) with at least one digit or @ $ !
_LEET_TOKEN = re.compile(r"(?<![a-z0-9@$!\u00df-\u024f])[a-z\u00df-\u024f]*[0-9@$!]"
                         r"[a-z0-9@$!\u00df-\u024f]*")
_LEET_CHAR = re.compile(r"[0134357@$!]")
_MAYBE_LEET = re.compile(r"[0-9@$!]")
_NUM_SUFFIX = re.compile(r"(\d+)([a-z]+)")
_SUFFIX_NUM = re.compile(r"([a-z]+)(\d+)")
#: a number followed by one of these is a Danbooru-style count or an age: split, never leet
COUNT_TAGS = frozenset("""girl girls boy boys other others koma man men woman women person
    people kid kids child children yo yos yr yrs year years month months""".split())
#: a single digit followed by one of these is a number with a unit: left alone
UNITS = frozenset("""d k p i x s m mm cm km kg g mb gb tb px fps hz khz mhz th st nd rd am pm
    h hr hrs min ms v w kw dpi ds dsmax dcg dcgi dprint wd gen in ft b c f l n""".split())

# --- 8. punctuation -----------------------------------------------------------------------
# (with the Arabic comma, semicolon and question mark, and the Devanagari danda)
_PHRASE_BREAK = re.compile(r"[,.;!?\n\r\u3001\u3002\uff0c\uff1b\uff01\uff1f\u2026\u00bf\u00a1"
                           r"\u060c\u061b\u061f\u0964\u0965]+")
# letters, digits and the combining marks that belong to letters (Thai, Indic, kana) are kept
#: emoji kept as words (the lexicon lists their sexual combinations); all others are removed
EMOJI = "\U0001f346\U0001f351\U0001f4a6\U0001f445\U0001f449\U0001f44c\U0001f448\U0001f51e"
_EMOJI = re.compile(f"[{EMOJI}]")
_EMOJI_RUN = re.compile(f"([{EMOJI}])(?: (?:, )?\\1)+")  # "🍆 🍆 , 🍆" -> "🍆"
_NON_WORD = re.compile(r"(?:[^\w\u0900-\u0dff\u0e00-\u0e7f\u0e80-\u0eff\u3099\u309a,"
                       + EMOJI + "]|_)+")
_BREAKS = re.compile(r"(?: ?,)+ ?")
_ASCII_NON_WORD = str.maketrans({c: " " for c in map(chr, range(128))
                                 if not (c.isalnum() and c.islower() or c.isdigit() or c == ",")})

# --- 9. stretched letters -----------------------------------------------------------------
_RUN3 = re.compile(r"([^\W\d_])\1{2,}")
_RUN2 = re.compile(r"([^\W\d_])\1+")
_RUN3_ASCII = re.compile(r"([a-z])\1\1+")
_RUN2_ASCII = re.compile(r"([a-z])\1+")


def collapse_runs(text: str) -> str:
    """Every run of a repeated letter collapsed to one letter ("boobs" -> "bobs")."""
    if text.isascii():
        return _RUN2_ASCII.sub(r"\1", text)
    return _RUN2.sub(r"\1", text)


def _fold_homoglyphs(match: "re.Match[str]") -> str:
    word = match.group(0)
    if _GREEK.search(word) or (_CYR_ARM.search(word) and _LATIN_LETTER.search(word)):
        return word.translate(_HOMOGLYPH_TABLE)
    return word


_PHRASE_SEP = re.compile(r"[,.;:!?]\s|\s[,.;:!?]|[,;!?]")
#: one-letter words a spaced-out word may follow ("a n u d e" is "a nude" or "anude")
_ONE_LETTER_WORDS = ("a", "i")


def _join_segment(chars: List[str], sep: str) -> str:
    joined = "".join(chars)
    letters = len(_ALPHA.findall(joined))
    if letters < 2 or letters <= len(joined) - letters:  # mostly digits: a number, "8 k 1 9"
        return sep.join(chars)
    return joined


#: words a spaced-out run may have fused with its neighbours ("w o m a n n a k e d" is one run:
#: "womannaked"); ``alternates`` then holds the reading with the word apart ("woman naked").
#: Four letters or more, so a spaced place name ("E S S E X") is not read as holding "sex".
FUSED_WORDS = ("naked", "nudes", "nude", "nudity", "topless", "porno", "porn", "penis",
               "vagina", "pussy", "nipples", "nipple", "hentai", "boobs", "breasts", "sexy",
               "nsfw")


#: words read apart when glued to other letters in an ordinary word (not only in a spaced
#: run): token-soup prompts fuse them with junk ("bairnaked", "nakedance", "sensunsfw"). Only
#: words that no ordinary word of the supported languages contains with three letters or more
#: on a side: "nude" is in German "Nudel", "porn" in "Ansporn", "penis" in Indonesian
#: "penistaan", "pussy" in "pussycat", "breasts" in "breaststroke", so those are not here.
FUSED_TOKEN_WORDS = ("naked", "nudity", "topless", "hentai", "nsfw")
_FUSED_TOKEN = re.compile("|".join(FUSED_TOKEN_WORDS))


def _fused(token: str, words: Tuple[str, ...] = FUSED_WORDS,
           least_before: int = 3) -> Optional[str]:
    """``token`` (a joined spaced run) with a FUSED_WORDS word set apart, when it holds one
    between other words: what is before and after it is empty or three letters or more
    ("woman|naked", not "s|naked|en" in "snakeden"), and there is something; else None.
    ``least_before``: the fewest letters before it (two for FUSED_TOKEN_WORDS: "jw|naked";
    one would read "s|naked" in "snaked")."""
    for word in words:
        at = token.find(word)
        if at < 0 or len(token) == len(word):
            continue
        before, after = token[:at], token[at + len(word):]
        if (len(before) == 0 or len(before) >= least_before) and \
                (len(after) == 0 or len(after) >= 3):
            return " ".join(p for p in (before, word, after) if p)
    return None


def _join_split_word(match: "re.Match[str]", split_first: bool = False,
                     ambiguous: Optional[List[bool]] = None) -> str:
    """Join one run of spaced single letters, cut where the separator changes (step 6). A
    joined run that holds one of FUSED_WORDS with other letters marks the text ambiguous
    (``ambiguous``), so that ``alternates`` reads it with that word apart."""
    run = match.group(0)
    chars = _SEP_CHARS.split(run)
    seps = _SEP_CHARS.findall(run)
    usual = max(sorted(set(seps)), key=seps.count)
    segments: List[List[str]] = [[chars[0]]]
    glue: List[str] = []
    for sep, ch in zip(seps, chars[1:]):
        if sep != usual or _PHRASE_SEP.search(sep):
            glue.append(" , " if _PHRASE_SEP.search(sep) else " ")
            segments.append([ch])
        else:
            segments[-1].append(ch)
    first = segments[0]
    if len(first) >= 4 and first[0] in _ONE_LETTER_WORDS and usual.isspace():
        if ambiguous is not None:
            ambiguous.append(True)
        if split_first:
            segments[0:1] = [[first[0]], first[1:]]
            glue.insert(0, " ")
    out = _join_segment(segments[0], usual)
    for g, seg in zip(glue, segments[1:]):
        out += g + _join_segment(seg, usual)
    if ambiguous is not None and any(_fused(t) for t in out.split()):
        ambiguous.append(True)
    return out


def _leet_word(match: "re.Match[str]") -> str:
    token = match.group(0)
    core = token.strip("!")
    if not core:
        return token
    head = token[: len(token) - len(token.lstrip("!"))]
    tail = token[len(head) + len(core):]
    if not _LATIN_LETTER.search(core):
        return token
    m = _NUM_SUFFIX.fullmatch(core)
    if m:
        digits, suffix = m.groups()
        if suffix in COUNT_TAGS:
            return f"{head}{digits} {suffix}{tail}"
        if suffix in UNITS or len(digits) >= 2:
            return token
    elif not _LEET_CHAR.search(core):
        return token
    else:
        m = _SUFFIX_NUM.fullmatch(core)
        if m and (len(m.group(2)) >= 2 or len(m.group(1)) < 3):
            return token  # "sdxl10", "v1", "ak47": versions and models
    return head + core.translate(_LEET_TABLE) + tail


def _core(text: str, split_first: bool = False,
          ambiguous: Optional[List[bool]] = None) -> str:
    """Steps 3-9 (no prompt syntax): used for the running text, the names, and terms.
    ``split_first``: read an ambiguous spaced run with its one-letter word apart (step 6);
    ``ambiguous`` collects whether the text had such a run."""
    s = text.casefold()
    if not s.isascii():
        s = unicodedata.normalize("NFD", s).translate(_DELETE_MARKS)
        if _HAS_CONFUSABLE_SCRIPT.search(s):
            s = _LETTER_RUN.sub(_fold_homoglyphs, s)
        s = unicodedata.normalize("NFC", s)
    s = _SPLIT_WORD.sub(lambda m: _join_split_word(m, split_first, ambiguous), s)
    if " " in s:
        s = _SPLIT_NUMBER.sub(lambda m: m.group(0).replace(" ", ""), s)
    if _MAYBE_LEET.search(s):
        s = _LEET_TOKEN.sub(_leet_word, s)
    s = _PHRASE_BREAK.sub(" , ", s)
    if s.isascii():
        s = " ".join(s.translate(_ASCII_NON_WORD).split())
        if ", ," in s or s.startswith(",") or s.endswith(","):
            s = _BREAKS.sub(" , ", s).strip(" ,")
        return _RUN3_ASCII.sub(r"\1\1", s)
    if _EMOJI.search(s):
        s = _EMOJI.sub(r" \g<0> ", s)
    s = _NON_WORD.sub(" ", s)
    s = _BREAKS.sub(" , ", s).strip(" ,")
    if _EMOJI.search(s):
        s = _EMOJI_RUN.sub(r"\1", s)
    return _RUN3.sub(r"\1\1", s)


def _split_name(raw: str) -> str:
    name = re.split(r"[/\\]", raw.strip())[-1]
    name = _NAME_EXT.sub("", name)
    return _CAMEL.sub(" ", name)


def normalise(text: str) -> NormalisedPrompt:
    """Normalise a prompt for matching (see the module docstring for every step)."""
    if not text:
        return NormalisedPrompt("", ())
    if "&" in text:
        text = html.unescape(text)
    s = text.translate(_DELETE_INVISIBLE)
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s)
    raw_names: List[str] = []

    def _take(match: "re.Match[str]") -> str:
        words = _split_name(match.group(1) or match.group(2))
        raw_names.append(words)
        return f" , {words} , "

    if ":" in s:
        s = _NAMED.sub(_take, s)
        s = _WEIGHT.sub("", s)
    if "BREAK" in s or "AND" in s:
        s = _KEYWORDS.sub(" , ", s)
    names: List[str] = []
    for raw in raw_names:
        n = _core(raw)
        if n and n not in names:
            names.append(n)
    ambiguous: List[bool] = []
    text = _core(s, ambiguous=ambiguous)
    return NormalisedPrompt(text, tuple(names), _alternates(s, text, bool(ambiguous)))


_MASKED = re.compile(r"(?<=[^\W\d_])\*(?=[^\W\d_])")
VOWELS = "aeiou"


def _alternates(raw: str, text: str, ambiguous: bool) -> Tuple[str, ...]:
    """Other readings of the prompt (step 6): the spaced run with its one-letter word apart,
    each vowel in place of the asterisks inside words ("n*ked" -> "naked" ...), and a
    FUSED_TOKEN_WORDS word glued to other letters set apart ("bairnaked" -> "bair naked")."""
    out: List[str] = []
    if ambiguous:
        out.append(_core(raw, split_first=True))
        apart = " ".join(_fused(t) or t for t in text.split(" "))
        if apart != text:
            out.append(apart)
    if "*" in raw and _MASKED.search(raw):
        for vowel in VOWELS:
            out.append(_core(_MASKED.sub(vowel, raw)))
    if _FUSED_TOKEN.search(text):
        apart = " ".join(_fused(t, FUSED_TOKEN_WORDS, 2) or t for t in text.split(" "))
        if apart != text:
            out.append(apart)
    return tuple(dict.fromkeys(a for a in out if a and a != text))


@lru_cache(maxsize=65536)
def normalise_term(term: str) -> str:
    """A lexicon entry or a protected name, normalised exactly like prompt text.

    A trailing ``*`` on a word (a wildcard for inflected endings) is kept on the last word
    the normalised word produces; phrase breaks are dropped (an entry is one phrase)."""
    if "*" not in term:
        return _BREAKS.sub(" ", normalise(term).text).strip()
    out: List[str] = []
    for word in term.split():
        star = word.endswith("*")
        norm = _BREAKS.sub(" ", normalise(word.rstrip("*")).text).strip()
        if norm:
            out.append(norm + ("*" if star else ""))
    return " ".join(out)


# --- safety tags in the positive prompt ---------------------------------------------------
# People who do not want explicit output write it into the prompt itself: "sfw", "safe for
# work", "no nudity", "without nsfw". Read as words these contain "nudity" and "nsfw", and the
# prompt would be blocked for asking for the opposite. The tag is removed before the lexicon and
# the classifier read the text. Only these abstract tags: clothing words are never dropped
# ("no clothes", "without clothing" ask for nudity), and a tag about a filter is kept ("no nsfw
# filter" asks for the filter to be off). "not safe for work" and "not sfw" are NSFW and stay
# (the English list has them).
_NEGATORS = r"(?:no|not|non|without|avoid|avoiding|zero|free of)"
_SAFETY_NOUNS = (r"(?:nudity|nude|nudes|nakedness|nsfw|porn|pornography|pornographic|"
                 r"sexual content|sexual|sex|explicit content|explicit|erotic|erotica)")
_SAFETY_TAGS = re.compile(
    rf"(?<![^\s,]){_NEGATORS}(?: any)?(?: explicit)? {_SAFETY_NOUNS}"
    rf"(?:(?: ,)? (?:or|and|nor) {_SAFETY_NOUNS})*"
    r"(?! (?:filter|filters|filtering|filtered|censor\w*|restriction\w*|limit\w*|rules?|"
    r"block\w*|ban\w*|checks?|safety|guard\w*|moderation|warning))(?![^\s,])"
    r"|(?<![^\s,])(?<!not )(?<!non )(?<!no )(?:sfw|safe for work)(?![^\s,])")


def drop_safety_tags(prompt: NormalisedPrompt) -> NormalisedPrompt:
    """The prompt without the safety tags it carries ("sfw", "no nudity"; see above)."""
    text = prompt.text
    if not any(w in text for w in ("sfw", "safe for work", "no ", "not ", "non ", "without ",
                                   "avoid", "zero ", "free of ")):
        return prompt
    cut = _SAFETY_TAGS.sub(" , ", text)
    if cut == text:
        return prompt
    cut = re.sub(r"(?: ,)+", " ,", " ".join(cut.split())).strip(" ,")
    return NormalisedPrompt(cut, prompt.names, prompt.alternates)
