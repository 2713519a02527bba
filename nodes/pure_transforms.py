"""The stock ComfyUI nodes whose IMAGE / MASK outputs are pure functions of their inputs'
pixels (geometry, colour, batching, mask arithmetic), read from ComfyUI a125cd84 (0.3.64).

In enforce mode (nodes/sources.py) every image or mask a node makes is checked, except the
outputs of these nodes: their image and mask inputs are checked first (or found in the
verdict cache), and a rotation, inversion, crop, scale or pad of an allowed picture is allowed
too. A node is taken as one of these only when ComfyUI's own class is registered under the
name (its module is `nodes` or `comfy_extras.*`): a custom pack that registers a class under
one of these names is a source like any other unknown node.

Not here, on purpose (they are sources, so what they make is checked):
* loaders: LoadImage, LoadImageMask, LoadImageOutput, LoadImageSetNode,
  LoadImageSetFromFolderNode, LoadImageTextSetFromFolderNode (nodes.py, nodes_train.py);
* anything that makes pixels from a model: VAEDecode, VAEDecodeTiled, ImageUpscaleWithModel;
* nodes that combine several pictures into one, where a picture may emerge that none of the
  parts showed (tiles put back together): ImageCompositeMasked, ImageBlend, ImageStitch,
  PorterDuffImageComposite, JoinImageWithAlpha, MaskComposite, ImageYUVToRGB;
* nodes that can turn a picture no detector reads into one it would read: channel
  extractors (ImageToMask, SplitImageWithAlpha, ImageRGBToYUV: a face hidden in the blue or a
  chroma channel of another photo becomes a grayscale face) and contrast amplifiers
  (ThresholdMask, ImageColorToMask: a face hidden as tiny differences around one grey level
  becomes a black-and-white face; ImageSharpen, up to 6x contrast per node, chained);
* every node of a custom pack.

What stays here moves, scales, blurs, inverts, batches or crops the pixels it is given, so
nothing comes out that a check of its inputs did not see.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

# name in NODE_CLASS_MAPPINGS -> where ComfyUI defines it
PURE_TRANSFORMS = {
    # nodes.py
    "ImageScale": "nodes.py ImageScale.upscale",
    "ImageScaleBy": "nodes.py ImageScaleBy.upscale",
    "ImageInvert": "nodes.py ImageInvert.invert",
    "ImageBatch": "nodes.py ImageBatch.batch",
    "EmptyImage": "nodes.py EmptyImage.generate (a solid colour, no image input)",
    "ImagePadForOutpaint": "nodes.py ImagePadForOutpaint.expand_image",
    # comfy_extras/nodes_images.py
    "ImageCrop": "comfy_extras/nodes_images.py ImageCrop.crop",
    "RepeatImageBatch": "comfy_extras/nodes_images.py RepeatImageBatch.repeat",
    "ImageFromBatch": "comfy_extras/nodes_images.py ImageFromBatch.frombatch",
    "ImageAddNoise": "comfy_extras/nodes_images.py ImageAddNoise.repeat",
    "ResizeAndPadImage": "comfy_extras/nodes_images.py ResizeAndPadImage.resize_and_pad",
    "ImageRotate": "comfy_extras/nodes_images.py ImageRotate.rotate",
    "ImageFlip": "comfy_extras/nodes_images.py ImageFlip.flip",
    "ImageScaleToMaxDimension": "comfy_extras/nodes_images.py ImageScaleToMaxDimension",
    # comfy_extras/nodes_mask.py
    "MaskToImage": "comfy_extras/nodes_mask.py MaskToImage.mask_to_image",
    "SolidMask": "comfy_extras/nodes_mask.py SolidMask.solid (no image input)",
    "InvertMask": "comfy_extras/nodes_mask.py InvertMask.invert",
    "CropMask": "comfy_extras/nodes_mask.py CropMask.crop",
    "FeatherMask": "comfy_extras/nodes_mask.py FeatherMask.feather",
    "GrowMask": "comfy_extras/nodes_mask.py GrowMask.expand_mask",
    # comfy_extras/nodes_post_processing.py (V3 nodes: node_id is the name)
    "ImageBlur": "comfy_extras/nodes_post_processing.py Blur",
    "ImageQuantize": "comfy_extras/nodes_post_processing.py Quantize",
    "ImageScaleToTotalPixels": "comfy_extras/nodes_post_processing.py ImageScaleToTotalPixels",
    # comfy_extras/nodes_morphology.py, nodes_compositing.py
    "Morphology": "comfy_extras/nodes_morphology.py Morphology",
}

STOCK_MODULES = ("nodes", "comfy_extras.")


def _comfy_folder(cls) -> Optional[str]:
    """Which of ComfyUI's own folders (comfy_extras, comfy_api_nodes) defines a class: nodes.py
    load_custom_node loads their files under the file's real path without its suffix as the
    module name (e.g. "/opt/ComfyUI/comfy_extras/nodes_images")."""
    module = getattr(cls, "__module__", "") or ""
    for folder in ("comfy_extras", "comfy_api_nodes"):
        if module.startswith(folder + "."):
            return folder
    nodes_file = getattr(sys.modules.get("nodes"), "__file__", None)
    if not nodes_file or not os.path.isabs(module):
        return None
    root = os.path.dirname(os.path.realpath(nodes_file))
    where = os.path.dirname(os.path.realpath(module))
    for folder in ("comfy_extras", "comfy_api_nodes"):
        if where == os.path.join(root, folder):
            return folder
    return None


def is_stock(cls) -> bool:
    """ComfyUI's own class, from nodes.py or comfy_extras/."""
    module = getattr(cls, "__module__", "") or ""
    return module == "nodes" or _comfy_folder(cls) == "comfy_extras"


def is_api_node(cls) -> bool:
    """One of ComfyUI's API nodes (comfy_api_nodes/): it sends its text to another service,
    without a CLIP tokenizer, and gets pictures back."""
    return _comfy_folder(cls) == "comfy_api_nodes"


def pure_classes(node_class_mappings: dict) -> frozenset:
    """The classes registered under PURE_TRANSFORMS' names that are ComfyUI's own."""
    return frozenset(cls for name, cls in node_class_mappings.items()
                     if name in PURE_TRANSFORMS and is_stock(cls))
