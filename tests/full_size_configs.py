"""The published configs of the full-size models, as their Hugging Face repositories hold them
(config.json of each component; defaults left out), for building the real architectures on the meta
device without downloading a weight: stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0 and black-forest-labs/FLUX.1-dev.

`write_model_folder` writes one as a diffusers folder of configs only (model_index.json and each
component's config.json), which the trainer's own family recognition and meta-model building read.
"""

from __future__ import annotations

import json
from pathlib import Path

SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": SD_DOWN_BLOCKS,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": SD_UP_BLOCKS,
}
# SD 2.1 (768-v): per-level head dims (64 channels a head), linear projections, 1024-wide OpenCLIP-H states.
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # pooled bigG (1280) + 6 size ids x 256
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower: SD 1.5's encoder, SDXL's first, FLUX's CLIP
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# OpenCLIP ViT-H/14's text tower as SD 2.x ships it: the last of its 24 layers is dropped (23 layers).
OPENCLIP_H_TEXT = {
    **CLIP_L_TEXT,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
OPENCLIP_BIGG_TEXT = {  # SDXL's second encoder, with its 1280 x 1280 text projection (the pooled vector)
    **CLIP_L_TEXT,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
T5_XXL_ENCODER = {  # google/t5-v1_1-xxl's encoder, FLUX's text_encoder_2
    "architectures": ["T5EncoderModel"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "model_type": "t5",
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_VAE = {**SD_VAE, "sample_size": 768}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
FLUX_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# Per model: model_index.json's pipeline class and each component's config.
MODELS = {
    "sd15": ("StableDiffusionPipeline", {"unet": SD15_UNET, "text_encoder": CLIP_L_TEXT, "vae": SD_VAE}),
    "sd21": ("StableDiffusionPipeline", {"unet": SD21_UNET, "text_encoder": OPENCLIP_H_TEXT, "vae": SD21_VAE}),
    "sdxl": (
        "StableDiffusionXLPipeline",
        {"unet": SDXL_UNET, "text_encoder": CLIP_L_TEXT, "text_encoder_2": OPENCLIP_BIGG_TEXT, "vae": SDXL_VAE},
    ),
    "flux-dev": (
        "FluxPipeline",
        {
            "transformer": FLUX_DEV_TRANSFORMER,
            "text_encoder": CLIP_L_TEXT,
            "text_encoder_2": T5_XXL_ENCODER,
            "vae": FLUX_VAE,
        },
    ),
}


def write_model_folder(model: str, folder: Path) -> Path:
    """`model`'s configs as a diffusers folder without weights; model_index.json names each component's
    library and class as diffusers writes them (a diffusers config's `_class_name`, a transformers one's
    `architectures`)."""
    pipeline, components = MODELS[model]
    index = {"_class_name": pipeline}
    for name, config in components.items():
        diffusers = "_class_name" in config
        index[name] = ["diffusers", config["_class_name"]] if diffusers else ["transformers", *config["architectures"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    for name, config in components.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
