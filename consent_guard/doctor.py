"""`consent-guard doctor`: is protection active on this ComfyUI install, and could the person
at the keyboard switch it off? Each check says what it saw and, when it fails, the fix.

It reads files (the plugin folder, the policy, the lock, the models, the registry, the audit
log, the admin's record of the approved policy and the registry) and, given the URL of a
running ComfyUI on this machine, asks it what it loaded (GET /system_stats for ComfyUI's
arguments, GET /consent_guard/status for the hooks, its engine's problem, and which home,
policy sha256 and registry it runs with): any difference from the admin's own is a failure. Without
a URL it looks for ComfyUI processes in /proc (Linux) to read their arguments.

For an AUTOMATIC1111 / Forge webui (`--webui DIR`, the webui's data folder) it checks that the
extension is there (a folder of <webui>/extensions or extensions-builtin holding
scripts/consent_guard_checks.py, whatever the folder is called), that <webui>/config.json does
not disable it ("disabled_extensions", "disable_all_extensions" other than "none"; Forge's
modules_forge/config.py always_disabled_extensions too), and that no running webui process was
started with --disable-extra-extensions or --disable-all-extensions (its /proc cmdline, plus
COMMANDLINE_ARGS from its environment, which webui appends to sys.argv itself: the cmdline
alone does not show them). The webui's home is `<webui>/consent_guard` unless
CONSENT_GUARD_HOME is set (a1111_adapter/bridge.py): doctor says when it checked another.

A machine where nothing is set up yet (no policy file, admin passphrase, admin's record or
registry in the home) is "not set up yet" (status "todo", with the steps), not a list of
failures. Who "can change" a file: the account named by --user; else, run as root, any
account but root (an owner other than root, a group with other members, or anyone when it is
world-writable); else whoever runs doctor.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import stat
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from . import admin, expect
from .policy import POLICY_FILENAME, load_policy

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
INFO, TODO = "info", "todo"  # TODO: a set-up step not taken yet (a fresh machine)
SETUP_STEPS = (
    "Consent Guard is not set up yet (nothing in {home}). To set it up, open ComfyUI and "
    "follow Consent Guard's set-up dialog (or the WebUI's Consent Guard tab: admin "
    "passphrase, enforce mode, lock), or run `consent-guard setup`, or step by step:\n"
    "  consent-guard admin set-passphrase\n"
    "  consent-guard policy init        (then set enforce = true in {home}/policy.toml)\n"
    "  consent-guard admin approve-policy\n"
    "  consent-guard admin lock\n"
    "and run `consent-guard doctor` again.")
SETUP_FIX = ("set up Consent Guard: ComfyUI's Consent Guard set-up dialog, or consent-guard admin "
             "set-passphrase; policy init (enforce = true); admin approve-policy; admin lock")
DISABLING_FLAGS = ("--disable-all-custom-nodes", "--whitelist-custom-nodes")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return {"check": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix}


def _is_plugin(folder: Path) -> bool:
    return (folder / "consent_guard" / "engine.py").is_file() and \
        (folder / "nodes" / "enforce.py").is_file()


def find_plugin(comfyui: Path) -> tuple:
    """(active plugin folders, disabled ones) under <comfyui>/custom_nodes."""
    custom = comfyui / "custom_nodes"
    active, disabled = [], []
    if custom.is_dir():
        for entry in sorted(custom.iterdir()):
            if entry.is_dir() and _is_plugin(entry):
                (disabled if entry.name.endswith(".disabled") else active).append(entry)
    return active, disabled


def not_set_up(home: Path) -> bool:
    """Nothing of Consent Guard's state in the home yet: a fresh machine."""
    from .registry import REGISTRY_FILENAME

    names = (POLICY_FILENAME, admin.ADMIN_FILENAME, expect.EXPECT_FILENAME, REGISTRY_FILENAME)
    return not any((Path(home) / name).exists() for name in names)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@functools.lru_cache(maxsize=None)
def _group_has_others(gid: int) -> bool:
    """Whether an account other than root is in group `gid` (as a member or by its primary
    group). An unknown group counts as having others: fail closed."""
    import grp
    import pwd

    try:
        names = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return True
    names |= {pw.pw_name for pw in pwd.getpwall() if pw.pw_gid == gid}
    for name in names:
        try:
            if pwd.getpwnam(name).pw_uid != 0:
                return True
        except KeyError:
            return True
    return False


def _changeable_by_non_root(path: Path) -> bool:
    """For a root-run doctor: could any account but root change `path`? Root owning a 0700
    folder or a 0600 file is the locked-down state; a file another account owns, or that a
    group with other members or everyone may write, is not."""
    st = path.stat()
    if st.st_uid != 0:
        return True  # its owner can write it, or chmod it and then write it
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and _group_has_others(st.st_gid)


def _writable_by(path: Path, user: Optional[str]) -> bool:
    """Whether `user` (default: whoever runs this; run as root: any other account) could
    change `path`: write it, or, for a file in a folder it can write, replace it."""
    if sys.platform == "win32":
        return os.access(path, os.W_OK)
    if user is None:
        return _changeable_by_non_root(path) if _is_root() else os.access(path, os.W_OK)
    import pwd

    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return True
    groups = set(os.getgrouplist(user, pw.pw_gid))
    st = path.stat()
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def _guarded_paths(home: Path, plugin: Optional[Path], comfyui: Optional[Path]) -> List[Path]:
    paths = [home, home / POLICY_FILENAME, home / admin.ADMIN_FILENAME,
             expect.expect_path(home)]
    if comfyui is not None:
        paths.append(comfyui / "custom_nodes")  # whoever can write it can rename the plugin
    if plugin is not None:
        paths.append(plugin)
        for root, dirs, files in os.walk(plugin):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", "tests",
                                                    "bench")]
            paths += [Path(root) / d for d in dirs]
            paths += [Path(root) / f for f in files if f.endswith((".py", ".toml", ".js"))]
    return [p for p in paths if p.exists()]


INSTALL_MODELS = "consent-guard install-models (or python install.py in the plugin folder)"


def _models_check(resolver, policy) -> Check:
    """Every model the default checks use (explicit content, faces, age, the prompt encoder),
    loaded by sha256 and run once on a tiny input (installer.verify_models): a file that is
    present but cannot run on this onnxruntime is a failure, not a pass."""
    from .installer import verify_models

    try:
        rows = [r for r in verify_models(policy.device, resolver)
                if not r[2].startswith("optional")]
    except Exception as exc:  # onnxruntime missing or broken: runtime_checks says which
        return Check("models", FAIL, f"cannot be run: {exc}", INSTALL_MODELS)
    bad = [f"{name}: {why}" for name, ran, why in rows if not ran]
    if bad:
        return Check("models", FAIL, "; ".join(bad), INSTALL_MODELS)
    return Check("models", OK, f"{len(rows)} models ran (sha256 verified): "
                               + ", ".join(name.split(" ")[0] for name, _, _ in rows))


def runtime_checks() -> List[Check]:
    """onnxruntime runs every model: without it each check fails (closed). OpenCV is not
    needed (the face models run on onnxruntime): its presence or absence is information."""
    import importlib.metadata as md

    out = []
    if importlib.util.find_spec("onnxruntime") is None:
        out.append(Check("onnxruntime", FAIL, "not installed: no model can run, so every "
                         "check fails closed", INSTALL_MODELS))
    else:
        builds = [f"{d} {md.version(d)}" for d in ("onnxruntime", "onnxruntime-gpu",
                                                   "onnxruntime-directml", "onnxruntime-silicon",
                                                   "onnxruntime-openvino") if _dist(d)]
        out.append(Check("onnxruntime", OK, ", ".join(builds) or "installed"))
    cv = [f"{d} {md.version(d)}" for d in ("opencv-python", "opencv-python-headless",
                                           "opencv-contrib-python",
                                           "opencv-contrib-python-headless") if _dist(d)]
    found = importlib.util.find_spec("cv2") is not None
    out.append(Check("OpenCV", INFO, (", ".join(cv) or "cv2") + " installed; Consent Guard "
                     "does not need it" if found else "not installed; Consent Guard does not "
                     "need it"))
    return out


def _dist(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def _get_json(url: str, timeout: float = 3.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:  # a local ComfyUI only
        return json.loads(response.read().decode("utf-8"))


def _proc_cmdlines() -> Iterable[List[str]]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    out = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            args = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
            if any(a.endswith("main.py") for a in args):
                out.append(args)
    return out


def _flags_exclude(argv: List[str], plugin_name: str) -> Optional[str]:
    """Why these ComfyUI arguments leave the plugin out, or None."""
    if "--disable-all-custom-nodes" not in argv:
        return None
    allowed = []
    if "--whitelist-custom-nodes" in argv:
        i = argv.index("--whitelist-custom-nodes") + 1
        while i < len(argv) and not argv[i].startswith("--"):
            allowed.append(argv[i])
            i += 1
    if plugin_name in allowed:
        return None
    return ("ComfyUI runs with --disable-all-custom-nodes" +
            (f" and --whitelist-custom-nodes {' '.join(allowed)}" if allowed else "") +
            f", which leaves out {plugin_name}")


def _check_expectation(home: Path, policy, add) -> bool:
    """The admin's record (expect.py) against the files; False when it refuses."""
    from .registry import registry_paths

    db, key_file = registry_paths(policy, home)
    refusals, notes = expect.problems(home, policy, db, key_file)
    if refusals:
        add(Check("admin's record", FAIL, "; ".join(refusals),
                  "restore the file, or as the admin: " + expect.APPROVE_COMMAND))
        return False
    try:
        record = expect.read(home)
    except expect.ExpectationError:  # pragma: no cover - problems() said so already
        record = {}
    if notes:
        add(Check("admin's record", WARN, "; ".join(notes), expect.APPROVE_COMMAND))
    elif "policy" not in record:
        add(Check("admin's record", WARN if policy.enforce else OK,
                  "no approved policy is recorded, so a policy removed or swapped later is not "
                  "noticed" if policy.enforce else "no approved policy recorded (enforce off)",
                  expect.APPROVE_COMMAND if policy.enforce else ""))
    else:
        reg = (record.get("registry") or {}).get("path")
        add(Check("admin's record", OK, f"policy approved (sha256 "
                  f"{str(record['policy'].get('sha256'))[:12]}...), registry "
                  + (f"expected at {reg}" if reg else "none expected")))
    return True


def _same_path(a, b) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, TypeError, ValueError):
        return False


def compare_setup(local: dict, setup) -> List[Check]:
    """The running server's home, policy hash and registry (GET /consent_guard/status, "setup")
    against what the admin's own home holds. Any difference is a failure: a ComfyUI started
    with another CONSENT_GUARD_HOME, an allow-all policy or no registry is not protected by
    what the admin configured, however armed it says it is."""
    if not isinstance(setup, dict):
        return [Check("same setup", FAIL, "the running ComfyUI does not say which home, policy "
                      "and registry it uses (an older Consent Guard?)",
                      "update the plugin in that ComfyUI and restart it")]
    out = []
    remote_home = setup.get("home")
    out.append(Check("same home", OK if _same_path(remote_home, local["home"]) else FAIL,
                     f"{remote_home}" if _same_path(remote_home, local["home"]) else
                     f"the running ComfyUI uses {remote_home}, the admin's is {local['home']}",
                     "" if _same_path(remote_home, local["home"]) else
                     f"start ComfyUI with CONSENT_GUARD_HOME={local['home']} (or unset it)"))
    remote_sha = (setup.get("policy") or {}).get("sha256")
    same_policy = remote_sha == local["policy_sha256"]
    out.append(Check("same policy", OK if same_policy else FAIL,
                     f"sha256 {str(remote_sha)[:12]}..." if same_policy else
                     f"the running ComfyUI's policy has sha256 {remote_sha}, the admin's "
                     f"{local['policy_sha256']}", "" if same_policy else
                     "start ComfyUI with the admin's home and policy"))
    reg = setup.get("registry") or {}
    remote_count, local_count = reg.get("identities"), local.get("identities")
    problems = []
    if local.get("registry_path") and not _same_path(reg.get("path"), local["registry_path"]):
        problems.append(f"it uses the registry {reg.get('path')}, the admin's is "
                        f"{local['registry_path']}")
    if remote_count is None:
        problems.append("it cannot open its registry")
    elif local_count is not None and remote_count != local_count:
        problems.append(f"it protects {remote_count} people, the admin's registry "
                        f"{local_count}")
    out.append(Check("same registry", FAIL if problems else OK,
                     "; ".join(problems) if problems else
                     f"{reg.get('path')}, {remote_count} protected",
                     "start ComfyUI with the admin's home" if problems else ""))
    return out



# -- AUTOMATIC1111 / Forge ---------------------------------------------------------------------

WEBUI_CHECKS_SCRIPT = Path("scripts") / "consent_guard_checks.py"
WEBUI_FLAGS = ("--disable-all-extensions", "--disable-extra-extensions")
# The shortest prefixes argparse takes for them in Forge's parser (allow_abbrev is on):
# "--disable-a" is ambiguous with --disable-attention-upcast, "--disable-e" is not.
_WEBUI_FLAG_PREFIXES = {"--disable-all-extensions": "--disable-al",
                        "--disable-extra-extensions": "--disable-e"}
WEBUI_SCRIPTS = ("launch.py", "webui.py")


def _is_webui_extension(folder: Path) -> bool:
    return (folder / WEBUI_CHECKS_SCRIPT).is_file()


def find_webui_extension(webui: Path) -> List[Path]:
    """Consent Guard's folders in <webui>/extensions and extensions-builtin, whatever they are
    called (webui loads any folder: a renamed one still loads, unless disabled by name)."""
    found = []
    for sub in ("extensions", "extensions-builtin"):
        base = Path(webui) / sub
        if base.is_dir():
            found += [e for e in sorted(base.iterdir()) if e.is_dir() and _is_webui_extension(e)]
    return found


def webui_settings(path: Path) -> Optional[dict]:
    """webui's config.json, {} when there is none yet (Forge writes it when settings are first
    saved); None when it exists but cannot be read (webui then starts with defaults, but
    doctor cannot tell what a later start will read: reported)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def forge_always_disabled(webui: Path) -> List[str]:
    """Forge's modules_forge/config.py `always_disabled_extensions` (folder names it never
    loads), read without importing it; [] for A1111."""
    import ast

    path = Path(webui) / "modules_forge" / "config.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) ==
                                                "always_disabled_extensions"
                                                for t in node.targets):
            try:
                return [str(x) for x in ast.literal_eval(node.value)]
            except ValueError:
                return []
    return []


def webui_flag(argv: List[str], builtin: bool = False) -> Optional[str]:
    """The flag in a webui command line that leaves the extension out, or None. Abbreviations
    argparse accepts count; --disable-extra-extensions spares built-in extensions."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        for flag, shortest in _WEBUI_FLAG_PREFIXES.items():
            if name.startswith(shortest) and flag.startswith(name):
                if flag == "--disable-extra-extensions" and builtin:
                    continue
                return flag
    return None


def _arg_value(argv: List[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _webui_cmdlines() -> Iterable[dict]:
    """Running webui processes (python ... launch.py / webui.py) as {"pid", "argv", "cwd"}:
    argv is the /proc cmdline plus the words of COMMANDLINE_ARGS from the process's environment
    (modules/paths_internal.py appends them to sys.argv, so the cmdline alone misses them).
    An environment that cannot be read (another account's process) is marked "environ": None."""
    import shlex

    proc = Path("/proc")
    if not proc.is_dir():
        return []
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
        if not any(os.path.basename(a) in WEBUI_SCRIPTS for a in argv[1:3]):
            continue
        environ = None
        try:
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0")
                       if b"=" in kv)
            environ = env.get(b"COMMANDLINE_ARGS", b"").decode("utf-8", "replace")
            home_env = env.get(b"CONSENT_GUARD_HOME", b"").decode("utf-8", "replace")
            argv += shlex.split(environ)
        except (OSError, ValueError):
            home_env = None
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = None
        out.append({"pid": int(entry.name), "argv": argv, "cwd": cwd, "environ": environ,
                    "home_env": home_env})
    return out


def _process_in(process: dict, webui: Path) -> bool:
    """Whether a webui process runs this webui: it uses it as --data-dir, or (without one) its
    launch.py/webui.py, resolved against its working folder, lies in `webui`."""
    root = Path(webui).resolve()
    argv, cwd = process.get("argv", []), process.get("cwd")
    data_dir = _arg_value(argv, "--data-dir")
    if data_dir:  # its extensions and config.json are there, wherever launch.py is
        return _same_path(Path(cwd or ".") / data_dir, root)
    for arg in argv[1:3]:
        if os.path.basename(arg) in WEBUI_SCRIPTS:
            script = Path(arg) if os.path.isabs(arg) or cwd is None else Path(cwd) / arg
            if _same_path(script.parent, root):
                return True
    return False



def _settings_check(config: Path, names, webui: Path, builtin: bool) -> Check:
    """Whether a webui settings file (config.json) disables the extension (modules/
    extensions.py list_extensions and active(); launch_utils.list_extensions)."""
    settings = webui_settings(config)
    if settings is None:
        return Check("webui settings", FAIL, f"{config} cannot be read: the webui may start "
                     f"with other settings than doctor can see", f"repair or remove {config}")
    problems = []
    off = [n for n in (settings.get("disabled_extensions") or []) if n in names]
    if off:
        problems.append(f"\"disabled_extensions\" lists {', '.join(off)}")
    always = [n for n in forge_always_disabled(webui) if n in names]
    if always:
        problems.append(f"Forge never loads a folder named {', '.join(always)} "
                        f"(modules_forge/config.py)")
    mode = settings.get("disable_all_extensions", "none")
    if mode not in (None, "none") and not (mode == "extra" and builtin):
        problems.append(f"\"disable_all_extensions\" is \"{mode}\"")
    if problems:
        return Check("webui settings", FAIL, f"{config}: " + "; ".join(problems),
                     "enable it again in the webui's Extensions tab (and set \"Disable all "
                     "extensions\" to none), or edit config.json; on a shared machine make "
                     "config.json writable by the admin only")
    return Check("webui settings", OK, f"{config} does not disable the extension"
                 if config.exists() else f"no {config.name} yet (webui defaults: every "
                                         f"extension on)")

def webui_checks(webui: Path, home: Path, cmdlines: Callable = _webui_cmdlines
                 ) -> tuple:
    """(checks, the extension folder or None) for an A1111/Forge webui folder."""
    checks: List[Check] = []
    add = checks.append
    webui = Path(webui)
    if not webui.is_dir():
        add(Check("webui extension", FAIL, f"no webui folder at {webui}",
                  "pass --webui with the webui's folder (the one with launch.py and "
                  "extensions/)"))
        return checks, None
    found = find_webui_extension(webui)
    ext = found[0] if found else None
    if ext is None:
        add(Check("webui extension", FAIL, f"not found in {webui / 'extensions'} (no folder "
                  f"there holds {WEBUI_CHECKS_SCRIPT})",
                  "install Consent Guard into the webui's extensions folder and restart it"))
    else:
        add(Check("webui extension", OK, str(ext)))
        if len(found) > 1:
            add(Check("webui extension copies", WARN, f"{len(found)} copies: "
                      + ", ".join(p.name for p in found), "keep one copy"))
    builtin = ext is not None and ext.parent.name == "extensions-builtin"

    # running webui processes, and the settings files they read (--ui-settings-file)
    procs = [p for p in cmdlines() if _process_in(p, webui)]
    configs = [webui / "config.json"]
    for p in procs:
        other = _arg_value(p["argv"], "--ui-settings-file")
        if other:
            other_path = Path(other) if os.path.isabs(other) else Path(p.get("cwd") or
                                                                         webui) / other
            if not any(_same_path(other_path, c) for c in configs):
                configs.append(other_path)
    names = {p.name for p in found}
    for config in configs:
        add(_settings_check(config, names, webui, builtin))

    bad = [(p, webui_flag(p["argv"], builtin)) for p in procs]
    bad = [(p, f) for p, f in bad if f]
    unread = [p for p in procs if p.get("environ") is None]
    if bad:
        p, flag = bad[0]
        add(Check("webui arguments", FAIL, f"the webui (pid {p['pid']}) runs with {flag}, "
                  f"which leaves Consent Guard out",
                  "start the webui without it (check COMMANDLINE_ARGS in webui-user.sh / "
                  "webui-user.bat too)"))
    elif procs:
        add(Check("webui arguments", WARN if unread else OK,
                  f"{len(procs)} webui process(es), no flag that leaves the extension out"
                  + (f"; the environment of pid {unread[0]['pid']} cannot be read, so its "
                     f"COMMANDLINE_ARGS were not checked" if unread else ""),
                  "run doctor as the account the webui runs as (or root)" if unread else ""))
    else:
        add(Check("webui running", SKIP, f"no webui process of {webui} found"))

    # the home the webui uses (a1111_adapter/bridge.py: <data dir>/consent_guard, unless
    # CONSENT_GUARD_HOME is set in its environment)
    from .home import ENV_HOME, HOME_FOLDER
    seen = [p for p in procs if p.get("environ") is not None]
    if seen:
        homes = {str(_webui_home(p, webui, ENV_HOME, HOME_FOLDER)) for p in seen}
        other = sorted(h for h in homes if not _same_path(h, home))
        add(Check("webui home", FAIL if other else OK,
                  f"the running webui uses {other[0]}, doctor checked {home}" if other else
                  str(home), f"start the webui with {ENV_HOME}={home} (or run doctor with "
                             f"{ENV_HOME} set to the webui's)" if other else ""))
    elif os.environ.get(ENV_HOME):
        add(Check("webui home", INFO, f"{ENV_HOME} is set for doctor: the webui must be "
                  f"started with the same {ENV_HOME}={home}"))
    else:
        theirs = webui / HOME_FOLDER
        same = _same_path(theirs, home)
        add(Check("webui home", OK if same else FAIL, str(theirs) if same else
                  f"the webui uses {theirs}, doctor checked {home}",
                  "" if same else f"set {ENV_HOME} for the webui, ComfyUI and the command line "
                                  f"alike, or run doctor with {ENV_HOME}={theirs}"))
    return checks, ext


def webui_home(webui: Path) -> Path:
    """The home a webui in `webui` uses when started from this environment:
    $CONSENT_GUARD_HOME, else <webui>/consent_guard (a1111_adapter/bridge.py). For
    `consent-guard doctor --webui DIR` without --comfyui."""
    from .home import ENV_HOME, HOME_FOLDER

    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path(webui) / HOME_FOLDER


def _webui_home(process: dict, webui: Path, env_name: str, folder: str) -> Path:
    """The home a running webui uses: its CONSENT_GUARD_HOME, else <its --data-dir>/
    consent_guard (the webui folder by default)."""
    if process.get("home_env"):
        return Path(process["home_env"]).expanduser()
    data_dir = _arg_value(process.get("argv", []), "--data-dir")
    if data_dir:
        return Path(process.get("cwd") or webui) / data_dir / folder
    return Path(webui) / folder


def run(home: Path, comfyui: Optional[Path] = None, url: Optional[str] = None,
        user: Optional[str] = None, get_json: Optional[Callable] = None,
        cmdlines: Callable = _proc_cmdlines, webui: Optional[Path] = None,
        webui_cmdlines: Callable = _webui_cmdlines) -> List[Check]:
    """Every check, in the order printed. `webui`: an A1111/Forge folder to check too (only
    that one when no ComfyUI folder is given)."""
    get_json = get_json or _get_json  # looked up here, so a test can stand in for the server
    checks: List[Check] = []
    add = checks.append
    plugin = None
    fresh = not_set_up(home)
    later = SETUP_FIX

    # the plugin folder
    webui_ext = None
    if webui is not None:
        found, webui_ext = webui_checks(Path(webui), home, webui_cmdlines)
        checks.extend(found)
    if comfyui is None and webui is not None:
        pass  # only the webui was asked about
    elif comfyui is None:
        add(Check("plugin folder", SKIP, "no ComfyUI folder given", "pass --comfyui DIR"))
    else:
        active, disabled = find_plugin(comfyui)
        if active:
            plugin = active[0]
            add(Check("plugin folder", OK, str(plugin)))
            if len(active) > 1:
                add(Check("plugin copies", WARN, f"{len(active)} copies: "
                          + ", ".join(p.name for p in active)))
            add(Check("prestartup guard", OK if (plugin / "prestartup_script.py").is_file()
                      else FAIL, str(plugin / "prestartup_script.py"),
                      "" if (plugin / "prestartup_script.py").is_file() else
                      "restore prestartup_script.py (git checkout, or reinstall the plugin)"))
        elif disabled:
            add(Check("plugin folder", FAIL, f"renamed to {disabled[0].name}: ComfyUI skips it",
                      f"rename it back to {disabled[0].name[:-len('.disabled')]}"))
        else:
            add(Check("plugin folder", FAIL, f"not found in {comfyui / 'custom_nodes'}",
                      "install Consent Guard into custom_nodes"))

    # the policy and enforce mode
    policy = None
    local = {"home": str(home), "policy_sha256": expect.sha256_of(home / POLICY_FILENAME)}
    try:
        policy = load_policy(home=home)
        src = policy.source or "built-in defaults (no policy file)"
        add(Check("policy", OK, src))
        if fresh:
            add(Check("enforce mode", TODO, "not set up yet: off, only workflows with Consent "
                      "Guard nodes are checked", later))
        else:
            add(Check("enforce mode", OK if policy.enforce else FAIL,
                      "on" if policy.enforce else "off: only workflows with Consent Guard "
                      "nodes are checked", "" if policy.enforce else
                      f"set enforce = true in {home / POLICY_FILENAME}"))
    except Exception as exc:
        add(Check("policy", FAIL, str(exc), "fix the policy file (consent-guard policy check)"))

    # the admin lock
    st = admin.state(home)
    if st.problem:
        add(Check("admin lock", FAIL, st.problem))
    elif not st.has_passphrase:
        add(Check("admin lock", TODO if fresh else FAIL,
                  "not set up yet: no admin passphrase" if fresh else "no admin passphrase set",
                  later if fresh else
                  "consent-guard admin set-passphrase, then consent-guard admin lock"))
    else:
        add(Check("admin lock", OK if st.locked else WARN, "locked" if st.locked else
                  "unlocked: the UI can change the policy",
                  "" if st.locked else "consent-guard admin lock"))

    if policy is not None:
        from .models import ModelResolver

        dirs = [comfyui / "models" / "consent_guard"] if comfyui is not None else []
        if webui is not None:
            dirs.append(Path(webui) / "models" / "consent_guard")
        resolver = ModelResolver(policy.model_paths, dirs)
        add(_models_check(resolver, policy))
        for check in runtime_checks():
            add(check)

        expected = _check_expectation(home, policy, add)
        from .registry import open_for_matching, registry_paths
        local["registry_path"] = str(registry_paths(policy, home)[0])
        try:  # read only (no record written); when the admin's record refused, it says why
            registry = open_for_matching(policy, home) if expected else None
            if not expected:
                add(Check("registry", FAIL, "not checked: the admin's record refuses"))
            elif registry is None:
                local["identities"] = "none"
                add(Check("registry", WARN, "no identity registry: nobody is protected by face",
                          "consent-guard identity enroll"))
            else:
                local["identities"] = len(registry.identities())
                add(Check("registry", OK, f"readable, {local['identities']} protected"))
                registry.close()
        except Exception as exc:
            add(Check("registry", FAIL, f"cannot be opened: {exc}",
                      "consent-guard identity key-file (as the admin)"))

        from .audit import audit_for
        try:
            log = audit_for(policy, home)
            if log is None:
                add(Check("audit log", WARN, "[audit] enabled = false"))
            elif fresh and not log.path.parent.exists():
                add(Check("audit log", TODO, f"not set up yet: {log.path} is created with the "
                          f"home folder", later))
            else:
                target = log.path if log.path.exists() else log.path.parent
                # the account people use ComfyUI as (--user) must append to it; else whoever
                # runs doctor
                ok = target.exists() and (_writable_by(target, user) if user else
                                          os.access(target, os.W_OK))
                add(Check("audit log", OK if ok else FAIL, str(log.path) +
                          ("" if ok else " cannot be written" +
                           (f" by user {user}" if user else "")),
                          "" if ok else f"let the ComfyUI account write {target}"))
        except Exception as exc:
            add(Check("audit log", FAIL, str(exc)))

    # files the person at the keyboard must not be able to change
    guarded = _guarded_paths(home, plugin, comfyui)
    if webui is not None:  # whoever can write these can switch the extension off or out
        extra = _guarded_paths(home, webui_ext, None) + [Path(webui) / "extensions",
                                                          Path(webui) / "config.json"]
        guarded += [p for p in dict.fromkeys(extra) if p.exists() and p not in guarded]
    writable = [p for p in guarded if _writable_by(p, user)]
    who = f"user {user}" if user else ("an account other than root" if _is_root() and
                                       sys.platform != "win32" else "this user")
    if sys.platform == "win32":
        add(Check("file permissions", WARN, "not checked on Windows (ACLs)",
                  "icacls: give the ComfyUI account read and execute only"))
    elif writable and fresh:
        add(Check("file permissions", TODO, f"not set up yet: {len(writable)} path(s) {who} "
                  f"can change, e.g. " + ", ".join(str(p) for p in writable[:4]),
                  "on a shared machine, after the set-up: docs/enforce.md, 'Locking down a shared "
                  "machine' (consent-guard lockdown)"))
    else:
        add(Check("file permissions", FAIL if writable else OK,
                  (f"{len(writable)} path(s) {who} can change, e.g. "
                   + ", ".join(str(p) for p in writable[:4])) if writable else
                  f"{who} cannot change the policy, the lock or the plugin",
                  "docs/enforce.md, 'Locking down a shared machine'" if writable else ""))

    # the running ComfyUI
    name = plugin.name if plugin is not None else "ComfyUI-Consent-Guard"
    if url:
        base = url.rstrip("/")
        try:
            stats = get_json(base + "/system_stats")
            argv = list(stats.get("system", {}).get("argv", []))
            why = _flags_exclude(argv, name)
            add(Check("ComfyUI arguments", FAIL if why else OK, why or " ".join(argv[1:]) or
                      "no arguments", "start ComfyUI without those flags (use the launcher)"
                      if why else ""))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            add(Check("ComfyUI running", WARN, f"could not reach {base}: {exc}"))
            return checks
        try:
            status = get_json(base + "/consent_guard/status")
        except urllib.error.HTTPError as exc:
            add(Check("plugin loaded", FAIL, f"{base} has no Consent Guard routes "
                      f"(HTTP {exc.code}): the plugin is not loaded",
                      "see ComfyUI's log for 'Cannot import'"))
            return checks
        except (urllib.error.URLError, OSError, ValueError) as exc:
            add(Check("plugin loaded", FAIL, f"{base}/consent_guard/status: {exc}"))
            return checks
        add(Check("plugin loaded", OK, base))
        hooks = status.get("hooks", {})
        missing = [k for k, v in hooks.items() if v != "installed"]
        add(Check("hooks", FAIL if missing or not hooks else OK,
                  ("missing: " + ", ".join(missing)) if missing else
                  f"{len(hooks)} in place: " + ", ".join(hooks)))
        armed_ok = status.get("armed") and status.get("enforce")
        add(Check("protection active", OK if armed_ok else FAIL,
                  "enforce mode armed" if armed_ok else
                  (status.get("problem") or "enforce mode is off in the running ComfyUI")))
        engine_problem = status.get("engine_problem")
        add(Check("engine", FAIL if engine_problem else OK,
                  engine_problem or "the running ComfyUI builds its checker without a problem",
                  "see the message; `consent-guard doctor` without --url checks the files"
                  if engine_problem else ""))
        for check in compare_setup(local, status.get("setup")):
            add(check)
    elif comfyui is not None or webui is None:
        found = [a for a in cmdlines()]
        bad = [why for why in (_flags_exclude(a, name) for a in found) if why]
        if bad:
            add(Check("ComfyUI arguments", FAIL, bad[0], "start ComfyUI without those flags"))
        elif found:
            add(Check("ComfyUI arguments", OK, f"{len(found)} ComfyUI process(es), no flag "
                      f"that leaves the plugin out"))
        else:
            add(Check("ComfyUI running", SKIP, "no ComfyUI process found; pass --url to ask a "
                      "running one what it loaded"))
    return checks
