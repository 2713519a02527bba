import pytest

from consent_guard import Decision, Policy, PolicyError, load_policy
from consent_guard.home import resolve_home
from consent_guard.policy import DEFAULT_POLICY_TOML, TOP_LEVEL, policy_from_dict

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


def test_documented_default_file_equals_builtin_defaults(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text(DEFAULT_POLICY_TOML)
    loaded = load_policy(f)
    assert loaded == Policy(source=str(f))


def test_missing_home_policy_means_defaults(tmp_path):
    p = load_policy(home=tmp_path)
    assert p.action_for("sexual") is Decision.BLOCK and p.action_for("nudity") is Decision.CENSOR
    assert p.source is None


def test_home_policy_is_read(tmp_path):
    (tmp_path / "policy.toml").write_text('[actions]\nnudity = "block"\n')
    assert load_policy(home=tmp_path).action_for("nudity") is Decision.BLOCK


def test_unknown_key_gets_a_suggestion():
    with pytest.raises(PolicyError, match=r"unknown key 'sexal' in \[actions\]. Did you mean 'sexual'"):
        policy_from_dict({"actions": {"sexal": "block"}})


def test_every_problem_is_reported_at_once():
    with pytest.raises(PolicyError) as err:
        policy_from_dict({"actions": {"nudity": "hide"}, "censor": {"margin": "big"},
                          "explicit": {"open_nsfw_safe_below": 0.9, "open_nsfw_explicit_at": 0.5},
                          "limits": {"max_pixels": 10}, "extra": 1})
    msg = str(err.value)
    assert "5 problem(s)" in msg or "6 problem(s)" in msg
    for part in ("'hide' is not one of", "margin must be a number", "must not be above",
                 "max_pixels", "unknown top-level key 'extra'"):
        assert part in msg


def test_out_of_range_and_wrong_version():
    with pytest.raises(PolicyError, match="out of range"):
        policy_from_dict({"explicit": {"nudenet_min_score": 1.5}})
    with pytest.raises(PolicyError, match="reads version 1"):
        policy_from_dict({"version": 2})


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("[actions\nsexual=")
    with pytest.raises(PolicyError, match="not valid TOML") as err:
        load_policy(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "absent.toml")


def test_default_toml_parses_and_documents_every_section():
    data = tomllib.loads(DEFAULT_POLICY_TOML)
    assert set(data) == set(TOP_LEVEL)  # every section is documented in the default file


def test_home_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "h"))
    assert resolve_home("/comfy/user") == tmp_path / "h"
    monkeypatch.delenv("CONSENT_GUARD_HOME")
    assert str(resolve_home("/comfy/user")) == "/comfy/user/consent_guard"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert resolve_home() == tmp_path / "cfg" / "consent-guard"
