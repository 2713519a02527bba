"""What every UI adapter needs from Consent Guard besides the engine's checks, in one place:
where the home is, the process's engine (rebuilt when the policy, the registry or the admin's
record change), the audit log, policy overrides, the admin's contact line and the enforce
state. The ComfyUI adapter (nodes/comfy_bridge.py) and the A1111/Forge adapter
(a1111_adapter/bridge.py) each make one Host with what differs between the UIs: the UI's
user folder (for the home, consent_guard/home.py), its model folders, its InsightFace
folders, the error class its code raises, and its name for messages.

So one machine running both UIs and the command line reads one policy, one registry and one
audit log, and a registry, policy or audit problem is refused the same way in both UIs (fail
closed: nothing is checked against a policy that cannot be read or a registry that vanished).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple, Union

from . import expect
from .engine import Engine
from .home import resolve_home
from .policy import POLICY_FILENAME, load_policy
from .registry import REGISTRY_FILENAME, open_for_matching, registry_paths

log = logging.getLogger("consent_guard")

PathsFn = Callable[[], Iterable[Union[str, Path]]]


class HostError(RuntimeError):
    """The default error a Host raises (an adapter passes its own class)."""


def file_state(path: Path) -> Tuple:
    """(path, mtime_ns, size), or (path, None, None) for a missing file."""
    try:
        stat = path.stat()
        return (str(path), stat.st_mtime_ns, stat.st_size)
    except FileNotFoundError:
        return (str(path), None, None)


class Host:
    """One UI's view of Consent Guard's shared state. Thread-safe; one per process per UI.

    `user_dir`: a function giving the UI's user folder (the home is `<user_dir>/consent_guard`
    unless CONSENT_GUARD_HOME is set), or None for the command line's choice;
    `model_dirs` / `insightface_dirs`: functions giving the folders weights are looked for in
    (called whenever the engine is rebuilt, so folders registered later count);
    `error`: the exception class raised when nothing can be checked (fail closed);
    `ui_name`: the UI's name, as a person reads it in those errors ("ComfyUI", "the WebUI")."""

    def __init__(self, user_dir: Optional[Callable[[], Optional[str]]] = None,
                 model_dirs: PathsFn = lambda: (), insightface_dirs: PathsFn = lambda: (),
                 error: type = HostError, ui_name: str = "this program"):
        self._user_dir = user_dir or (lambda: None)
        self._model_dirs = model_dirs
        self._insightface_dirs = insightface_dirs
        self.error = error
        self.ui_name = ui_name
        self.engine: Optional[Engine] = None
        self._engine_key: Optional[Tuple] = None
        self._lock = threading.Lock()
        self._seen_registries: set = set()  # registries opened in this process: cannot vanish
        self._overrides: dict = {}  # (override text, locked, base id) -> engine

    # -- where ---------------------------------------------------------------------------

    def home(self) -> Path:
        return resolve_home(self._user_dir())

    def model_dirs(self) -> List[Path]:
        return list(dict.fromkeys(Path(p) for p in self._model_dirs()))

    def insightface_dirs(self) -> List[Path]:
        return list(dict.fromkeys(Path(p) for p in self._insightface_dirs()))

    # -- what a check depends on ----------------------------------------------------------

    def policy_state(self) -> Tuple:
        """Identifies the policy file's current version (path, mtime, size). A policy the
        admin approved that is gone reads as (path, "missing", None), not as "no file": a
        policy file that exists but cannot be used counts as enforce mode on (enforce_on), and
        so must one that the admin's record says exists (expect.py); get_engine then refuses
        to check."""
        home = self.home()
        state = file_state(home / POLICY_FILENAME)
        if state[1] is None and self._policy_expected(home):
            return (state[0], "missing", None)
        return state

    @staticmethod
    def _policy_expected(home: Path) -> bool:
        try:
            rec = expect.read(home).get("policy") or {}
        except expect.ExpectationError:
            return True  # a record that cannot be read: assume the worst
        return bool(rec.get("sha256"))

    def _registry_db(self) -> Path:
        policy = self.engine.policy if self.engine is not None else None
        return registry_paths(policy, self.home())[0] if policy is not None else \
            self.home() / REGISTRY_FILENAME

    def checks_state(self) -> Tuple:
        """What a check's result depends on besides its inputs: the policy file and the
        identity registry (someone enrolled or revoked since). For caches of verdicts."""
        db = self._registry_db()
        return self.policy_state() + file_state(db) + file_state(Path(str(db) + "-wal"))

    def _registry_exists(self) -> bool:
        """A registry created after the engine was built must be picked up (the engine keeps
        an open registry and sees later changes to it through its generation counter)."""
        return self._registry_db().exists()

    # -- the engine -----------------------------------------------------------------------

    def get_engine(self, policy_state: Optional[Callable[[], Tuple]] = None) -> Engine:
        """The process's engine; rebuilt when the policy file, the registry's existence or the
        admin's record change, so edits need no restart. A policy that cannot be read raises
        `self.error`: nothing runs unchecked. `policy_state`: the function that identifies
        the policy's version (an adapter may pass its own module-level one)."""
        home = self.home()
        key = (policy_state or self.policy_state)() + (self._registry_exists(),) + \
            file_state(expect.expect_path(home))
        policy_path = Path(key[0])
        with self._lock:
            if self.engine is None or key != self._engine_key:
                self._build(policy_path.parent)
                # building may have written the admin's record (a registry seen for the first
                # time): that write is not a change to rebuild for
                self._engine_key = key[:-3] + file_state(expect.expect_path(home))
            return self.engine

    def _build(self, where: Path) -> None:
        try:
            policy = load_policy(home=where)
        except Exception as exc:
            raise self.error(f"Consent Guard cannot read its policy, so nothing is saved: "
                             f"{exc}") from exc
        registry = self._open_expected_registry(policy, where)
        if self.engine is not None and self.engine.registry is not None:
            self.engine.registry.close()
        engine = Engine(policy, model_dirs=self.model_dirs(), registry=registry,
                        insightface_dirs=self.insightface_dirs())
        self.engine = engine
        try:
            from .audit import audit_for

            engine.audit = audit_for(policy, where)
        except Exception as exc:  # the log is not needed to check, but enforce needs it
            log.error("Consent Guard: the audit log cannot be opened: %s", exc)
            if policy.enforce:
                raise self.error(f"Consent Guard cannot open its audit log, and in enforce "
                                 f"mode nothing runs unlogged: {exc}") from exc
        self._overrides.clear()

    def _open_expected_registry(self, policy, where: Path):
        """The registry, after the admin's record (expect.py) and this process's own memory
        agree that nothing expected is missing: a registry that existed must never read as
        "nobody is protected", nor a swapped policy as approved."""
        db, key_file = registry_paths(policy, where)
        gone = [str(p) for p in sorted(self._seen_registries) if not Path(p).exists()]
        if gone:
            raise self.error(f"Consent Guard refuses to check, so nothing is saved: the "
                             f"identity registry {', '.join(gone)} was open in this "
                             f"{self.ui_name} and is gone; restore it (if it was removed on "
                             f"purpose: `{expect.FORGET_COMMAND}`, then restart "
                             f"{self.ui_name})")
        try:
            for note in expect.require(where, policy, db, key_file):
                log.warning("Consent Guard: %s", note)
        except expect.ExpectationError as exc:
            raise self.error(f"{exc}. Nothing is saved until this is resolved.") from exc
        try:  # an existing registry that cannot be opened must not mean "nobody protected"
            registry = open_for_matching(policy, where)
        except Exception as exc:
            raise self.error(f"Consent Guard cannot open the identity registry, so nothing "
                             f"is saved: {exc}") from exc
        if registry is not None:
            self._seen_registries.add(str(db))
            if not expect.note_registry(where, db, key_file):
                log.warning("Consent Guard: could not record the registry in %s; the admin's "
                            "commands record it", expect.expect_path(where))
        return registry

    def engine_for(self, base: Engine, override: str) -> Engine:
        """`base`, or an engine for a policy override (only stricter values when the admin
        lock is on; what was ignored is logged)."""
        if not (override or "").strip():
            return base
        from .admin import is_locked
        from .overrides import apply_override

        locked = is_locked(self.home())
        key = (override, locked, id(base))
        with self._lock:
            hit = self._overrides.get(key)
        if hit is not None:
            return hit
        try:
            policy, ignored = apply_override(base.policy, override, locked)
        except Exception as exc:
            raise self.error(str(exc)) from exc
        for note in ignored:
            log.warning("Consent Guard: the admin lock is on, so a looser setting is "
                        "ignored: %s", note)
        base.load()
        engine = base.with_policy(policy)
        with self._lock:
            self._overrides[key] = engine
        return engine

    # -- what the adapters show and obey ----------------------------------------------------

    def contact(self) -> str:
        """The admin's line shown under every refusal (policy `[messages] contact`), or ""."""
        engine = self.engine
        if engine is None:
            try:
                engine = self.get_engine()
            except Exception:
                return ""
        return getattr(engine.policy, "contact", "") or ""

    def enforce_on(self, get_engine: Optional[Callable[[], Engine]] = None) -> bool:
        """The policy's `enforce`; a policy file that exists (or that the admin's record says
        exists) but cannot be used counts as on: fail closed."""
        try:
            return bool((get_engine or self.get_engine)().policy.enforce)
        except self.error:
            return self.policy_state()[1] is not None

    def locked(self) -> bool:
        """The admin lock (consent_guard/admin.py) is on for this home."""
        from .admin import is_locked

        try:
            return bool(is_locked(self.home()))
        except Exception:  # a lock file that cannot be read: assume locked
            return True
