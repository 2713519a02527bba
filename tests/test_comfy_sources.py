"""Enforce mode checks pictures where they are made (nodes/sources.py), against stand-ins of
ComfyUI's execution and stock nodes (comfy_standins.make_core, after ComfyUI a125cd84).

Test images are keyed by their top-left pixel (conftest.keyed_image): the fake detectors see
the key, so a rotated copy is, to them, another picture, as a rotated face is to a real face
detector. That is the bypass these tests close."""
import asyncio
import sys
import types

import numpy as np
import pytest

from consent_guard.verdict import Decision, Reason, Verdict

from conftest import keyed_image
from test_comfy_enforce import ALLOW, BLOCK, CENSOR, PKG, batch, comfy, files, use_engine  # noqa: F401

torch = pytest.importorskip("torch")


def run(cls, prompt_id="p1", unique_id="9", obj=None, **inputs):
    execution = sys.modules["execution"]
    return asyncio.run(execution.get_output_data(prompt_id, unique_id, obj or cls(),
                                                 {k: [v] for k, v in inputs.items()}))


def core(name):
    return sys.modules["nodes"].NODE_CLASS_MAPPINGS[name]


def sources_module():
    return sys.modules[PKG + ".nodes.sources"]


def counting(engine):
    calls = []
    original = engine.check_images

    def check_images(pixels, *a, **k):
        calls.append(len(pixels))
        return original(pixels, *a, **k)
    engine.check_images = check_images
    return calls


def test_a_picture_a_node_makes_is_checked_before_anything_uses_it(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    vae_decode = core("VAEDecode")
    with pytest.raises(Exception, match=r"refused the image made by node 9 \(VAEDecode\)"):
        run(vae_decode, samples={"samples": torch.zeros((1, 4, 8, 8))},
            vae=lambda s: batch(BLOCK))
    out, _, _, _ = run(vae_decode, samples={"samples": torch.zeros((1, 4, 8, 8))},
                       vae=lambda s: batch(CENSOR))
    made = batch(CENSOR)
    assert out[0][0].shape == made.shape and not torch.equal(out[0][0], made)  # censored copy


def test_rotating_an_unchecked_picture_does_not_get_it_past_the_saver(comfy, monkeypatch):
    """The reported bypass: a picture no check saw (here: handed in directly, as ComfyUI's
    output cache does with a node that did not run again) goes through ImageRotate to
    SaveImage. Rotated, the detectors would not know it; its input is checked first."""
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    rotated = torch.rot90(batch(BLOCK), k=2, dims=[2, 1])
    run(core("SaveImage"), images=rotated, filename_prefix="control")
    assert files(base / "output")  # the fakes do not see what is rotated: it would be saved
    with pytest.raises(Exception, match=r"ImageRotate\) \(input 'image'\)"):
        run(core("ImageRotate"), image=batch(BLOCK), rotation="180 degrees")
    with pytest.raises(Exception, match=r"ImageInvert"):
        run(core("ImageInvert"), image=batch(BLOCK))


def test_a_chain_of_pure_transforms_is_checked_once_where_it_is_used(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    calls = counting(engine)
    made = run(core("VAEDecode"), samples={"samples": torch.zeros((1, 4, 8, 8))},
               vae=lambda s: batch(ALLOW, 3))[0][0][0]
    assert calls == [2]
    rotated = run(core("ImageRotate"), image=made, rotation="180 degrees")[0][0][0]
    inverted = run(core("ImageInvert"), image=rotated)[0][0][0]
    assert calls == [2]  # nothing checked between the two pure transforms
    run(core("SaveImage"), images=inverted, filename_prefix="ok")
    assert calls == [2, 2]  # the saver checks what the chain made
    assert len(files(base / "output")) == 2
    run(core("SaveImage"), images=made, filename_prefix="again")
    assert calls == [2, 2]  # the decoder's own output: found in the cache


def test_what_a_pure_transform_reveals_is_checked_where_it_is_used(comfy, monkeypatch):
    """Scaling and cropping can bring out what the check of the input could not see (a face
    too small in the detector's copy, a picture hidden in every fourth pixel). Here the
    fakes' key sits in the bottom-right corner: a half turn brings it to the top left."""
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    hidden = batch(ALLOW)
    hidden[0, -1, -1, 0] = BLOCK / 255
    made = run(core("VAEDecode"), samples={"samples": None}, vae=lambda s: hidden)[0][0][0]
    revealed = run(core("ImageRotate"), image=made, rotation="180 degrees")[0][0][0]
    with pytest.raises(Exception, match=r"blocked 1 of 1 image"):
        run(core("SaveImage"), images=revealed, filename_prefix="leak")
    with pytest.raises(Exception, match=r"VAEDecode\) \(input 'samples'\)|refused"):
        run(core("VAEDecode"), samples={"samples": None, "pixels": revealed},
            vae=lambda s: batch(ALLOW))
    assert files(base / "output") == []


def test_a_custom_class_under_a_stock_name_is_not_a_pure_transform(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)

    class ImageRotate:  # a custom pack's class registered under the stock name
        FUNCTION = "rotate"
        RETURN_TYPES = ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT",)}}

        def rotate(self, seed):
            return (batch(BLOCK),)  # makes a picture from nothing we checked

    monkeypatch.setitem(sys.modules["nodes"].NODE_CLASS_MAPPINGS, "ImageRotate", ImageRotate)
    assert not sources_module().is_pure(ImageRotate)
    with pytest.raises(Exception, match="refused the image made by"):
        run(ImageRotate, seed=1)


def test_a_mask_is_checked_as_a_grayscale_picture(comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)

    class LoadsAMask:  # any loader of masks (LoadImageMask, a custom one)
        FUNCTION = "load"
        RETURN_TYPES = ("MASK",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": ("STRING",)}}

        def load(self, name):
            gray = keyed_image(BLOCK)[..., 1].astype(np.float32) / 255
            gray[0, 0] = BLOCK / 255  # the key, as gray
            return (torch.from_numpy(gray)[None],)

    with pytest.raises(Exception, match="refused the mask made by"):
        run(LoadsAMask, name="red")
    # an unchecked mask handed to a pure transform is checked as its input
    gray = torch.from_numpy(np.full((1, 64, 48), BLOCK / 255, dtype=np.float32))
    gray[0, 1, 1] = 0.5
    with pytest.raises(Exception, match=r"MaskToImage\) \(input 'mask'\)"):
        run(core("MaskToImage"), mask=gray)


def test_an_output_node_never_prints_tensor_values(comfy, monkeypatch):
    """PreviewAny shows str(source): a mask cut into tiles came back as numbers."""
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    enforce = sys.modules[PKG + ".nodes.enforce"]
    tile = torch.rand((1, 31, 31))
    _, ui, _, _ = run(core("PreviewAny"), source=tile)
    assert ui["text"] == [enforce.TEXT_WITHHELD]
    _, ui, _, _ = run(core("PreviewAny"), source={"samples": torch.rand((1, 4, 8, 8))})
    assert ui["text"] == [enforce.TEXT_WITHHELD]
    _, ui, _, _ = run(core("PreviewAny"), source="a plain string")
    assert ui["text"] == ["a plain string"]


def test_outside_enforce_mode_nothing_changes(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg, enforce=False)
    calls = counting(engine)
    out = run(core("ImageRotate"), image=batch(BLOCK), rotation="180 degrees")[0][0][0]
    assert out.shape == batch(BLOCK).shape and calls == []
    _, ui, _, _ = run(core("PreviewAny"), source=torch.rand((1, 4, 4)))
    assert ui["text"][0].startswith("tensor(")


def test_the_verdict_cache_forgets_when_the_policy_or_registry_changes(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    calls = counting(engine)
    sources = sources_module()
    state = ["v1"]
    monkeypatch.setattr(sources, "state", lambda: state[0])
    picture = batch(ALLOW)
    sources.check_picture("IMAGE", picture, "here")
    sources.check_picture("IMAGE", picture.clone(), "here")  # same bytes: cached
    assert calls == [1]
    state[0] = "v2"  # someone enrolled
    sources.check_picture("IMAGE", picture, "here")
    assert calls == [1, 1]


def test_a_flat_picture_needs_no_check(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    calls = counting(engine)
    sources_module().check_picture("MASK", torch.zeros((1, 64, 64)), "here")
    assert calls == []


# -- text at the encoder ---------------------------------------------------------------------

class CLIPTextEncode:  # any node that hands text to a CLIP tokenizer
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING",), "clip": ("CLIP",)}}

    def encode(self, clip, text):
        return (clip.tokenize(text),)


def refuse_word(monkeypatch, engine, word="forbidden"):
    def check_prompt(text, negative=None):
        if word in text:
            return Verdict(Decision.BLOCK, reasons=(Reason("lexicon", word, 1.0,
                                                           "sexual_explicit", Decision.BLOCK),))
        return Verdict(Decision.ALLOW)
    monkeypatch.setattr(engine, "check_prompt", check_prompt)


def running(server, prompt, prompt_id="p1"):
    server.PromptServer.instance.prompt_queue = types.SimpleNamespace(
        currently_running={0: (0, prompt_id, prompt, {}, [])})


def sampler_graph(cfg):
    return {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "y", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {"positive": ["2", 0],
                                                       "negative": ["1", 0], "cfg": cfg}}}


def test_text_built_at_run_time_is_checked_when_the_encoder_gets_it(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    refuse_word(monkeypatch, engine)
    clip = sys.modules["comfy.sd"].CLIP()
    running(server, sampler_graph(7.0))
    run(CLIPTextEncode, unique_id="2", clip=clip, text="a quiet lake")
    with pytest.raises(Exception, match=r"refuses the text that node 2 \(CLIPTextEncode\)"):
        run(CLIPTextEncode, unique_id="2", clip=clip, text="made at run time: forbidden")
    # the negative prompt of a sampler with cfg > 1 is a safety tool: not refused
    run(CLIPTextEncode, unique_id="1", clip=clip, text="forbidden")
    # a node that reads captions from files calls the tokenizer itself, outside any text input
    with pytest.raises(Exception, match="refuses the text"):
        clip.tokenize("caption read from a file: forbidden")


def test_text_is_not_checked_outside_enforce_mode(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg, enforce=False)
    refuse_word(monkeypatch, engine)
    sys.modules["comfy.sd"].CLIP().tokenize("forbidden")


def test_a_node_that_changes_its_input_in_place_has_its_output_checked(comfy, monkeypatch):
    """Digests of a node's inputs are remembered only until it runs: the same tensor object,
    changed in place and handed on, is checked as what it now is."""
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)

    class Scribbles:
        FUNCTION = "run"
        RETURN_TYPES = ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",)}}

        def run(self, image):
            image.copy_(batch(BLOCK))  # in place: same object, other content
            return (image,)

    picture = batch(ALLOW)
    with pytest.raises(Exception, match=r"refused the image made by node 9 \(Scribbles\)"):
        run(Scribbles, image=picture)


def test_a_negative_with_cfg_1_is_checked_at_the_encoder(comfy, monkeypatch):
    """At cfg <= 1 the sampler follows the negative too (prompt_guard.node_roles)."""
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    refuse_word(monkeypatch, engine)
    clip = sys.modules["comfy.sd"].CLIP()
    running(server, sampler_graph(1.0))
    with pytest.raises(Exception, match=r"refuses the text that node 1 \(CLIPTextEncode\)"):
        run(CLIPTextEncode, unique_id="1", clip=clip, text="forbidden")


def test_refusals_in_enforce_mode_do_not_say_who(comfy, monkeypatch):
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    who = Verdict(Decision.BLOCK, reasons=(Reason("face_match", "id_0123abcd", 0.9,
                                                  "protected_identity", Decision.BLOCK),))
    monkeypatch.setattr(engine, "check_images", lambda px, *a, **k: [who] * len(px))
    for node, inputs in ((core("SaveImage"), {"images": batch(ALLOW), "filename_prefix": "x"}),
                         (core("VAEDecode"), {"samples": {"samples": None},
                                              "vae": lambda s: batch(ALLOW)})):
        with pytest.raises(Exception) as err:
            run(node, **inputs)
        assert "protected" in str(err.value) and "id_0123abcd" not in str(err.value)


def test_what_a_stock_saver_wrote_after_the_gate_is_served_without_a_second_check(
        comfy, monkeypatch):
    pkg, base, home, server = comfy
    use_engine(monkeypatch, pkg)
    http_guard = sys.modules[PKG + ".nodes.http_guard"]
    http_guard.CACHE.clear()
    run(core("SaveImage"), images=batch(ALLOW), filename_prefix="seen")
    (written,) = (base / "output").glob("seen_*.png")

    def judged(path):
        raise AssertionError("checked again")
    monkeypatch.setattr(http_guard, "judge_file", judged)
    assert http_guard.file_refusal(written) is None
    written.write_bytes(written.read_bytes() + b"changed")  # another file now: checked again
    with pytest.raises(AssertionError, match="checked again"):
        http_guard.file_refusal(written)


def test_a_two_tone_face_is_refused_while_someone_is_protected(comfy, monkeypatch, tmp_path):
    """A threshold of a face hidden as two nearly equal grey levels: recognition cannot tell
    who it is, so enforce mode refuses a two-tone picture with a face in it."""
    from consent_guard import Engine, Policy
    from consent_guard.faces.backends import FaceBackend
    from consent_guard.registry import Consent, Registry
    from conftest import FakeFaces, FakeParts, FakeScorer

    pkg, base, home, server = comfy
    two_tone = np.full((64, 64, 3), 255, np.uint8)
    two_tone[20:40, 10:50] = 0
    two_tone[0, 0, 0] = 0  # the fakes' key: a face is found in it
    faces = FakeFaces({0: ["stranger"]})

    def engine_with(registry):
        engine = Engine(Policy(enforce=True), parts=FakeParts(), scorer=FakeScorer(),
                        registry=registry, face_backend=FaceBackend("fake", faces, faces))
        monkeypatch.setattr(sys.modules[PKG + ".nodes.image_nodes"], "get_engine",
                            lambda: engine)
        sources_module().CACHE.clear()

    picture = torch.from_numpy(two_tone.astype(np.float32) / 255)[None]
    engine_with(None)  # nobody enrolled: nothing to protect
    sources_module().check_picture("IMAGE", picture, "here")
    reg = Registry.create(tmp_path / "identities.db", "two tone passphrase")
    reg.add("Alice", "any", Consent("Alice"), {"fake-000000000001": FakeFaces.vector("alice")[None]})
    try:
        engine_with(reg)
        with pytest.raises(Exception, match="two tones"):
            sources_module().check_picture("IMAGE", picture, "here")
        photo = keyed_image(0, (64, 64))  # the same face, in a photo of many tones
        sources_module().check_picture("IMAGE", torch.from_numpy(
            photo.astype(np.float32) / 255)[None], "here")
    finally:
        reg.close()


def test_stock_classes_are_known_by_where_comfyui_loaded_them(comfy, monkeypatch, tmp_path):
    """nodes.py load_custom_node names a comfy_extras module by its file path, not
    "comfy_extras.nodes_images" (seen on the real ComfyUI)."""
    pkg, base, home, server = comfy
    from importlib import import_module

    is_stock = import_module(PKG + ".nodes.pure_transforms").is_stock
    monkeypatch.setattr(sys.modules["nodes"], "__file__", str(tmp_path / "ComfyUI" / "nodes.py"),
                        raising=False)

    def made_in(module):
        return type("ImageCrop", (), {"__module__": module})

    assert is_stock(made_in(str(tmp_path / "ComfyUI" / "comfy_extras" / "nodes_images")))
    assert is_stock(made_in("nodes"))
    assert not is_stock(made_in(str(tmp_path / "ComfyUI" / "custom_nodes" / "nodes_images")))
    assert not is_stock(made_in(str(tmp_path / "elsewhere" / "comfy_extras" / "nodes_images")))
    assert not is_stock(made_in("my_pack.nodes"))


def test_an_api_node_has_its_text_checked_when_it_runs(comfy, monkeypatch):
    """comfy_api_nodes send their prompt to another service without a CLIP tokenizer."""
    pkg, base, home, server = comfy
    engine = use_engine(monkeypatch, pkg)
    refuse_word(monkeypatch, engine)

    class OpenAIDalle3:
        FUNCTION = "api_call"
        RETURN_TYPES = ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"prompt": ("STRING",), "negative_prompt": ("STRING",),
                                 "seed": ("INT",)}}

        def api_call(self, prompt, negative_prompt, seed):
            return (batch(ALLOW),)

    OpenAIDalle3.__module__ = "comfy_api_nodes.nodes_openai"
    run(OpenAIDalle3, prompt="a quiet lake", negative_prompt="forbidden", seed=1)
    with pytest.raises(Exception, match=r"refuses the text that node 9 \(OpenAIDalle3\) sends"):
        run(OpenAIDalle3, prompt="built at run time: forbidden", negative_prompt="", seed=1)
    OpenAIDalle3.__module__ = "my_pack.nodes"  # not an API node: its text is not read here
    run(OpenAIDalle3, prompt="forbidden", negative_prompt="", seed=1)
