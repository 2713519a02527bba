"""Small stand-ins for the ComfyUI modules the adapter imports, following the real signatures
of ComfyUI a125cd84: folder_paths.py (directories, add_model_folder_path, get_folder_paths,
get_save_image_path), comfy/cli_args.py (args.disable_metadata), comfy/utils.py (ProgressBar);
server.py (PromptServer: instance, routes, add_on_prompt_handler, trigger_on_prompt; 0.3.64).
Only what the adapter uses is here; the integration test runs the real ComfyUI."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_folder_paths(base: Path) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.base_path = str(base)
    fp.models_dir = str(base / "models")
    fp.output_directory = str(base / "output")
    fp.temp_directory = str(base / "temp")
    fp.user_directory = str(base / "user")
    fp.folder_names_and_paths = {}
    for d in (fp.output_directory, fp.temp_directory, fp.user_directory):
        os.makedirs(d, exist_ok=True)

    fp.get_output_directory = lambda: fp.output_directory
    fp.get_directory_by_type = lambda type_name: {
        "output": fp.output_directory, "temp": fp.temp_directory,
        "input": os.path.join(str(base), "input")}.get(type_name)
    fp.get_temp_directory = lambda: fp.temp_directory
    fp.get_user_directory = lambda: fp.user_directory

    def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False):
        paths = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    def get_folder_paths(folder_name: str) -> list:
        return fp.folder_names_and_paths[folder_name][0][:]

    def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0, image_height=0):
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception("Saving image outside the output folder is not allowed.")
        os.makedirs(full_output_folder, exist_ok=True)
        taken = [int(f[len(filename) + 1:].split("_")[0]) for f in os.listdir(full_output_folder)
                 if f.startswith(filename + "_") and f[len(filename) + 1:].split("_")[0].isdigit()]
        counter = max(taken, default=0) + 1
        return full_output_folder, filename, counter, subfolder, filename_prefix

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_save_image_path = get_save_image_path
    return fp


class ProgressBar:
    instances: list = []

    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        self.current = min(value, self.total)

    def update(self, value):
        self.update_absolute(self.current + value)


class RouteTable(list):
    """aiohttp's web.RouteTableDef as PromptServer.routes uses it: get/post decorators."""

    def _add(self, method, path):
        def deco(handler):
            self.append(types.SimpleNamespace(method=method, path=path, handler=handler))
            return handler
        return deco

    def get(self, path):
        return self._add("GET", path)

    def post(self, path):
        return self._add("POST", path)


class PromptServer:
    """server.PromptServer of ComfyUI 0.3.64: `instance` (set by __init__), `routes`,
    `on_prompt_handlers`, add_on_prompt_handler(handler) and trigger_on_prompt(json_data),
    which like the real one logs a handler's exception and goes on with the json unchanged."""

    instance = None

    def __init__(self):
        type(self).instance = self  # the real one: PromptServer.instance = self
        self.routes = RouteTable()
        self.on_prompt_handlers = []
        self.client_id = None  # execution.py sets it from the running prompt's extra_data
        # aiohttp's web.Application(middlewares=[...]) as PromptServer.__init__ builds it;
        # frozen once the app starts (after custom nodes are imported)
        self.app = types.SimpleNamespace(middlewares=[], frozen=False)
        self.sent = []

    def send_sync(self, event, data, sid=None):  # the real one queues it for the websocket
        self.sent.append((event, data, sid))

    def add_on_prompt_handler(self, handler):
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data):
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:
                logging.warning("[ERROR] An error occurred during the on_prompt_handler processing")
                logging.warning(traceback.format_exc())
        return json_data


def make_server() -> types.ModuleType:
    """A `server` module whose PromptServer has a running instance."""
    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (PromptServer,), {"instance": None})
    server.PromptServer()
    return server


def install(monkeypatch, base: Path, disable_metadata: bool = False, server=None,
            core: bool = False):
    """Put the stand-ins in sys.modules, then load this repo the way ComfyUI's
    nodes.load_custom_node does: spec_from_file_location(<module path>, <dir>/__init__.py).
    `server`: a module from make_server(), for a load while ComfyUI's server runs (with an
    aiohttp.web stand-in for the routes when aiohttp is not installed)."""
    if server is not None:
        monkeypatch.setitem(sys.modules, "server", server)
        if importlib.util.find_spec("aiohttp") is None:
            aiohttp, web = types.ModuleType("aiohttp"), types.ModuleType("aiohttp.web")
            web.json_response = lambda body, status=200, headers=None: (status, body, headers)
            aiohttp.web = web
            monkeypatch.setitem(sys.modules, "aiohttp", aiohttp)
            monkeypatch.setitem(sys.modules, "aiohttp.web", web)
    fp = make_folder_paths(base)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    if core:  # ComfyUI's own nodes, execution and savers, for enforce mode
        (base / "input").mkdir(parents=True, exist_ok=True)
        for mod_name, mod in make_core(fp, base / "input").items():
            monkeypatch.setitem(sys.modules, mod_name, mod)
        monkeypatch.delitem(sys.modules, "_consent_guard_enforce", raising=False)
    comfy = types.ModuleType("comfy")
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=disable_metadata)
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    comfy.cli_args, comfy.utils = cli_args, utils
    if core:
        comfy.sd = sys.modules["comfy.sd"]
    for name, mod in (("comfy", comfy), ("comfy.cli_args", cli_args), ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    name = "custom_nodes_consent_guard_under_test"
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- ComfyUI's own output paths, for enforce mode (nodes/enforce.py) ---------------------------

def make_core(fp: types.ModuleType, input_dir: Path) -> dict:
    """Stand-ins of the ComfyUI modules enforce mode hooks, following a125cd84:
    nodes.py SaveImage.save_images(self, images, filename_prefix="ComfyUI", prompt=None,
    extra_pnginfo=None) (PreviewImage inherits it, output_dir = temp), LoadImage.load_image(
    self, image) -> (IMAGE, MASK); execution.py get_output_data(prompt_id, unique_id, obj,
    input_data_all, execution_block_cb=None, pre_execute_cb=None, hidden_inputs=None) (calls
    obj.FUNCTION once per index of the input lists) and validate_prompt(prompt_id, prompt,
    partial_execution_list) -> (ok, error, outputs, node_errors); comfy_api/latest/_ui.py
    ImageSaveHelper.save_images(images, filename_prefix, folder_type, cls, compress_level=4),
    save_animated_png(images, filename_prefix, folder_type, cls, fps, compress_level),
    save_animated_webp(images, filename_prefix, folder_type, cls, fps, lossless, quality,
    method) (staticmethods); latent_preview.py get_previewer(device, latent_format)."""
    import numpy as np
    from PIL import Image

    def save_batch(images, prefix, out_dir):
        full, name, counter, sub, _ = fp.get_save_image_path(prefix, out_dir, images[0].shape[1],
                                                             images[0].shape[0])
        results = []
        for i, image in enumerate(images):
            arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            file = f"{name.replace('%batch_num%', str(i))}_{counter:05}_.png"
            Image.fromarray(arr).save(os.path.join(full, file))
            results.append({"filename": file, "subfolder": sub, "type": "output"})
            counter += 1
        return results

    nodes = types.ModuleType("nodes")

    class SaveImage:
        def __init__(self):
            self.output_dir = fp.get_output_directory()
            self.prefix_append = ""

        OUTPUT_NODE = True
        FUNCTION = "save_images"

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
            return {"ui": {"images": save_batch(images, filename_prefix + self.prefix_append,
                                                self.output_dir)}}

    class PreviewImage(SaveImage):
        def __init__(self):
            self.output_dir = fp.get_temp_directory()
            self.prefix_append = "_temp_abcde"

    class LoadImage:
        FUNCTION = "load_image"

        def load_image(self, image):
            import torch
            arr = np.asarray(Image.open(input_dir / image).convert("RGB"), dtype=np.float32) / 255
            return (torch.from_numpy(arr)[None], torch.zeros((1, 64, 64)))

    nodes.SaveImage, nodes.PreviewImage, nodes.LoadImage = SaveImage, PreviewImage, LoadImage
    core_nodes = make_core_nodes()
    nodes.NODE_CLASS_MAPPINGS = {"SaveImage": SaveImage, "PreviewImage": PreviewImage,
                                 "LoadImage": LoadImage, **core_nodes}
    for cls in (SaveImage, PreviewImage, LoadImage):
        cls.__module__ = "nodes"

    execution = types.ModuleType("execution")

    async def get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=None,
                              pre_execute_cb=None, hidden_inputs=None):
        n = max((len(v) for v in input_data_all.values()), default=1)
        results = [getattr(obj, obj.FUNCTION)(**{k: v[min(i, len(v) - 1)]
                                                for k, v in input_data_all.items()})
                   for i in range(n)]
        # the real one calls get_output_from_returns by its module-global name
        output, ui, has_subgraph = execution.get_output_from_returns(results, obj)
        return output, ui, has_subgraph, False

    def get_output_from_returns(return_values, obj):
        """execution.py get_output_from_returns for V1 returns: a tuple, or a dict with
        "ui" and "result"; outputs merged per slot ([slot][call]), uis per key."""
        results, uis = [], []
        for r in return_values:
            if isinstance(r, dict):
                if "ui" in r:
                    uis.append(r["ui"])
                if "result" in r:
                    results.append(r["result"])
            else:
                results.append(r)
        output = [[o[i] for o in results] for i in range(len(results[0]))] if results else []
        ui = {k: [y for x in uis for y in x[k]] for k in uis[0]} if uis else {}
        return output, ui, False

    async def validate_prompt(prompt_id, prompt, partial_execution_list):
        return (True, None, list(prompt), {})

    execution.get_output_data, execution.validate_prompt = get_output_data, validate_prompt
    execution.get_output_from_returns = get_output_from_returns

    ui = types.ModuleType("comfy_api.latest._ui")

    class ImageSaveHelper:
        @staticmethod
        def save_images(images, filename_prefix, folder_type, cls, compress_level=4):
            out = fp.get_output_directory() if folder_type == "output" else fp.get_temp_directory()
            return save_batch(images, filename_prefix, out)

        @staticmethod
        def save_animated_png(images, filename_prefix, folder_type, cls, fps, compress_level):
            return ImageSaveHelper.save_images(images, filename_prefix, folder_type, cls)

        @staticmethod
        def save_animated_webp(images, filename_prefix, folder_type, cls, fps, lossless,
                               quality, method):
            return ImageSaveHelper.save_images(images, filename_prefix, folder_type, cls)

    ui.ImageSaveHelper = ImageSaveHelper
    comfy_api, latest = types.ModuleType("comfy_api"), types.ModuleType("comfy_api.latest")
    comfy_api.latest, latest._ui = latest, ui

    comfy_sd = types.ModuleType("comfy.sd")

    class CLIP:
        """comfy/sd.py CLIP.tokenize(self, text, return_word_ids=False, **kwargs)."""
        def tokenize(self, text, return_word_ids=False, **kwargs):
            return {"l": [[(len(w), 1.0) for w in text.split()]]}

    comfy_sd.CLIP = CLIP

    latent_preview = types.ModuleType("latent_preview")
    latent_preview.get_previewer = lambda device, latent_format: "a previewer"
    return {"nodes": nodes, "execution": execution, "comfy_api": comfy_api,
            "comfy_api.latest": latest, "comfy_api.latest._ui": ui,
            "latent_preview": latent_preview, "comfy.sd": comfy_sd}


def make_core_nodes() -> dict:
    """Stand-ins of stock nodes the source checks tell apart (ComfyUI a125cd84): a loader
    (nodes.py LoadImageMask: (MASK,)), pure transforms (comfy_extras/nodes_images.py
    ImageRotate, nodes.py ImageInvert, comfy_extras/nodes_mask.py MaskToImage), a maker of
    pixels (nodes.py VAEDecode: its output is a source) and an output node that prints its
    input (comfy_extras/nodes_preview_any.py PreviewAny: {"ui": {"text": (str(source),)}})."""
    import torch

    def node(name, module, function, returns, inputs, fn, output=False):
        cls = type(name, (), {"FUNCTION": function, "RETURN_TYPES": returns,
                              "OUTPUT_NODE": output,
                              "INPUT_TYPES": classmethod(lambda c: {"required": inputs}),
                              function: lambda self, **kw: fn(**kw)})
        cls.__module__ = module
        return cls

    return {
        "LoadImageMask": node("LoadImageMask", "nodes", "load_image", ("MASK",),
                              {"image": (["a"],)}, lambda image: (torch.zeros((1, 64, 64)),)),
        "ImageRotate": node("ImageRotate", "comfy_extras.nodes_images", "rotate", ("IMAGE",),
                            {"image": ("IMAGE",), "rotation": (["180 degrees"],)},
                            lambda image, rotation="180 degrees":
                            (torch.rot90(image, k=2, dims=[2, 1]),)),
        "ImageInvert": node("ImageInvert", "nodes", "invert", ("IMAGE",),
                            {"image": ("IMAGE",)}, lambda image: (1.0 - image,)),
        "MaskToImage": node("MaskToImage", "comfy_extras.nodes_mask", "mask_to_image",
                            ("IMAGE",), {"mask": ("MASK",)},
                            lambda mask: (mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
                                          .movedim(1, -1).expand(-1, -1, -1, 3),)),
        "VAEDecode": node("VAEDecode", "nodes", "decode", ("IMAGE",),
                          {"samples": ("LATENT",), "vae": ("VAE",)},
                          lambda samples, vae: (vae(samples),)),
        "PreviewAny": node("PreviewAny", "comfy_extras.nodes_preview_any", "main", (),
                           {"source": ("*", {})},
                           lambda source: {"ui": {"text": (str(source),)}}, output=True),
    }
