"""The A1111/Forge adapter (scripts/consent_guard_checks.py, a1111_adapter/) against stand-ins of
the WebUI's modules (tests/a1111_standins.py, after Forge dfdcbab6 and A1111). The real Forge:
tests/test_forge_*.py. Pictures are keyed test pictures (conftest): the detector doubles call
them allowed, censored or blocked; a "protected person" is a benign adult enrolled through the
face doubles."""
import base64
import io
import sys

import numpy as np
import pytest
from PIL import Image

from consent_guard import Engine, Policy
from consent_guard.detectors.base import PartDetection

import a1111_standins
from conftest import FakeFaces, FakeParts, FakeScorer, fake_backend, keyed_image

ALLOW, CENSOR, BLOCK = 1, 10, 20
ALICE, BOB = 30, 31  # alice: scope any; bob: scope explicit
PASS = "correct horse battery"
EXPLICIT_PROMPT = "a nude woman on a beach"


@pytest.fixture(params=["forge", "a1111"])
def webui(request, monkeypatch, tmp_path):
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    ns = a1111_standins.install(monkeypatch, tmp_path / "webui", flavour=request.param)
    ns.flavour = request.param
    ns.out = tmp_path / "outputs"
    ns.blocked = tmp_path / "blocked"  # where blocked pictures' placeholders are written
    ns.blocked.mkdir()
    monkeypatch.setattr(sys.modules["a1111_adapter.checks"], "blocked_folder",
                        lambda: str(ns.blocked))
    yield ns
    ns.cleanup()


def bridge():
    return sys.modules["a1111_adapter.bridge"]


def use_engine(monkeypatch, enforce=False, registry=None, faces=None, parts=None, **policy):
    parts = parts or FakeParts(
        {CENSOR: [PartDetection("FEMALE_BREAST_EXPOSED", 0.8, (10, 10, 20, 20))]})
    engine = Engine(Policy(enforce=enforce, prompt_classifier=False, **policy), parts=parts,
                    scorer=FakeScorer(whole={CENSOR: 0.5, BLOCK: 0.97}), registry=registry,
                    face_backend=faces)
    monkeypatch.setattr(bridge(), "get_engine", lambda: engine)
    return engine


def picture(key, size=(64, 48)):
    return Image.fromarray(keyed_image(key, size))


def run_job(ns, keys=(ALLOW,), img2img=False, **kw):
    """A txt2img (or img2img) job through the stand-in process_images, as the WebUI runs it."""
    kw.setdefault("prompt", "a red bicycle leaning on a wall")
    cls = ns.processing.StableDiffusionProcessingImg2Img if img2img else \
        ns.processing.StableDiffusionProcessingTxt2Img
    p = cls(outpath_samples=str(ns.out / "samples"), outpath_grids=str(ns.out / "grids"),
            batch_size=len(keys), sample=lambda prompts: [picture(k) for k in keys], **kw)
    p.scripts = ns.runner
    ns.shared.state.begin()
    return p, ns.processing.process_images(p)


def saved(ns):
    return sorted(f for f in ns.out.rglob("*.png")) if ns.out.exists() else []


def kept_out(ns):
    """Placeholders of blocked pictures: written outside outputs/, for the gallery only."""
    return sorted(ns.blocked.glob("*.png"))


def pixels(image):
    return np.asarray(image.convert("RGB"))


def assert_refused(ns, p, res, words):
    assert p.sampled == 0, "a refused job must not reach the sampler"
    assert ns.shared.state.interrupted
    assert res.images == [] and saved(ns) == []
    assert res.info.startswith("Consent Guard: ") and words in res.info
    assert not ns.errors.reported, ns.errors.reported  # refusals are not swallowed errors


# -- texts -----------------------------------------------------------------------------------

def test_benign_prompt_runs_and_saves(webui, monkeypatch):
    use_engine(monkeypatch)
    p, res = run_job(webui, keys=(ALLOW,))
    assert p.sampled == 1 and len(res.images) == 1 and len(saved(webui)) == 1
    assert np.array_equal(pixels(res.images[0]), keyed_image(ALLOW))
    assert not webui.shared.state.interrupted


def test_explicit_prompt_stops_the_job_before_sampling(webui, monkeypatch):
    use_engine(monkeypatch)
    p, res = run_job(webui, prompt=EXPLICIT_PROMPT)
    assert_refused(webui, p, res, "This prompt asks for sexual content")
    assert p.consent_guard_refusal.kind == "prompt_explicit"


@pytest.mark.parametrize("cfg, refused", [(7.0, False), (1.5, False), (1.0, True), (0.5, True)])
def test_negative_prompt_is_a_safety_tool_unless_cfg_is_at_most_one(webui, monkeypatch, cfg,
                                                                    refused):
    use_engine(monkeypatch)
    p, res = run_job(webui, negative_prompt="nude, nsfw, lowres", cfg_scale=cfg)
    assert (p.sampled == 0) is refused
    assert bool(res.images) is not refused


def test_styles_are_checked_before_sampling(webui, monkeypatch):
    use_engine(monkeypatch)
    webui.shared.prompt_styles.styles["beach"] = ("{prompt}, nude", "")
    p, res = run_job(webui, prompt="a woman on a beach", styles=["beach"])
    assert_refused(webui, p, res, "This prompt asks for sexual content")


@pytest.mark.parametrize("prompt", ["a cat <lora:nude_body_v2:0.8>",
                                    "a cat, <hypernet:nsfw-lines:1>"])
def test_extra_network_names_are_text_too(webui, monkeypatch, prompt):
    use_engine(monkeypatch)
    p, res = run_job(webui, prompt=prompt)
    assert p.sampled == 0 and res.images == []


def test_wildcards_expanded_in_all_prompts_are_checked_in_process(webui, monkeypatch):
    """Extensions (dynamic prompts) rewrite p.all_prompts after before_process: the texts are
    checked again in `process`, before the batch loop."""
    use_engine(monkeypatch)

    class Wildcards(webui.scripts.Script):
        def process(self, p, *args):
            p.all_prompts = [EXPLICIT_PROMPT for _ in p.all_prompts]

    webui.runner.alwayson_scripts.append(Wildcards())
    p, res = run_job(webui, prompt="__person__ on a beach")
    assert p.sampled == 0 and res.images == []


def test_a_policy_that_cannot_be_read_stops_every_job(webui, monkeypatch):
    def broken():
        raise bridge().ConsentGuardError("policy.toml: bad value")

    monkeypatch.setattr(bridge(), "get_engine", broken)
    p, res = run_job(webui)
    assert_refused(webui, p, res, "could not run its check")
    assert p.consent_guard_refusal.kind == "check_failed"


def test_real_host_reads_the_home_and_refuses_a_broken_policy(webui, tmp_path):
    """No engine double: the shared Host reads CONSENT_GUARD_HOME's policy."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "policy.toml").write_text("enforce = [not toml", encoding="utf-8")
    assert bridge().home() == home
    assert bridge().enforce_on()  # a policy file that cannot be read counts as enforce on
    p, res = run_job(webui)
    assert p.sampled == 0 and res.images == []


# -- source pictures -------------------------------------------------------------------------

@pytest.fixture
def enrolled(tmp_path):
    from consent_guard.registry import Consent, Registry

    reg = Registry.create(tmp_path / "identities.db", PASS)
    model = "fake-000000000001"
    reg.add("Alice", "any", Consent("Alice"), {model: FakeFaces.vector("alice")[None]})
    reg.add("Bob", "explicit", Consent("Bob"), {model: FakeFaces.vector("bob")[None]})
    yield reg
    reg.close()


def b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ControlNetUnit:
    """Like sd-forge-controlnet's unit dataclass: the picture sits in a field."""

    def __init__(self, image):
        self.enabled, self.module, self.image = True, "ip-adapter_clip", image


@pytest.mark.parametrize("where", ["init", "mask", "unit_pil", "unit_b64", "dict_array"])
def test_protected_person_in_a_source_picture_stops_the_job(webui, monkeypatch, enrolled,
                                                            where):
    use_engine(monkeypatch, registry=enrolled, faces=fake_backend({ALICE: ["alice"],
                                                                   BOB: ["bob"]}))
    alice = picture(ALICE)
    kw = {"init_images": [picture(ALLOW)]}
    if where == "init":
        kw["init_images"] = [picture(BOB), alice]
    elif where == "mask":
        kw["image_mask"] = alice
    elif where == "unit_pil":
        kw["script_args"] = (ControlNetUnit(alice),)
    elif where == "unit_b64":
        kw["script_args"] = ({"image": b64(alice), "weight": 1.0},)
    else:
        kw["script_args"] = ([{"image": np.asarray(alice), "mask": None}],)
    p, res = run_job(webui, img2img=True, **kw)
    assert_refused(webui, p, res, "This picture shows a protected person")
    assert p.consent_guard_refusal.kind == "input_protected"
    assert "Alice" not in res.info


def test_protected_person_under_scope_explicit_may_be_a_source(webui, monkeypatch, enrolled):
    use_engine(monkeypatch, registry=enrolled, faces=fake_backend({ALICE: ["alice"],
                                                                   BOB: ["bob"]}))
    p, res = run_job(webui, img2img=True, init_images=[picture(BOB)],
                     script_args=(ControlNetUnit(picture(ALLOW)),))
    assert p.sampled == 1 and len(res.images) == 1


# -- outputs ---------------------------------------------------------------------------------

def test_outputs_are_censored_or_replaced_before_they_are_saved_or_returned(webui, monkeypatch):
    """Through postprocess_image: Forge's PostprocessImageArgs(image, index) and A1111's
    PostprocessImageArgs(image) alike."""
    use_engine(monkeypatch)
    p, res = run_job(webui, keys=(ALLOW, CENSOR, BLOCK))
    grid, allowed, censored, blocked = res.images
    assert np.array_equal(pixels(allowed), keyed_image(ALLOW))
    assert not np.array_equal(pixels(censored), keyed_image(CENSOR))
    assert np.array_equal(pixels(censored)[40:, :], keyed_image(CENSOR)[40:, :])  # only a box
    assert pixels(blocked).std() < 40  # the grey placeholder, not the noise picture
    files = saved(webui)
    # the allowed and the censored sample and the grid; the blocked one never reaches outputs/
    assert len(files) == 3
    [placeholder] = kept_out(webui)
    assert pixels(Image.open(placeholder)).std() < 40
    on_disk = [pixels(Image.open(f)) for f in files + [placeholder]]
    assert not any(np.array_equal(a, keyed_image(BLOCK)) for a in on_disk)
    assert not any(np.array_equal(a, keyed_image(CENSOR)) for a in on_disk)
    assert not webui.errors.reported


def test_a_picture_is_checked_once_though_forge_hides_the_infotext_in_its_alpha(
        webui, monkeypatch):
    parts = FakeParts()
    use_engine(monkeypatch, parts=parts)
    p, res = run_job(webui, keys=(ALLOW,))
    assert len(saved(webui)) == 1
    assert parts.calls == [1]  # postprocess_image checked it; the save and the result did not


def test_grid_and_extra_images_the_api_returns_are_gated(webui, monkeypatch):
    use_engine(monkeypatch)
    p, res = run_job(webui, keys=(ALLOW,), extra_result_images=[picture(BLOCK)])
    [extra] = res.extra_images
    assert not np.array_equal(pixels(extra), keyed_image(BLOCK))


def test_save_before_postprocessing_is_gated(webui, monkeypatch):
    use_engine(monkeypatch)
    webui.shared.opts.save_images_before_color_correction = True
    run_job(webui, keys=(BLOCK,))
    assert saved(webui) == []  # neither copy reaches outputs/
    files = kept_out(webui)
    assert len(files) == 2
    assert not any(np.array_equal(pixels(Image.open(f)), keyed_image(BLOCK)) for f in files)


def test_last_gate_saves_a_placeholder_when_the_check_errs(webui, monkeypatch):
    """on_before_image_saved: the WebUI saves params.image whatever a callback raised, so a
    check that cannot run must leave a placeholder there, never the original."""
    def broken():
        raise RuntimeError("the detector fell over")

    monkeypatch.setattr(bridge(), "get_engine", broken)
    original = picture(ALLOW)
    path, _ = webui.images.save_image(original, str(webui.out), "", p=None)
    on_disk = pixels(Image.open(path))
    assert on_disk.shape == (48, 64, 3)
    assert not np.array_equal(on_disk, keyed_image(ALLOW))
    assert not webui.errors.reported  # it did not raise either


def test_last_gate_blocks_a_picture_saved_outside_a_job(webui, monkeypatch):
    use_engine(monkeypatch)
    path, _ = webui.images.save_image(picture(BLOCK), str(webui.out), "", p=None)
    assert not np.array_equal(pixels(Image.open(path)), keyed_image(BLOCK))
    ok, _ = webui.images.save_image(picture(ALLOW), str(webui.out), "", p=None)
    assert np.array_equal(pixels(Image.open(ok)), keyed_image(ALLOW))


def test_extras_are_gated_in_ui_and_api_mode(webui, monkeypatch):
    """Extras: the UI saves with p=None, the API never saves but returns the picture."""
    use_engine(monkeypatch)
    shown = webui.postprocessing.run_postprocessing(picture(BLOCK), webui.extras,
                                                    str(webui.out / "extras"), save_output=True)
    assert not np.array_equal(pixels(shown), keyed_image(BLOCK))
    assert saved(webui) == []
    [saved_file] = kept_out(webui)
    assert not np.array_equal(pixels(Image.open(saved_file)), keyed_image(BLOCK))
    returned = webui.postprocessing.run_postprocessing(picture(BLOCK), webui.extras,
                                                       str(webui.out / "api"), save_output=False)
    assert not np.array_equal(pixels(returned), keyed_image(BLOCK))
    fine = webui.postprocessing.run_postprocessing(picture(ALLOW), webui.extras, "",
                                                   save_output=False)
    assert np.array_equal(pixels(fine), keyed_image(ALLOW))


# -- enforce mode ----------------------------------------------------------------------------

def test_enforce_mode_turns_live_previews_off_and_keeps_them_off(webui, monkeypatch):
    use_engine(monkeypatch, enforce=False)
    run_job(webui)
    assert webui.shared.opts.live_previews_enable is True  # not enforce: the user's choice
    use_engine(monkeypatch, enforce=True)
    run_job(webui)
    assert webui.shared.opts.live_previews_enable is False
    webui.shared.opts.live_previews_enable = True  # switched back on in Settings
    run_job(webui)
    assert webui.shared.opts.live_previews_enable is False

    class Override(webui.scripts.Script):  # what an API call's override_settings does
        def before_process(self, p, *args):
            webui.shared.opts.live_previews_enable = True

    webui.runner.alwayson_scripts.append(Override())
    run_job(webui)
    assert webui.shared.opts.live_previews_enable is False


def test_enforce_mode_keeps_its_extras_gate_on(webui, monkeypatch):
    use_engine(monkeypatch, enforce=True)
    webui.shared.opts.postprocessing_disable_in_extras = ["Consent Guard", "Other"]
    run_job(webui)
    assert webui.shared.opts.postprocessing_disable_in_extras == ["Other"]


def test_extension_cannot_be_disabled_while_locked_in_enforce_mode(webui, monkeypatch):
    checks = sys.modules["a1111_adapter.checks"]
    name = checks.extension_name()
    use_engine(monkeypatch, enforce=True)
    monkeypatch.setattr(bridge().HOST, "locked", lambda: True)
    run_job(webui)  # enforce settings are applied at every job
    opts = webui.shared.opts
    opts.disabled_extensions = ["other", name]
    opts.disable_all_extensions = "extra"
    opts.save("config.json")  # what Settings > Extensions > Apply does
    assert opts.saved[-1]["disabled_extensions"] == ["other"]
    assert opts.saved[-1]["disable_all_extensions"] == "none"
    monkeypatch.setattr(bridge().HOST, "locked", lambda: False)  # unlocked: the admin may
    opts.disabled_extensions = [name]
    opts.save("config.json")
    assert opts.saved[-1]["disabled_extensions"] == [name]


# -- the API guard ---------------------------------------------------------------------------

def test_api_guard_answers_a_refused_job_with_403(webui, monkeypatch):
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    use_engine(monkeypatch)

    async def endpoint(request):
        data = await request.json()
        p, res = run_job(webui, prompt=data["prompt"])
        return JSONResponse({"images": [str(i) for i in res.images]})

    app = Starlette(routes=[Route("/sdapi/v1/txt2img", endpoint, methods=["POST"])])
    for callback in webui.callbacks.registered["app_started"]:
        callback(None, app)
    client = TestClient(app)
    ok = client.post("/sdapi/v1/txt2img", json={"prompt": "a red bicycle"})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    refused = client.post("/sdapi/v1/txt2img", json={"prompt": EXPLICIT_PROMPT})
    assert refused.status_code == 403
    body = refused.json()
    assert "This prompt asks for sexual content" in body["detail"]
    assert body["consent_guard"]["kind"] == "prompt_explicit"


# -- loading ---------------------------------------------------------------------------------

def test_another_copy_of_consent_guard_is_set_aside_for_the_extensions_own(tmp_path,
                                                                          monkeypatch):
    """A copy installed elsewhere (pip) must not give the WebUI a second engine."""
    other = tmp_path / "site" / "consent_guard"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("STALE = True\n", encoding="utf-8")
    saved = {k: v for k, v in sys.modules.items()
             if k == "consent_guard" or k.startswith("consent_guard.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import a1111_adapter
    import consent_guard as first

    assert getattr(first, "STALE", False)
    a1111_adapter.check_imports()
    import consent_guard as now

    assert not hasattr(now, "STALE") and a1111_adapter._from_here(now)
    for name in [k for k in sys.modules if k == "consent_guard" or k.startswith("consent_guard.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_home_is_in_the_webui_data_folder_unless_the_environment_says_otherwise(
        webui, monkeypatch, tmp_path):
    monkeypatch.delenv("CONSENT_GUARD_HOME")
    data = tmp_path / "webui"
    assert bridge().home() == data / "consent_guard"
    assert bridge().HOST.model_dirs() == [data / "models" / "consent_guard"]
    assert bridge().HOST.insightface_dirs() == [data / "models" / "insightface"]
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "shared"))
    assert bridge().home() == tmp_path / "shared"


def test_status_says_what_is_in_place(webui, monkeypatch):
    use_engine(monkeypatch, enforce=True)
    run_job(webui)
    state = bridge().status()
    assert state["adapter"] == "a1111" and state["live_previews"] is False
    assert state["hooks"]["save gate"] == "installed"
    assert set(state["hooks"].values()) == {"installed"}
