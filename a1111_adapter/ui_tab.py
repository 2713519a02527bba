"""The Consent Guard tab and settings section of an A1111 / Forge webui.

The tab (script_callbacks.on_ui_tabs): status (set up, enforce, lock, models, how many people
are protected), the first-run set-up (consent_guard/setup.py run_setup: one admin passphrase
that also seals the registry, enforce on/off, lock on/off), enrolment, the policy (view; edit
with the admin passphrase while locked), the audit log (always the admin passphrase) and the
lock. Every action is consent_guard/admin_api.py, the same logic and refusal codes as
ComfyUI's routes, with its passphrase limiter counted per browser address; set-up is taken
only from this machine (loopback, and not through a --share/--ngrok tunnel, where every
visitor looks local), because until it is done the first to send a passphrase becomes the
admin. So with enforce on and the lock on, nothing here loosens protection without the admin
passphrase.

Photos for enrolment: gradio writes uploads to its temporary folder before any code of ours
sees them. Each is read into memory at once and gradio's copy deleted, whatever the outcome,
and the upload box is cleared: pick the photos again after a refusal.

Layout: the actions are plain functions of plain values (`*_action`, `status_markdown`) that
return what the tab shows, so tests run them without gradio; `build_tab(gr, ...)` only wires
components to them. It uses components and arguments that gradio 3.41 (A1111 1.10) and 4.40
(Forge) both have: Blocks, Row, Column, Accordion, Markdown, Textbox (type="password"),
Checkbox, Dropdown, File (file_count="multiple": gradio 3 hands tempfile wrappers with .name,
gradio 4 paths; both are taken), Button and `gr.Request` (the browser's address). It was run
in Forge (gradio 4.40); on A1111 1.10 (gradio 3.41) it was not run here.
"""
# No `from __future__ import annotations` here: gradio finds the gr.Request parameter of an
# event handler by its annotation, which must be the class, not a string.
import html
import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from consent_guard import admin_api
from consent_guard.admin_api import EnrolForm, Photo, Reply, Site

log = logging.getLogger("consent_guard")

TAB_TITLE = "Consent Guard"
ELEM_ID = "consent_guard"
SOURCE = "a1111 tab"
SETTINGS_SECTION = ("consent_guard", "Consent Guard")
OPT_SHOW_MODELS = "consent_guard_show_models"
OPT_AUDIT_ROWS = "consent_guard_audit_rows"
DEFAULT_AUDIT_ROWS = 200
DECISIONS = ("any", "block", "censor", "allow")
AUDIT_COLUMNS = ("time", "source", "kind", "decision", "categories", "identities", "error")


# -- where the tab gets its Site ---------------------------------------------------------------

def site_from_host(host, source: str = SOURCE, hooks: Optional[Callable[[], dict]] = None
                   ) -> Site:
    """A Site (admin_api) over a consent_guard.host.Host: the same home, engine and model
    folders as the adapter's checks, so the tab changes what the checks use."""
    return Site(home=host.home, engine=host.get_engine, model_dirs=host.model_dirs,
                insightface_dirs=host.insightface_dirs, source=source, hooks=hooks)


def default_site(source: str = SOURCE) -> Site:
    """The webui's Site: the Host of the adapter's bridge (a1111_adapter/bridge.py), so the tab
    and the checks share one home, engine and model folders."""
    from . import bridge

    host = getattr(bridge, "HOST", None) or getattr(bridge, "host", None)
    if callable(host) and not hasattr(host, "home"):
        host = host()
    if host is None:
        raise RuntimeError("a1111_adapter.bridge has no Host (HOST); the Consent Guard tab "
                           "cannot find the checks' home")
    hooks = getattr(bridge, "status", None)
    return site_from_host(host, source, hooks if callable(hooks) else None)


def _opt(name: str, default):
    """A display option from webui's settings, or its default outside webui."""
    try:
        from modules import shared

        value = getattr(shared.opts, name, default)
        return default if value is None else value
    except Exception:
        return default


def tunnelled() -> Optional[str]:
    """The flag that makes every visitor look local (--share, --ngrok, ...), or None."""
    try:
        from modules import shared

        opts = shared.cmd_opts
    except Exception:
        return None
    for flag in ("share", "ngrok", "cloudflared", "localhostrun", "remotemoe"):
        if getattr(opts, flag, None):
            return "--" + flag
    return None


def client_of(request) -> str:
    """The browser's address as the passphrase limiter and the set-up check see it. A request
    that came through a proxy (X-Forwarded-For and the like) or a webui tunnel is not this
    machine, whatever address the socket shows."""
    headers = getattr(request, "headers", None) or {}
    try:
        forwarded = next((headers.get(h) for h in ("x-forwarded-for", "forwarded", "x-real-ip")
                          if headers.get(h)), None)
    except Exception:
        forwarded = None
    host = getattr(getattr(request, "client", None), "host", None) or "unknown"
    if forwarded:
        return f"forwarded:{str(forwarded).split(',')[0].strip()}"
    tunnel = tunnelled()
    if tunnel:
        return f"tunnel({tunnel}):{host}"
    return str(host)


# -- what the tab shows --------------------------------------------------------------------------

def _yes(value) -> str:
    return "unknown" if value is None else ("on" if value else "off")


def status_markdown(site: Site, show_models: bool = True) -> str:
    """The status block: set up, enforce, lock, registry, audit, problems, models."""
    try:
        body = admin_api.status(site).body
    except Exception as exc:
        return f"**Status cannot be read:** {html.escape(f'{type(exc).__name__}: {exc}')}"
    reg = (body.get("setup") or {}).get("registry") or {}
    count = reg.get("identities")
    people = ("no registry yet (nobody is protected by face)" if count == "none" else
              "cannot be opened" if count is None else f"{count} protected")
    lines = [f"- **Set up:** {'yes' if body.get('set_up') else 'no: use First-run set-up below'}",
             f"- **Enforce mode:** {_yes(body.get('enforce'))}",
             f"- **Admin lock:** {_yes(body.get('locked'))}",
             f"- **Identity registry:** {people}",
             f"- **Home folder:** `{(body.get('setup') or {}).get('home', '?')}`"]
    audit = body.get("audit")
    if audit is not None:
        lines.append("- **Audit log:** " + ("writing" if audit.get("healthy") else
                                            f"NOT writing: {audit.get('problem')}"))
    for key, label in (("engine_problem", "Problem"), ("lock_problem", "Lock problem"),
                       ("hooks_problem", "Adapter problem")):
        if body.get(key):
            lines.append(f"- **{label}:** {html.escape(str(body[key]))}")
    if body.get("armed") is not None:
        lines.append(f"- **Protection armed:** {'yes' if body.get('armed') else 'no'}")
    if show_models:
        rows = body.get("models") or []
        ok = [m["name"] for m in rows if m.get("ok")]
        bad = [f"{m['name']} ({m.get('error') or 'missing'})" for m in rows if not m.get("ok")]
        lines.append(f"- **Models:** {len(ok)} of {len(rows)} found"
                     + (": missing " + html.escape("; ".join(bad)) if bad else ""))
    return "\n".join(lines)


def message(reply: Reply, done: str = "") -> str:
    """A reply as one short Markdown line: what was done, or why it was refused."""
    if reply.ok:
        return f"**Done.** {done}".strip()
    code = reply.body.get("code")
    text = html.escape(str(reply.body.get("error") or "Refused."))
    return f"**Refused{f' ({code})' if code else ''}:** {text}"


# -- the actions (plain values in, plain values out) ------------------------------------------

def setup_action(site: Site, passphrase: str, confirm: str, registry_passphrase: str,
                 enforce: bool, locked: bool, client: str):
    """First-run set-up. Returns (message, passphrase, confirm, registry passphrase, status):
    the passphrase fields are always cleared."""
    reply = admin_api.setup_post(site, passphrase or None, confirm or None, bool(enforce),
                                 bool(locked), registry_passphrase or None, client)
    done = ""
    if reply.ok:
        done = (f"Enforce mode {_yes(reply.body.get('enforce'))}, lock "
                f"{_yes(reply.body.get('locked'))}; registry {reply.body.get('registry')}.")
    return message(reply, done), "", "", "", status_markdown(site, _opt(OPT_SHOW_MODELS, True))


def _path_of(item) -> Optional[str]:
    """A file from gr.File: a path (gradio 4), a tempfile wrapper with .name (gradio 3), or a
    dict with "name"/"path"."""
    if item is None:
        return None
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict):
        return item.get("path") or item.get("name")
    return getattr(item, "name", None)


def read_photos(files: Optional[Sequence]) -> List[Photo]:
    """The uploads read into memory, and gradio's temporary copies deleted (best effort)."""
    photos: List[Photo] = []
    for n, item in enumerate(files or [], 1):
        path = _path_of(item)
        source = os.path.basename(path) if path else f"photo {n}"
        if not path:
            photos.append(Photo(source, None, "not read: no file"))
            continue
        try:
            size = os.path.getsize(path)
            if size > admin_api.MAX_PHOTO_BYTES:
                photos.append(Photo(source, None, f"not read: file over "
                                                  f"{admin_api.MAX_PHOTO_BYTES // 2 ** 20} MB"))
            else:
                photos.append(Photo(source, Path(path).read_bytes()))
        except OSError as exc:
            photos.append(Photo(source, None, f"not read: {exc.strerror or exc}"))
        finally:
            _forget(path)
    return photos


def _forget(path: str) -> None:
    """Delete gradio's temporary copy of an upload (only files in a temporary folder)."""
    import tempfile

    try:
        real = os.path.realpath(path)
        temp_roots = {os.path.realpath(tempfile.gettempdir())}
        if os.environ.get("GRADIO_TEMP_DIR"):
            temp_roots.add(os.path.realpath(os.environ["GRADIO_TEMP_DIR"]))
        if any(real.startswith(root + os.sep) for root in temp_roots):
            os.unlink(real)
    except OSError:
        pass


ENROL_FIELDS = ("name", "aliases", "scope", "consent_by", "on_behalf_of", "consent_date",
                "note")


def enrol_action(site: Site, passphrase: str, registry_passphrase: str, name: str,
                 aliases: str, scope: str, consent_by: str, on_behalf_of: str,
                 consent_date: str, note: str, files, client: str):
    """Enrol one person. Returns (message, passphrase, registry passphrase, name, aliases,
    scope, consent by, on behalf of, date, note, photos, status): after success every field
    is cleared (scope back to "explicit"); after a refusal the text stays for a retry, the
    passphrases and the photos do not."""
    form = EnrolForm(passphrase=passphrase or "", name=name or "", scope=scope or "",
                     consent_by=consent_by or "", photos=read_photos(files),
                     aliases=aliases or "", on_behalf_of=on_behalf_of or "",
                     consent_date=consent_date or "", note=note or "",
                     registry_passphrase=registry_passphrase or "")
    reply = admin_api.enrol(site, form, client)
    rows = reply.body.get("photos") or []
    detail = "; ".join(f"{r['source']}: {'used' if r['ok'] else r['reason']}" for r in rows)
    if reply.ok:
        text = message(reply, f"{reply.body.get('name')} is protected (scope "
                              f"{reply.body.get('scope')}, id {reply.body.get('id')}).")
        notes = reply.body.get("notes") or []
        extra = "".join(f"\n\n{html.escape(x)}" for x in ([detail] if detail else []) + notes)
        kept = ("", "", "explicit", "", "", "", "")
    else:
        text = message(reply)
        extra = f"\n\n{html.escape(detail)}" if detail else ""
        kept = (name, aliases, scope, consent_by, on_behalf_of, consent_date, note)
    return (text + extra, "", "") + kept + (None, status_markdown(
        site, _opt(OPT_SHOW_MODELS, True)))


def policy_load_action(site: Site):
    """(policy text, message)."""
    reply = admin_api.policy_get(site)
    if not reply.ok:
        return "", message(reply)
    text = reply.body.get("text")
    lock = ("Locked: saving needs the admin passphrase." if reply.body.get("locked") else
            "Not locked: anyone at this webui can change it.")
    if text is None:
        return "", f"No policy file yet at `{reply.body.get('path')}` (defaults apply). {lock}"
    return text, f"`{reply.body.get('path')}`. {lock}"


def policy_save_action(site: Site, text: str, passphrase: str, client: str):
    """(message, passphrase, status)."""
    reply = admin_api.policy_post(site, text or "", passphrase or None, client)
    return (message(reply, "The policy was saved and approved."), "",
            status_markdown(site, _opt(OPT_SHOW_MODELS, True)))


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    text = "" if value is None else str(value)
    return html.escape(text).replace("|", "&#124;").replace("\n", " ")


def audit_markdown(records: List[dict]) -> str:
    """The records as a Markdown table, newest first (ids and hashes only, as the log)."""
    if not records:
        return "_No records._"
    head = "| " + " | ".join(AUDIT_COLUMNS) + " |\n|" + "---|" * len(AUDIT_COLUMNS)
    rows = ["| " + " | ".join(_cell(r.get(c)) for c in AUDIT_COLUMNS) + " |"
            for r in reversed(records)]
    return head + "\n" + "\n".join(rows)


def audit_action(site: Site, passphrase: str, since: str, decision: str, client: str):
    """(message, table, passphrase)."""
    limit = _opt(OPT_AUDIT_ROWS, DEFAULT_AUDIT_ROWS)
    reply = admin_api.audit(site, passphrase or None, (since or "").strip() or None,
                            None if decision in (None, "", "any") else decision, limit, client)
    if not reply.ok:
        return message(reply), "", ""
    records = reply.body.get("records") or []
    note = reply.body.get("note")
    text = note or (f"{len(records)} of {reply.body.get('total', len(records))} records "
                    f"(newest first) from `{reply.body.get('path')}`.")
    return text, audit_markdown(records), ""


def lock_action(site: Site, locked: bool, passphrase: str, client: str):
    """(message, passphrase, status)."""
    reply = admin_api.lock_post(site, bool(locked), passphrase or None, client)
    return (message(reply, "Locked." if locked else "Unlocked."), "",
            status_markdown(site, _opt(OPT_SHOW_MODELS, True)))


# -- gradio (thin) ------------------------------------------------------------------------------

def build_tab(gr, site: Callable[[], Site]):
    """The tab's gr.Blocks; `site` gives the Site when an event runs."""
    def status_now():
        return status_markdown(site(), _opt(OPT_SHOW_MODELS, True))

    try:
        first_status = status_now()
    except Exception as exc:  # shown, never fatal for the webui
        first_status = f"**Status cannot be read:** {html.escape(str(exc))}"

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("## Consent Guard\nChecks prompts and images before they are saved, and "
                    "protects enrolled people. Everything that matters needs the admin "
                    "passphrase once the lock is on.")
        with gr.Row():
            status = gr.Markdown(first_status, elem_id="consent_guard_status")
        refresh = gr.Button("Refresh status", elem_id="consent_guard_refresh")
        refresh.click(status_now, inputs=[], outputs=[status])

        with gr.Accordion("First-run set-up", open=False, elem_id="consent_guard_setup"):
            gr.Markdown("One admin passphrase (at least 8 characters) that also seals the list "
                        "of protected people. It cannot be recovered. Set-up is only taken "
                        "from the computer the webui runs on.")
            s_pass = gr.Textbox(label="Admin passphrase", type="password",
                                elem_id="consent_guard_setup_pass")
            s_confirm = gr.Textbox(label="Admin passphrase again", type="password",
                                   elem_id="consent_guard_setup_confirm")
            s_reg = gr.Textbox(label="Existing registry's passphrase (only if asked)",
                               type="password", elem_id="consent_guard_setup_registry")
            s_enforce = gr.Checkbox(label="Enforce mode: check every prompt and image, live "
                                          "previews off", value=True,
                                    elem_id="consent_guard_setup_enforce")
            s_lock = gr.Checkbox(label="Lock: changes need the admin passphrase", value=True,
                                 elem_id="consent_guard_setup_lock")
            s_go = gr.Button("Set up", variant="primary", elem_id="consent_guard_setup_go")
            s_msg = gr.Markdown("", elem_id="consent_guard_setup_msg")

        def on_setup(p, c, r, e, lk, request: gr.Request):
            return setup_action(site(), p, c, r, e, lk, client_of(request))
        s_go.click(on_setup, inputs=[s_pass, s_confirm, s_reg, s_enforce, s_lock],
                   outputs=[s_msg, s_pass, s_confirm, s_reg, status])

        with gr.Accordion("Enrol a protected person", open=False, elem_id="consent_guard_enrol"):
            gr.Markdown("Only with the person's consent (or their guardian's). Photos are "
                        "turned into face embeddings and dropped; clear photos of this person "
                        "alone, face to the camera.")
            with gr.Row():
                e_name = gr.Textbox(label="Name", elem_id="consent_guard_enrol_name")
                e_aliases = gr.Textbox(label="Other names (comma-separated)")
                e_scope = gr.Dropdown(label="Scope", choices=["explicit", "any"],
                                      value="explicit")
            with gr.Row():
                e_by = gr.Textbox(label="Consent given by")
                e_behalf = gr.Textbox(label="On behalf of (e.g. a parent for a child)")
                e_date = gr.Textbox(label="Consent date (YYYY-MM-DD, empty: today)")
            e_note = gr.Textbox(label="Note")
            e_photos = gr.File(label="Photos", file_count="multiple", file_types=["image"],
                               elem_id="consent_guard_enrol_photos")
            with gr.Row():
                e_pass = gr.Textbox(label="Admin passphrase", type="password")
                e_reg = gr.Textbox(label="Registry passphrase (only if asked)",
                                   type="password")
            e_go = gr.Button("Enrol", variant="primary", elem_id="consent_guard_enrol_go")
            e_msg = gr.Markdown("", elem_id="consent_guard_enrol_msg")

        def on_enrol(p, r, n, a, sc, by, beh, d, note, files, request: gr.Request):
            return enrol_action(site(), p, r, n, a, sc, by, beh, d, note, files,
                                client_of(request))
        e_go.click(on_enrol, inputs=[e_pass, e_reg, e_name, e_aliases, e_scope, e_by, e_behalf,
                                     e_date, e_note, e_photos],
                   outputs=[e_msg, e_pass, e_reg, e_name, e_aliases, e_scope, e_by, e_behalf,
                            e_date, e_note, e_photos, status])

        with gr.Accordion("Policy", open=False, elem_id="consent_guard_policy"):
            p_text = gr.Textbox(label="policy.toml", lines=18, max_lines=60,
                                elem_id="consent_guard_policy_text")
            p_msg = gr.Markdown("", elem_id="consent_guard_policy_msg")
            with gr.Row():
                p_load = gr.Button("Load", elem_id="consent_guard_policy_load")
                p_pass = gr.Textbox(label="Admin passphrase (needed while locked)",
                                    type="password", elem_id="consent_guard_policy_pass")
                p_save = gr.Button("Save", variant="primary",
                                   elem_id="consent_guard_policy_save")
        p_load.click(lambda: policy_load_action(site()), inputs=[], outputs=[p_text, p_msg])

        def on_policy_save(text, p, request: gr.Request):
            return policy_save_action(site(), text, p, client_of(request))
        p_save.click(on_policy_save, inputs=[p_text, p_pass], outputs=[p_msg, p_pass, status])

        with gr.Accordion("Audit log", open=False, elem_id="consent_guard_audit"):
            with gr.Row():
                a_pass = gr.Textbox(label="Admin passphrase", type="password",
                                    elem_id="consent_guard_audit_pass")
                a_since = gr.Textbox(label="Since (e.g. 24h, 7d, 2026-01-31)", value="7d")
                a_decision = gr.Dropdown(label="Decision", choices=list(DECISIONS),
                                         value="any")
                a_go = gr.Button("Show", elem_id="consent_guard_audit_go")
            a_msg = gr.Markdown("", elem_id="consent_guard_audit_msg")
            a_table = gr.Markdown("", elem_id="consent_guard_audit_table")

        def on_audit(p, since, decision, request: gr.Request):
            return audit_action(site(), p, since, decision, client_of(request))
        a_go.click(on_audit, inputs=[a_pass, a_since, a_decision],
                   outputs=[a_msg, a_table, a_pass])

        with gr.Accordion("Lock", open=False, elem_id="consent_guard_lock"):
            with gr.Row():
                l_pass = gr.Textbox(label="Admin passphrase", type="password",
                                    elem_id="consent_guard_lock_pass")
                l_lock = gr.Button("Lock", elem_id="consent_guard_lock_go")
                l_unlock = gr.Button("Unlock", elem_id="consent_guard_unlock")
            l_msg = gr.Markdown("", elem_id="consent_guard_lock_msg")

        def on_lock(p, request: gr.Request):
            return lock_action(site(), True, p, client_of(request))

        def on_unlock(p, request: gr.Request):
            return lock_action(site(), False, p, client_of(request))
        l_lock.click(on_lock, inputs=[l_pass], outputs=[l_msg, l_pass, status])
        l_unlock.click(on_unlock, inputs=[l_pass], outputs=[l_msg, l_pass, status])
    return tab


# -- the webui callbacks --------------------------------------------------------------------------

def on_ui_tabs(site: Callable[[], Site] = default_site):
    """script_callbacks.on_ui_tabs: [(blocks, title, elem_id)]."""
    import gradio as gr

    return [(build_tab(gr, site), TAB_TITLE, ELEM_ID)]


def on_ui_settings():
    """script_callbacks.on_ui_settings. Display options only, on purpose: webui's settings can
    be changed by anyone at the keyboard (no passphrase), so nothing here may weaken a check;
    the admin lock (the tab, the policy) covers everything that matters."""
    from modules import shared

    shared.opts.add_option(OPT_SHOW_MODELS, shared.OptionInfo(
        True, "Show the model list in the Consent Guard tab's status",
        section=SETTINGS_SECTION))
    shared.opts.add_option(OPT_AUDIT_ROWS, shared.OptionInfo(
        DEFAULT_AUDIT_ROWS, f"Audit log: records shown at a time in the Consent Guard tab "
                            f"(at most {admin_api.MAX_AUDIT_RECORDS})",
        section=SETTINGS_SECTION))
