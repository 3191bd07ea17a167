"""Test helper: turn a diffusers Stable Diffusion 1.x/2.x pipeline folder into one state dict in
the original (LDM / CompVis) single-file key layout, as found in the .safetensors checkpoints
people download from Civitai:

    model.diffusion_model.*                     the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                         the VAE (encoder.down / mid / decoder.up)
    cond_stage_model.transformer.text_model.*   the CLIP text encoder (Hugging Face CLIP names)

It is the inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), written independently and
driven by the folder's configs (number of levels, layers per block, which blocks have attention),
so it works for any SD-shaped UNet/VAE, not only the tiny built-ins. Every diffusers tensor must
map to exactly one LDM key: an unmapped or doubly mapped tensor raises, so nothing is silently
dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D (UNet) -> LDM ResBlock
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D (VAE) -> LDM ResnetBlock
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# diffusers Attention (VAE mid block) -> LDM AttnBlock, whose q/k/v/proj_out are 1x1 convs
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm(pipeline_folder: str | Path) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, text encoder) as one LDM-layout state dict."""
    folder = Path(pipeline_folder)
    checkpoint: dict[str, torch.Tensor] = {}
    for prefix, converted in (
        (UNET_PREFIX, unet_to_ldm(_weights(folder / "unet"), _config(folder / "unet"))),
        (VAE_PREFIX, vae_to_ldm(_weights(folder / "vae"), _config(folder / "vae"))),
        (CLIP_PREFIX, clip_to_ldm(_weights(folder / "text_encoder"))),
    ):
        checkpoint.update({prefix + key: value for key, value in converted.items()})
    return checkpoint


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM UNetModel keys (without `model.diffusion_model.`)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise NotImplementedError("per-level layers_per_block has no single LDM numbering")
    levels = len(config["block_out_channels"])
    # (diffusers prefix, LDM prefix, kind); kind says how the names inside the module change
    modules: list[tuple[str, str, str]] = [
        ("time_embedding.linear_1", "time_embed.0", "same"),
        ("time_embedding.linear_2", "time_embed.2", "same"),
        ("conv_in", "input_blocks.0.0", "same"),
        ("conv_norm_out", "out.0", "same"),
        ("conv_out", "out.2", "same"),
    ]

    # Down path: input block 0 is conv_in; each level then has `layers` (resnet [+ attention])
    # blocks, and every level but the last one more block holding only the downsampler.
    block = 1
    for level in range(levels):
        for layer in range(layers):
            modules.append((f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{block}.0", "unet_resnet"))
            modules.append((f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{block}.1", "same"))
            block += 1
        if level < levels - 1:
            modules.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{block}.0.op", "same"))
            block += 1

    # Middle: resnet, attention, resnet.
    modules += [
        ("mid_block.resnets.0", "middle_block.0", "unet_resnet"),
        ("mid_block.attentions.0", "middle_block.1", "same"),
        ("mid_block.resnets.1", "middle_block.2", "unet_resnet"),
    ]

    # Up path: each level has `layers + 1` output blocks (resnet [+ attention]); the last one of
    # every level but the last also holds the upsampler, after the attention when there is one.
    up_types = config["up_block_types"]
    block = 0
    for level in range(levels):
        has_attention = "CrossAttn" in up_types[level]
        for layer in range(layers + 1):
            modules.append((f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{block}.0", "unet_resnet"))
            if has_attention:
                modules.append((f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{block}.1", "same"))
            if layer == layers and level < levels - 1:
                slot = 2 if has_attention else 1
                modules.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{block}.{slot}.conv", "same"))
            block += 1

    return _rename(state_dict, modules, "UNet")


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM AutoencoderKL keys (without `first_stage_model.`)."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    modules: list[tuple[str, str, str]] = [
        ("quant_conv", "quant_conv", "same"),
        ("post_quant_conv", "post_quant_conv", "same"),
    ]
    for part in ("encoder", "decoder"):
        modules += [
            (f"{part}.conv_in", f"{part}.conv_in", "same"),
            (f"{part}.conv_norm_out", f"{part}.norm_out", "same"),
            (f"{part}.conv_out", f"{part}.conv_out", "same"),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "vae_resnet"),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "vae_resnet"),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "vae_attention"),
        ]
    for level in range(levels):
        # Encoder levels keep their order. LDM numbers the decoder's `up` levels by resolution
        # (up.0 is the last, full-resolution one), diffusers by run order: up_blocks.i is up.{levels-1-i}.
        down, up = f"encoder.down_blocks.{level}", f"decoder.up_blocks.{level}"
        ldm_down, ldm_up = f"encoder.down.{level}", f"decoder.up.{levels - 1 - level}"
        for layer in range(layers):
            modules.append((f"{down}.resnets.{layer}", f"{ldm_down}.block.{layer}", "vae_resnet"))
        for layer in range(layers + 1):
            modules.append((f"{up}.resnets.{layer}", f"{ldm_up}.block.{layer}", "vae_resnet"))
        if level < levels - 1:
            modules.append((f"{down}.downsamplers.0.conv", f"{ldm_down}.downsample.conv", "same"))
            modules.append((f"{up}.upsamplers.0.conv", f"{ldm_up}.upsample.conv", "same"))
    return _rename(state_dict, modules, "VAE")


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPTextModel keys -> the keys under `cond_stage_model.transformer.text_model.`.

    transformers >= 5.6 saves CLIPTextModel flat (`encoder.layers.0...`), older versions under
    `text_model.`; the LDM layout always has the `text_model.` level, which the prefix supplies."""
    return {key.removeprefix("text_model."): value for key, value in state_dict.items()}


def _rename(
    state_dict: dict[str, torch.Tensor], modules: list[tuple[str, str, str]], what: str
) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for diffusers_prefix, ldm_prefix, kind in modules:
        for key, value in state_dict.items():
            if not key.startswith(diffusers_prefix + "."):
                continue
            rest = key[len(diffusers_prefix) + 1 :]
            if kind == "unet_resnet":
                rest = _rename_leaf(rest, _UNET_RESNET, key)
            elif kind == "vae_resnet":
                rest = _rename_leaf(rest, _VAE_RESNET, key)
            elif kind == "vae_attention":
                rest = _rename_leaf(rest, _VAE_ATTENTION, key)
                if rest.endswith(".weight") and value.ndim == 2:
                    value = value[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
            ldm_key = f"{ldm_prefix}.{rest}"
            if key in used or ldm_key in renamed:
                raise ValueError(f"{what}: {key} maps twice (to {ldm_key})")
            used.add(key)
            renamed[ldm_key] = value.contiguous()
    unmapped = sorted(set(state_dict) - used)
    if unmapped:
        raise ValueError(f"{what}: no LDM name for {len(unmapped)} tensors, e.g. {unmapped[:5]}")
    return renamed


def _rename_leaf(rest: str, names: dict[str, str], key: str) -> str:
    module, _, parameter = rest.rpartition(".")
    if module not in names:
        raise ValueError(f"unexpected tensor {key}")
    return f"{names[module]}.{parameter}"


def _weights(component: Path) -> dict[str, torch.Tensor]:
    files = sorted(component.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {component}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if re.search(r"\.fp16\.|\.bf16\.", file.name):
            continue
        weights.update(load_file(file))
    return weights


def _config(component: Path) -> dict:
    return json.loads((component / "config.json").read_text(encoding="utf-8"))
