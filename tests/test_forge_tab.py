"""The Consent Guard tab in a real Forge UI, driven in Chromium: status on a fresh machine, the
first-run set-up, set-up refused once done, a wrong passphrase at the lock, the policy and the
audit log; and the FastAPI routes of the same server. Skipped unless FORGE_DIR is set (see
tests/forge_harness.py) and an interpreter with playwright is found. Forge's venv must hold
the extension's dependencies (its installer: install.py; the tests' own check imports
cryptography with Forge's python). Screenshots go to $CONSENT_GUARD_SHOTS (default: the
test's temporary folder)."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import forge_harness as fh

PASS = "forge tab passphrase"
TAB_PORT = 7864

pytestmark = pytest.mark.skipif(fh.skip_reason() is not None,
                                reason=fh.skip_reason() or "")

DRIVER = r'''
import json, sys
from playwright.sync_api import sync_playwright

url, chromium, shots, passphrase = sys.argv[1:5]
result = {"steps": {}, "error": None, "page_errors": []}


def shot(page, name):
    page.screenshot(path=f"{shots}/{name}.png", full_page=True)


def text(page, sel):
    return page.locator(sel).inner_text(timeout=30000)


def wait_text(page, sel, needle, timeout=60000):
    page.wait_for_function(
        "([s, n]) => { const e = document.querySelector(s); return e && e.innerText.includes(n); }",
        arg=[sel, needle], timeout=timeout)
    return text(page, sel)


def open_section(page, title):
    page.locator("#tab_consent_guard").get_by_text(title, exact=True).first.click()


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("pageerror", lambda e: result["page_errors"].append(str(e)))
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=120000)
        page.wait_for_selector("#txt2img_prompt textarea", timeout=120000)
        tabs = page.locator("#tabs > .tab-nav button")
        result["tabs"] = tabs.all_inner_texts()
        tabs.filter(has_text="Consent Guard").first.click()
        result["steps"]["fresh_status"] = wait_text(page, "#consent_guard_status", "Set up")
        shot(page, "01_fresh")

        open_section(page, "First-run set-up")
        page.fill("#consent_guard_setup_pass input", passphrase)
        page.fill("#consent_guard_setup_confirm input", passphrase)
        page.click("#consent_guard_setup_go")
        result["steps"]["setup"] = wait_text(page, "#consent_guard_setup_msg", "Done")
        result["steps"]["setup_cleared"] = page.input_value("#consent_guard_setup_pass input")
        result["steps"]["status_after"] = wait_text(page, "#consent_guard_status", "Set up: yes")
        shot(page, "02_set_up")

        page.fill("#consent_guard_setup_pass input", "someone else's")
        page.fill("#consent_guard_setup_confirm input", "someone else's")
        page.click("#consent_guard_setup_go")
        result["steps"]["setup_again"] = wait_text(page, "#consent_guard_setup_msg", "Refused")
        shot(page, "03_set_up_again")

        open_section(page, "Lock")
        page.fill("#consent_guard_lock_pass input", "not the passphrase")
        page.click("#consent_guard_unlock")
        result["steps"]["unlock_wrong"] = wait_text(page, "#consent_guard_lock_msg", "Refused")

        open_section(page, "Policy")
        page.click("#consent_guard_policy_load")
        page.wait_for_function(
            "() => document.querySelector('#consent_guard_policy_text textarea').value"
            ".includes('enforce')", timeout=60000)
        result["steps"]["policy"] = page.input_value("#consent_guard_policy_text textarea")

        open_section(page, "Audit log")
        page.fill("#consent_guard_audit_pass input", passphrase)
        page.click("#consent_guard_audit_go")
        result["steps"]["audit"] = wait_text(page, "#consent_guard_audit_table", "admin")
        shot(page, "04_lock_policy_audit")

        try:  # the settings section (display options only); not fatal
            tabs.filter(has_text="Settings").first.click()
            page.locator("#settings").get_by_text("Consent Guard", exact=True).first.click()
            page.wait_for_timeout(1000)
            page.evaluate("window.scrollTo(0, 0)")
            result["steps"]["settings"] = page.locator("#settings").inner_text(timeout=30000)
            page.screenshot(path=f"{shots}/05_settings.png")
        except Exception as err:
            result["steps"]["settings"] = f"not shown: {err}"
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        try:
            shot(page, "99_error")
        except Exception:
            pass
    finally:
        browser.close()
print("RESULT " + json.dumps(result))
'''


@pytest.fixture
def server(tmp_path_factory):  # per test: the next test waits for its port
    if fh.playwright_python() is None:
        pytest.skip("no interpreter with playwright (set CONSENT_GUARD_PLAYWRIGHT_PYTHON)")
    ok = subprocess.run([str(fh.forge_python()), "-c", "import cryptography"],
                        capture_output=True).returncode == 0
    if not ok:
        pytest.skip("Forge's venv lacks the extension's dependencies (cryptography): run the "
                    "extension's installer there")
    root = tmp_path_factory.mktemp("forge_tab")
    # its own port: the harness's ports are shared with other suites, and a server that is
    # not ours must never be driven (set-up would write into someone else's home)
    forge = fh.Forge(root / "data", root / "home", ui=True, port=TAB_PORT).start()
    yield forge
    forge.stop()


def wait_for_routes(server, timeout: float = 180):
    """webui serves /sdapi and the page before it runs the on_app_started callbacks (webui.py:
    create_api, then app_started_callback), so our routes come a few seconds later."""
    deadline = time.time() + timeout
    while True:
        code, body = server.get("/consent_guard/status")
        if code != 404 or time.time() > deadline:
            return code, body
        time.sleep(1)


def test_tab_set_up_and_status_in_a_real_forge(server, tmp_path):
    shots = Path(os.environ.get("CONSENT_GUARD_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    code, status = wait_for_routes(server)
    assert code == 200, status
    assert status["setup"]["home"] == str(server.home), \
        f"another server answers on {server.url}: {status['setup']['home']}; not driving it"
    assert status["set_up"] is False, status

    driver = server.data / "tab_driver.py"
    driver.write_text(DRIVER)
    run = subprocess.run([fh.playwright_python(), str(driver), server.url, fh.CHROMIUM,
                          str(shots), PASS], capture_output=True, text=True, timeout=400)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the UI driver failed ({run.returncode}):\n{run.stdout}{run.stderr}"
    result = json.loads(lines[-1][len("RESULT "):])
    steps = result["steps"]
    assert result["error"] is None, (result, server.tail())
    assert "Consent Guard" in result["tabs"]
    assert "Set up: no" in steps["fresh_status"]
    assert steps["setup"].startswith("Done.") and "Enforce mode on, lock on" in steps["setup"]
    assert steps["setup_cleared"] == ""
    assert "Enforce mode: on" in steps["status_after"]
    assert "Admin lock: on" in steps["status_after"]
    assert "already_set_up" in steps["setup_again"]
    assert "passphrase_wrong" in steps["unlock_wrong"]
    assert "enforce = true" in steps["policy"]
    assert "a1111 tab" in steps["audit"]

    # the same server's routes see what the tab did; set-up over HTTP is refused now
    code, status = server.get("/consent_guard/status")
    assert code == 200 and status["set_up"] and status["locked"] and status["enforce"]
    assert PASS not in json.dumps(status)
    code, body = server.post("/consent_guard/setup", {"passphrase": "x" * 12,
                                                      "passphrase_confirm": "x" * 12,
                                                      "enforce": False, "locked": False})
    assert code == 409 and body["code"] == "already_set_up"
    code, body = server.post("/consent_guard/lock", {"locked": False, "passphrase": "nope"})
    assert code == 403 and body["code"] == "passphrase_wrong"
    assert (server.home / "admin.json").exists()
    assert "Show the model list in the Consent Guard tab" in steps["settings"], steps["settings"]

    # doctor --webui on this very server: the extension (linked in), its process, its home
    from consent_guard import doctor

    checks = {c.name: c for c in doctor.webui_checks(server.data, server.home)[0]}
    assert checks["webui extension"].status == doctor.OK, checks
    assert checks["webui settings"].status == doctor.OK, checks
    assert checks["webui arguments"].status == doctor.OK, checks
    assert checks["webui home"].status == doctor.OK, checks


def test_doctor_sees_a_forge_started_without_extras(tmp_path):
    """A real Forge started with --disable-extra-extensions: the extension does not load (no
    routes), and doctor reads the flag from the running process."""
    from consent_guard import doctor

    forge = fh.Forge(tmp_path / "data", tmp_path / "home", port=TAB_PORT + 1,
                     extra_args=["--disable-extra-extensions"]).start()
    try:
        code, _ = forge.get("/sdapi/v1/options")
        assert code == 200
        time.sleep(3)  # on_app_started would have run
        assert forge.get("/consent_guard/status")[0] == 404
        checks = {c.name: c for c in doctor.webui_checks(forge.data, forge.home)[0]}
    finally:
        forge.stop()
    assert checks["webui extension"].status == doctor.OK  # the folder is there...
    bad = checks["webui arguments"]
    assert bad.status == doctor.FAIL and "--disable-extra-extensions" in bad.detail, checks
