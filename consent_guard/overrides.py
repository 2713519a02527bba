"""Policy overrides from a workflow (a node's `policy_override` text, in the policy's TOML).

Unlocked, a node may change these keys either way. Locked by the admin, a node may only make
the policy stricter: a looser value is ignored and reported, never applied. Only keys whose
"stricter" direction is clear can be overridden from a node; anything else is an error.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from .policy import Policy, PolicyError, policy_from_dict
from .verdict import Decision


def _rank(d) -> int:
    return Decision(d).rank


# (section, key) -> (Policy field, is `new` stricter than or as strict as `old`?)
_STRICTER: Dict[Tuple[str, str], Tuple[str, Callable]] = {
    ("explicit", "nudenet_min_score"): ("nudenet_min_score", lambda new, old: new <= old),
    ("explicit", "open_nsfw_safe_below"): ("open_nsfw_safe_below", lambda new, old: new <= old),
    ("explicit", "open_nsfw_explicit_at"): ("open_nsfw_explicit_at",
                                            lambda new, old: new <= old),
    ("prompts", "sexual_explicit"): ("prompt_explicit",
                                     lambda new, old: _rank(new) >= _rank(old)),
    ("prompts", "sexual_suggestive"): ("prompt_suggestive",
                                       lambda new, old: _rank(new) >= _rank(old)),
    ("prompts", "classifier"): ("prompt_classifier", lambda new, old: new or not old),
    ("prompts", "confirm_words"): ("prompt_confirm_words", lambda new, old: new or not old),
    ("minors", "minor_unknown"): ("minor_unknown",
                                  lambda new, old: new == "block" or old != "block"),
    ("faces", "min_face_px"): ("min_face_px", lambda new, old: new <= old),
}
_ACTIONS = ("sexual", "nudity")


def parse_override(text: str) -> dict:
    try:
        data = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"The node's policy override is not valid TOML: {exc}") from None
    allowed = {f"[{s}] {k}" for s, k in _STRICTER} | {f"[actions] {a}" for a in _ACTIONS}
    for section, table in data.items():
        keys = table.items() if isinstance(table, dict) else [(None, None)]
        for key, _ in keys:
            if section == "actions" and key in _ACTIONS or (section, key) in _STRICTER:
                continue
            where = f"[{section}] {key}" if key else section
            raise PolicyError(f"The node's policy override sets {where}, which a workflow "
                              f"cannot change. It may set: {', '.join(sorted(allowed))}.")
    policy_from_dict(data, "<the node's policy override>")  # same validation as the file
    return data


def apply_override(base: Policy, text: str, locked: bool) -> Tuple[Policy, List[str]]:
    """`base` with the override applied; and a note per looser value ignored because the
    admin lock is on."""
    if not (text or "").strip():
        return base, []
    data = parse_override(text)
    parsed = policy_from_dict(data, "<the node's policy override>")
    changes, ignored = {}, []
    actions = dict(base.actions)
    for cat, value in data.get("actions", {}).items():
        new = Decision(value)
        if locked and new.rank < actions[cat].rank:
            ignored.append(f"[actions] {cat} = {value!r} (the locked policy says "
                           f"{actions[cat].value!r})")
            continue
        actions[cat] = new
    changes["actions"] = actions
    for (section, key), (field, stricter) in _STRICTER.items():
        if key not in data.get(section, {}):
            continue
        new, old = getattr(parsed, field), getattr(base, field)
        if locked and not stricter(new, old):
            old_shown = old.value if isinstance(old, Decision) else old
            ignored.append(f"[{section}] {key} = {data[section][key]!r} (the locked policy "
                           f"says {old_shown!r})")
            continue
        changes[field] = new
    result = dataclasses.replace(base, **changes)
    if result.open_nsfw_safe_below > result.open_nsfw_explicit_at:
        raise PolicyError("The node's policy override would put open_nsfw_safe_below above "
                          "open_nsfw_explicit_at.")
    return result, ignored
