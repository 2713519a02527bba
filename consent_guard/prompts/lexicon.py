"""The curated per-language word lists (lexicon/<lang>.toml) and their matcher.

File format (one file per language, validated on load; an error names the file and key)::

    script = "latin"              # latin | cyrillic | arabic | devanagari | hangul | cjk | thai
    explicit = ["nude", "porn*", "bare breasts", ...]
    suggestive = [...]
    minor = [...]
    undress = [...]
    undress_patterns = ['...']    # optional, also explicit_/suggestive_/minor_patterns
    allow = ["chicken breast*"]   # optional: benign phrases masked before matching

An entry is a word or phrase, normalised with ``normalise_term`` exactly like the prompt. A
``*`` at the end of a word allows any ending ("desnud*" matches desnuda, desnudos). A
``*_patterns`` entry is a regular expression (non-capturing groups only) over normalised text
(lower case, no accents, words separated by single spaces, phrase breaks written " , ").

How an entry matches depends on its script, not on the prompt's language (every list is
matched against every prompt, so a Spanish word in an English prompt is found):

- alphabetic scripts (Latin, Cyrillic, Arabic, Devanagari): whole words; the entry may not be preceded or
  followed by a letter or digit ("title", "Scunthorpe", "cocktail", "pussycat" do not match
  "tit", "cunt", "cock", "pussy"); the few emoji the normaliser keeps (normalise.EMOJI) are
  words of this class too;
- Hangul: the entry must start a word and any syllables may follow, so Korean particles and
  endings match ("누드를", "누드는", "누드가" match "누드");
- CJK and Thai (no spaces): substring, so entries there are multi-character words; a
  katakana entry of two characters must not touch other katakana ("ロリ" is not "カロリー").

Stretched letters: the entries are matched against the normalised text (runs of three or more
letters already two: "boooobs" is "boobs"); then every word that has a double letter is
collapsed to single letters and looked up among the one-word alphabetic entries that have no
double letter ("nuude" -> "nude", "sexxxy" -> "sexy"). ``allow`` phrases ("chicken breast",
and words such as "penne" that would collapse onto an entry) are masked out of the text first.

Every language's literal entries of one script class are compiled into one trie-shaped
regular expression (one pass over the prompt per class present in it); each pattern runs only
where one of the literal words it starts with occurs (found by one more trie).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .normalise import NormalisedPrompt, collapse_runs, normalise_term

try:  # the regular-expression parser, to find the words a pattern starts with
    import re._parser as _sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["CATEGORIES", "LANGUAGES", "SCRIPTS", "Hit", "Entry", "Lexicon", "LexiconError",
           "LEXICON_DIR"]

CATEGORIES = ("explicit", "suggestive", "minor", "undress")
#: the order in which languages are loaded; a term listed by several reports the first
LANGUAGES = ("en", "id", "ko", "ms", "ja", "zh", "th", "vi", "es", "pt", "fr", "de", "ru", "tl",
             "uk", "nl", "da", "hu", "ar", "hi")
SCRIPTS = ("latin", "cyrillic", "arabic", "devanagari", "hangul", "cjk", "thai")
LEXICON_DIR = Path(__file__).resolve().with_name("lexicon")

_PATTERN_KEYS = tuple(f"{c}_patterns" for c in CATEGORIES)
_KNOWN_KEYS = frozenset(("lang", "script", "allow") + CATEGORIES + _PATTERN_KEYS)

# matching classes: how an entry is matched, decided by the characters it contains
ALPHA, HANGUL, CJK, THAI = "alpha", "hangul", "cjk", "thai"
_CLASS_OF_SCRIPT = {"latin": ALPHA, "cyrillic": ALPHA, "arabic": ALPHA, "devanagari": ALPHA,
                    "hangul": HANGUL, "cjk": CJK, "thai": THAI}
_HANGUL_CHARS = "\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f"
_CJK_CHARS = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_THAI_CHARS = "\u0e00-\u0e7f"
_KATAKANA = "\u30a0-\u30ff\u31f0-\u31ff"
_HAS_HANGUL = re.compile(f"[{_HANGUL_CHARS}]")
_HAS_CJK = re.compile(f"[{_CJK_CHARS}]")
_HAS_THAI = re.compile(f"[{_THAI_CHARS}]")
_ALL_KATAKANA = re.compile(f"[{_KATAKANA}]+")
# a letter or digit of an alphabetic script: what may not touch a whole-word entry
# (Arabic letters and Devanagari letters and vowel signs too: "سكس" is not inside "سكسونيا")
_WORDCHAR = (r"0-9a-z\u00c0-\u024f\u0370-\u03ff\u0400-\u052f\u1e00-\u1eff"
             r"\u0620-\u064a\u066e-\u06d3\u0900-\u0963\u0966-\u097f")
_ALPHA_BEFORE = f"(?<![{_WORDCHAR}])"
_ALPHA_AFTER = f"(?![{_WORDCHAR}])"
# (a Devanagari vowel sign or nukta is not a \w character but is part of the word: "चोद*"
# must reach the end of "चोदू")
_WILD_RE = "(?:[^\\W_]|[\u0900-\u0903\u093a-\u094f\u0951-\u0957\u0962\u0963])*"
_WILD = "\x00"  # the wildcard inside the trie
_DOUBLE = re.compile(r"([^\W\d_])\1")


class LexiconError(ValueError):
    """A lexicon file is missing, unreadable or invalid; the message names file and key."""


@dataclass(frozen=True)
class Hit:
    category: str   # one of CATEGORIES
    term: str       # the entry as written in the lexicon file (or the pattern)
    lang: str       # the lexicon file it came from
    matched: str    # the normalised text it matched


@dataclass(frozen=True)
class Entry:
    lang: str
    category: str   # a category, or "allow"
    term: str       # as written in the file
    norm: str       # normalised (wildcards kept as "*"); the pattern itself for patterns
    cls: str        # alpha | hangul | cjk | thai
    pattern: bool = False


def _class_of(norm: str) -> str:
    if _HAS_HANGUL.search(norm):
        return HANGUL
    if _HAS_CJK.search(norm):
        return CJK
    if _HAS_THAI.search(norm):
        return THAI
    return ALPHA


def _trie_regex(words: Iterable[str]) -> str:
    """One regex for many literal strings, shaped as a trie (fast in Python's re: at each
    position only the branch of the current character is followed; longer matches first)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}
    return _node_regex(trie)


def _node_regex(node: dict) -> str:
    alts = []
    # literal continuations first, the wildcard after them, the end of an entry last: the
    # first alternative that matches wins, so this order finds the longest entry
    for ch in sorted((k for k in node if k), key=lambda k: (k == _WILD, k)):
        head = _WILD_RE if ch == _WILD else re.escape(ch)
        alts.append(head + _node_regex(node[ch]))
    if not alts:
        return ""
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    if "" in node:
        body = "(?:" + body + ")?"
    return body


def _wild_key(norm: str) -> str:
    return norm.replace("*", _WILD)


def _wild_fullmatch(norm: str) -> "re.Pattern[str]":
    return re.compile("".join(_WILD_RE if c == "*" else re.escape(c) for c in norm))


def _boundaries(cls: str, body: str) -> str:
    if cls == ALPHA:
        return _ALPHA_BEFORE + "(?:" + body + ")" + _ALPHA_AFTER
    if cls == HANGUL:
        return f"(?<![{_HANGUL_CHARS}])(?:" + body + ")"
    return "(?:" + body + ")"


def _literal_prefixes(pattern: str) -> Optional[List[str]]:
    """The literal strings one of which starts every match of ``pattern`` (None when a match
    can start with something else): the pattern runs only where one of them occurs."""
    try:
        prefixes, _ = _seq_prefixes(list(_sre_parse.parse(pattern)))
    except _PrefixLimit:
        return None
    if not prefixes or "" in prefixes:
        return None
    return sorted(prefixes)


class _PrefixLimit(Exception):
    pass


def _first_chars(items: list) -> Optional[set]:
    """The characters a match of the parsed pattern can start with (None: unknown, or too
    many to list)."""
    for op, av in items:
        if op in (_sre_parse.ASSERT, _sre_parse.ASSERT_NOT, _sre_parse.AT):
            continue
        if op is _sre_parse.LITERAL:
            return {chr(av)}
        if op is _sre_parse.IN:
            chars: set = set()
            for o, a in av:
                if o is _sre_parse.LITERAL:
                    chars.add(chr(a))
                elif o is _sre_parse.RANGE and a[1] - a[0] < 256:
                    chars.update(map(chr, range(a[0], a[1] + 1)))
                else:
                    return None
            return chars
        if op is _sre_parse.SUBPATTERN:
            return _first_chars(list(av[-1]))
        if op is _sre_parse.BRANCH:
            chars = set()
            for branch in av[1]:
                sub = _first_chars(list(branch))
                if sub is None:
                    return None
                chars |= sub
            return chars
        return None
    return None


def _seq_prefixes(items: list) -> Tuple[set, bool]:
    """(prefixes, complete): complete when the whole sequence is literal."""
    prefixes = {""}
    for op, av in items:
        if op is _sre_parse.LITERAL:
            prefixes = {p + chr(av) for p in prefixes}
            continue
        if op in (_sre_parse.ASSERT, _sre_parse.ASSERT_NOT, _sre_parse.AT):
            continue  # zero width
        if op is _sre_parse.IN and all(o is _sre_parse.LITERAL for o, _ in av):
            sub, complete = {chr(c) for _, c in av}, True  # (?:a|b) parsed as [ab]
        elif op is _sre_parse.SUBPATTERN:
            sub, complete = _seq_prefixes(list(av[-1]))
        elif op is _sre_parse.BRANCH:
            sub, complete = set(), True
            for branch in av[1]:
                b, c = _seq_prefixes(list(branch))
                sub |= b
                complete = complete and c
        else:
            return prefixes, False
        prefixes = {p + q for p in prefixes for q in sub}
        if len(prefixes) > 2000:
            raise _PrefixLimit
        if not complete:
            return prefixes, False
    return prefixes, True


class _Matcher:
    """The compiled form of one script class for one text variant: one trie-shaped regex for
    the literal entries, and the patterns, each tried only where one of the words it starts
    with occurs (one more trie)."""

    def __init__(self, cls: str, entries: Sequence[Entry], rank: Dict[str, int]):
        self.cls = cls
        self.literal: Dict[str, List[Tuple[str, str, str]]] = {}
        self.wild: Dict[str, List[Tuple["re.Pattern[str]", str, str, str]]] = {}
        # patterns by the first character of their prefixes; and those without a prefix
        self.keyed: Dict[str, List[Tuple["re.Pattern[str]", str, str, str]]] = {}
        self.unkeyed: List[Tuple["re.Pattern[str]", str, str, str]] = []
        seen = set()
        literals, short_kata, triggers, unkeyed = [], [], set(), []
        for e in sorted(entries, key=lambda e: rank.get(e.lang, 99)):
            key = (e.category, e.norm, e.pattern)
            if key in seen:  # listed by several languages: the first reports it
                continue
            seen.add(key)
            if e.pattern:
                item = (re.compile(_boundaries(cls, e.norm)), e.category, e.term, e.lang)
                prefixes = _literal_prefixes(e.norm)
                if prefixes is None:
                    self.unkeyed.append(item)
                    unkeyed.append(e.norm)
                    continue
                for first in {p[0] for p in prefixes}:
                    self.keyed.setdefault(first, []).append(item)
                triggers.update(prefixes)
            elif "*" in e.norm:
                self.wild.setdefault(e.norm[0], []).append(
                    (_wild_fullmatch(e.norm), e.category, e.term, e.lang))
                literals.append(_wild_key(e.norm))
            else:
                self.literal.setdefault(e.norm, []).append((e.category, e.term, e.lang))
                if cls == CJK and len(e.norm) <= 2 and _ALL_KATAKANA.fullmatch(e.norm):
                    short_kata.append(e.norm)
                else:
                    literals.append(e.norm)
        alts = []
        if literals:
            alts.append(_trie_regex(literals))
        if short_kata:
            alts.append(f"(?<![{_KATAKANA}])(?:{_trie_regex(short_kata)})(?![{_KATAKANA}])")
        # a lookahead capture: the longest entry at every position, overlapping ones included
        self.regex = (re.compile("(?=(" + _boundaries(cls, "|".join(alts)) + "))")
                      if alts else None)
        self.trigger = None
        if triggers:
            before = _ALPHA_BEFORE if cls == ALPHA else (
                f"(?<![{_HANGUL_CHARS}])" if cls == HANGUL else "")
            self.trigger = re.compile(f"(?={before}(?:{_trie_regex(triggers)}))")
        # patterns without a literal start ("12 year old"): one combined regex, tried where a
        # character one of them can start with occurs (or everywhere if that is unknown)
        self.unkeyed_regex = self.unkeyed_first = None
        if unkeyed:
            self.unkeyed_regex = re.compile(_boundaries(cls, "|".join(f"(?:{p})" for p in unkeyed)))
            first: Optional[set] = set()
            for p in unkeyed:
                chars = _first_chars(list(_sre_parse.parse(p)))
                first = None if chars is None or first is None else first | chars
            if first:
                self.unkeyed_first = re.compile(
                    "[" + "".join(re.escape(c) for c in sorted(first)) + "]")

    def scan(self, text: str, found: Dict[Tuple[str, str], Hit]) -> None:
        if self.regex is not None:
            done = set()
            for m in self.regex.finditer(text):
                s = m.group(1)
                if s and s not in done:
                    done.add(s)
                    self._resolve(s, found)
        if self.trigger is not None:
            for m in self.trigger.finditer(text):
                pos = m.start()
                for rx, category, term, lang in self.keyed.get(text[pos], ()):
                    if (category, term) not in found:
                        pm = rx.match(text, pos)
                        if pm:
                            found[(category, term)] = Hit(category, term, lang, pm.group(0))
        if self.unkeyed_regex is not None:
            if self.unkeyed_first is not None:
                hit = any(self.unkeyed_regex.match(text, m.start())
                          for m in self.unkeyed_first.finditer(text))
            else:
                hit = self.unkeyed_regex.search(text) is not None
            if hit:
                for rx, category, term, lang in self.unkeyed:
                    if (category, term) not in found:
                        pm = rx.search(text)
                        if pm:
                            found[(category, term)] = Hit(category, term, lang, pm.group(0))

    def _resolve(self, s: str, found: Dict[Tuple[str, str], Hit]) -> None:
        """Which entries produced the match ``s`` (and the shorter ones it starts with)."""
        if self.cls == ALPHA:
            ends: Iterable[int] = [i for i, ch in enumerate(s) if ch == " "] + [len(s)]
        else:
            ends = range(1, len(s) + 1)
        for end in ends:
            c = s[:end]
            for category, term, lang in self.literal.get(c, ()):
                found.setdefault((category, term), Hit(category, term, lang, c))
            for rx, category, term, lang in self.wild.get(c[0], ()):
                if rx.fullmatch(c):
                    found.setdefault((category, term), Hit(category, term, lang, c))


class Lexicon:
    """All languages' lists, compiled. ``Lexicon.load()`` is cached per folder."""

    _cache: Dict[str, "Lexicon"] = {}
    _lock = threading.Lock()

    def __init__(self, entries: Sequence[Entry], scripts: Dict[str, str]):
        self.entries: Tuple[Entry, ...] = tuple(entries)
        self.scripts = dict(scripts)  # lang -> script
        self.langs = tuple(scripts)
        rank = {lang: i for i, lang in enumerate(self.langs)}
        terms = [e for e in entries if e.category != "allow"]
        self._full: Dict[str, _Matcher] = {}
        for cls in (ALPHA, HANGUL, CJK, THAI):
            # the allow entries ride along: the text is masked only when one of them is found
            self._full[cls] = _Matcher(cls, [e for e in entries if e.cls == cls], rank)
        # the collapsed copy: one-word alphabetic entries without a double letter, looked up
        # for the words that collapsing changes ("nuude" -> "nude")
        self._c_words: Dict[str, List[Tuple[str, str, str]]] = {}
        self._c_stems: Dict[int, Dict[str, List[Tuple[str, str, str]]]] = {}
        seen = set()
        for e in sorted(terms, key=lambda e: rank.get(e.lang, 99)):
            if (e.cls != ALPHA or e.pattern or " " in e.norm or _DOUBLE.search(e.norm)
                    or (e.category, e.norm) in seen):
                continue
            seen.add((e.category, e.norm))
            if e.norm.endswith("*"):
                stem = e.norm[:-1]
                self._c_stems.setdefault(len(stem), {}).setdefault(stem, []).append(
                    (e.category, e.term, e.lang))
            else:
                self._c_words.setdefault(e.norm, []).append((e.category, e.term, e.lang))
        allow: Dict[str, List[str]] = {}
        for e in entries:
            if e.category == "allow":
                allow.setdefault(e.cls, []).append(_wild_key(e.norm))
        self._allow: List[Tuple[str, "re.Pattern[str]"]] = []
        for cls, words in allow.items():
            body = _trie_regex(words)
            if cls == ALPHA:
                body = _ALPHA_BEFORE + body + _ALPHA_AFTER
            elif cls == HANGUL:
                body = f"(?<![{_HANGUL_CHARS}])" + body
            self._allow.append((cls, re.compile(body)))

    # --- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Optional[Path] = None) -> "Lexicon":
        """Load and validate every ``<lang>.toml`` in ``folder`` (default: the package's
        lexicon folder). Cached: later calls with the same folder return the same object."""
        path = Path(folder) if folder is not None else LEXICON_DIR
        key = str(path.resolve())
        with cls._lock:
            lex = cls._cache.get(key)
            if lex is None:
                lex = cls._cache[key] = cls._read(path)
            return lex

    @classmethod
    def _read(cls, folder: Path) -> "Lexicon":
        if not folder.is_dir():
            raise LexiconError(f"lexicon folder {folder} does not exist")
        files = sorted(folder.glob("*.toml"))
        if not files:
            raise LexiconError(f"lexicon folder {folder} holds no .toml file")
        order = {lang: i for i, lang in enumerate(LANGUAGES)}
        files.sort(key=lambda p: (order.get(p.stem, len(order)), p.stem))
        entries: List[Entry] = []
        scripts: Dict[str, str] = {}
        for path in files:
            lang, script, file_entries = _read_file(path)
            scripts[lang] = script
            entries.extend(file_entries)
        return cls(entries, scripts)

    # --- matching ---------------------------------------------------------------------
    def find(self, prompt: NormalisedPrompt) -> List[Hit]:
        """Every lexicon entry the prompt contains, one Hit per (category, entry). The
        prompt's ``alternates`` (other readings of an ambiguous spelling, see normalise.py
        step 6) are read too: a hit in any reading counts."""
        found = self._find_in(prompt.text)
        for alternate in prompt.alternates:
            for key, hit in self._find_in(alternate).items():
                found.setdefault(key, hit)
        return [hit for key, hit in found.items() if key[0] != "allow"]

    def _find_in(self, text: str) -> Dict[Tuple[str, str], Hit]:
        if not text:
            return {}
        found = self._scan_full(text)
        if any(category == "allow" for category, _ in found):
            text = self._mask(text)
            found = self._scan_full(text)
        collapsed = collapse_runs(text)
        if collapsed != text:
            for word, short in zip(text.split(" "), collapsed.split(" ")):
                if word != short:
                    self._lookup_collapsed(short, found)
        return found

    def _lookup_collapsed(self, word: str, found: Dict[Tuple[str, str], Hit]) -> None:
        for category, term, lang in self._c_words.get(word, ()):
            found.setdefault((category, term), Hit(category, term, lang, word))
        for length, stems in self._c_stems.items():
            if len(word) >= length:
                for category, term, lang in stems.get(word[:length], ()):
                    found.setdefault((category, term), Hit(category, term, lang, word))

    def _scan_full(self, text: str) -> Dict[Tuple[str, str], Hit]:
        found: Dict[Tuple[str, str], Hit] = {}
        self._full[ALPHA].scan(text, found)
        if not text.isascii():
            if _HAS_HANGUL.search(text):
                self._full[HANGUL].scan(text, found)
            if _HAS_CJK.search(text):
                self._full[CJK].scan(text, found)
            if _HAS_THAI.search(text):
                self._full[THAI].scan(text, found)
        return found

    def _mask(self, text: str) -> str:
        masked = False
        for cls, rx in self._allow:
            if cls != ALPHA and text.isascii():
                continue
            new = rx.sub(" , ", text)
            if new != text:
                text, masked = new, True
        if masked:
            text = re.sub(r"(?: ?,)+ ?", " , ", text).strip(" ,")
        return text

    def find_names(self, prompt: NormalisedPrompt, names: Sequence[str]) -> List[str]:
        """Which of ``names`` (display names, aliases) occur in the prompt, in the order
        given. A name is normalised like the prompt ("J4ne  Doe" is "jane doe"). Latin and
        Cyrillic names match as whole words; a name of several words also matches written
        as one word ("janedoe", "#JaneDoe", a LoRA called "JaneDoe_v1") when that word has
        at least 6 letters, because usernames, tags and LoRA names glue names together.
        Hangul names match at the start of a word (particles may follow); CJK and Thai names
        match as substrings."""
        text = prompt.text
        if not text or not names:
            return []
        variants = [text]
        collapsed = collapse_runs(text)
        if collapsed != text:
            variants.append(collapsed)
        out: List[str] = []
        for name in names:
            if name in out:
                continue
            rx = _name_regex(name)
            if rx is not None and any(rx.search(v) for v in variants):
                out.append(name)
        return out


_name_cache: Dict[str, Optional["re.Pattern[str]"]] = {}


def _name_regex(name: str) -> Optional["re.Pattern[str]"]:
    rx = _name_cache.get(name, False)
    if rx is not False:
        return rx  # type: ignore[return-value]
    norm = normalise_term(name.replace("*", " ")).replace(" , ", " ")
    if not norm:
        rx = None
    else:
        cls = _class_of(norm)
        alts = [re.escape(norm)]
        if cls == ALPHA and " " in norm:
            joined = norm.replace(" ", "")
            if len(joined) >= 6:
                alts.append(re.escape(joined))
        if not _DOUBLE.search(norm):
            pass  # matched in the collapsed copy as written
        else:
            alts.append(re.escape(collapse_runs(norm)))
        body = "(?:" + "|".join(alts) + ")"
        if cls == ALPHA:
            body = _ALPHA_BEFORE + body + _ALPHA_AFTER
        elif cls == HANGUL:
            body = f"(?<![{_HANGUL_CHARS}])" + body
        rx = re.compile(body)
    if len(_name_cache) > 4096:
        _name_cache.clear()
    _name_cache[name] = rx
    return rx


def _fail(path: Path, key: str, msg: str) -> LexiconError:
    return LexiconError(f"{path}: key {key!r}: {msg}")


def _read_file(path: Path) -> Tuple[str, str, List[Entry]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LexiconError(f"{path}: cannot read: {exc}") from exc
    lang = path.stem
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    if "lang" in data and data["lang"] != lang:
        raise _fail(path, "lang", f"is {data['lang']!r} but the file is named {lang}.toml")
    script = data.get("script")
    if script not in SCRIPTS:
        raise _fail(path, "script", f"must be one of {', '.join(SCRIPTS)}, not {script!r}")
    want_cls = _CLASS_OF_SCRIPT[script]
    entries: List[Entry] = []
    for key in CATEGORIES + ("allow",) + _PATTERN_KEYS:
        if key not in data:
            if key in CATEGORIES:
                raise _fail(path, key, "missing (write an empty list if there is nothing)")
            continue
        values = data[key]
        if not isinstance(values, list):
            raise _fail(path, key, "must be a list of strings")
        seen = set()
        for i, value in enumerate(values):
            where = f"{key}[{i}]"
            if not isinstance(value, str) or not value.strip():
                raise _fail(path, where, f"must be a non-empty string, not {value!r}")
            if value in seen:
                raise _fail(path, where, f"{value!r} is listed twice")
            seen.add(value)
            if key in _PATTERN_KEYS:
                entries.append(_pattern_entry(path, where, lang, key[: -len("_patterns")],
                                              value, want_cls))
                continue
            if re.search(r"\*(?=\S)|(?:^|\s)\*", value):
                raise _fail(path, where, f"{value!r}: '*' may only end a word")
            norm = normalise_term(value)
            if not norm.replace("*", "").strip():
                raise _fail(path, where, f"{value!r} normalises to nothing")
            cls = _class_of(norm)
            if cls != want_cls:
                raise _fail(path, where, f"{value!r} is not written in the file's script "
                                         f"({script})")
            entries.append(Entry(lang, key, value, norm, cls))
    return lang, script, entries


def _pattern_entry(path: Path, where: str, lang: str, category: str, value: str,
                   cls: str) -> Entry:
    try:
        rx = re.compile(value)
    except re.error as exc:
        raise _fail(path, where, f"{value!r} is not a valid regular expression: {exc}") from exc
    if rx.groups:
        raise _fail(path, where, f"{value!r}: use non-capturing groups (?:...)")
    if rx.fullmatch(""):
        raise _fail(path, where, f"{value!r} matches the empty string")
    return Entry(lang, category, value, value, cls, pattern=True)
