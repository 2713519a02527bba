// Consent Guard refusals in the ComfyUI front end: a plain toast, in the UI's language, in
// place of the crash report.
//
// What the server sends (nodes/comfy_bridge.py, consent_guard/messages.py payload()):
//   {kind, language, message, next, contact, title, texts: {en|id|ko: {message, next, title}},
//    stopped, node, node_type, blocked, total, ...}
// - over the websocket as the custom event "consent_guard.refusal": a run stopped by a refusal
//   (stopped: true; the run itself ends with execution_interrupted, not execution_error, so the
//   front end opens no error dialog), or pictures a save node blocked (stopped: false; the run
//   goes on and the node shows the placeholder);
// - in a refused POST /prompt: error.type "consent_guard_refused", error.extra_info
//   .consent_guard. app.queuePrompt (comfyui-frontend-package 1.27.10) shows every failed
//   POST /prompt in its error dialog (PromptExecutionError); for a policy refusal we answer
//   app.queuePrompt with the node_errors instead, so the refused node is outlined in red and
//   the message is a toast. A check that could not run keeps the error dialog, with its
//   message.
//
// The language: the front end's "Comfy.Locale" setting (it defaults to the browser's), then
// navigator.language; English when the catalogue has no such language.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "consent_guard.refusal";
const REFUSED_TYPE = "consent_guard_refused";
const LIFE_MS = 12000;
const SAME_WITHIN_MS = 3000; // a batch of N queues the same refusal N times: one toast

function uiLanguage() {
  let locale = null;
  try {
    locale = app.extensionManager?.setting?.get("Comfy.Locale");
  } catch (e) {
    locale = null;
  }
  locale = locale || navigator.language || "en";
  const first = String(locale).replace("_", "-").split("-")[0].toLowerCase();
  return first === "in" ? "id" : first;
}

// {summary, detail} of a payload in the UI's language (English, else the server's words).
export function wording(info, language = uiLanguage()) {
  const texts = info?.texts || {};
  const chosen = texts[language] || texts.en || info || {};
  const parts = [chosen.message || info?.message, chosen.next || info?.next, info?.contact];
  return {
    summary: chosen.title || info?.title || "Consent Guard",
    detail: parts.filter((p) => p && String(p).trim()).join(" "),
  };
}

let last = { key: "", at: 0 };

export function showRefusal(info) {
  if (!info) return;
  const { summary, detail } = wording(info);
  const key = `${info.kind}|${info.node}|${detail}`;
  const now = Date.now();
  if (key === last.key && now - last.at < SAME_WITHIN_MS) return;
  last = { key, at: now };
  const severity = info.kind === "check_failed" ? "error" : "warn";
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity, summary, detail, life: LIFE_MS });
  } else {
    console.warn(`${summary}: ${detail}`); // a front end without the toast API
  }
}

function onRefusalEvent(event) {
  showRefusal(event.detail);
}

// A refused POST /prompt: a toast and the node outlined, not the error dialog.
function wrapQueuePrompt() {
  const original = api.queuePrompt;
  if (typeof original !== "function" || original.consentGuard) return;
  const wrapped = async function (...args) {
    try {
      return await original.apply(this, args);
    } catch (error) {
      const body = error?.response;
      const info = body?.error?.extra_info?.consent_guard;
      if (body?.error?.type !== REFUSED_TYPE || !info || info.kind === "check_failed") {
        throw error;
      }
      showRefusal(info);
      return { node_errors: body.node_errors ?? {} };
    }
  };
  wrapped.consentGuard = true;
  api.queuePrompt = wrapped;
}

app.registerExtension({
  name: "ConsentGuard.Refusals",
  async setup() {
    api.addEventListener(EVENT, onRefusalEvent);
    wrapQueuePrompt();
  },
});
