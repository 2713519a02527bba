"""The A1111/Forge adapter in a real Stable Diffusion WebUI Forge, black-box over HTTP (and the
gradio UI for Extras). Skipped unless FORGE_DIR points at a Forge checkout whose venv python
exists (FORGE_PYTHON overrides it); see tests/forge_harness.py for how the servers are made
(a throwaway --data-dir whose extensions/ links this repo, a fresh Consent Guard home in
CONSENT_GUARD_HOME, the tiny random-weight checkpoint of tests/forge_checkpoint.py).

Set-up once: Consent Guard's dependencies in Forge's venv (what A1111/Forge's launcher does at
install: `cd $FORGE_DIR && venv/bin/python -c "from modules import launch_utils as l;
l.run_extension_installer('/path/to/this/repo')"`, or `venv/bin/python install.py` here).
Run:

    FORGE_DIR=/tmp/forge .venv/bin/python -m pytest -q tests/test_forge_integration.py

Two servers, one after the other (only one Forge may run at a time here):
- "enforce": API only, `enforce = true`, the default policy otherwise, a benign adult
  (skimage's astronaut) enrolled under scope `any` with the command line before the start.
  A benign prompt is generated and saved (so the suite can fail both ways); an explicit
  prompt and img2img from the enrolled person's photo are refused; live previews are off.
- "everything explicit": UI and API, a policy whose open_nsfw bands are both 0, so the real
  models call every picture explicit (nothing explicit is ever made or shown). txt2img
  (batch of 2 and its grid), img2img and Extras (API and UI) give placeholders, and nothing
  reaches outputs/.
Each server's log is checked for exceptions that escaped a Consent Guard hook: Forge catches
those and goes on as if nothing was checked.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

import forge_harness as fh
from consent_guard import provenance

pytestmark = pytest.mark.skipif(fh.skip_reason() is not None, reason=fh.skip_reason() or "")

BAD = "a nude woman"  # the words the ComfyUI suites use for an explicit prompt
BENIGN = "a red barn in a green field"
SEED = 4321
ENFORCE = "enforce = true\n"
EVERYTHING_EXPLICIT = "[explicit]\nopen_nsfw_safe_below = 0.0\nopen_nsfw_explicit_at = 0.0\n"
SHOTS = Path(os.environ.get("CONSENT_GUARD_SHOTS", "/tmp/shots/forge_integration"))


class Servers:
    """At most one Forge at a time: asking for another stops the one running. A server that
    failed to start is not tried again by every test: they fail at once with its reason."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.name, self.server, self.failed = tmp_path_factory, None, None, {}

    def get(self, name: str) -> fh.Forge:
        if name in self.failed:
            pytest.fail(f"the {name} server did not start: {self.failed[name]}")
        if self.name == name:
            return self.server
        self.stop()
        try:
            self.server, self.name = self._start(name), name
            loaded(self.server)
        except Exception as exc:
            self.stop()
            self.failed[name] = f"{type(exc).__name__}: {exc}"
            raise
        return self.server

    def _start(self, name: str) -> fh.Forge:
        data = self.tmp.mktemp(f"forge_{name}")
        home = self.tmp.mktemp(f"cg_home_{name}")
        if name == "enforce":
            (home / "policy.toml").write_text(ENFORCE)
            fh.enrol(home, astronaut())
            return fh.Forge(data, home, ui=False).start()
        (home / "policy.toml").write_text(EVERYTHING_EXPLICIT)
        return fh.Forge(data, home, ui=True).start()

    def stop(self):
        if self.server is not None:
            self.server.stop()
        self.name, self.server = None, None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pool = Servers(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def reference():
    """Images the enforce server made and allowed, keyed by request, for the blocked runs to
    differ from (the same seed and checkpoint give the same noise)."""
    return {}


@pytest.fixture
def enforce_server(servers):
    return servers.get("enforce")


@pytest.fixture
def explicit_server(servers):
    return servers.get("explicit")


def astronaut() -> Path:
    from conftest import package_file

    return package_file("skimage", "data/astronaut.png")  # an adult portrait, public domain


def probe() -> Image.Image:
    """The enrolled person, cropped and rescaled: not the enrolment file itself."""
    return Image.open(astronaut()).convert("RGB").crop((40, 0, 472, 432)).resize((384, 384))


def loaded(server: fh.Forge) -> None:
    """The extension's script is loaded (the AlwaysVisible script is listed) without an error.
    (/sdapi/v1/extensions lists only folders with a git remote: not a plain checkout.)"""
    status, scripts = server.get("/sdapi/v1/scripts")
    assert status == 200, scripts
    names = " ".join(scripts.get("txt2img", []) + scripts.get("img2img", [])).lower()
    assert "consent" in names, f"no Consent Guard script in {scripts}\n{server.tail()}"
    errors = hook_errors(server)  # loading the scripts, on_app_started, the tab, settings
    assert not errors, "\n\n".join(errors)


def refusal(status: int, body, kind: str) -> dict:
    """A refused /sdapi/v1 job, as the adapter answers it (a1111_adapter/checks.py
    refusal_response): HTTP 403 in the shape of the WebUI's own errors plus Consent Guard's
    payload, whose kind says why (503 would mean the check could not run: not this)."""
    assert status == 403, f"HTTP {status}, not a refusal: {str(body)[:1500]}"
    assert isinstance(body, dict) and body.get("error") == "ConsentGuardRefusal", body
    assert "images" not in body, "a refusal returned images"
    payload = body["consent_guard"]
    assert payload["kind"] == kind, payload
    assert body["message"].startswith(payload["message"]), body
    return payload


def new_files(server: fh.Forge, before):
    return [str(p.relative_to(server.outputs)) for p in server.output_files() if p not in before]


def hook_errors(server: fh.Forge) -> list:
    """Forge's reports of exceptions that escaped a script or callback of this extension:
    modules/errors.py report() prints `*** Error ...` lines, the traceback, then `---`."""
    found, block = [], None
    for line in server.log_text().splitlines():
        if block is None:
            if line.startswith("*** Error"):
                block = [line]
        elif line.strip() == "---":
            text = "\n".join(block)
            if re.search(r"consent|a1111_adapter", text, re.I):
                found.append(text[-1500:])
            block = None
        else:
            block.append(line)
    return found


# ------------------------------------------------------------- enforce mode, default policy

def test_1_benign_prompt_is_generated_and_saved(enforce_server, reference):
    server = enforce_server
    status, body = server.post("/sdapi/v1/txt2img", fh.txt2img_body(BENIGN, SEED, batch_size=2))
    assert status == 200, body
    images = [fh.from_b64(b) for b in body["images"]]
    assert len(images) == 3  # the grid, then the two pictures
    assert not any(fh.looks_like_placeholder(im) for im in images)
    saved = [str(p.relative_to(server.outputs)) for p in server.output_files()]
    assert len([s for s in saved if s.startswith("txt2img-images/")]) == 2, saved
    assert len([s for s in saved if s.startswith("txt2img-grids/")]) == 1, saved
    for path in server.output_files():
        assert not fh.looks_like_placeholder(Image.open(path))
    # enforce mode: every saved PNG carries a signed verdict that matches its pixels (issue 15)
    pngs = [p for p in server.output_files() if p.suffix.lower() == ".png"]
    assert pngs, saved
    for path in pngs:
        check = provenance.verify_file(path)
        assert check.signature is not None and check.signature.status == "valid", \
            (path, check.to_dict())
        assert check.signature.claim["verdict"]["decision"] == "allow"
    reference["txt2img"] = images


def test_2_benign_img2img_and_extras_pass(enforce_server, reference):
    server = enforce_server
    before = server.output_files()
    status, body = server.post("/sdapi/v1/img2img", fh.img2img_body(BENIGN, fh.gradient(), SEED))
    assert status == 200, body
    [image] = [fh.from_b64(b) for b in body["images"]]
    assert not fh.looks_like_placeholder(image)
    assert [f for f in new_files(server, before) if f.startswith("img2img-images/")], \
        new_files(server, before)
    reference["img2img"] = image

    status, body = server.post("/sdapi/v1/extra-single-image", fh.extras_body(fh.gradient()))
    assert status == 200, body
    assert fh.same_pixels(fh.from_b64(body["image"]), fh.gradient())


def test_3_explicit_prompt_is_refused(enforce_server):
    server = enforce_server
    before = server.output_files()
    status, body = server.post("/sdapi/v1/txt2img", fh.txt2img_body(BAD, SEED, batch_size=2))
    refusal(status, body, "prompt_explicit")
    assert "nude" not in json.dumps(body)  # the refusal does not repeat the prompt
    assert new_files(server, before) == []


def test_4_explicit_negative_prompt_is_not_a_refusal(enforce_server):
    """Negative prompts are a safety tool (cfg > 1): the job runs."""
    server = enforce_server
    status, body = server.post("/sdapi/v1/txt2img",
                               fh.txt2img_body(BENIGN, SEED, negative_prompt=BAD))
    assert status == 200 and len(body["images"]) == 1, body


def test_5_img2img_from_an_enrolled_person_is_refused(enforce_server):
    server = enforce_server
    before = server.output_files()
    status, body = server.post("/sdapi/v1/img2img", fh.img2img_body(BENIGN, probe(), SEED))
    refusal(status, body, "input_protected")
    assert new_files(server, before) == []


def test_6_live_previews_are_off_in_enforce_mode(enforce_server):
    status, options = enforce_server.get("/sdapi/v1/options")
    assert status == 200
    assert options["live_previews_enable"] is False, options["live_previews_enable"]


def test_7_no_hook_raised_on_the_enforce_server(enforce_server):
    assert hook_errors(enforce_server) == []


# ------------------------------------------------- a policy that calls every picture explicit

def assert_nothing_saved(server: fh.Forge, before) -> None:
    """Nothing reaches outputs/ (files there before the test's job aside). Checked in two
    steps, so a failure says which: a generated picture on disk (a leak), or placeholders
    written there (the issue asks that no file reaches outputs/)."""
    files = [f for f in server.output_files() if f not in before]
    leaks = [str(f) for f in files if not fh.looks_like_placeholder(Image.open(f))]
    assert leaks == [], f"generated pictures reached outputs/: {leaks}"
    assert files == [], ("placeholders were written to outputs/ (nothing should be): "
                         f"{new_files(server, before)}")


def assert_placeholders(images, refs=()):
    for i, image in enumerate(images):
        colour, share = fh.dominant_colour(image)
        assert fh.looks_like_placeholder(image), \
            f"image {i} is not a placeholder (most common colour {colour} on {share:.0%})"
    for image, ref in zip(images, refs):
        assert not fh.same_pixels(image, ref)


def test_8_blocked_txt2img_batch_and_grid_are_placeholders(explicit_server, reference):
    server = explicit_server
    before = server.output_files()
    status, body = server.post("/sdapi/v1/txt2img", fh.txt2img_body(BENIGN, SEED, batch_size=2))
    assert status == 200, body
    images = [fh.from_b64(b) for b in body["images"]]
    assert len(images) == 3, f"{len(images)} images (expected the grid and two placeholders)"
    assert_placeholders(images, reference.get("txt2img", ()))
    assert_nothing_saved(server, before)


def test_9_blocked_img2img_is_a_placeholder(explicit_server, reference):
    server = explicit_server
    before = server.output_files()
    status, body = server.post("/sdapi/v1/img2img", fh.img2img_body(BENIGN, fh.gradient(), SEED))
    assert status == 200, body
    images = [fh.from_b64(b) for b in body["images"]]
    assert len(images) == 1
    assert_placeholders(images, [reference["img2img"]] if "img2img" in reference else ())
    assert_nothing_saved(server, before)


def test_10_blocked_extras_api_returns_a_placeholder(explicit_server):
    server = explicit_server
    before = server.output_files()
    status, body = server.post("/sdapi/v1/extra-single-image", fh.extras_body(fh.gradient()))
    if status == 200:
        assert_placeholders([fh.from_b64(body["image"])])
    else:
        assert status >= 400 and "image" not in (body if isinstance(body, dict) else {}), body
    assert_nothing_saved(server, before)


def test_11_extras_in_the_ui_is_gated(explicit_server, tmp_path):
    """Extras through the gradio UI (the one Extras path that saves): the picture shown is a
    placeholder or the tab says why there is none, and the original never reaches outputs/."""
    if fh.playwright_python() is None or not Path(fh.CHROMIUM).exists():
        pytest.skip("playwright (CONSENT_GUARD_PLAYWRIGHT_PYTHON) or Chromium is missing")
    server = explicit_server
    before = server.output_files()
    photo = tmp_path / "ramp.png"
    fh.gradient((96, 96)).save(photo)
    SHOTS.mkdir(parents=True, exist_ok=True)
    result = fh.ui_extras(server, photo, SHOTS / "extras_blocked.png")
    assert result["error"] is None, (result["error"], result["log"], server.tail())
    original = Image.open(photo).convert("RGB")
    for image in result["gallery"]:
        assert not fh.same_pixels(image, original)
    if result["gallery"]:
        assert_placeholders(result["gallery"])
    else:
        assert result["log"].strip(), "no picture and no message in the Extras tab"
    assert_nothing_saved(server, before)


def test_12_no_hook_raised_on_the_blocking_server(explicit_server):
    assert hook_errors(explicit_server) == []
