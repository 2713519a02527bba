"""`consent-guard setup`: the browser's first-run set-up from a terminal (consent_guard/setup.py)."""

from consent_guard import admin, cli

PASS = "a long admin passphrase"


def test_setup_then_doctor_sees_it(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    pf = tmp_path / "pass.txt"
    pf.write_text(PASS + "\n")
    assert cli.main(["setup", "--passphrase-file", str(pf), "--no-lock"]) == 0
    out = capsys.readouterr().out
    assert "is set up" in out
    st = admin.state(home)
    assert st.has_passphrase and not st.locked and admin.verify(home, PASS)
    assert "enforce = true" in (home / "policy.toml").read_text()
    assert (home / "identities.db").exists()  # sealed with the same passphrase
    # a second set-up is refused, and changes nothing
    other = tmp_path / "other.txt"
    other.write_text("another passphrase here\n")
    assert cli.main(["setup", "--passphrase-file", str(other)]) == 2
    assert "set up already" in capsys.readouterr().err
    assert admin.verify(home, PASS) and not admin.verify(home, "another passphrase here")


def test_setup_short_passphrase_is_refused(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    pf = tmp_path / "pass.txt"
    pf.write_text("short\n")
    assert cli.main(["setup", "--passphrase-file", str(pf)]) == 2
    assert "consent-guard setup:" in capsys.readouterr().err
    assert not admin.state(home).has_passphrase


def test_setup_asks_for_an_older_registry_passphrase(tmp_path, monkeypatch, capsys):
    from consent_guard.registry import Registry

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    Registry.create(home / "identities.db", "the old registry passphrase",
                    key_file=home / "registry.key").close()
    pf, old = tmp_path / "pass.txt", tmp_path / "old.txt"
    pf.write_text(PASS + "\n")
    old.write_text("the old registry passphrase\n")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["setup", "--passphrase-file", str(pf)]) == 2  # no way to ask
    assert not admin.state(home).has_passphrase
    capsys.readouterr()
    assert cli.main(["setup", "--passphrase-file", str(pf),
                     "--registry-passphrase-file", str(old)]) == 0
    Registry.open(home / "identities.db", passphrase=PASS).close()  # resealed
