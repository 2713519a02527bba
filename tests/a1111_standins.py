"""Small stand-ins of the AUTOMATIC1111 / Forge modules the adapter touches, following the real
signatures and the real order of the hooks, so the adapter runs in CI without a WebUI.

Followed (Forge lllyasviel/stable-diffusion-webui-forge dfdcbab6; A1111 differences noted):
* modules/scripts.py: `AlwaysVisible = object()` l.14; `PostprocessImageArgs(image, index)`
  l.32-35 (A1111 AUTOMATIC1111/stable-diffusion-webui 036500223: `PostprocessImageArgs(image)`,
  no index; no `process_before_every_sampling`, which is Forge's, l.194); `class Script`
  hooks `before_process(p, *args)` l.147, `process(p, *args)` l.156, `process_batch(p, *args,
  **kwargs)` l.201, `postprocess_image(p, pp, *args)` l.263,
  `postprocess_image_after_composite(p, pp, *args)` l.277, `postprocess(p, processed, *args)`
  l.286; ScriptRunner (l.832-) calls every hook in `try/except Exception: errors.report`.
* modules/script_callbacks.py: `ImageSaveParams(image, p, filename, pnginfo)` l.18;
  `on_before_image_saved(callback, *, name=None)` l.499, `on_app_started` l.456; the runner
  `before_image_saved_callback(params)` l.306 catches each callback's exception and goes on.
* modules/images.py: `save_image(image, path, basename, seed=None, prompt=None,
  extension='png', info=None, short_filename=False, no_prompt=False, grid=False,
  pnginfo_section_name='parameters', p=None, existing_info=None, forced_filename=None,
  suffix="", save_to_dirs=None)` l.627: builds ImageSaveParams, runs the callbacks (l.714) and
  saves `params.image` to `params.filename` whatever they raised. Forge first hides the
  infotext in the alpha channel (`stealth_infotext.add_stealth_pnginfo(params)` l.712-713).
* modules/processing.py: `process_images(p)` l.815 (`before_process` first, l.818, before the
  model loads), `process_images_inner` l.852 (`setup_prompts` applies styles l.414-415,
  `scripts.process` l.907, the batch loop breaks on `state.interrupted` l.930,
  `before_process_batch` l.946 then `if len(p.prompts) == 0: break` l.949, `process_batch` l.958,
  `postprocess_image` l.1055, save before color correction l.1073-1075,
  `postprocess_image_after_composite` l.1088, sample save l.1092, grid l.1126-1137,
  `Processed` l.1141, `scripts.postprocess` l.1156); `p.comment(text)` l.297 and
  `Processed.comments` l.528.
* modules/shared.py / shared_state.py: `opts` (live_previews_enable, disabled_extensions,
  disable_all_extensions, postprocessing_disable_in_extras, localization, save()),
  `cmd_opts.data_dir`, `state.interrupt()` l.87 / `begin()` (resets `interrupted`),
  `prompt_styles.apply_styles_to_prompt / apply_negative_styles_to_prompt` (styles.py l.174).
* modules/scripts_postprocessing.py: `PostprocessedImage(image)` l.14, `ScriptPostprocessing`
  (name, order, ui(), process(pp, **args)); the runner (l.172) does not catch exceptions.
  modules/postprocessing.py `run_postprocessing(..., save_output=True)` l.9 saves with
  `images.save_image(pp.image, ..., p=None)` l.99-100 (the Extras API passes save_output=False).
* modules/paths_internal.py: `data_path` l.30, `models_path` l.32.

The sampler is a function the test gives (`p.sample`): it returns PIL pictures for a batch, in
place of the model. Nothing here draws explicit content: tests key pictures (conftest).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "consent_guard_checks.py"


class Errors:
    """What the runners swallowed (errors.report in the real WebUI)."""

    def __init__(self):
        self.reported: List[str] = []


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    return mod


def make_modules(data_dir: Path, flavour: str = "forge", locale: str = "None"):
    """The `modules` package with its stand-ins, registered in sys.modules (the caller
    removes them: use install())."""
    from PIL import Image

    errors = Errors()
    modules = _module("modules")
    modules.__path__ = []  # a package

    # -- paths_internal, shared -------------------------------------------------------------
    paths_internal = _module("modules.paths_internal")
    paths_internal.data_path = str(data_dir)
    paths_internal.models_path = str(data_dir / "models")

    shared = _module("modules.shared")

    class Options:
        """shared.opts: options in `data`, reached as attributes; save() writes config.json."""

        def __init__(self):
            object.__setattr__(self, "data", {
                "live_previews_enable": True, "disabled_extensions": [],
                "disable_all_extensions": "none", "postprocessing_disable_in_extras": [],
                "localization": locale, "return_grid": True, "samples_format": "png",
                "save_images_before_color_correction": False, "enable_pnginfo": True})
            object.__setattr__(self, "saved", [])

        def __getattr__(self, key):
            try:
                return self.__dict__["data"][key]
            except KeyError:
                raise AttributeError(key) from None

        def __setattr__(self, key, value):
            if key in self.data:
                self.data[key] = value
            else:
                object.__setattr__(self, key, value)

        def save(self, filename=None):
            self.saved.append(dict(self.data))

    class State:
        """shared_state.State: interrupt() l.87; begin() resets the flags (l.118)."""

        def __init__(self):
            self.interrupted = self.skipped = self.stopping_generation = False

        def interrupt(self):
            self.interrupted = True

        def begin(self, job=""):
            self.interrupted = self.skipped = self.stopping_generation = False

    class StyleDatabase:
        """styles.py: a style's prompt holds "{prompt}" or is appended with ", "."""

        def __init__(self):
            self.styles = {}

        def _apply(self, text, styles, field):
            for name in styles:
                style = self.styles.get(name)
                if style is None:
                    continue
                add = style[field]
                text = add.replace("{prompt}", text) if "{prompt}" in add else \
                    ", ".join(t for t in (text, add) if t)
            return text

        def apply_styles_to_prompt(self, prompt, styles):
            return self._apply(prompt, styles, 0)

        def apply_negative_styles_to_prompt(self, prompt, styles):
            return self._apply(prompt, styles, 1)

    shared.opts = Options()
    shared.cmd_opts = types.SimpleNamespace(data_dir=str(data_dir))
    shared.state = State()
    shared.prompt_styles = StyleDatabase()
    modules.paths_internal, modules.shared = paths_internal, shared

    # -- script_callbacks ----------------------------------------------------------------------
    callbacks = _module("modules.script_callbacks")

    class ImageSaveParams:
        def __init__(self, image, p, filename, pnginfo):
            self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo

    callbacks.ImageSaveParams = ImageSaveParams
    callbacks.registered = {"before_image_saved": [], "app_started": []}

    def on_before_image_saved(callback, *, name=None):
        callbacks.registered["before_image_saved"].append(callback)

    def on_app_started(callback, *, name=None):
        callbacks.registered["app_started"].append(callback)

    def before_image_saved_callback(params):
        for c in callbacks.registered["before_image_saved"]:
            try:
                c(params)
            except Exception as exc:  # report_exception, and go on saving
                errors.reported.append(f"before_image_saved: {exc}")

    def app_started_callback(demo, app):
        for c in callbacks.registered["app_started"]:
            try:
                c(demo, app)
            except Exception as exc:
                errors.reported.append(f"app_started: {exc}")

    callbacks.on_before_image_saved = on_before_image_saved
    callbacks.on_app_started = on_app_started
    callbacks.before_image_saved_callback = before_image_saved_callback
    callbacks.app_started_callback = app_started_callback
    modules.script_callbacks = callbacks

    # -- images --------------------------------------------------------------------------------
    images = _module("modules.images")

    def save_image(image, path, basename, seed=None, prompt=None, extension='png', info=None,
                   short_filename=False, no_prompt=False, grid=False,
                   pnginfo_section_name='parameters', p=None, existing_info=None,
                   forced_filename=None, suffix="", save_to_dirs=None):
        os.makedirs(path, exist_ok=True)
        count = len(os.listdir(path))
        name = forced_filename or f"{count:05d}{('-' + basename) if basename else ''}{suffix}"
        params = ImageSaveParams(image, p, os.path.join(path, f"{name}.{extension}"),
                                 {pnginfo_section_name: info} if info else {})
        if flavour == "forge" and shared.opts.enable_pnginfo:  # stealth_infotext (l.712)
            params.image = params.image.convert("RGBA")
            params.image.putalpha(254)  # the infotext, hidden in the alpha channel
        before_image_saved_callback(params)
        params.image.save(params.filename)
        return params.filename, None

    def image_grid(imgs, batch_size=1):
        w, h = imgs[0].size
        grid = Image.new("RGB", (w * len(imgs), h))
        for i, im in enumerate(imgs):
            grid.paste(im, (w * i, 0))
        return grid

    images.save_image, images.image_grid = save_image, image_grid
    modules.images = images

    # -- scripts -------------------------------------------------------------------------------
    scripts = _module("modules.scripts")
    scripts.AlwaysVisible = object()

    if flavour == "forge":
        class PostprocessImageArgs:
            def __init__(self, image, index):
                self.image, self.index = image, index
    else:
        class PostprocessImageArgs:  # A1111
            def __init__(self, image):
                self.image = image

    class Script:
        filename = None
        args_from = args_to = 0
        alwayson = False
        sorting_priority = 0

        def title(self):
            raise NotImplementedError

        def ui(self, is_img2img):
            pass

        def show(self, is_img2img):
            return True

        def before_process(self, p, *args): pass
        def process(self, p, *args): pass
        def before_process_batch(self, p, *args, **kwargs): pass
        def process_batch(self, p, *args, **kwargs): pass
        def postprocess_image(self, p, pp, *args): pass
        def postprocess_image_after_composite(self, p, pp, *args): pass
        def postprocess(self, p, processed, *args): pass

    if flavour == "forge":
        Script.process_before_every_sampling = lambda self, p, *args, **kwargs: None

    class ScriptRunner:
        """Calls each always-on script's hook in try/except, as the real runner does."""

        def __init__(self, alwayson):
            self.alwayson_scripts = alwayson

        def _run(self, hook, p, *args, **kwargs):
            for script in self.alwayson_scripts:
                method = getattr(script, hook, None)
                if method is None:
                    continue
                try:
                    method(p, *args, *p.script_args[script.args_from:script.args_to],
                           **kwargs)
                except Exception as exc:  # errors.report(...) and go on
                    errors.reported.append(f"{hook}: {exc}")

        def __getattr__(self, hook):
            return lambda p, *args, **kwargs: self._run(hook, p, *args, **kwargs)

    scripts.PostprocessImageArgs, scripts.Script = PostprocessImageArgs, Script
    scripts.ScriptRunner = ScriptRunner
    modules.scripts = scripts

    # -- scripts_postprocessing, postprocessing (Extras) ---------------------------------------
    spp = _module("modules.scripts_postprocessing")

    class PostprocessedImage:
        def __init__(self, image):
            self.image, self.info, self.extra_images = image, {}, []
            self.disable_processing, self.nametags, self.caption = False, [], None

    class ScriptPostprocessing:
        filename = None
        controls = None
        args_from = args_to = None
        order = 1000
        name = None

        def ui(self):
            pass

        def process(self, pp, **args):
            pass

        def process_firstpass(self, pp, **args):
            pass

    spp.PostprocessedImage, spp.ScriptPostprocessing = PostprocessedImage, ScriptPostprocessing
    modules.scripts_postprocessing = spp

    postprocessing = _module("modules.postprocessing")

    def run_postprocessing(image, extras_scripts, outpath, save_output=True):
        """The Extras run: every enabled script in order (no try/except), then the save with
        p=None; returns what Extras shows (and the API returns)."""
        pp = PostprocessedImage(image.convert("RGB"))
        off = set(shared.opts.postprocessing_disable_in_extras)
        for script in sorted(extras_scripts, key=lambda s: s.order):
            if script.name not in off:
                script.process(pp)
        if save_output:
            save_image(pp.image, path=outpath, basename="", extension="png",
                       short_filename=True, no_prompt=True, grid=False,
                       pnginfo_section_name="postprocessing", p=None)
        return pp.image

    postprocessing.run_postprocessing = run_postprocessing
    modules.postprocessing = postprocessing

    # -- processing ----------------------------------------------------------------------------
    processing = _module("modules.processing")

    class StableDiffusionProcessing:
        def __init__(self, prompt="", negative_prompt="", styles=None, cfg_scale=7.0,
                     batch_size=1, n_iter=1, outpath_samples="", outpath_grids="",
                     do_not_save_samples=False, do_not_save_grid=False,
                     sample: Optional[Callable] = None, script_args=(), **extra):
            self.prompt, self.negative_prompt, self.styles = prompt, negative_prompt, styles or []
            self.cfg_scale, self.batch_size, self.n_iter = cfg_scale, batch_size, n_iter
            self.outpath_samples, self.outpath_grids = outpath_samples, outpath_grids
            self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
            self.sample, self.script_args = sample, tuple(script_args)
            self.comments = {}
            self.scripts = None
            self.enable_hr = False
            self.extra_result_images = []
            self.sampled = 0  # how many batches reached the sampler (for the tests)
            for k, v in extra.items():
                setattr(self, k, v)

        def comment(self, text):
            self.comments[text] = 1

        def setup_prompts(self):
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
            self.all_prompts = [shared.prompt_styles.apply_styles_to_prompt(x, self.styles)
                                for x in self.all_prompts]
            self.all_negative_prompts = [
                shared.prompt_styles.apply_negative_styles_to_prompt(x, self.styles)
                for x in self.all_negative_prompts]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        pass

    class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
        def __init__(self, init_images=None, image_mask=None, **kw):
            super().__init__(**kw)
            self.init_images, self.image_mask = init_images or [], image_mask

    class Processed:
        def __init__(self, p, images_list, info="", extra_images_list=()):
            self.images = images_list
            self.extra_images = list(extra_images_list)
            self.info = info
            self.comments = "".join(f"{comment}\n" for comment in p.comments)

    def _pp_args(image, index):
        return PostprocessImageArgs(image, index) if flavour == "forge" else \
            PostprocessImageArgs(image)

    def process_images(p):
        runner = p.scripts
        if runner is not None:
            runner.before_process(p)
        p.setup_prompts()
        if runner is not None:
            runner.process(p)
        output = []
        for n in range(p.n_iter):
            if shared.state.interrupted:
                break
            p.prompts = prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            if runner is not None:
                runner.before_process_batch(p, batch_number=n, prompts=p.prompts)
            if len(p.prompts) == 0:
                break
            if runner is not None:
                runner.process_batch(p, batch_number=n, prompts=prompts)
                if flavour == "forge":
                    runner.process_before_every_sampling(p)
            p.sampled += 1
            for i, image in enumerate(p.sample(prompts)):
                index = i + n * p.batch_size
                if not p.do_not_save_samples and shared.opts.save_images_before_color_correction:
                    save_image(image, p.outpath_samples, "", prompt=prompts[i], p=p,
                               suffix="-before-color-correction")
                if runner is not None:
                    pp = _pp_args(image, index)
                    runner.postprocess_image(p, pp)
                    image = pp.image
                    if flavour == "forge":
                        pp = _pp_args(image, index)
                        runner.postprocess_image_after_composite(p, pp)
                        image = pp.image
                if not p.do_not_save_samples:
                    save_image(image, p.outpath_samples, "", prompt=prompts[i], p=p)
                output.append(image)
        if len(output) > 1 and shared.opts.return_grid and not p.do_not_save_grid:
            grid = image_grid(output, p.batch_size)
            output.insert(0, grid)
            save_image(grid, p.outpath_grids, "grid", p=p, grid=True)
        res = Processed(p, output, extra_images_list=p.extra_result_images)
        if runner is not None:
            runner.postprocess(p, res)
        return res

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.StableDiffusionProcessingImg2Img = StableDiffusionProcessingImg2Img
    processing.Processed, processing.process_images = Processed, process_images
    modules.processing = processing
    return types.SimpleNamespace(modules=modules, shared=shared, scripts=scripts,
                                 callbacks=callbacks, images=images, processing=processing,
                                 postprocessing=postprocessing, spp=spp, errors=errors)


def load_script(path: Path = SCRIPT):
    """As modules/script_loading.py load_module does: the file by path, under its base name."""
    spec = importlib.util.spec_from_file_location(path.stem, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(monkeypatch, data_dir: Path, flavour: str = "forge", locale: str = "None"):
    """The stand-ins in sys.modules and the script loaded the WebUI's way (call `cleanup()`
    on the result after the test: each test loads the extension afresh). Returns a
    namespace: the stand-ins, `module` (the loaded script file), `runner` (a ScriptRunner
    with its always-on script) and `extras` (its Extras scripts)."""
    for name in [k for k in sys.modules if _ours(k)]:
        monkeypatch.delitem(sys.modules, name)
    ns = make_modules(data_dir, flavour, locale)
    module = load_script()
    always = [cls() for cls in vars(module).values() if isinstance(cls, type) and
              issubclass(cls, ns.scripts.Script) and cls is not ns.scripts.Script]
    for script in always:
        assert script.show(False) is ns.scripts.AlwaysVisible
        script.alwayson = True
    ns.module = module
    ns.runner = ns.scripts.ScriptRunner(always)
    ns.extras = [cls() for cls in vars(module).values() if isinstance(cls, type) and
                 issubclass(cls, ns.spp.ScriptPostprocessing) and
                 cls is not ns.spp.ScriptPostprocessing]

    def cleanup():
        for name in [k for k in sys.modules if _ours(k)]:
            del sys.modules[name]

    ns.cleanup = cleanup
    return ns


def _ours(name: str) -> bool:
    return name in ("modules", "a1111_adapter", "consent_guard_checks") or \
        name.startswith(("modules.", "a1111_adapter."))
