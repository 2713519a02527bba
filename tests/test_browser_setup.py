"""The first-run set-up and the Consent Guard panel in a real browser against a real ComfyUI.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (see test_comfyui_integration.py),
Playwright is importable and a Chromium is at CONSENT_GUARD_CHROMIUM (default Debian's
/usr/bin/chromium). Run, e.g., with Playwright from another venv:

    PYTHONPATH=/tmp/pw_only COMFYUI_DIR=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/ComfyUI/venv/bin/python \\
        .venv/bin/python -m pytest -q tests/test_browser_setup.py

(/tmp/pw_only holds links to that venv's playwright and greenlet packages only.)

One ComfyUI with a fresh Consent Guard home, one browser page, the steps in order: the set-up
dialog offered on load (Escape closes it, focus returns; opened again from the command, first
field focused), set-up with enforce and lock on, the panel's status, enrolling a benign adult
(wrong passphrase, then right; the form resets), a refusal (that person's photo as a source),
the locked policy (no passphrase, a wrong one: different messages; the right one saves), a
blocked image (a policy that calls benign photos explicit), unlocking, a change without
passphrase. Screenshots go to $CONSENT_GUARD_SHOTS (default /tmp/shots/setup/).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from test_comfyui_integration import COMFYUI_DIR, outputs, start, wait_done

try:
    from playwright.sync_api import expect as pw_expect, sync_playwright
except ImportError:  # pragma: no cover - the suite runs without it
    sync_playwright = None

CHROMIUM = os.environ.get("CONSENT_GUARD_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("CONSENT_GUARD_SHOTS", "/tmp/shots/setup"))
pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not importable"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
]
PASS = "browser setup passphrase"
EVERYTHING_EXPLICIT = "[explicit]\nopen_nsfw_safe_below = 0.0\nopen_nsfw_explicit_at = 0.0\n"
PANEL = ".consent-guard-panel"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from conftest import package_file

    astronaut = package_file("skimage", "data/astronaut.png")  # an adult portrait
    server, base, home = start(tmp_path_factory)
    shutil.copy(astronaut, base / "input" / "astronaut.png")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30000)
        try:
            page.goto(server.url)
            page.wait_for_function("window.app && window.app.graph", timeout=180000)
            # ComfyUI's first-visit templates browser: closed as a user would (it opens on
            # top; the set-up dialog waits until no other dialog is open)
            page.locator(".p-dialog-mask").first.wait_for(timeout=15000)
            shot(page, "00_first_visit")
            page.keyboard.press("Escape")
            page.wait_for_function("window.app && window.app.graph", timeout=180000)
            yield page, server, base, home
        finally:
            browser.close()
            server.stop()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def panel(page):
    """The Consent Guard sidebar tab, opened if it is not."""
    if not page.locator(PANEL).is_visible():
        page.locator(".consent-guard-tab-button").first.click()
    pw_expect(page.locator(PANEL)).to_be_visible()
    return page.locator(PANEL)


def close_panel(page):
    if page.locator(PANEL).is_visible():
        page.locator(".consent-guard-tab-button").first.click()
    pw_expect(page.locator(PANEL)).to_be_hidden()


def section(page, title: str):
    details = panel(page).locator("details", has=page.locator("summary", has_text=title))
    if details.get_attribute("open") is None:
        details.locator("summary").click()
    return details


def focused_name(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.name || ''")


def run_in_ui(page, server, graph: dict) -> dict:
    """Queue `graph` through the front end (app.loadApiJson, app.queuePrompt) and wait for it
    to finish; returns its history entry (None when it was refused before queueing)."""
    before = set(server.get("/history"))
    page.evaluate(f"app.loadApiJson({json.dumps(graph)})")
    page.wait_for_timeout(1000)
    page.evaluate("app.queuePrompt(0)")
    deadline = time.time() + 180
    while time.time() < deadline:
        new = set(server.get("/history")) - before
        if new:
            return wait_done(server, new.pop())
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"] and \
                time.time() > deadline - 170:
            page.wait_for_timeout(1000)
            if not set(server.get("/history")) - before and not server.get("/queue")[
                    "queue_running"]:
                return None
        page.wait_for_timeout(500)
    raise TimeoutError("the workflow did not finish")


def visible_message_with(page, text: str) -> bool:
    """A dialog, toast or alert on the page (not our panel) shows `text`."""
    return page.evaluate("""(text) => [...document.querySelectorAll(
        '.p-dialog, .p-toast-message, .comfy-modal, [role=alert], [role=dialog]')]
        .some((n) => n.offsetParent !== null && !n.closest('.consent-guard-panel')
                     && n.innerText.includes(text))""", text)


def test_1_setup_is_offered_and_escape_returns_focus(ui):
    page, server, base, home = ui
    form = page.locator("form.cg-setup")
    pw_expect(form).to_be_visible(timeout=60000)  # opened by itself on the first load
    pw_expect(page.get_by_text("Consent Guard is not set up yet")).to_be_visible()
    pw_expect(form.locator("input[name=passphrase]")).to_be_focused()
    shot(page, "01_setup_offered")
    page.wait_for_timeout(500)  # the dialog's show animation: Escape is bound after it
    page.keyboard.press("Escape")
    pw_expect(form).to_be_hidden()

    opener = panel(page).locator("button.cg-setup-open")  # the panel's own button
    opener.click()
    pw_expect(form).to_be_visible()
    pw_expect(form.locator("input[name=passphrase]")).to_be_focused()
    page.mouse.click(5, 450)  # the backdrop closes it too
    pw_expect(form).to_be_hidden()
    pw_expect(opener).to_be_focused()  # focus went back to the button that opened it


def test_2_setup_with_enforce_and_lock(ui):
    page, server, base, home = ui
    page.evaluate("app.extensionManager.command.execute('ConsentGuard.Setup')")
    form = page.locator("form.cg-setup")
    pw_expect(form).to_be_visible()
    form.locator("input[name=passphrase]").fill(PASS)
    form.locator("input[name=passphrase_confirm]").fill(PASS + " typo")
    form.locator("button[type=submit]").click()
    pw_expect(form.get_by_text("differ")).to_be_visible()
    assert not (home / "admin.json").exists()
    form.locator("input[name=passphrase_confirm]").fill(PASS)
    assert form.locator("input[name=enforce]").is_checked()
    assert form.locator("input[name=locked]").is_checked()
    form.locator("button[type=submit]").click()
    pw_expect(form.get_by_text("Consent Guard is set up.")).to_be_visible(timeout=60000)
    shot(page, "02_setup_done")
    assert (home / "admin.json").exists() and (home / "identities.db").exists()
    status = server.get("/api/consent_guard/status")
    assert status["set_up"] and status["locked"] and status["enforce"] and status["armed"]
    pw_expect(form).to_be_hidden(timeout=10000)  # the dialog closes by itself


def test_3_panel_status(ui):
    page, server, base, home = ui
    p = panel(page)
    status = p.locator("table.cg-status")
    pw_expect(status).to_contain_text("armed")
    pw_expect(status).to_contain_text("Enforce mode")
    pw_expect(status.locator("tr", has_text="Lock")).to_contain_text("on")
    pw_expect(status.locator("tr", has_text="Registry")).to_contain_text("0 protected")
    pw_expect(status.locator("tr", has_text="Hooks")).to_contain_text("installed")
    pw_expect(status.locator("tr", has_text="Models")).to_contain_text("found")
    shot(page, "03_panel_status")


def test_4_enrol_wrong_then_right_and_the_form_resets(ui, astronaut_png):
    page, server, base, home = ui
    form = section(page, "Enrol protected person").locator("form.cg-enrol")
    form.locator("input[name=name]").fill("Astronaut Example")
    form.locator("input[name=consent_by]").fill("Astronaut Example")
    form.locator("input[name=scope][value=any]").check()
    form.locator("input[name=photo]").set_input_files(str(astronaut_png))
    form.locator("input[name=passphrase]").fill("not the passphrase")
    form.locator("button[type=submit]").click()
    result = form.locator(".cg-result")
    pw_expect(result).to_contain_text("Wrong admin passphrase", timeout=60000)
    pw_expect(form.locator("input[name=passphrase]")).to_be_focused()
    shot(page, "04_enrol_wrong_passphrase")

    form.locator("input[name=passphrase]").fill(PASS)
    form.locator("button[type=submit]").click()
    pw_expect(result).to_contain_text("Enrolled Astronaut Example", timeout=120000)
    shot(page, "05_enrolled")
    assert form.locator("input[name=name]").input_value() == ""
    assert form.locator("input[name=consent_by]").input_value() == ""
    assert form.locator("input[name=photo]").input_value() == ""
    assert form.locator("input[name=scope][value=explicit]").is_checked()
    pw_expect(panel(page).locator("table.cg-status tr", has_text="Registry")).to_contain_text(
        "1 protected", timeout=15000)


def test_5_the_enrolled_persons_photo_is_refused(ui):
    page, server, base, home = ui
    close_panel(page)
    hist = run_in_ui(page, server, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": "cg_browser_refused"}}})
    page.wait_for_timeout(2000)
    shot(page, "06_refused")
    assert hist is None or hist["status"]["status_str"] == "error"
    assert outputs(base, "cg_browser_refused") == []
    assert visible_message_with(page, "Consent Guard")
    page.keyboard.press("Escape")


def test_6_locked_policy_needs_the_passphrase(ui):
    page, server, base, home = ui
    form = section(page, "Policy").locator("form.cg-policy")
    text = form.locator("textarea[name=text]")
    before = (home / "policy.toml").read_text()
    page.wait_for_function("document.querySelector('form.cg-policy textarea').value.length > 0")
    text.fill("enforce = false\n" + EVERYTHING_EXPLICIT)
    result = form.locator(".cg-result")
    form.locator("button[type=submit]").click()
    pw_expect(result).to_contain_text("needs the admin passphrase")
    missing = result.inner_text()
    shot(page, "07_policy_locked_no_passphrase")
    form.locator("input[name=passphrase]").fill("a wrong passphrase")
    form.locator("button[type=submit]").click()
    pw_expect(result).to_contain_text("Wrong admin passphrase")
    assert result.inner_text() != missing
    shot(page, "08_policy_locked_wrong_passphrase")
    assert (home / "policy.toml").read_text() == before
    form.locator("input[name=passphrase]").fill(PASS)
    form.locator("button[type=submit]").click()
    pw_expect(result).to_contain_text("Saved")
    assert "open_nsfw_explicit_at = 0.0" in (home / "policy.toml").read_text()
    shot(page, "09_policy_saved_with_passphrase")


def test_7_a_blocked_image_is_not_saved(ui):
    page, server, base, home = ui
    close_panel(page)
    hist = run_in_ui(page, server, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
        "2": {"class_type": "ConsentGuardSaveImage",
              "inputs": {"images": ["1", 0], "filename_prefix": "cg_browser_blocked"}}})
    page.wait_for_timeout(2500)
    shot(page, "10_blocked_image")
    assert hist is not None and hist["status"]["status_str"] == "success", hist
    assert outputs(base, "cg_browser_blocked") == []
    ui_out = hist["outputs"]["2"]
    assert [i["type"] for i in ui_out["images"]] == ["temp"]  # a placeholder, not the photo
    assert "block" in json.dumps(ui_out["consent_guard"])
    assert visible_message_with(page, "Consent Guard")


def test_8_unlock_then_the_policy_changes_without_passphrase(ui):
    page, server, base, home = ui
    lock = section(page, "Lock").locator("form.cg-lock")
    lock.locator("input[name=passphrase]").fill("a wrong passphrase")
    lock.locator("button[type=submit]").click()
    pw_expect(lock.locator(".cg-result")).to_contain_text("Wrong admin passphrase")
    lock.locator("input[name=passphrase]").fill(PASS)
    lock.locator("button[type=submit]").click()
    pw_expect(panel(page).locator("table.cg-status tr", has_text="Lock")).to_contain_text(
        "off", timeout=15000)
    assert server.get("/api/consent_guard/status")["locked"] is False

    form = section(page, "Policy").locator("form.cg-policy")
    page.wait_for_function("document.querySelector('form.cg-policy textarea').value.length > 0")
    form.locator("textarea[name=text]").fill("enforce = false\n")
    form.locator("button[type=submit]").click()
    pw_expect(form.locator(".cg-result")).to_contain_text("Saved")
    pw_expect(form).to_contain_text("not locked")
    assert (home / "policy.toml").read_text() == "enforce = false\n"
    shot(page, "11_unlocked_policy_saved")


def test_9_a_saved_image_verifies_in_the_dialog(ui):
    """Issue 15: an image saved with [provenance] on carries the mark and a signed verdict,
    and the "Verify an image" dialog says so."""
    page, server, base, home = ui
    (home / "policy.toml").write_text("enforce = false\n[provenance]\nwatermark = true\n"
                                      "sign = true\n")
    close_panel(page)
    hist = run_in_ui(page, server, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "t1.jpg"}},
        "2": {"class_type": "ConsentGuardSaveImage",
              "inputs": {"images": ["1", 0], "filename_prefix": "cg_browser_marked"}}})
    assert hist is not None and hist["status"]["status_str"] == "success", hist
    [saved] = outputs(base, "cg_browser_marked")
    page.evaluate("app.extensionManager.command.execute('ConsentGuard.VerifyImage')")
    form = page.locator("form.cg-verify").last
    pw_expect(form).to_be_visible()
    form.locator("input[name=image]").set_input_files(str(saved))
    form.locator("button[type=submit]").click()
    result = form.locator(".cg-result")
    pw_expect(result).to_contain_text("Signed verdict: valid", timeout=60000)
    pw_expect(result).to_contain_text("Invisible mark: found")
    shot(page, "12_verify_dialog")
