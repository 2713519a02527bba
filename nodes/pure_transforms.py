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


def is_stock(cls) -> bool:
    """ComfyUI's own class: defined in nodes.py, or in comfy_extras/, which nodes.py
    load_custom_node loads under the file's path without its suffix as the module name
    (e.g. "/opt/ComfyUI/comfy_extras/nodes_images"), not as "comfy_extras.nodes_images"."""
    module = getattr(cls, "__module__", "") or ""
    if module == "nodes" or module.startswith("comfy_extras."):
        return True
    nodes_file = getattr(sys.modules.get("nodes"), "__file__", None)
    if not nodes_file or not os.path.isabs(module):
        return False
    extras = os.path.join(os.path.dirname(os.path.abspath(nodes_file)), "comfy_extras")
    return os.path.dirname(os.path.normpath(module)) == os.path.normpath(extras)


def pure_classes(node_class_mappings: dict) -> frozenset:
    """The classes registered under PURE_TRANSFORMS' names that are ComfyUI's own."""
    return frozenset(cls for name, cls in node_class_mappings.items()
                     if name in PURE_TRANSFORMS and is_stock(cls))
