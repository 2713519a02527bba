// Consent Guard in the ComfyUI front end: first-run set-up, and a panel (a sidebar tab, the
// shield icon in the left bar) with status, enrolment, policy, lock and audit log.
//
// Where things are (comfyui-frontend-package 1.27.10):
// - The sidebar tab: app.extensionManager.registerSidebarTab({id, icon, title, tooltip,
//   type: "custom", render(el), destroy()}) (src/stores/workspace/sidebarTabStore.ts); it
//   also gets a "Toggle Consent Guard Sidebar" command.
// - Commands and menu entries: an extension's `commands` and `menuCommands` (top menu:
//   Extensions > Consent Guard > ...; and the command palette), read by extensionService.ts.
// - Dialogs and toasts: the front end's own, through extensionManager (see the helpers below).
// - First run: when no admin passphrase exists (GET /consent_guard/setup), a toast says so on
//   every load and the set-up dialog opens by itself once per browser.
//
// ComfyUI serves web/ at /extensions/<folder>/ (nodes.py EXTENSION_WEB_DIRS), so this file is
// /extensions/<folder>/js/consent_guard.js and the front end's shims (scripts/app.js and
// scripts/api.js) are three levels up. api.fetchApi(route) fetches /api<route>. The server
// side: nodes/routes.py (enrolment) and nodes/admin_routes.py (status, set-up, policy, lock,
// audit). Refusals carry a "code": "passphrase_missing" and "passphrase_wrong" differ.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// -- helpers: DOM, requests, the front end's dialogs and toasts -------------------------------
// Dialogs and toasts go through the front end's own components where it exposes them to
// extensions (comfyui-frontend-package 1.27.10, src/stores/workspaceStore.ts):
//   app.extensionManager.toast.add({severity, summary, detail, life})   (PrimeVue Toast)
//   app.extensionManager.dialog.showExtensionDialog({key, title, component, props,
//       dialogComponentProps}) -> {dialog, closeDialog}                  (PrimeVue Dialog:
//       modal, closeOnEscape and dismissableMask (backdrop click) on by default)
// showExtensionDialog takes a Vue component, and extensions get no Vue `h`; a component whose
// render() returns "" renders one empty text node, after which mounted() puts our own DOM.
// Where the dialog service is missing (an older front end) modal() below stands in, with the
// same Escape, backdrop and focus behaviour.

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function field(label, control, hint = "") {
  const row = el("label", { className: "cg-field", style: "display:block;margin:8px 0" },
    el("div", { textContent: label, style: "font-weight:600;margin-bottom:2px" }), control);
  if (hint) row.append(el("div", { textContent: hint, style: "opacity:.75;font-size:12px" }));
  return row;
}

function input(name, props = {}) {
  return el("input", { name, style: "width:100%;box-sizing:border-box", ...props });
}

function button(text, props = {}) {
  return el("button", { type: "button", textContent: text, className: "cg-button",
    style: "padding:4px 12px;cursor:pointer", ...props });
}

// A line for results and refusals; `ok` false shows it as an error (role=alert: read aloud).
function say(node, text, ok = true) {
  node.textContent = text;
  node.style.color = ok ? "" : "var(--error-text,#f66)";
  node.setAttribute("role", ok ? "status" : "alert");
}

async function readJson(response) {
  try { return await response.json(); } catch { return { ok: false, error: `HTTP ${response.status}` }; }
}

async function getJson(route) {
  return readJson(await api.fetchApi(route, { cache: "no-store" }));
}

async function postJson(route, body) {
  return readJson(await api.fetchApi(route, { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" } }));
}

// Returns a function that takes the toast away again (PrimeVue matches the same object).
function toast(severity, summary, detail, life = 6000) {
  const t = app.extensionManager?.toast;
  const message = { severity, summary, detail, life };
  if (t?.add) t.add(message);
  else if (severity === "error") alert(`${summary}: ${detail}`);
  return () => t?.remove?.(message);
}

function focusFirst(root) {
  const target = root.querySelector("[autofocus]") ||
    root.querySelector("input:not([type=hidden]):not([disabled]), select, textarea, button");
  target?.focus();
}

// Shows `content` in a dialog; returns the function that closes it. Focus goes to the first
// field (or the one marked autofocus) and back to whatever had it before, on any close.
// Each opening gets its own dialog key: the front end reuses a dialog whose key is still in
// its stack, and one closed a moment ago may still be playing its hide animation (it would be
// removed right after being shown again). A second opening of the same dialog closes the first.
const openDialogs = new Map();
let opened = 0;

function showDialog(key, title, content) {
  openDialogs.get(key)?.();
  // "extension-" first: the front end adds it when missing, and then its closeDialog() (which
  // looks the key up as given) finds nothing to close (1.27.10)
  const close = showDialogOnce(`extension-consent-guard-${key}-${++opened}`, title, content,
                               () => { if (openDialogs.get(key) === close) openDialogs.delete(key); });
  openDialogs.set(key, close);
  return close;
}

function showDialogOnce(key, title, content, onClosed) {
  const opener = document.activeElement;
  const giveBack = () => {
    onClosed();
    setTimeout(() => { if (opener?.isConnected) opener.focus(); }, 0);
  };
  const service = app.extensionManager?.dialog;
  if (service?.showExtensionDialog) {
    const component = {
      name: "ConsentGuardDialogBody",
      render: () => "",
      mounted() {
        this.$el.parentNode.insertBefore(content, this.$el.nextSibling);
        // after PrimeVue's own focus on show; never taken from a field already chosen (on a
        // busy machine the timer can fire after someone has clicked into the second field)
        setTimeout(() => { if (!content.contains(document.activeElement)) focusFirst(content); }, 60);
      },
      unmounted() { content.remove(); },
    };
    const { closeDialog } = service.showExtensionDialog({
      key, title, component,
      dialogComponentProps: { onClose: giveBack, style: "width:min(640px,94vw)" } });
    return closeDialog;
  }
  return modal(content, title, giveBack);
}

// The stand-in dialog: Escape and a click on the backdrop close it, Tab stays inside.
function modal(content, title, onClose) {
  const box = el("div", { role: "dialog", ariaModal: "true", ariaLabel: title,
    style: "background:var(--comfy-menu-bg,#222);color:var(--fg-color,#ddd);padding:16px 20px;" +
           "border-radius:8px;width:min(640px,92vw);max-height:90vh;overflow:auto;font-size:14px" },
    el("h3", { textContent: title, style: "margin-top:0" }), content);
  const overlay = el("div", { style: "position:fixed;inset:0;z-index:10000;display:flex;" +
    "align-items:center;justify-content:center;background:rgba(0,0,0,.5)" }, box);
  const close = () => { overlay.remove(); document.removeEventListener("keydown", onKey, true); onClose?.(); };
  const onKey = (e) => {
    if (e.key === "Escape") { e.stopPropagation(); close(); return; }
    if (e.key !== "Tab") return;
    const items = [...box.querySelectorAll("input,select,textarea,button,[tabindex]")]
      .filter((n) => !n.disabled && n.offsetParent !== null);
    if (!items.length) return;
    const [first, last] = [items[0], items[items.length - 1]];
    if (e.shiftKey && document.activeElement === first) { e.preventDefault(); last.focus(); }
    else if (!e.shiftKey && document.activeElement === last) { e.preventDefault(); first.focus(); }
  };
  overlay.addEventListener("mousedown", (e) => { if (e.target === overlay) close(); });
  document.addEventListener("keydown", onKey, true);
  document.body.append(overlay);
  focusFirst(box);
  return close;
}

function today() {
  const d = new Date();
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}`;
}

const ROUTES = {
  enroll: "/consent_guard/identities/enroll",
  status: "/consent_guard/status",
  setup: "/consent_guard/setup",
  policy: "/consent_guard/policy",
  lock: "/consent_guard/lock",
  audit: "/consent_guard/audit",
  verify: "/consent_guard/verify",
};
const CMD = {
  setup: "ConsentGuard.Setup",
  enrol: "ConsentGuard.EnrolProtectedPerson",
  policy: "ConsentGuard.Policy",
  audit: "ConsentGuard.AuditLog",
  verify: "ConsentGuard.VerifyImage",
  panel: "ConsentGuard.OpenPanel",
};
const TAB_ID = "consent-guard";
const OFFERED_KEY = "ConsentGuard.setupOffered";
const changed = new EventTarget();  // "changed": set-up, lock or enrolment: panels refresh
let removeSetupToast = () => {};  // the "not set up yet" toast, taken away once set up

function notify() { changed.dispatchEvent(new Event("changed")); }

function passphraseInput(name, props = {}) {
  return input(name, { type: "password", autocomplete: "current-password", ...props });
}

// After a refused request: the message, and the field to type in again.
function refused(result, body, passphrase) {
  say(result, body.error || "Refused.", false);
  if (passphrase && (body.code === "passphrase_missing" || body.code === "passphrase_wrong")) {
    passphrase.focus();
  }
}

// Clears `result`; a refused reply's message is shown there instead, and true returned.
function showRefusal(result, body, passphrase) {
  result.replaceChildren();
  if (body.ok) return false;
  const line = el("div");
  result.append(line);
  refused(line, body, passphrase);
  return true;
}

// -- first-run set-up -------------------------------------------------------------------------

function setupForm(info, onDone) {
  const min = info.min_passphrase || 8;
  const pass = passphraseInput("passphrase", { autocomplete: "new-password", required: true,
                                               minLength: min, autofocus: true });
  const again = passphraseInput("passphrase_confirm", { autocomplete: "new-password",
                                                        required: true });
  const regPass = passphraseInput("registry_passphrase");
  const regRow = field("Registry passphrase", regPass,
    `An identity registry already exists (${info.registry_path}). Type the passphrase it was ` +
    "made with: set-up then seals it with the admin passphrase, so one passphrase does both.");
  regRow.style.display = info.registry_exists ? "" : "none";
  const enforce = el("input", { type: "checkbox", name: "enforce", checked: true,
                                defaultChecked: true });
  const locked = el("input", { type: "checkbox", name: "locked", checked: true,
                               defaultChecked: true });
  const result = el("div", { style: "margin-top:8px;white-space:pre-wrap" });
  const submit = el("button", { type: "submit", textContent: "Set up", className: "cg-button",
                                style: "padding:4px 16px" });
  const form = el("form", { className: "cg-setup" },
    el("p", { style: "margin-top:0", textContent: "Choose the admin passphrase. It protects " +
      "the policy, the lock and the audit log, and it also seals the list of protected " +
      "people. It cannot be recovered: keep it somewhere safe." }),
    field("Admin passphrase", pass, `At least ${min} characters.`),
    field("Admin passphrase again", again),
    regRow,
    el("label", { style: "display:block;margin:10px 0" }, enforce, " Enforce mode",
       el("div", { textContent: info.enforce_help, style: "opacity:.75;font-size:12px" })),
    el("label", { style: "display:block;margin:10px 0" }, locked, " Lock",
       el("div", { textContent: info.lock_help, style: "opacity:.75;font-size:12px" })),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, submit), result);
  form.onsubmit = async (event) => {
    event.preventDefault();
    if (pass.value !== again.value) {
      say(result, "The two admin passphrases differ: type the same one twice.", false);
      again.focus();
      return;
    }
    submit.disabled = true;
    say(result, "Setting up...");
    try {
      const body = await postJson(ROUTES.setup, { passphrase: pass.value,
        passphrase_confirm: again.value, registry_passphrase: regPass.value || null,
        enforce: enforce.checked, locked: locked.checked });
      if (!body.ok) {
        if (body.code === "registry_passphrase_needed") { regRow.style.display = ""; regPass.focus(); }
        refused(result, body, body.code?.startsWith("registry") ? regPass : pass);
        return;
      }
      // the form's work is done: only the summary stays (the dialog closes by itself)
      form.replaceChildren(result);
      say(result, "Consent Guard is set up.\n" + (body.done || []).join("\n"));
      removeSetupToast();
      toast("success", "Consent Guard is set up", `Enforce mode ${body.enforce ? "on" : "off"}, ` +
            `lock ${body.locked ? "on" : "off"}. Enrol protected people in the Consent Guard panel.`);
      notify();
      onDone?.(body);
    } catch (err) {
      say(result, `Set-up failed: ${err}`, false);
    } finally {
      pass.value = again.value = regPass.value = "";
      submit.disabled = false;
    }
  };
  return form;
}

async function openSetup() {
  const info = await getJson(ROUTES.setup);
  if (info.set_up) {
    toast("info", "Consent Guard is set up already",
          "Change the policy or the lock in the Consent Guard panel (admin passphrase).");
    return;
  }
  let close = null;
  close = showDialog("setup", "Set up Consent Guard",
                     setupForm(info, () => setTimeout(() => close?.(), 1500)));
}

// -- enrolment --------------------------------------------------------------------------------

function scopeChoice(value, title, text, checked = false) {
  return el("label", { style: "display:block;margin:4px 0" },
    el("input", { type: "radio", name: "scope", value, checked, defaultChecked: checked }),
    ` ${title}: `, el("span", { textContent: text, style: "opacity:.8" }));
}

function enrolForm() {
  const passphrase = passphraseInput("passphrase", { required: true });
  const regPass = passphraseInput("registry_passphrase");
  const regRow = field("Registry passphrase", regPass, "Only where the registry was sealed " +
                       "with another passphrase than the admin's.");
  regRow.style.display = "none";
  const name = input("name", { required: true, autofocus: true });
  const files = input("photo", { type: "file", multiple: true, accept: "image/*", required: true });
  const submit = el("button", { type: "submit", textContent: "Enrol", className: "cg-button",
                                style: "padding:4px 16px" });
  const result = el("div", { className: "cg-result", style: "margin-top:8px;white-space:pre-wrap" });
  const date = input("consent_date", { type: "date", value: today(), defaultValue: today() });
  const form = el("form", { className: "cg-enrol" },
    el("p", { style: "margin-top:0;padding:8px;border:1px solid #c90;border-radius:4px",
      textContent: "Only enrol someone who has consented, or a parent/guardian or school on " +
                   "their behalf. Photos are not stored; only face embeddings, encrypted." }),
    field("Name", name),
    field("Aliases", input("aliases"), "Other names, comma-separated."),
    el("fieldset", { style: "margin:8px 0" }, el("legend", { textContent: "Scope" }),
      scopeChoice("explicit", "explicit", "blocks nude or sexual generated images of them; " +
                  "their photos may still be used as sources.", true),
      scopeChoice("any", "any", "blocks every generated image showing them, and refuses " +
                  "their photos as img2img / inpaint / face-swap sources.")),
    field("Consent given by", input("consent_by", { required: true }),
          "The person, or their parent, guardian or school."),
    field("On behalf of", input("on_behalf_of"), "Whose behalf, when not their own."),
    field("Consent date", date),
    field("Note", input("note")),
    field("Photos", files, "Clear photos of this person alone, face to the camera; 3 or more " +
                           "match more reliably."),
    field("Admin passphrase", passphrase),
    regRow,
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, submit), result);

  form.onsubmit = async (event) => {
    event.preventDefault();
    const data = new FormData(form);  // every named field above, and each chosen photo
    if (!regPass.value) data.delete("registry_passphrase");
    submit.disabled = true;
    say(result, "Enrolling: finding and embedding the face in each photo...");
    try {
      const response = await api.fetchApi(ROUTES.enroll, { method: "POST", body: data });
      const body = await readJson(response);
      const lines = (body.photos || []).map((p) =>
        `${p.ok ? "ok" : "refused"}  ${p.source}: ${p.reason}`);
      if (body.ok) {
        form.reset();  // every field back to its default: ready for the next person
        regRow.style.display = "none";
        lines.unshift(`Enrolled ${body.name} (${body.id}, scope ${body.scope}), embedded ` +
                      `with ${body.backends.join(", ")}.`);
        lines.push(...(body.notes || []).map((n) => `note: ${n}`));
        say(result, lines.join("\n"));
        toast("success", "Consent Guard", `Enrolled ${body.name}.`);
        notify();
        name.focus();
      } else {
        if (body.code === "registry_passphrase_needed") { regRow.style.display = ""; regPass.focus(); }
        refused(result, { ...body, error: [`Not enrolled: ${body.error}`, ...lines].join("\n") },
                passphrase);
      }
    } catch (err) {
      say(result, `Not enrolled: ${err}`, false);
    } finally {
      passphrase.value = "";
      regPass.value = "";
      submit.disabled = false;
    }
  };
  return form;
}

// A section that needs set-up first shows this instead of its form.
function needsSetup() {
  return el("div", {}, el("p", { textContent: "Consent Guard is not set up yet: choose the " +
    "admin passphrase first." }), button("Set up Consent Guard...", { onclick: openSetup }));
}

async function openEnrol() {
  const info = await getJson(ROUTES.setup);
  showDialog("enrol", "Enrol protected person", info.set_up ? enrolForm() : needsSetup());
}

// -- policy -----------------------------------------------------------------------------------

function policyForm() {
  const text = el("textarea", { name: "text", rows: 18, spellcheck: false, autofocus: true,
    style: "width:100%;box-sizing:border-box;font-family:monospace;font-size:12px" });
  const passphrase = passphraseInput("passphrase");
  const state = el("div", { style: "opacity:.8;margin-bottom:4px" });
  const result = el("div", { className: "cg-result", style: "margin-top:8px;white-space:pre-wrap" });
  const save = el("button", { type: "submit", textContent: "Save policy", className: "cg-button",
                              style: "padding:4px 16px" });
  const form = el("form", { className: "cg-policy" }, state, text,
    field("Admin passphrase", passphrase, "Needed while the lock is on."),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, save), result);
  const showState = (current) => {
    state.textContent = `${current.path}: ${current.locked ? "locked: saving needs the admin " +
                                                             "passphrase" : "not locked"}`;
  };
  const load = async () => {
    const current = await getJson(ROUTES.policy);
    text.value = current.text ?? "# No policy file yet: the built-in defaults apply.\n";
    showState(current);
  };
  load();
  // the lock may change while this form is open: say so, without touching what is typed
  const onChange = async () => {
    if (!form.isConnected) { changed.removeEventListener("changed", onChange); return; }
    showState(await getJson(ROUTES.policy));
  };
  changed.addEventListener("changed", onChange);
  form.onsubmit = async (event) => {
    event.preventDefault();
    save.disabled = true;
    try {
      const body = await postJson(ROUTES.policy, { text: text.value, passphrase: passphrase.value });
      if (body.ok) {
        say(result, "Saved; it applies from the next run.");
        notify();
      } else {
        refused(result, body, passphrase);
      }
    } finally {
      passphrase.value = "";
      save.disabled = false;
    }
  };
  return form;
}

// -- lock -------------------------------------------------------------------------------------

function lockForm(locked) {
  const passphrase = passphraseInput("passphrase", { required: true });
  const result = el("div", { className: "cg-result", style: "margin-top:8px;white-space:pre-wrap" });
  const submit = el("button", { type: "submit", className: "cg-button", style: "padding:4px 16px",
                                textContent: locked ? "Unlock" : "Lock" });
  const form = el("form", { className: "cg-lock" },
    el("div", { textContent: locked ? "Locked: the policy, enrolment and the lock need the " +
      "admin passphrase." : "Unlocked: anyone using this ComfyUI can change the policy." }),
    field("Admin passphrase", passphrase),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, submit), result);
  form.onsubmit = async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const body = await postJson(ROUTES.lock, { locked: !locked, passphrase: passphrase.value });
      if (body.ok) {
        toast("success", "Consent Guard", body.locked ? "Locked." : "Unlocked.");
        notify();
      } else {
        refused(result, body, passphrase);
      }
    } finally {
      passphrase.value = "";
      submit.disabled = false;
    }
  };
  return form;
}

// -- audit log --------------------------------------------------------------------------------

function auditForm() {
  const passphrase = passphraseInput("passphrase", { required: true, autofocus: true });
  const since = input("since", { value: "7d" });
  const decision = el("select", { name: "decision" },
    ...["", "block", "censor", "allow"].map((d) => el("option", { value: d,
                                                                  textContent: d || "any" })));
  const result = el("div", { className: "cg-result", style: "margin-top:8px;overflow:auto" });
  const show = el("button", { type: "submit", textContent: "Show", className: "cg-button",
                              style: "padding:4px 16px" });
  const form = el("form", { className: "cg-audit" },
    field("Since", since, "e.g. 30m, 12h, 7d, or a date such as 2026-01-31"),
    field("Decision", decision), field("Admin passphrase", passphrase),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, show), result);
  form.onsubmit = async (event) => {
    event.preventDefault();
    show.disabled = true;
    try {
      const body = await postJson(ROUTES.audit, { passphrase: passphrase.value,
        since: since.value, decision: decision.value, limit: 500 });
      if (showRefusal(result, body, passphrase)) return;
      result.append(el("div", { textContent: `${body.records.length} of ${body.total ?? 0} ` +
                                             `record(s), newest last (${body.path || ""})` }));
      const rows = body.records.map((r) => el("tr", {},
        ...[r.time, r.user + (r.client_id ? ` / ${r.client_id}` : ""), r.kind, r.decision,
            (r.categories || []).join(", "), (r.identities || []).join(", "), r.note || ""]
          .map((t) => el("td", { textContent: t ?? "", style: "padding:2px 6px" }))));
      result.append(el("table", { style: "border-collapse:collapse;font-size:12px" },
        el("tr", {}, ...["time", "user / client", "kind", "decision", "categories",
                         "identity ids", "where"].map((t) => el("th", { textContent: t }))),
        ...rows));
    } finally {
      passphrase.value = "";
      show.disabled = false;
    }
  };
  return form;
}

// -- verify an image (consent_guard/provenance.py) ---------------------------------------------

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function verifyLines(body) {
  const mark = body.watermark;
  const sig = body.signature || {};
  const claim = sig.claim || {};
  const who = { true: "this machine's key", false: "another machine's key (self-signed)" };
  const lines = [
    mark ? `Invisible mark: ${mark.found ? "found" : "not found"} (${mark.tag_bits_matching} ` +
           `tag bits, bit confidence ${mark.bit_confidence}` +
           (mark.found ? `, id ${mark.mark_id})` : ")")
         : `Invisible mark: not read (${(body.notes || []).join("; ")})`,
    sig.status === "valid"
      ? `Signed verdict: valid, ${who[sig.signed_by_this_machine] || "key not compared"}; ` +
        `${claim.verdict?.decision}, audit record ${claim.audit_record}, signed ${claim.time}`
      : `Signed verdict: ${sig.status} (${sig.problem})`,
  ];
  if (body.record) {
    const recs = body.record.records || [];
    lines.push(recs.length ? "Audit record: " + recs.map((r) =>
      `#${r.seq} ${r.time} ${r.user} ${r.decision} ${r.note || ""}`).join("; ")
      : `Audit record: none (${body.record.why || "not in the audit log"})`);
  }
  return lines;
}

function verifyForm() {
  const file = input("image", { type: "file", accept: "image/*", required: true });
  const passphrase = passphraseInput("passphrase");
  const result = el("div", { className: "cg-result", style: "margin-top:8px" });
  const check = el("button", { type: "submit", textContent: "Verify", className: "cg-button",
                               style: "padding:4px 16px" });
  const form = el("form", { className: "cg-verify" },
    field("Image file", file, "a picture saved by ComfyUI, or a copy of one shared elsewhere"),
    field("Admin passphrase", passphrase, "optional: also show the audit record it points to"),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, check), result);
  form.onsubmit = async (event) => {
    event.preventDefault();
    if (!file.files.length) return;
    check.disabled = true;
    try {
      const body = await postJson(ROUTES.verify, { image: await readAsBase64(file.files[0]),
        name: file.files[0].name, passphrase: passphrase.value || undefined });
      if (showRefusal(result, body, passphrase)) return;
      result.append(...verifyLines(body).map((t) => el("div", { textContent: t })));
    } catch (err) {
      say(result, String(err), false);
    } finally {
      passphrase.value = "";
      check.disabled = false;
    }
  };
  return form;
}

// -- status -----------------------------------------------------------------------------------

function statusRows(s) {
  const hooks = Object.entries(s.hooks || {});
  const hooksOk = hooks.filter(([, v]) => v === "installed").length;
  const models = s.models || [];
  const modelsBad = models.filter((m) => !m.ok);
  const reg = s.setup?.registry || {};
  const count = reg.identities === "none" ? "no registry yet"
    : reg.identities === null || reg.identities === undefined ? "exists (count not readable)"
    : `${reg.identities} protected`;
  const rows = [
    ["Set up", s.set_up ? "yes" : "no: use Set up below"],
    ["Protection", s.armed ? "armed" : `not armed${s.problem ? `: ${s.problem}` : ""}`],
    ["Enforce mode", s.enforce ? "on: every workflow is checked" : "off: Consent Guard's nodes only"],
    ["Lock", s.locked ? "on" : "off"],
    ["Hooks", `${hooksOk} of ${hooks.length} installed`],
    ["Models", modelsBad.length ? `${models.length - modelsBad.length} of ${models.length} ` +
      `found; missing: ${modelsBad.map((m) => m.name).join(", ")}` : `${models.length} found`],
    ["Registry", count],
  ];
  if (s.engine_problem) rows.push(["Problem", s.engine_problem]);
  if (s.audit && !s.audit.healthy) rows.push(["Audit log", s.audit.problem]);
  return el("table", { className: "cg-status", style: "border-collapse:collapse;width:100%" },
    ...rows.map(([k, v]) => el("tr", {},
      el("th", { textContent: k, style: "text-align:left;padding:2px 8px 2px 0;vertical-align:top;" +
                                        "white-space:nowrap" }),
      el("td", { textContent: v, style: "padding:2px 0" }))));
}

function section(title, body, open = false) {
  return el("details", { open, className: "cg-section", style: "margin:10px 0;border-top:1px " +
    "solid var(--border-color,#444);padding-top:6px" },
    el("summary", { textContent: title, style: "font-weight:600;cursor:pointer" }), body);
}

// The panel: the status table is read again on every change (set-up, lock, enrolment, a
// saved policy); the forms are built once, so a result shown under one stays. They are built
// again only when what they ask for changes: set-up done, or the lock turned on or off.
function renderPanel(root) {
  const statusBox = el("div");
  const setupBox = el("div", { style: "margin:10px 0" },
    button("Set up Consent Guard...", { onclick: openSetup, className: "cg-button cg-setup-open" }));
  const sections = el("div");
  let built = null;  // the set-up state the sections were built for
  let lockBuiltFor = null;
  let lockBody = null;
  root.replaceChildren(
    el("div", { style: "display:flex;justify-content:space-between;align-items:center" },
      el("h3", { textContent: "Consent Guard", style: "margin:0" }),
      button("Refresh", { onclick: () => render() })),
    statusBox, setupBox, sections);

  const render = async () => {
    let s;
    try { s = await getJson(ROUTES.status); } catch (err) { s = { problem: String(err) }; }
    statusBox.replaceChildren(statusRows(s));
    setupBox.style.display = s.set_up ? "none" : "";
    if (built !== !!s.set_up) {
      built = !!s.set_up;
      lockBody = s.set_up ? el("div") : null;
      lockBuiltFor = null;
      sections.replaceChildren(...[
        section("Enrol protected person", s.set_up ? enrolForm() : needsSetup(), true),
        section("Policy", policyForm()),
        lockBody ? section("Lock", lockBody) : null,
        section("Audit log (admin)", auditForm()),
        section("Verify an image", verifyForm()),
      ].filter(Boolean));
    }
    if (lockBody && lockBuiltFor !== !!s.locked) {
      lockBuiltFor = !!s.locked;
      lockBody.replaceChildren(lockForm(lockBuiltFor));
    }
  };
  changed.addEventListener("changed", render);
  render();
  return () => changed.removeEventListener("changed", render);
}

function registerPanel() {
  const manager = app.extensionManager;
  if (!manager?.registerSidebarTab) return false;
  let stop = null;
  manager.registerSidebarTab({
    id: TAB_ID,
    icon: "pi pi-shield",
    title: "Consent Guard",
    tooltip: "Consent Guard: status, set-up, protected people, policy",
    type: "custom",
    render: (container) => {
      const root = el("div", { className: "consent-guard-panel",
                               style: "padding:8px 12px;font-size:14px;overflow:auto;height:100%" });
      container.replaceChildren(root);
      stop = renderPanel(root);
    },
    destroy: () => { stop?.(); stop = null; },
  });
  return true;
}

function openPanel() {
  const commands = app.extensionManager?.command;
  if (commands?.execute) commands.execute(`Workspace.ToggleSidebarTab.${TAB_ID}`);
}

// -- on load ----------------------------------------------------------------------------------

// Resolves once no other dialog is open (checked every second, for at most ten minutes), so
// the set-up dialog does not open underneath one that Escape would close first.
async function noOtherDialog() {
  for (let i = 0; i < 600 && document.querySelector(".p-dialog-mask, .comfy-modal[style*=flex]"); i++) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function onLoad() {
  registerPanel();
  let info;
  try { info = await getJson(ROUTES.setup); } catch { return; }
  if (!info.set_up && !info.problem) {
    removeSetupToast = toast("warn", "Consent Guard is not set up yet",
          "Choose the admin passphrase: Consent Guard panel (shield icon on the left) or " +
          "Extensions > Consent Guard > Set up.", 12000);
    if (!localStorage.getItem(OFFERED_KEY)) {
      await noOtherDialog();  // e.g. the templates browser ComfyUI opens on a first visit
      localStorage.setItem(OFFERED_KEY, "1");
      openSetup();
    }
  }
  try {  // enforce mode turns live previews off: say so once per page load
    const s = await getJson(ROUTES.status);
    if (s.enforce) {
      toast(s.armed ? "info" : "error", "Consent Guard enforce mode",
            s.armed ? "Every image is checked before it is saved or shown; live previews " +
                      "while sampling are off."
                    : `Protection is not in place, so nothing is queued: ${s.problem}`, 8000);
    }
  } catch { /* the status route is informational */ }
}

app.registerExtension({
  name: "ConsentGuard.Enrol",
  commands: [
    { id: CMD.setup, label: "Consent Guard: Set up", menubarLabel: "Set up...",
      icon: "pi pi-cog", function: openSetup },
    { id: CMD.panel, label: "Consent Guard: Open panel", menubarLabel: "Panel",
      icon: "pi pi-shield", function: openPanel },
    { id: CMD.enrol, label: "Consent Guard: Enrol protected person",
      menubarLabel: "Enrol protected person...", icon: "pi pi-user-plus", function: openEnrol },
    { id: CMD.policy, label: "Consent Guard: Policy", menubarLabel: "Policy...",
      icon: "pi pi-file-edit", function: () => showDialog("policy", "Consent Guard policy", policyForm()) },
    { id: CMD.audit, label: "Consent Guard: Audit log", menubarLabel: "Audit log (admin)...",
      icon: "pi pi-list", function: () => showDialog("audit", "Audit log (admin)", auditForm()) },
    { id: CMD.verify, label: "Consent Guard: Verify an image", menubarLabel: "Verify an image...",
      icon: "pi pi-verified", function: () => showDialog("verify", "Verify an image", verifyForm()) },
  ],
  menuCommands: [{ path: ["Extensions", "Consent Guard"],
                   commands: [CMD.setup, CMD.panel, CMD.enrol, CMD.policy, CMD.audit,
                              CMD.verify] }],
  setup: onLoad,
});
