"""A tiny Stable Diffusion 1.5 checkpoint with random weights, for the real-Forge / A1111 suites.

`build_tiny_sd15(path)` writes a single-file checkpoint in the original (LDM) SD1.5 layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`)
as .safetensors. The models are made from diffusers / transformers configs with random weights:

- UNet: two levels instead of four (block_out_channels 320, 640; one res block per level;
  cross-attention on the first level and in the middle block). Forge's huggingface_guess still
  detects it as SD15, since that only asks for model_channels 320, context_dim 768, conv
  proj_in and no ADM input; the UNet is then built from the guessed config.
- VAE and CLIP-L text encoder: full SD1.5 size, because Forge builds those two from its fixed
  configs (backend/huggingface/runwayml/stable-diffusion-v1-5/{vae,text_encoder}/config.json)
  and would leave missing weights uninitialised.

Stored as float16 (about 0.45 GB). 64x64 at 1 step then takes seconds on CPU; the images are
noise. Needs torch, safetensors, diffusers and transformers in the running interpreter (Forge's
venv has them); otherwise ImportError says so.

    python tests/forge_checkpoint.py /path/to/webui/models/Stable-diffusion/tiny_sd15.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

UNET_BLOCK_OUT = (320, 640)
UNET_LAYERS_PER_BLOCK = 1

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": UNET_BLOCK_OUT,
    "layers_per_block": UNET_LAYERS_PER_BLOCK,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' name for SD1.5's num_heads=8
    "norm_num_groups": 32,
    "use_linear_projection": False,
}

# runwayml/stable-diffusion-v1-5 vae/config.json
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}

# openai/clip-vit-large-patch14 text model, as in runwayml/stable-diffusion-v1-5 text_encoder/config.json
CLIP_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}


def _require():
    missing = []
    for name in ("torch", "safetensors", "diffusers", "transformers"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            "build_tiny_sd15 needs " + ", ".join(missing) + " in this interpreter "
            f"({sys.executable}); run it with a Forge/A1111 venv's python, which has them "
            "(e.g. $FORGE_DIR/venv/bin/python tests/forge_checkpoint.py OUT.safetensors)"
        )


def _resnet_map(hf: str, sd: str) -> dict[str, str]:
    return {
        f"{hf}norm1.": f"{sd}in_layers.0.",
        f"{hf}conv1.": f"{sd}in_layers.2.",
        f"{hf}time_emb_proj.": f"{sd}emb_layers.1.",
        f"{hf}norm2.": f"{sd}out_layers.0.",
        f"{hf}conv2.": f"{sd}out_layers.3.",
        f"{hf}conv_shortcut.": f"{sd}skip_connection.",
    }


def _unet_to_ldm(sd: dict, down_types, up_types, layers: int) -> dict:
    """diffusers UNet2DConditionModel keys -> LDM openaimodel keys, for any number of levels."""
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }
    prefixes.update(_resnet_map("mid_block.resnets.0.", "middle_block.0."))
    prefixes.update(_resnet_map("mid_block.resnets.1.", "middle_block.2."))
    n = len(down_types)
    for i in range(n):
        for j in range(layers):
            idx = 1 + i * (layers + 1) + j
            prefixes.update(_resnet_map(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."))
            if "CrossAttn" in down_types[i]:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{idx}.1."
        if i < n - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
    for i in range(n):
        has_attn = "CrossAttn" in up_types[i]
        for j in range(layers + 1):
            idx = i * (layers + 1) + j
            prefixes.update(_resnet_map(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."))
            if has_attn:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{idx}.1."
        if i < n - 1:
            idx = i * (layers + 1) + layers
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{idx}.{2 if has_attn else 1}."
    out = {}
    for k, v in sd.items():
        for hf, ldm in prefixes.items():
            if k.startswith(hf):
                out[ldm + k[len(hf):]] = v
                break
        else:
            raise KeyError(f"no LDM name for UNet key {k}")
    return out


def _vae_to_ldm(sd: dict) -> dict:
    """diffusers AutoencoderKL keys -> LDM first_stage_model keys (the SD1.5 4-level VAE)."""
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for k, v in sd.items():
        name = k
        for ldm, hf in pairs:
            name = name.replace(hf, ldm)
        if "attentions" in k or "mid.attn_1." in name:
            for ldm, hf in attn:
                name = name.replace(hf, ldm)
            if name.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")) and v.ndim == 2:
                v = v[:, :, None, None]  # linear -> 1x1 conv, as the LDM VAE stores them
        out[name] = v
    return out


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """Write a random-weight SD1.5-layout checkpoint to `path` (.safetensors) and return the path."""
    _require()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the checkpoint must end in .safetensors")
    torch.manual_seed(seed)
    with torch.no_grad():
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))

        state: dict[str, torch.Tensor] = {}
        for k, v in _unet_to_ldm(unet.state_dict(), UNET_CONFIG["down_block_types"],
                                 UNET_CONFIG["up_block_types"], UNET_LAYERS_PER_BLOCK).items():
            state["model.diffusion_model." + k] = v
        for k, v in _vae_to_ldm(vae.state_dict()).items():
            state["first_stage_model." + k] = v
        for k, v in clip.state_dict().items():
            if k.endswith("position_ids"):
                continue
            state["cond_stage_model.transformer." + k] = v
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    _save_sorted(state, tmp, {"format": "pt", "note": "random weights, SD1.5 layout, tests only"})
    tmp.replace(path)
    return path


def _save_sorted(state: dict, path: Path, metadata: dict) -> None:
    """Write .safetensors with the tensors in name order, so one seed gives the same bytes (and the
    same model hash in the UI) every time; safetensors.torch.save_file's order varies between runs."""
    import json
    import struct

    import torch

    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this writer assumes a little-endian machine")
    header: dict = {"__metadata__": metadata}
    offset = 0
    names = sorted(state)
    for name in names:
        t = state[name]
        if t.dtype != torch.float16:
            raise TypeError(f"{name}: expected float16, got {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(state[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny random-weight SD1.5 checkpoint (.safetensors).")
    ap.add_argument("out", type=Path, help="e.g. $FORGE_DIR/models/Stable-diffusion/tiny_sd15.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        out = build_tiny_sd15(args.out, seed=args.seed)
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{out} ({out.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
