"""The admin lock, node overrides, `consent-guard doctor` on simulated tamper cases, and the
prestartup guard (enforce mode with a plugin that cannot load)."""
import asyncio
import importlib.util
import json
import os
import sys
import types
import urllib.error
from pathlib import Path

import pytest

import comfy_standins

from consent_guard import admin, doctor
from consent_guard.cli import main
from consent_guard.overrides import apply_override
from consent_guard.policy import Policy, PolicyError
from consent_guard.verdict import Decision

REPO = Path(__file__).resolve().parent.parent
PASS = "correct horse battery"


def test_passphrase_is_stored_as_a_slow_hash_only(tmp_path):
    admin.set_passphrase(tmp_path, PASS)
    stored = (tmp_path / "admin.json").read_text()
    assert PASS not in stored and json.loads(stored)["kdf"]["name"] == "scrypt"
    assert admin.verify(tmp_path, PASS) and not admin.verify(tmp_path, "wrong passphrase")
    with pytest.raises(admin.AdminLocked):
        admin.set_passphrase(tmp_path, "another one!", current="wrong passphrase")
    admin.set_passphrase(tmp_path, "another one!", current=PASS)
    assert admin.verify(tmp_path, "another one!")
    with pytest.raises(admin.AdminError, match="at least 8"):
        admin.set_passphrase(tmp_path, "short", current="another one!")


def test_lock_unlock_and_require(tmp_path):
    admin.require_admin(tmp_path, None, "anything")  # nothing set: nothing locked
    with pytest.raises(admin.AdminError, match="set-passphrase"):
        admin.set_locked(tmp_path, True, PASS)
    admin.set_passphrase(tmp_path, PASS)
    with pytest.raises(admin.AdminLocked):
        admin.set_locked(tmp_path, True, "wrong passphrase")
    admin.set_locked(tmp_path, True, PASS)
    assert admin.is_locked(tmp_path)
    with pytest.raises(admin.AdminLocked, match="changing the policy"):
        admin.require_admin(tmp_path, "wrong passphrase", "changing the policy")
    admin.require_admin(tmp_path, PASS, "changing the policy")
    admin.set_locked(tmp_path, False, PASS)
    admin.require_admin(tmp_path, None, "changing the policy")


def test_a_damaged_admin_file_stays_locked(tmp_path):
    (tmp_path / "admin.json").write_text("{not json")
    st = admin.state(tmp_path)
    assert st.locked and "cannot be read" in st.problem
    with pytest.raises(admin.AdminLocked):
        admin.require_admin(tmp_path, PASS, "changing the policy")


def test_cli_admin_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    pp = tmp_path / "pp"
    pp.write_text(PASS + "\n")
    assert main(["admin", "set-passphrase", "--new-passphrase-file", str(pp)]) == 0
    assert main(["admin", "lock", "--passphrase-file", str(pp)]) == 0
    main(["admin", "status"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["locked"] is True
    bad = tmp_path / "bad"
    bad.write_text("wrong passphrase\n")
    assert main(["policy", "init", "--passphrase-file", str(bad)]) == 2
    assert "needs the admin passphrase" in capsys.readouterr().err
    assert main(["policy", "init", "--passphrase-file", str(pp)]) == 0
    assert main(["admin", "unlock", "--passphrase-file", str(bad)]) == 2
    assert main(["admin", "unlock", "--passphrase-file", str(pp)]) == 0


def test_overrides_only_stricter_when_locked():
    base = Policy()
    looser = "[actions]\nsexual = 'allow'\n[explicit]\nopen_nsfw_explicit_at = 0.95\n"
    policy, ignored = apply_override(base, looser, locked=False)
    assert policy.actions["sexual"] is Decision.ALLOW and policy.open_nsfw_explicit_at == 0.95
    assert ignored == []
    policy, ignored = apply_override(base, looser, locked=True)
    assert policy == base and len(ignored) == 2
    stricter = ("[actions]\nnudity = 'block'\n[explicit]\nopen_nsfw_explicit_at = 0.6\n"
                "[prompts]\nsexual_suggestive = 'block'\n")
    policy, ignored = apply_override(base, stricter, locked=True)
    assert ignored == [] and policy.actions["nudity"] is Decision.BLOCK
    assert policy.open_nsfw_explicit_at == 0.6 and policy.prompt_suggestive is Decision.BLOCK
    with pytest.raises(PolicyError, match="cannot change"):
        apply_override(base, "enforce = false\n", locked=False)
    with pytest.raises(PolicyError, match="cannot change"):
        apply_override(base, "[audit]\nenabled = false\n", locked=False)
    with pytest.raises(PolicyError):
        apply_override(base, "[actions]\nnudity = 'hide'\n", locked=False)


# -- doctor ------------------------------------------------------------------------------------

@pytest.fixture
def install(tmp_path):
    """A ComfyUI folder with this plugin in custom_nodes (a copy of the files doctor reads),
    and a home with enforce on, a locked admin passphrase."""
    comfy, home = tmp_path / "ComfyUI", tmp_path / "home"
    plugin = comfy / "custom_nodes" / "ComfyUI-Consent-Guard"
    for rel in ("consent_guard/engine.py", "nodes/enforce.py", "prestartup_script.py"):
        (plugin / rel).parent.mkdir(parents=True, exist_ok=True)
        (plugin / rel).write_text((REPO / rel).read_text())
    home.mkdir()
    (home / "policy.toml").write_text("enforce = true\n")
    admin.set_passphrase(home, PASS)
    admin.set_locked(home, True, PASS)
    return comfy, home, plugin


ARMED = {"enforce": True, "armed": True, "problem": None,
         "hooks": {"execution.get_output_data": "installed", "prompt handler": "installed"}}


def setup_of(home: Path, identities="none") -> dict:
    """What GET /consent_guard/status says of a server running with this home."""
    from consent_guard.expect import sha256_of

    return {"home": str(home),
            "policy": {"path": str(home / "policy.toml"),
                       "sha256": sha256_of(home / "policy.toml"), "enforce": True},
            "registry": {"path": str(home / "identities.db"),
                         "exists": (home / "identities.db").exists(), "identities": identities}}


def fake_comfy(argv=("main.py",), status=ARMED, loaded=True, home=None):
    """A running ComfyUI's answers; with `home`, its status says it runs with that home."""
    def get_json(url):
        if url.endswith("/system_stats"):
            return {"system": {"argv": list(argv)}}
        if not loaded:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        if home is not None and "setup" not in status:
            return dict(status, setup=setup_of(home))
        return status
    return get_json


def by_name(checks):
    return {c.name: c for c in checks}


def run_doctor(comfy, home, **kw):
    kw.setdefault("get_json", fake_comfy(home=home))
    return by_name(doctor.run(home, comfy, url=kw.pop("url", "http://127.0.0.1:8188"), **kw))


def test_doctor_all_good_except_what_this_test_machine_cannot_show(install):
    comfy, home, plugin = install
    checks = run_doctor(comfy, home)
    for name in ("plugin folder", "prestartup guard", "policy", "enforce mode", "admin lock",
                 "admin's record", "ComfyUI arguments", "plugin loaded", "hooks",
                 "protection active", "engine", "same home", "same policy", "same registry"):
        assert checks[name].status == doctor.OK, checks[name]


def test_doctor_reports_each_tamper_case(install):
    comfy, home, plugin = install
    (plugin / "prestartup_script.py").unlink()
    assert run_doctor(comfy, home)["prestartup guard"].status == doctor.FAIL

    plugin.rename(plugin.with_name(plugin.name + ".disabled"))
    c = run_doctor(comfy, home)["plugin folder"]
    assert c.status == doctor.FAIL and "renamed" in c.detail
    plugin.with_name(plugin.name + ".disabled").rename(plugin)

    (home / "policy.toml").write_text("enforce = false\n")
    assert run_doctor(comfy, home)["enforce mode"].status == doctor.FAIL
    (home / "policy.toml").write_text("enforce = nope\n")
    assert run_doctor(comfy, home)["policy"].status == doctor.FAIL
    (home / "policy.toml").write_text("enforce = true\n")

    admin.set_locked(home, False, PASS)
    assert run_doctor(comfy, home)["admin lock"].status == doctor.WARN
    (home / "admin.json").unlink()
    assert run_doctor(comfy, home)["admin lock"].status == doctor.FAIL

    (home / "policy.toml").write_text(f'enforce = true\n[models.paths]\nopen_nsfw = '
                                      f'"{home / "gone.onnx"}"\n')
    c = run_doctor(comfy, home)["models"]
    assert c.status == doctor.FAIL and "gone.onnx" in c.detail
    (home / "policy.toml").write_text("enforce = true\n")

    argv = ("main.py", "--disable-all-custom-nodes", "--whitelist-custom-nodes", "other")
    c = run_doctor(comfy, home, get_json=fake_comfy(argv=argv))["ComfyUI arguments"]
    assert c.status == doctor.FAIL and "ComfyUI-Consent-Guard" in c.detail
    argv = ("main.py", "--disable-all-custom-nodes", "--whitelist-custom-nodes",
            "ComfyUI-Consent-Guard")
    assert run_doctor(comfy, home, get_json=fake_comfy(argv=argv))[
        "ComfyUI arguments"].status == doctor.OK

    assert run_doctor(comfy, home, get_json=fake_comfy(loaded=False))[
        "plugin loaded"].status == doctor.FAIL
    unarmed = dict(ARMED, armed=False, problem="hooks missing: previews",
                   hooks={"previews": "not installed: no server"})
    checks = run_doctor(comfy, home, get_json=fake_comfy(status=unarmed))
    assert checks["hooks"].status == doctor.FAIL and checks["protection active"].status == \
        doctor.FAIL and "previews" in checks["protection active"].detail

    # without a URL: ComfyUI processes found in /proc
    flags = [["python", "main.py", "--disable-all-custom-nodes"]]
    checks = by_name(doctor.run(home, comfy, cmdlines=lambda: flags))
    assert checks["ComfyUI arguments"].status == doctor.FAIL


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_doctor_file_permissions_for_a_named_user(install):
    import pwd

    comfy, home, plugin = install
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    for p in [home, comfy / "custom_nodes", *plugin.rglob("*"), plugin, *home.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    c = run_doctor(comfy, home, user="nobody")["file permissions"]
    assert c.status == doctor.OK, c
    (home / "policy.toml").chmod(0o666)
    c = run_doctor(comfy, home, user="nobody")["file permissions"]
    assert c.status == doctor.FAIL and "policy.toml" in c.detail


def test_doctor_cli_exit_status(install, monkeypatch, capsys):
    comfy, home, plugin = install
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    monkeypatch.setattr(doctor, "_proc_cmdlines", lambda: [])
    code = main(["doctor", "--comfyui", str(comfy), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["check"] for r in rows} >= {"home", "plugin folder", "enforce mode", "admin lock"}
    # 1 exactly when a check failed (here, e.g., models not installed, or files this
    # non-root account could change), else 0
    assert code == (1 if any(r["status"] == doctor.FAIL for r in rows) else 0), rows
    (home / "policy.toml").write_text("enforce = false\n")
    assert main(["doctor", "--comfyui", str(comfy), "--json"]) == 1
    rows = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["enforce mode"]["status"] == doctor.FAIL  # set up, so not "todo"


# -- the prestartup guard ------------------------------------------------------------------------

def test_prestartup_guard_refuses_until_the_plugin_arms(tmp_path, monkeypatch):
    """Enforce mode with a plugin that never finishes loading: every submission is refused;
    the guard is put on `execution` when ComfyUI imports it (after this script ran)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "policy.toml").write_text("enforce = true\n")
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    monkeypatch.delitem(sys.modules, "_consent_guard_enforce", raising=False)
    monkeypatch.delitem(sys.modules, "execution", raising=False)
    fake = tmp_path / "comfy"
    fake.mkdir()
    (fake / "execution.py").write_text(
        "async def validate_prompt(prompt_id, prompt, partial_execution_list):\n"
        "    return (True, None, list(prompt), {})\n")
    monkeypatch.syspath_prepend(str(fake))
    spec = importlib.util.spec_from_file_location("cg_prestartup", REPO / "prestartup_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    finders = [f for f in sys.meta_path if type(f).__name__ == "_GuardExecution"]
    try:
        import execution

        ok, error, _, _ = asyncio.run(execution.validate_prompt("p", {"1": {}}, None))
        assert not ok and error["type"] == "consent_guard_not_active"
        assert "did not finish loading" in error["message"]
        sys.modules["_consent_guard_enforce"].armed = True  # what nodes/enforce.py does
        assert asyncio.run(execution.validate_prompt("p", {"1": {}}, None))[0] is True
    finally:
        for f in finders:
            if f in sys.meta_path:
                sys.meta_path.remove(f)
        sys.modules.pop("execution", None)
        sys.modules.pop("_consent_guard_enforce", None)


def test_prestartup_guard_is_quiet_without_enforce(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "_consent_guard_enforce", raising=False)
    execution = types.ModuleType("execution")

    async def validate_prompt(prompt_id, prompt, partial):
        return (True, None, [], {})

    execution.validate_prompt = validate_prompt
    monkeypatch.setitem(sys.modules, "execution", execution)
    spec = importlib.util.spec_from_file_location("cg_prestartup2", REPO / "prestartup_script.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        assert asyncio.run(execution.validate_prompt("p", {}, None))[0] is True
        (tmp_path / "policy.toml").write_text("enforce = [\n")  # unreadable: fail closed
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        ok, error, _, _ = asyncio.run(execution.validate_prompt("p", {}, None))
        assert not ok and "cannot be read" in error["message"]
    finally:
        sys.modules.pop("_consent_guard_enforce", None)
    assert os.environ["CONSENT_GUARD_HOME"] == str(tmp_path)


# -- admin.json is owner-only (issue 12, item 14) -------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_admin_file_is_owner_only_even_when_it_was_world_readable(tmp_path):
    admin.set_passphrase(tmp_path, PASS)
    assert (tmp_path / "admin.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "admin.json").chmod(0o644)  # written by an older version
    admin.set_locked(tmp_path, True, PASS)
    assert (tmp_path / "admin.json").stat().st_mode & 0o777 == 0o600
    assert admin.is_locked(tmp_path) and not (tmp_path / "admin.json.tmp").exists()


# -- doctor --url compares the running server's setup (issue 12, item 6) ----------------------

def test_doctor_fails_a_comfyui_running_with_another_home(install, tmp_path, monkeypatch,
                                                          capsys):
    """The issue's repro: ComfyUI started with another CONSENT_GUARD_HOME holding an allow-all
    policy and no registry, armed and enforcing as far as its hooks go. Its status is made by
    the real status route (nodes/admin_routes.py under the ComfyUI stand-ins)."""
    comfy, home, plugin = install
    from consent_guard.registry import Registry
    Registry.create(home / "identities.db", PASS, key_file=home / "registry.key").close()
    other = tmp_path / "other_home"
    other.mkdir()
    (other / "policy.toml").write_text("enforce = true\n[actions]\nsexual = 'allow'\n"
                                       "nudity = 'allow'\n")
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(other))
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy_standin")
    try:
        import importlib
        api = importlib.import_module(pkg.__name__ + ".nodes.admin_routes")
        body = api.status_sync().body
    finally:
        for key in [k for k in sys.modules if k.startswith(pkg.__name__)]:
            del sys.modules[key]
    assert body["setup"]["home"] == str(other)
    assert body["setup"]["registry"]["identities"] == "none"
    status = dict(ARMED, **{k: body[k] for k in ("setup", "engine_problem")})
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    checks = run_doctor(comfy, home, get_json=fake_comfy(status=status))
    assert checks["protection active"].status == doctor.OK  # what it said before
    for name in ("same home", "same policy", "same registry"):
        assert checks[name].status == doctor.FAIL, checks[name]
    assert str(other) in checks["same home"].detail
    assert "0 people" not in checks["same registry"].detail
    assert "identities.db" in checks["same registry"].detail

    monkeypatch.setattr(doctor, "_get_json", fake_comfy(status=status))
    assert main(["doctor", "--comfyui", str(comfy), "--url", "http://127.0.0.1:8188"]) == 1
    out = capsys.readouterr().out
    assert "protection looks complete" not in out and "[FAIL] same home" in out


def test_doctor_reports_the_running_engine_problem_and_an_old_status(install):
    comfy, home, plugin = install
    broken = dict(ARMED, engine_problem="the identity registry is missing", setup=setup_of(home))
    checks = run_doctor(comfy, home, get_json=fake_comfy(status=broken))
    assert checks["engine"].status == doctor.FAIL and "registry" in checks["engine"].detail
    checks = run_doctor(comfy, home, get_json=fake_comfy(status=ARMED))  # no "setup" at all
    assert checks["same setup"].status == doctor.FAIL


def test_doctor_fails_a_count_or_policy_that_differs(install):
    comfy, home, plugin = install
    from consent_guard.registry import Registry
    Registry.create(home / "identities.db", PASS, key_file=home / "registry.key").close()
    checks = run_doctor(comfy, home, get_json=fake_comfy(
        status=dict(ARMED, setup=setup_of(home, identities=0))))
    assert checks["same registry"].status == doctor.OK, checks["same registry"]
    checks = run_doctor(comfy, home, get_json=fake_comfy(
        status=dict(ARMED, setup=setup_of(home, identities="none"))))
    assert checks["same registry"].status == doctor.FAIL
    remote = setup_of(home, identities=0)
    remote["policy"]["sha256"] = "0" * 64
    checks = run_doctor(comfy, home, get_json=fake_comfy(status=dict(ARMED, setup=remote)))
    assert checks["same policy"].status == doctor.FAIL


def test_doctor_reports_the_admins_record(install):
    comfy, home, plugin = install
    assert run_doctor(comfy, home)["admin's record"].status == doctor.OK  # locked: recorded
    (home / "policy.toml").rename(home / "policy.moved")
    c = run_doctor(comfy, home)["admin's record"]
    assert c.status == doctor.FAIL and "missing" in c.detail


def test_prestartup_guard_refuses_uploads_until_the_plugin_arms(tmp_path, monkeypatch):
    """server.py's PromptServer gets a middleware when ComfyUI imports `server`: uploads and
    /view answer 403 while enforce mode is on and the plugin has not armed."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "policy.toml").write_text("enforce = true\n")
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    for name in ("_consent_guard_enforce", "execution", "server"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    aiohttp, web = types.ModuleType("aiohttp"), types.ModuleType("aiohttp.web")
    web.json_response = lambda body, status=200: (status, body)
    aiohttp.web = web
    monkeypatch.setitem(sys.modules, "aiohttp", aiohttp)
    monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    fake = tmp_path / "comfy"
    fake.mkdir()
    (fake / "server.py").write_text(
        "import types\n"
        "class PromptServer:\n"
        "    def __init__(self, loop=None):\n"
        "        self.app = types.SimpleNamespace(middlewares=[])\n")
    monkeypatch.syspath_prepend(str(fake))
    spec = importlib.util.spec_from_file_location("cg_prestartup3", REPO / "prestartup_script.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finders = [f for f in sys.meta_path if type(f).__name__ == "_GuardExecution"]
    try:
        import server

        (middleware,) = server.PromptServer().app.middlewares
        assert middleware.__middleware_version__ == 1  # aiohttp calls it (request, handler)

        async def handler(request):
            return (200, "served")

        def ask(path):
            return asyncio.run(middleware(types.SimpleNamespace(path=path), handler))

        for path in ("/upload/image", "/api/upload/mask", "/view", "/api/view"):
            status, body = ask(path)
            assert status == 403 and "protection is not in place" in body["error"], path
        assert ask("/queue") == (200, "served")
        sys.modules["_consent_guard_enforce"].armed = True
        assert ask("/upload/image") == (200, "served")
    finally:
        for f in finders:
            if f in sys.meta_path:
                sys.meta_path.remove(f)
        sys.modules.pop("server", None)
        sys.modules.pop("_consent_guard_enforce", None)
