"""Start, drive and stop a real Stable Diffusion WebUI Forge for tests/test_forge_integration.py.

Nothing here touches the Forge checkout itself: each server gets a throwaway `--data-dir`
(its own extensions/, outputs/, config.json and cache), whose extensions/consent-guard is a
link to this repo, and a checkpoint folder (`--ckpt-dir`) that links the tiny random-weight
SD1.5 checkpoint (tests/forge_checkpoint.py). The Consent Guard home is the one passed in,
set as CONSENT_GUARD_HOME in Forge's environment, so the command line (run by the repo's
.venv) and Forge read the same policy, registry and audit log.

Environment:
- FORGE_DIR: the Forge checkout (required; without it the suite is skipped).
- FORGE_PYTHON: its interpreter (default FORGE_DIR/venv/bin/python).
- FORGE_WAIT_S: how long to wait for another Forge on ports 7860-7869 to go away (default 600).
- CONSENT_GUARD_PLAYWRIGHT_PYTHON: an interpreter with playwright, for the UI driver
  (default /tmp/pw/bin/python, else this one); CONSENT_GUARD_CHROMIUM: the browser
  (default /usr/bin/chromium).

Only one Forge runs at a time on the machines this was written for: `Forge.start` waits while
any port of 7860-7869 is taken, and every server is stopped by its owner and at exit.
"""
from __future__ import annotations

import atexit
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXTENSION_NAME = "consent-guard"
CHECKPOINT_NAME = "tiny_sd15.safetensors"
BUSY_PORTS = tuple(range(7860, 7870))  # other engineers' Forges (7860/7861 and up) and ours
API_PORT, UI_PORT = 7862, 7863
START_TIMEOUT_S = 240
CHROMIUM = os.environ.get("CONSENT_GUARD_CHROMIUM", "/usr/bin/chromium")
OFFLINE_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "DO_NOT_TRACK": "1", "COMMANDLINE_ARGS": ""}


def forge_dir() -> Optional[Path]:
    value = os.environ.get("FORGE_DIR")
    return Path(value) if value else None


def forge_python() -> Path:
    value = os.environ.get("FORGE_PYTHON")
    return Path(value) if value else (forge_dir() or Path(".")) / "venv" / "bin" / "python"


def skip_reason() -> Optional[str]:
    """Why the suite cannot run here, or None."""
    root = forge_dir()
    if root is None:
        return "set FORGE_DIR to a Stable Diffusion WebUI Forge checkout"
    if not (root / "launch.py").is_file():
        return f"FORGE_DIR={root} has no launch.py"
    if not forge_python().exists():
        return f"no Forge python at {forge_python()} (set FORGE_PYTHON)"
    return None


def repo_python() -> str:
    """The interpreter that runs the `consent-guard` command line: the repo's .venv."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# ---------------------------------------------------------------- checkpoint

def tiny_checkpoint() -> Path:
    """The tiny SD1.5 checkpoint: FORGE_DIR/models/Stable-diffusion/tiny_sd15.safetensors, built
    there on first use by tests/forge_checkpoint.py under Forge's python (it needs diffusers),
    or in the temp folder when that one is not writable."""
    for folder in (forge_dir() / "models" / "Stable-diffusion",
                   Path(tempfile.gettempdir()) / "consent_guard_forge"):
        path = folder / CHECKPOINT_NAME
        if path.is_file():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            run = subprocess.run([str(forge_python()), str(REPO / "tests" / "forge_checkpoint.py"),
                                  str(path)], capture_output=True, text=True, timeout=300)
            if run.returncode != 0 or not path.is_file():
                raise RuntimeError(f"building {path} failed:\n{run.stdout}{run.stderr}")
            return path
    raise RuntimeError("no writable folder for the tiny checkpoint")


# ---------------------------------------------------------------- Consent Guard home

def enrol(home: Path, photo: Path, name: str = "Astronaut Example", scope: str = "any") -> str:
    """Enrols `photo`'s person in `home` with the command line (the repo's .venv), as an admin
    would before starting the UI; the registry's key file lets Forge open it unattended."""
    env = dict(os.environ, CONSENT_GUARD_HOME=str(home),
               CONSENT_GUARD_PASSPHRASE="forge integration passphrase")
    run = subprocess.run([repo_python(), "-m", "consent_guard", "identity", "enroll",
                          "--name", name, "--scope", scope, "--consent-by", name,
                          "--consent-date", "2024-05-01", str(photo)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"enrolment failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    return run.stdout


# ---------------------------------------------------------------- ports

def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_ports_free(ports=BUSY_PORTS, timeout: Optional[float] = None) -> None:
    """Waits until no server listens on `ports` (another engineer's Forge, or a leftover of
    ours); raises after FORGE_WAIT_S seconds, naming the ports, rather than start a second one."""
    timeout = float(os.environ.get("FORGE_WAIT_S", "600")) if timeout is None else timeout
    deadline = time.time() + timeout
    while True:
        taken = [p for p in ports if port_taken(p)]
        if not taken:
            return
        if time.time() > deadline:
            raise RuntimeError(f"another server listens on port(s) {taken}; only one Forge may "
                               "run at a time here: stop it (or wait) and run the suite again")
        time.sleep(2)


# ---------------------------------------------------------------- server

_RUNNING: List["Forge"] = []


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


def _exit_on_sigterm() -> None:
    """A `timeout` or a CI runner ends the tests with SIGTERM, which skips atexit: turn it
    into SystemExit so the servers are stopped (Forge runs in its own session and would
    outlive us). Only where nobody else handles SIGTERM."""
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Forge:
    """One Forge process on a throwaway data dir. `ui`: the gradio UI too (else --nowebui);
    the /sdapi/v1 API is on in both modes."""

    def __init__(self, data: Path, home: Path, ui: bool = False,
                 port: Optional[int] = None, extension: bool = True, extra_args=()):
        self.data, self.home, self.ui = Path(data), Path(home), ui
        self.port = port or (UI_PORT if ui else API_PORT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.extension, self.extra_args = extension, list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.data / "forge.log"

    # -- life cycle

    def _prepare(self) -> List[str]:
        extensions = self.data / "extensions"
        extensions.mkdir(parents=True, exist_ok=True)
        link = extensions / EXTENSION_NAME
        if self.extension and not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        ckpt = self.data / "ckpt"
        ckpt.mkdir(exist_ok=True)
        if not (ckpt / CHECKPOINT_NAME).exists():
            (ckpt / CHECKPOINT_NAME).symlink_to(tiny_checkpoint())
        args = [str(forge_python()), "launch.py", "--skip-prepare-environment", "--always-cpu",
                "--skip-torch-cuda-test", "--api", "--server-name", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(self.data),
                "--ckpt-dir", str(ckpt),
                # the UI's own scripts (javascript/, extensions-builtin/) are served from the
                # Forge folder; gradio serves only the data dir unless told otherwise
                "--gradio-allowed-path", str(forge_dir()), *self.extra_args]
        if not self.ui:
            args.insert(args.index("--api") + 1, "--nowebui")
        return args

    def start(self) -> "Forge":
        _exit_on_sigterm()
        wait_ports_free()
        args = self._prepare()
        env = dict(os.environ, **OFFLINE_ENV, CONSENT_GUARD_HOME=str(self.home))
        env.pop("CONSENT_GUARD_PASSPHRASE", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=forge_dir(), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        _RUNNING.append(self)
        try:
            self._wait_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_up(self) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Forge exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                api_up = self.request("GET", "/sdapi/v1/options", timeout=5)[0] == 200
                if api_up and (not self.ui or self.request("GET", "/", timeout=30)[0] == 200):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"Forge did not answer in {START_TIMEOUT_S} s:\n{self.tail()}")

    def stop(self) -> None:
        """Ends the process group Forge started in (its launcher and the webui it runs)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self in _RUNNING:
            _RUNNING.remove(self)
        if getattr(self, "_log", None):
            self._log.close()

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP

    def request(self, method: str, path: str, body=None, timeout: float = 180):
        """(status, body): JSON decoded where it is JSON, else text. HTTP errors are returned,
        not raised, so a test can assert on a refusal's status and message."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, _decode(r.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    # -- folders

    @property
    def outputs(self) -> Path:
        return self.data / "outputs"

    def output_files(self) -> List[Path]:
        """Every file Forge wrote under outputs/ (images, grids, Extras, init images...)."""
        if not self.outputs.exists():
            return []
        return sorted(p for p in self.outputs.rglob("*") if p.is_file())


def _decode(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


# ---------------------------------------------------------------- generation requests

def txt2img_body(prompt: str, seed: int = 1234, batch_size: int = 1, **extra) -> dict:
    """64x64, 1 step: seconds on a CPU with the tiny checkpoint. Saved like the UI saves."""
    body = {"prompt": prompt, "negative_prompt": "", "width": 64, "height": 64, "steps": 1,
            "cfg_scale": 7, "sampler_name": "Euler a", "seed": seed, "batch_size": batch_size,
            "save_images": True, "send_images": True}
    body.update(extra)
    return body


def img2img_body(prompt: str, init: Image.Image, seed: int = 1234, **extra) -> dict:
    body = txt2img_body(prompt, seed, init_images=[to_b64(init)], denoising_strength=0.5)
    body.update(extra)
    return body


def extras_body(image: Image.Image) -> dict:
    return {"image": to_b64(image), "resize_mode": 0, "upscaling_resize": 1,
            "upscaler_1": "None", "show_extras_results": True}


def to_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def from_b64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1]))).convert("RGB")


def gradient(size: Tuple[int, int] = (64, 64)) -> Image.Image:
    """A benign picture with no face and no skin: a colour ramp."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1))


# ---------------------------------------------------------------- what came back

def dominant_colour(image: Image.Image) -> Tuple[Tuple[int, ...], float]:
    """The most common RGB colour and the share of pixels that have it."""
    rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    i = int(counts.argmax())
    return tuple(int(c) for c in colours[i]), float(counts[i] / counts.sum())


def looks_like_placeholder(image: Image.Image) -> bool:
    """Consent Guard's placeholder (consent_guard/censor.py) is a flat dark grey with a symbol
    and a few words: most pixels share one dark colour. The tiny checkpoint's images are
    noise, where no colour covers more than a few pixels."""
    colour, share = dominant_colour(image)
    return share >= 0.5 and sum(colour) / 3 <= 100


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    a, b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    return a.shape == b.shape and np.array_equal(a, b)


# ---------------------------------------------------------------- the browser

UI_EXTRAS_DRIVER = r'''
import base64, json, sys
from playwright.sync_api import sync_playwright
url, photo, chromium, shot = sys.argv[1:5]
result = {"gallery": [], "log": "", "error": None}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60000)
    try:
        page.goto(url, timeout=120000)
        page.wait_for_selector("#txt2img_prompt textarea", timeout=120000)
        page.click("#tabs > .tab-nav button:has-text('Extras')")
        page.set_input_files("#extras_image input[type=file]", photo)
        page.wait_for_selector("#extras_image img", timeout=30000)
        page.wait_for_timeout(1000)
        page.click("#extras_generate")
        page.wait_for_function("""() => document.querySelector('#extras_gallery img')
            || (document.querySelector('#html_log_extras')
                && document.querySelector('#html_log_extras').innerText.trim())""",
            timeout=120000)
        page.wait_for_timeout(1500)
        result["log"] = page.inner_text("#html_log_extras")
        for src in page.eval_on_selector_all("#extras_gallery img", "els => els.map(e => e.src)"):
            data = page.evaluate("""async (src) => { const r = await fetch(src);
                const b = new Uint8Array(await r.arrayBuffer()); let s = '';
                for (const c of b) s += String.fromCharCode(c); return btoa(s); }""", src)
            result["gallery"].append(data)
    except Exception as err:  # reported to the test, with the page's state
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        try:
            page.screenshot(path=shot)
        except Exception:
            pass
        browser.close()
print("RESULT " + json.dumps(result))
'''


def playwright_python() -> Optional[str]:
    """An interpreter that can import playwright, or None."""
    for python in (os.environ.get("CONSENT_GUARD_PLAYWRIGHT_PYTHON"), "/tmp/pw/bin/python",
                   sys.executable):
        if python and Path(python).exists():
            ok = subprocess.run([python, "-c", "import playwright.sync_api"],
                                capture_output=True).returncode == 0
            if ok:
                return python
    return None


def ui_extras(server: Forge, photo: Path, shot: Path) -> dict:
    """Runs `photo` through the Extras tab of `server`'s UI in Chromium (a subprocess with the
    playwright interpreter); returns {"gallery": [PIL images shown], "log": the tab's message
    box text, "error": a driver failure or None}."""
    python = playwright_python()
    driver = server.data / "ui_extras_driver.py"
    driver.write_text(UI_EXTRAS_DRIVER)
    run = subprocess.run([python, str(driver), server.url, str(photo), CHROMIUM, str(shot)],
                         capture_output=True, text=True, timeout=240)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the UI driver failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["gallery"] = [Image.open(io.BytesIO(base64.b64decode(d))).convert("RGB")
                         for d in result["gallery"]]
    return result
