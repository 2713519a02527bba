"""consent_guard/host.py: the state both UI adapters share (home, engine, registry, audit,
enforce state), parameterised by the UI. The ComfyUI side's own tests (test_comfy_adapter.py,
test_expected_files.py) run the same code through nodes/comfy_bridge.py."""
import pytest

from consent_guard.host import Host


class UIError(RuntimeError):
    pass


@pytest.fixture
def ui(tmp_path, monkeypatch):
    monkeypatch.delenv("CONSENT_GUARD_HOME", raising=False)
    user = tmp_path / "webui"
    user.mkdir()
    host = Host(user_dir=lambda: str(user), model_dirs=lambda: [user / "models" / "cg"],
                insightface_dirs=lambda: [user / "models" / "insightface"] * 2,
                error=UIError, ui_name="WebUI")
    return host, user / "consent_guard"


def test_home_is_the_uis_folder_unless_the_environment_says_otherwise(ui, tmp_path,
                                                                     monkeypatch):
    host, home = ui
    assert host.home() == home
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "elsewhere"))
    assert host.home() == tmp_path / "elsewhere"


def test_engine_is_kept_until_the_policy_changes(ui):
    host, home = ui
    first = host.get_engine()
    assert host.get_engine() is first and not first.policy.enforce
    assert host.insightface_dirs() == [home.parent / "models" / "insightface"]
    home.mkdir(exist_ok=True)
    (home / "policy.toml").write_text('enforce = true\n[messages]\ncontact = "Ask Ms Lee."\n',
                                      encoding="utf-8")
    second = host.get_engine()
    assert second is not first and second.policy.enforce
    assert host.enforce_on() and host.contact() == "Ask Ms Lee."


def test_a_policy_that_cannot_be_read_raises_the_uis_error_and_counts_as_enforce(ui):
    host, home = ui
    home.mkdir()
    (home / "policy.toml").write_text("enforce = [broken", encoding="utf-8")
    with pytest.raises(UIError, match="cannot read its policy"):
        host.get_engine()
    assert host.enforce_on()  # fail closed
    assert host.contact() == ""


def test_a_registry_that_vanishes_is_refused_in_the_uis_words(ui):
    from consent_guard.registry import Registry

    host, home = ui
    home.mkdir()
    Registry.create(home / "identities.db", "correct horse battery",
                    key_file=home / "registry.key").close()
    assert host.get_engine().registry is not None
    (home / "identities.db").rename(home / "moved.db")
    with pytest.raises(UIError, match="identities.db"):
        host.get_engine()


def test_two_hosts_on_one_home_share_the_policy(tmp_path, monkeypatch):
    """ComfyUI and the WebUI on one machine, pointed at one home, read one policy."""
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "policy.toml").write_text("enforce = true\n", encoding="utf-8")
    comfy = Host(user_dir=lambda: str(tmp_path / "comfy" / "user"), error=UIError)
    webui = Host(user_dir=lambda: str(tmp_path / "webui"), error=UIError)
    assert comfy.home() == webui.home()
    assert comfy.get_engine().policy.enforce and webui.get_engine().policy.enforce
