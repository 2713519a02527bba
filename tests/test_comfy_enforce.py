"""Enforce mode against stand-ins of ComfyUI's own nodes, execution and savers
(comfy_standins.make_core, after ComfyUI a125cd84). The real ComfyUI: test_comfyui_enforce.py."""
import asyncio
import json
import sys

import numpy as np
import pytest
from PIL import Image

from consent_guard import Engine, Policy
from consent_guard.detectors.base import PartDetection
from consent_guard.verdict import Decision, Reason, Verdict

import comfy_standins
from conftest import FakeParts, FakeScorer, keyed_image

torch = pytest.importorskip("torch")

ALLOW, CENSOR, BLOCK = 1, 10, 20
PKG = "custom_nodes_consent_guard_under_test"


def batch(*keys, size=(64, 48)):
    return torch.from_numpy(np.stack([keyed_image(k, size) for k in keys]).astype(np.float32) / 255)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    server = comfy_standins.make_server()
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy", server=server, core=True)
    yield pkg, tmp_path / "comfy", home, server
    for key in [k for k in sys.modules if k.startswith(PKG)]:
        del sys.modules[key]


def use_engine(monkeypatch, pkg, enforce=True, **policy):
    parts = FakeParts({CENSOR: [PartDetection("FEMALE_BREAST_EXPOSED", 0.8, (10, 10, 20, 20))]})
    engine = Engine(Policy(enforce=enforce, **policy), parts=parts,
                    scorer=FakeScorer(whole={CENSOR: 0.5, BLOCK: 0.97}))
    monkeypatch.setattr(sys.modules[pkg.__name__ + ".nodes.image_nodes"], "get_engine",
                        lambda: engine)
    return engine


def run_node(cls, **inputs):
    """As execution.execute does: through (the hooked) execution.get_output_data."""
    execution = sys.modules["execution"]
    return asyncio.run(execution.get_output_data("p1", "9", cls(), {k: [v] for k, v in
                                                                    inputs.items()}))


def files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def enforce_module(pkg):
    return sys.modules[pkg.__name__ + ".nodes.enforce"]


def test_every_hook_is_installed_and_armed(comfy):
    pkg, base, home, server = comfy
    status = enforce_module(pkg).status()
    assert status["armed"] and status["problem"] is None
    assert set(status["hooks"]) >= {"execution.get_output_data", "nodes.SaveImage.save_images",
                                    "nodes.LoadImage.load_image", "latent_preview.get_previewer",
                                    "comfy_api.latest._ui.ImageSaveHelper",
                                    "folder_paths.get_save_image_path", "PromptServer.send_sync",
                                    "execution.validate_prompt", "prompt handler"}
    assert set(status["hooks"].values()) == {"installed"}


def test_stock_save_writes_nothing_of_a_blocked_image(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    nodes = sys.modules["nodes"]
    with pytest.raises(Exception, match="blocked 1 of 1 image"):
        run_node(nodes.SaveImage, images=batch(BLOCK), filename_prefix="x")
    with pytest.raises(Exception, match="blocked 1 of 1 image"):
        run_node(nodes.PreviewImage, images=batch(BLOCK))
    assert files(base / "output") == [] and files(base / "temp") == []


def test_stock_save_keeps_allowed_censors_and_leaves_out_blocked(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    run_node(sys.modules["nodes"].SaveImage, images=batch(ALLOW, BLOCK, CENSOR),
             filename_prefix="mix")
    saved = sorted((base / "output").glob("mix_*.png"))
    assert len(saved) == 2  # the blocked one is left out, not replaced
    first, second = (np.asarray(Image.open(p).convert("RGB")) for p in saved)
    # enforce mode marks what it saves (consent_guard/provenance.py): close, not equal
    assert 0 < np.abs(first.astype(int) - keyed_image(ALLOW)).mean() < 3
    assert not np.array_equal(second, keyed_image(CENSOR))  # censored copy


def test_enforce_off_leaves_stock_nodes_alone(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg, enforce=False)
    run_node(sys.modules["nodes"].SaveImage, images=batch(BLOCK), filename_prefix="off")
    assert len(files(base / "output")) == 1


def test_direct_saver_calls_are_checked_too(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    helper = sys.modules["comfy_api.latest._ui"].ImageSaveHelper
    with pytest.raises(Exception, match="blocked"):
        helper.save_images(batch(BLOCK), filename_prefix="v3", folder_type="output", cls=None)
    with pytest.raises(Exception, match="blocked"):
        sys.modules["nodes"].SaveImage().save_images(batch(BLOCK), "direct")
    assert files(base / "output") == []
    helper.save_images(batch(ALLOW), filename_prefix="v3", folder_type="output", cls=None)
    assert len(files(base / "output")) == 1


def test_a_batch_is_checked_once(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    calls = []
    original = engine.check_images
    monkeypatch.setattr(engine, "check_images", lambda px, *a: calls.append(len(px)) or
                        original(px, *a))
    run_node(sys.modules["nodes"].SaveImage, images=batch(ALLOW), filename_prefix="once")
    assert calls == [1]  # the gate checked it; SaveImage.save_images's own hook did not again


def test_a_batch_changed_in_place_after_a_check_is_checked_again(comfy, monkeypatch):
    """Nothing is remembered across node runs: another node may change a tensor in place."""
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    images = batch(ALLOW)
    run_node(sys.modules["nodes"].SaveImage, images=images, filename_prefix="first")
    images[:] = batch(BLOCK)  # the same tensor object, now showing something else
    with pytest.raises(Exception, match="blocked 1 of 1"):
        run_node(sys.modules["nodes"].SaveImage, images=images, filename_prefix="second")
    assert not list((base / "output").glob("second_*"))


def test_check_failure_saves_nothing(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    engine._parts = FakeParts(error=RuntimeError("detector broke"))
    with pytest.raises(Exception, match="could not check.*detector broke"):
        run_node(sys.modules["nodes"].SaveImage, images=batch(ALLOW), filename_prefix="f")
    assert files(base / "output") == []


def test_load_image_refuses_a_protected_source(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    Image.fromarray(keyed_image(ALLOW)).save(base / "input" / "photo.png")
    refused = Verdict(Decision.BLOCK, reasons=(Reason("face_match", "id_abc", 0.9,
                                                      "protected_identity", Decision.BLOCK),))
    monkeypatch.setattr(engine, "check_images", lambda px, *a: [refused] * len(px))
    with pytest.raises(Exception, match="refused the image made by LoadImage.*protected") as e:
        sys.modules["nodes"].LoadImage().load_image("photo.png")
    assert "id_abc" not in str(e.value)  # who is enrolled is not told


def test_files_written_without_checked_inputs_are_swept(comfy, monkeypatch):
    """A saver that makes its picture itself (no IMAGE input) is checked from disk."""
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    fp = sys.modules["folder_paths"]

    class MakesItsOwn:
        OUTPUT_NODE = True
        FUNCTION = "run"

        def run(self, key, suffix=".png"):
            full, name, counter, _, _ = fp.get_save_image_path("own", fp.get_output_directory())
            path = f"{full}/{name}_{counter:05}_{suffix}"
            if suffix == ".png":
                Image.fromarray(keyed_image(key)).save(path)
            else:
                open(path, "wb").write(b"not really a video")
            return {}

    run_node(MakesItsOwn, key=ALLOW)
    assert len(files(base / "output")) == 1
    with pytest.raises(Exception, match="removed what MakesItsOwn"):
        run_node(MakesItsOwn, key=BLOCK)
    with pytest.raises(Exception, match="video whose frames were not checked"):
        run_node(MakesItsOwn, key=ALLOW, suffix=".mp4")
    assert len(files(base / "output")) == 1


def test_previews_are_off_with_enforce(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    assert sys.modules["latent_preview"].get_previewer("cpu", None) is None
    instance = server.PromptServer.instance
    instance.send_sync(1, b"jpeg bytes", "c")
    instance.send_sync("progress", {"value": 1}, "c")
    assert instance.sent == [("progress", {"value": 1}, "c")]
    use_engine(monkeypatch, pkg, enforce=False)
    assert sys.modules["latent_preview"].get_previewer("cpu", None) == "a previewer"


def test_unarmed_enforce_refuses_every_submission(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    execution = sys.modules["execution"]
    assert asyncio.run(execution.validate_prompt("p", {"1": {}}, None))[0] is True
    state = enforce_module(pkg).state()
    monkeypatch.setattr(state, "armed", False)
    monkeypatch.setattr(state, "problem", "hooks missing: nodes.SaveImage.save_images")
    ok, error, _, _ = asyncio.run(execution.validate_prompt("p", {"1": {}}, None))
    assert not ok and error["type"] == "consent_guard_not_active"
    assert "nodes.SaveImage.save_images" in error["message"]


def test_audit_records_each_decision_and_enforce_stops_unlogged_saves(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    from consent_guard.audit import AuditLog, read_records

    engine.audit = AuditLog(home / "audit.log")
    server.PromptServer.instance.client_id = "client-7"
    run_node(sys.modules["nodes"].SaveImage, images=batch(ALLOW, BLOCK), filename_prefix="a")
    records = list(read_records(home / "audit.log"))
    assert [r["decision"] for r in records] == ["allow", "block"]
    assert {r["client_id"] for r in records} == {"client-7"}
    assert all(r["image_sha256"] and len(json.dumps(r)) < 2000 for r in records)

    monkeypatch.setattr(engine.audit, "record", lambda *a, **k: False)
    engine.audit.last_error = "audit log: No space left on device"
    with pytest.raises(Exception, match="cannot write its audit log"):
        # a picture not seen before (one already checked is in the verdict cache)
        run_node(sys.modules["nodes"].SaveImage, images=batch(3), filename_prefix="b")
    assert not list((base / "output").glob("b_*"))


def test_prompt_decisions_are_audited(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    from consent_guard.audit import AuditLog, read_records

    engine.audit = AuditLog(home / "audit.log")
    guard = sys.modules[pkg.__name__ + ".nodes.prompt_guard"]
    monkeypatch.setattr(guard, "get_engine", lambda: engine)
    monkeypatch.setattr(engine, "check_prompt", lambda text, negative=None: Verdict(
        Decision.BLOCK, reasons=(Reason("prompt_lexicon", "x", 1.0, "sexual_explicit",
                                        Decision.BLOCK),)))
    out = guard.on_prompt({"prompt": {"6": {"class_type": "CLIPTextEncode",
                                            "inputs": {"text": "some words"}}},
                           "client_id": "c9"})
    assert out["prompt"]["6"]["class_type"] == guard.REFUSAL_CLASS
    [rec] = list(read_records(home / "audit.log"))
    assert rec["kind"] == "prompt" and rec["client_id"] == "c9" and rec["decision"] == "block"
    assert "some words" not in json.dumps(rec)  # hashed by default


# -- the admin lock over HTTP and in nodes ---------------------------------------------------

class Request:
    def __init__(self, body):
        self.body = body

    async def json(self):
        return self.body


def call(handler, body=None):
    return asyncio.run(handler(Request(body)))


def test_locked_policy_cannot_be_changed_over_http_without_the_passphrase(comfy):
    pkg, base, home, server = comfy
    from consent_guard import admin

    routes = sys.modules[pkg.__name__ + ".nodes.admin_routes"]
    sys.modules[pkg.__name__ + ".nodes.routes"].LIMITER.reset()
    paths = {(r.method, r.path) for r in server.PromptServer.instance.routes}
    assert {("GET", "/consent_guard/status"), ("POST", "/consent_guard/policy"),
            ("POST", "/consent_guard/audit")} <= paths
    (home / "policy.toml").write_text("enforce = true\n")
    unlocked = call(routes.handle_policy_post, {"text": "enforce = true\n[actions]\n"
                                                        "nudity = 'block'\n"})
    assert unlocked.status == 200  # no lock yet: the UI may change it
    admin.set_passphrase(home, "correct horse battery")
    admin.set_locked(home, True, "correct horse battery")
    for body in ({"text": "enforce = false\n"},
                 {"text": "enforce = false\n", "passphrase": "wrong passphrase"}):
        reply = call(routes.handle_policy_post, body)
        assert reply.status == 403 and reply.body["locked"], reply.body
    assert "enforce = true" in (home / "policy.toml").read_text()
    bad = call(routes.handle_policy_post, {"text": "enforce = 'maybe'\n",
                                           "passphrase": "correct horse battery"})
    assert bad.status == 400 and "enforce" in bad.body["error"]
    ok = call(routes.handle_policy_post, {"text": "enforce = false\n",
                                          "passphrase": "correct horse battery"})
    assert ok.status == 200 and (home / "policy.toml").read_text() == "enforce = false\n"
    assert call(routes.handle_policy_get).body["locked"] is True


def test_audit_route_is_for_the_admin_only(comfy):
    pkg, base, home, server = comfy
    from consent_guard import admin

    routes = sys.modules[pkg.__name__ + ".nodes.admin_routes"]
    sys.modules[pkg.__name__ + ".nodes.routes"].LIMITER.reset()
    assert call(routes.handle_audit, {}).status == 403  # no admin passphrase set at all
    admin.set_passphrase(home, "correct horse battery")
    assert call(routes.handle_audit, {"passphrase": "nope nope"}).status == 403
    reply = call(routes.handle_audit, {"passphrase": "correct horse battery"})
    assert reply.status == 200 and reply.body["records"] == []


def test_locked_nodes_can_only_be_stricter(comfy, monkeypatch):
    pkg, base, home, server = comfy
    from consent_guard import admin

    engine = use_engine(monkeypatch, pkg, actions={"sexual": Decision.BLOCK,
                                                   "nudity": Decision.CENSOR})
    nodes = sys.modules[pkg.__name__ + ".nodes.image_nodes"]
    stricter = "[actions]\nnudity = 'block'\n"
    looser = "[actions]\nsexual = 'allow'\n"

    def decisions(override):
        _, report = nodes.ConsentGuardCheckImage().check(batch(CENSOR, BLOCK),
                                                         policy_override=override)
        return [i["decision"] for i in json.loads(report)["images"]]

    assert decisions("") == ["censor", "block"]
    assert decisions(stricter) == ["block", "block"]
    assert decisions(looser) == ["censor", "allow"]  # unlocked: the node may loosen
    admin.set_passphrase(home, "correct horse battery")
    admin.set_locked(home, True, "correct horse battery")
    assert decisions(looser) == ["censor", "block"]  # locked: ignored
    assert decisions(stricter) == ["block", "block"]
    with pytest.raises(Exception, match="cannot change"):
        decisions("[models]\ndevice = 'cpu'\n")
    assert engine.policy.actions["sexual"] is Decision.BLOCK


# -- how a refusal is shown (enforce.install_shown) ------------------------------------------

class Executor:
    """execution.py PromptExecutor of ComfyUI 0.3.64, as far as errors go: add_message()
    keeps every message for the history and sends it to the prompt's client;
    handle_execution_error() reports an InterruptProcessingException as
    `execution_interrupted` (no traceback) and anything else as `execution_error`."""

    def __init__(self, server):
        self.server, self.status_messages = server, []

    def add_message(self, event, data, broadcast):
        data = {**data, "timestamp": 0}
        self.status_messages.append((event, data))
        if self.server.client_id is not None or broadcast:
            self.server.send_sync(event, data, self.server.client_id)

    def handle_execution_error(self, prompt_id, prompt, current_outputs, executed, error, ex):
        mes = {"prompt_id": prompt_id, "node_id": error["node_id"],
               "node_type": prompt[error["node_id"]]["class_type"], "executed": list(executed)}
        if isinstance(ex, sys.modules["comfy.model_management"].InterruptProcessingException):
            self.add_message("execution_interrupted", mes, broadcast=True)
        else:
            self.add_message("execution_error", {**mes, "exception_message": str(ex),
                                                 "traceback": ["..."]}, broadcast=False)


@pytest.fixture
def shown(monkeypatch, tmp_path):
    """The stand-ins with comfy.model_management and execution.PromptExecutor, as ComfyUI has
    them before custom nodes load."""
    import types

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(home))
    server = comfy_standins.make_server()
    pkg = comfy_standins.install(monkeypatch, tmp_path / "comfy", server=server, core=True)
    sys.modules["execution"].PromptExecutor = type("PromptExecutor", (Executor,), {})
    assert set(enforce_module(pkg).install_shown().values()) == {"installed"}
    yield pkg, tmp_path / "comfy", server, mm
    for key in [k for k in sys.modules if k.startswith(PKG)]:
        del sys.modules[key]


def execute_node(server, mm, prompt, node_id, run):
    """execution.py execute()'s error handling around one node, then handle_execution_error."""
    executor = sys.modules["execution"].PromptExecutor(server.PromptServer.instance)
    try:
        run()
        return executor
    except mm.InterruptProcessingException as iex:
        error, ex = {"node_id": node_id}, iex
    except Exception as exc:
        error, ex = {"node_id": node_id, "exception_message": str(exc)}, exc
    executor.handle_execution_error("p1", prompt, [], set(), error, ex)
    return executor


def test_a_refused_input_stops_the_run_without_a_crash_report(shown, monkeypatch):
    pkg, base, server, mm = shown
    instance = server.PromptServer.instance
    instance.client_id = "browser"
    engine = use_engine(monkeypatch, pkg)
    monkeypatch.setattr(sys.modules[pkg.__name__ + ".nodes.comfy_bridge"], "contact",
                        lambda: "Talk to your teacher.")
    Image.fromarray(keyed_image(ALLOW)).save(base / "input" / "photo.png")
    refused = Verdict(Decision.BLOCK, reasons=(Reason("face_match", "id_abc", 0.9,
                                                      "protected_identity", Decision.BLOCK),))
    monkeypatch.setattr(engine, "check_images", lambda px, *a: [refused] * len(px))
    prompt = {"3": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}}
    executor = execute_node(server, mm, prompt, "3",
                            lambda: sys.modules["nodes"].LoadImage().load_image("photo.png"))
    events = [e for e, _ in executor.status_messages]
    assert events == ["execution_interrupted", "consent_guard.refusal"]  # no execution_error
    data = dict(executor.status_messages)["consent_guard.refusal"]
    assert data["kind"] == "input_protected" and data["stopped"] is True
    assert data["node"] == "3" and data["node_type"] == "LoadImage"
    assert data["message"].startswith("This picture shows a protected person")
    assert data["next"] == "Use a different picture."
    assert data["contact"] == "Talk to your teacher."
    assert set(data["texts"]) == {"en", "id", "ko"}
    assert "id_abc" not in json.dumps(data)
    # the browser gets it over the websocket, to the prompt's client only
    sent = [(e, sid) for e, _, sid in instance.sent if e == "consent_guard.refusal"]
    assert sent == [("consent_guard.refusal", "browser")]


def test_a_check_that_cannot_run_is_still_an_error(shown, monkeypatch):
    pkg, base, server, mm = shown
    engine = use_engine(monkeypatch, pkg)
    Image.fromarray(keyed_image(ALLOW)).save(base / "input" / "photo.png")
    monkeypatch.setattr(engine, "check_images",
                        lambda px, *a: [Verdict.failed("model file missing")] * len(px))
    prompt = {"3": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}}
    executor = execute_node(server, mm, prompt, "3",
                            lambda: sys.modules["nodes"].LoadImage().load_image("photo.png"))
    [(event, data)] = executor.status_messages
    assert event == "execution_error" and "model file missing" in data["exception_message"]


def test_a_blocked_output_stops_the_run_as_a_refusal(shown, monkeypatch):
    pkg, base, server, mm = shown
    use_engine(monkeypatch, pkg)
    nodes = sys.modules["nodes"]
    prompt = {"9": {"class_type": "SaveImage", "inputs": {}}}
    executor = execute_node(server, mm, prompt, "9",
                            lambda: run_node(nodes.SaveImage, images=batch(BLOCK)))
    events = dict(executor.status_messages)
    assert set(events) == {"execution_interrupted", "consent_guard.refusal"}
    assert events["consent_guard.refusal"]["kind"] == "output_explicit"
    assert files(base / "output") == []


def test_a_refused_prompt_is_answered_in_the_front_ends_shape(shown, monkeypatch):
    """validate_prompt, hooked: a prompt on_prompt refused gets one message under the real
    node; any other prompt goes to ComfyUI's own validation."""
    pkg, base, server, mm = shown
    guard = sys.modules[pkg.__name__ + ".nodes.prompt_guard"]

    class Blocks:
        def check_prompt(self, text, negative=None):
            if "word" not in text:
                return Verdict(Decision.ALLOW)
            return Verdict(Decision.BLOCK, (Reason("lexicon", "w", 1.0, "sexual_explicit",
                                                   Decision.BLOCK),))
    monkeypatch.setattr(guard, "get_engine", Blocks)
    prompt = {"6": {"class_type": "CLIPTextEncode",
                    "inputs": {"text": "a word", "clip": ["4", 0]}},
              "4": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": "m.safetensors"}}}
    refused = server.PromptServer.instance.trigger_on_prompt({"prompt": prompt})
    execution = sys.modules["execution"]
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("p", refused["prompt"],
                                                                      None))
    assert ok is False and error["type"] == "consent_guard_refused"
    assert list(node_errors) == ["6"] and node_errors["6"]["class_type"] == "CLIPTextEncode"
    assert asyncio.run(execution.validate_prompt("p", prompt, None))[0] is True
