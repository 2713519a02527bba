// Consent Guard: "Enrol protected person" dialog for the ComfyUI front end.
//
// Opened from the top menu (the ComfyUI logo menu): Extensions > Consent Guard > Enrol protected
// person..., and from the command palette / keybinding settings as "Consent Guard: Enrol
// protected person". The `commands` and `menuCommands` of an extension are read by
// comfyui-frontend-package 1.27.10 (src/services/extensionService.ts registerExtension ->
// commandStore.loadExtensionCommands and menuItemStore.loadExtensionMenuCommands).
//
// ComfyUI serves web/ at /extensions/<folder>/ (nodes.py EXTENSION_WEB_DIRS), so this file is
// /extensions/<folder>/js/consent_guard.js and the front end's shims (scripts/app.js and
// scripts/api.js, which re-export window.comfyAPI) are three levels up.
// api.fetchApi(route) fetches /api<route>; ComfyUI serves every route under /api too
// (server.py add_routes). The server side is nodes/routes.py.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const ENROLL = "/consent_guard/identities/enroll";
const STATUS = "/consent_guard/identities/status";
const COMMAND = "ConsentGuard.EnrolProtectedPerson";
// Admin pages (nodes/admin_routes.py): the audit log always needs the admin passphrase; the
// policy can be changed without it only while the admin lock is off.
const PROTECTION = "/consent_guard/status";
const POLICY = "/consent_guard/policy";
const AUDIT = "/consent_guard/audit";
const AUDIT_COMMAND = "ConsentGuard.AuditLog";
const POLICY_COMMAND = "ConsentGuard.Policy";

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c);
  return node;
}

function field(label, input, hint = "") {
  const row = el("label", { style: "display:block;margin:8px 0" },
    el("div", { textContent: label, style: "font-weight:600;margin-bottom:2px" }), input);
  if (hint) row.append(el("div", { textContent: hint, style: "opacity:.75;font-size:12px" }));
  return row;
}

function input(name, props = {}) {
  return el("input", { name, style: "width:100%;box-sizing:border-box", ...props });
}

function scopeChoice(value, title, text, checked = false) {
  return el("label", { style: "display:block;margin:4px 0" },
    el("input", { type: "radio", name: "scope", value, checked }),
    ` ${title}: `, el("span", { textContent: text, style: "opacity:.8" }));
}

function today() {
  const d = new Date();
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}`;
}

// Shows `content` over the page; returns the function that closes it (Escape closes it too).
function modal(content, width = "520px") {
  const overlay = el("div", { style: "position:fixed;inset:0;z-index:10000;display:flex;" +
    "align-items:center;justify-content:center;background:rgba(0,0,0,.5)" },
    el("div", { style: "background:var(--comfy-menu-bg,#222);color:var(--fg-color,#ddd);" +
      `padding:16px 20px;border-radius:8px;width:min(${width},92vw);max-height:90vh;` +
      "overflow:auto;font-size:14px" }, content));
  const close = () => overlay.remove();
  overlay.addEventListener("keydown", (e) => { if (e.key === "Escape") close(); });
  document.body.append(overlay);
  return close;
}

async function postJson(route, body) {
  const response = await api.fetchApi(route, { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" } });
  let reply;
  try { reply = await response.json(); } catch { reply = { error: `HTTP ${response.status}` }; }
  return reply;
}

function openAudit() {
  const passphrase = input("passphrase", { type: "password", required: true,
                                           autocomplete: "current-password" });
  const since = input("since", { value: "7d" });
  const decision = el("select", { name: "decision" },
    ...["", "block", "censor", "allow"].map((d) => el("option", { value: d,
                                                                  textContent: d || "any" })));
  const result = el("div", { style: "margin-top:8px" });
  const show = el("button", { type: "submit", textContent: "Show" });
  const cancel = el("button", { type: "button", textContent: "Close" });
  const form = el("form", {},
    el("h3", { textContent: "Audit log (admin)", style: "margin-top:0" }),
    field("Since", since, "e.g. 30m, 12h, 7d, or a date such as 2026-01-31"),
    field("Decision", decision), field("Admin passphrase", passphrase),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, cancel, show), result);
  cancel.onclick = modal(form, "900px");
  passphrase.focus();
  form.onsubmit = async (event) => {
    event.preventDefault();
    show.disabled = true;
    try {
      const body = await postJson(AUDIT, { passphrase: passphrase.value, since: since.value,
                                           decision: decision.value, limit: 500 });
      result.replaceChildren();
      if (!body.ok) {
        result.append(el("div", { textContent: body.error, style: "color:#f66" }));
        return;
      }
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
}

async function openPolicy() {
  const text = el("textarea", { name: "text", rows: 24, spellcheck: false,
    style: "width:100%;box-sizing:border-box;font-family:monospace;font-size:12px" });
  const passphrase = input("passphrase", { type: "password", autocomplete: "current-password" });
  const state = el("div", { style: "opacity:.8" });
  const result = el("div", { style: "margin-top:8px;white-space:pre-wrap" });
  const save = el("button", { type: "submit", textContent: "Save" });
  const cancel = el("button", { type: "button", textContent: "Close" });
  const form = el("form", {}, el("h3", { textContent: "Consent Guard policy",
                                         style: "margin-top:0" }), state, text,
    field("Admin passphrase", passphrase, "Needed while the admin lock is on."),
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, cancel, save), result);
  cancel.onclick = modal(form, "760px");
  const current = await (await api.fetchApi(POLICY)).json();
  text.value = current.text ?? "# No policy file yet: the built-in defaults apply.\n";
  state.textContent = `${current.path}: ${current.locked ? "locked by the admin"
                                                          : "not locked"}`;
  form.onsubmit = async (event) => {
    event.preventDefault();
    save.disabled = true;
    try {
      const body = await postJson(POLICY, { text: text.value, passphrase: passphrase.value });
      result.textContent = body.ok ? "Saved; it applies from the next run." : body.error;
      result.style.color = body.ok ? "" : "#f66";
    } finally {
      passphrase.value = "";
      save.disabled = false;
    }
  };
}

// Enforce mode turns live previews off: say so once per page load.
async function noticeEnforce() {
  try {
    const s = await (await api.fetchApi(PROTECTION)).json();
    const toast = app.extensionManager?.toast;
    if (!s.enforce || !toast) return;
    toast.add({ severity: s.armed ? "info" : "error", life: 8000,
      summary: "Consent Guard enforce mode",
      detail: s.armed ? "Every image is checked before it is saved or shown; live previews " +
                        "while sampling are off."
                      : `Protection is not in place, so nothing is queued: ${s.problem}` });
  } catch { /* the status route is informational */ }
}

function openDialog() {
  const status = el("div", { textContent: "Checking the registry...", style: "opacity:.8" });
  const confirm = input("passphrase_confirm", { type: "password", autocomplete: "new-password" });
  const confirmRow = field("Admin passphrase again", confirm,
    "No registry exists yet: this enrolment creates it, and this passphrase becomes the admin " +
    "passphrase (at least 8 characters; it cannot be recovered).");
  confirmRow.style.display = "none";
  const passphrase = input("passphrase", { type: "password", required: true,
                                           autocomplete: "current-password" });
  const name = input("name", { required: true });
  const aliases = input("aliases");
  const files = input("photo", { type: "file", multiple: true, accept: "image/*", required: true });
  const submit = el("button", { type: "submit", textContent: "Enrol" });
  const cancel = el("button", { type: "button", textContent: "Close" });
  const result = el("div", { style: "margin-top:8px;white-space:pre-wrap" });

  const form = el("form", {},
    el("h3", { textContent: "Enrol protected person", style: "margin-top:0" }),
    el("p", { style: "padding:8px;border:1px solid #c90;border-radius:4px",
      textContent: "Only enrol someone who has consented, or a parent/guardian or school on " +
                   "their behalf. Photos are not stored; only face embeddings, encrypted." }),
    status,
    field("Name", name),
    field("Aliases", aliases, "Other names, comma-separated."),
    el("fieldset", { style: "margin:8px 0" }, el("legend", { textContent: "Scope" }),
      scopeChoice("explicit", "explicit", "blocks nude or sexual generated images of them " +
                  "(blocked, not just censored); their photos may still be used as sources.",
                  true),
      scopeChoice("any", "any", "blocks every generated image showing them, and refuses " +
                  "their photos as img2img / inpaint / face-swap sources.")),
    field("Consent given by", input("consent_by", { required: true }),
          "The person, or their parent, guardian or school."),
    field("On behalf of", input("on_behalf_of"), "Whose behalf, when not their own."),
    field("Consent date", input("consent_date", { type: "date", value: today() })),
    field("Note", input("note")),
    field("Photos", files, "Clear photos of this person alone, face to the camera; 3 or more " +
                           "match more reliably."),
    field("Admin passphrase", passphrase),
    confirmRow,
    el("div", { style: "display:flex;gap:8px;justify-content:flex-end" }, cancel, submit),
    result);

  cancel.onclick = modal(form);
  name.focus();

  api.fetchApi(STATUS).then((r) => r.json()).then((s) => {
    confirmRow.style.display = s.registry_exists ? "none" : "";
    status.textContent = s.problem ? `Problem: ${s.problem}`
      : !s.registry_exists ? "No one is enrolled yet."
      : s.enrolled === null ? "A registry exists (ComfyUI cannot read it unattended)."
      : `${s.enrolled} person(s) enrolled.`;
  }).catch(() => { status.textContent = "Could not read the registry status."; });

  form.onsubmit = async (event) => {
    event.preventDefault();
    const data = new FormData(form);  // every named field above, and each chosen photo
    if (confirmRow.style.display === "none") data.delete("passphrase_confirm");
    submit.disabled = true;
    result.textContent = "Enrolling: finding and embedding the face in each photo...";
    try {
      const response = await api.fetchApi(ENROLL, { method: "POST", body: data });
      let body;
      try { body = await response.json(); } catch { body = { error: `HTTP ${response.status}` }; }
      const lines = (body.photos || []).map((p) =>
        `${p.ok ? "ok" : "refused"}  ${p.source}: ${p.reason}`);
      if (body.ok) {
        lines.unshift(`Enrolled ${body.name} (${body.id}, scope ${body.scope}), ` +
                      `embedded with ${body.backends.join(", ")}.`);
        lines.push(...(body.notes || []).map((n) => `note: ${n}`));
        name.value = "";
        aliases.value = "";
        files.value = "";
        confirmRow.style.display = "none";
      } else {
        lines.unshift(`Not enrolled: ${body.error || `HTTP ${response.status}`}`);
      }
      result.textContent = lines.join("\n");
      result.style.color = body.ok ? "" : "#f66";
    } catch (err) {
      result.textContent = `Not enrolled: ${err}`;
      result.style.color = "#f66";
    } finally {
      passphrase.value = "";
      confirm.value = "";
      submit.disabled = false;
    }
  };
}

app.registerExtension({
  name: "ConsentGuard.Enrol",
  commands: [{
    id: COMMAND,
    label: "Consent Guard: Enrol protected person",
    menubarLabel: "Enrol protected person...",
    icon: "pi pi-user-plus",
    function: openDialog,
  }, {
    id: AUDIT_COMMAND,
    label: "Consent Guard: Audit log",
    menubarLabel: "Audit log (admin)...",
    icon: "pi pi-list",
    function: openAudit,
  }, {
    id: POLICY_COMMAND,
    label: "Consent Guard: Policy",
    menubarLabel: "Policy...",
    icon: "pi pi-shield",
    function: openPolicy,
  }],
  menuCommands: [{ path: ["Extensions", "Consent Guard"],
                   commands: [COMMAND, POLICY_COMMAND, AUDIT_COMMAND] }],
  setup: noticeEnforce,
});
