"""`consent-guard policy show` prints the whole effective policy: every key with its value,
defaults included, as TOML the policy loader reads back to the same policy (issue 13 item 5)."""
from __future__ import annotations

import dataclasses
import json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from consent_guard import cli, cli_policy
from consent_guard.policy import DEFAULT_POLICY_TOML, Policy, policy_from_dict

CHANGED = """\
enforce = true
[actions]
nudity = "block"
[censor]
style = "blur"
[prompts]
classifier_threshold = 0.9
[faces]
min_face_px = 48
[faces.thresholds]
sface = 0.4
[minors]
threshold = 0.05
[audit]
prompt = "none"
[models.paths]
open_nsfw = "/opt/models/open_nsfw.onnx"
[messages]
contact = "Talk to your teacher."
"""


def show(capsys, *argv) -> str:
    assert cli.main(["policy", "show", *argv]) == 0
    return capsys.readouterr().out


def test_every_policy_setting_has_a_key_in_policy_show():
    """A setting added to Policy must be added to cli_policy.KEYS too (until then `policy show`
    prints it as a comment: this test says so)."""
    shown = {name for _, _, name in cli_policy.KEYS if name}
    shown = {n.split(".")[0] for n in shown}
    assert {f.name for f in dataclasses.fields(Policy)} - {"source"} <= shown
    assert cli_policy._unmapped(Policy()) == []


def test_defaults_are_all_shown_and_marked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    out = show(capsys)
    assert out.startswith("# Effective Consent Guard policy: built-in defaults")
    for line in ('enforce = false  # default', '[minors]\nthreshold = 0.1  # default',
                 'contact = ""  # default', 'max_pixels = 100000000  # default',
                 f'registry = "{tmp_path / "identities.db"}"  # default (in the home folder)',
                 f'path = "{tmp_path / "audit.log"}"  # default (in the home folder)',
                 "classifier_threshold = "):
        assert line in out, line
    trained = cli_policy._trained_threshold()
    assert trained is not None  # the weights ship in the package
    assert f"classifier_threshold = {trained!r}  # default (the one stored" in out
    # every key the documented default file sets is in the output
    documented = tomllib.loads(DEFAULT_POLICY_TOML)
    parsed = tomllib.loads(out)
    for section, table in documented.items():
        if isinstance(table, dict):
            assert set(table) <= set(parsed[section]), section
    assert policy_from_dict(parsed, "shown") == dataclasses.replace(
        Policy(), registry_path=str(tmp_path / "identities.db"),
        key_file=str(tmp_path / "registry.key"), audit_path=str(tmp_path / "audit.log"),
        prompt_classifier_threshold=trained, source="shown")


def test_a_changed_policy_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    (tmp_path / "policy.toml").write_text(CHANGED)
    out = show(capsys)
    assert 'nudity = "block"\n' in out and 'sexual = "block"  # default' in out
    assert "sface = 0.4" in out and 'open_nsfw = "/opt/models/open_nsfw.onnx"' in out
    original = policy_from_dict(tomllib.loads(CHANGED), "x")
    again = policy_from_dict(tomllib.loads(out), "x")
    assert again == dataclasses.replace(original, registry_path=str(tmp_path / "identities.db"),
                                        key_file=str(tmp_path / "registry.key"),
                                        audit_path=str(tmp_path / "audit.log"))
    data = json.loads(show(capsys, "--json"))
    assert data["contact"] == "Talk to your teacher." and data["face_thresholds"] == {
        "sface": 0.4} and data["actions"] == {"sexual": "block", "nudity": "block"}
    assert data["registry_path"] == str(tmp_path / "identities.db")
    assert set(data) == {f.name for f in dataclasses.fields(Policy)}


def test_show_a_given_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    other = tmp_path / "other.toml"
    other.write_text('[censor]\nstyle = "black"\n')
    out = show(capsys, str(other))
    assert f"# Effective Consent Guard policy: {other}" in out and 'style = "black"\n' in out
