"""The published configs of the full-size models, as their Hugging Face repositories hold them
(config.json of each component; defaults left out), for building the real architectures on the meta
device without downloading a weight: stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-medium and
-large, lodestones/Chroma1-HD, Qwen/Qwen-Image, Tongyi-MAI/Z-Image-Turbo and black-forest-labs/FLUX.2-dev (the last
six: their scheduler configs too; each block below names where its numbers were read, the gated SD 3.5 repositories
through public copies).

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
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X), as public code copies it verbatim
# (tenstorrent's SD 3.5 FP8 loader; the research's find_string hits 53246397469, 53668838869): 24 joint blocks of
# 24 heads x 64, the first 13 with a second self-attention on the image tokens (attn2, "dual attention").
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,  # CLIP-L's 768 + CLIP-G's 1280 pooled vectors
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-large transformer/config.json (the same copies, and hits 42657771187, 52200000965:
# "byte-identical between both large releases", Large and Large Turbo): 38 blocks of 38 heads, no dual attention.
SD35_LARGE_TRANSFORMER = {
    **SD35_MEDIUM_TRANSFORMER,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "num_attention_heads": 38,
    "num_layers": 38,
    "pos_embed_max_size": 192,
}
# lodestones/Chroma1-HD transformer/config.json: FLUX.1-schnell's 19 + 38 blocks with the per-block modulation
# replaced by one "distilled guidance" approximator (5 layers, 5120 wide); diffusers' ChromaTransformer2DModel
# defaults are this model (diffusers' single_file_utils.py names lodestones/Chroma1-HD its default config), as
# a converter deriving the config from the checkpoint's shapes writes it (research hit 54778455255).
FLUX_MODULATION_INPUTS = ("guidance_embeds", "pooled_projection_dim")
CHROMA_TRANSFORMER = {
    # FLUX.1's blocks without what fed its modulation: no guidance embedding, no pooled CLIP vector
    **{key: value for key, value in FLUX_DEV_TRANSFORMER.items() if key not in FLUX_MODULATION_INPUTS},
    "_class_name": "ChromaTransformer2DModel",
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
    "approximator_num_channels": 64,
}
# Qwen/Qwen-Image transformer/config.json (MMDiT, 20B), as musubi-tuner's qwen_image_model.py quotes it and a
# Qwen-Image-Edit copy states it (research hits 4582033389, 69426042033; the latter: 20,430,401,088 parameters,
# the 40.86 GB of bf16 shards); its stale `pooled_projection_dim` is not a constructor argument and is left out.
QWEN_IMAGE_TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,  # Qwen2.5-VL-7B's hidden size
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}
# "From https://huggingface.co/Tongyi-MAI/Z-Image-Turbo/blob/main/transformer/config.json", as an MLX converter
# and a Rust port's "verbatim upstream" fixture copy it (research hits 14665271616, 56328250317): a single-stream
# DiT of 30 layers, 3840 wide (30 heads x 128), with 2 noise and 2 context refiner layers before them.
Z_IMAGE_TURBO_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,  # Qwen3-4B's hidden size
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
# black-forest-labs/FLUX.2-dev transformer/config.json: diffusers' Flux2Transformer2DModel defaults are this model, as a
# converter deriving the config from BFL's checkpoint writes it and a config copy lists it (48 heads x 128, 8 double
# and 48 single blocks; research hits 52565848514, 58697716367): 6144 wide, Mistral's 3 x 5120 states in.
FLUX2_DEV_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "guidance_embeds": True,
    "in_channels": 128,  # 2x2 patches of the 32-channel latents
    "joint_attention_dim": 15360,  # three Mistral layers' states side by side
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
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
# stabilityai/stable-diffusion-3.5-* text_encoder/config.json: CLIP-L with its 768 x 768 text projection (SD 3.5's
# first pooled vector); its text_encoder_2 is OPENCLIP_BIGG_TEXT and its text_encoder_3 T5_XXL_ENCODER.
CLIP_L_PROJECTED_TEXT = {**CLIP_L_TEXT, "architectures": ["CLIPTextModelWithProjection"]}
# Qwen/Qwen-Image text_encoder/config.json: Qwen2.5-VL-7B-Instruct whole (in transformers' flat layout: the language
# model's keys at the top, its vision tower in vision_config), of which the pipeline reads the language model's last
# hidden states; as public code copies it (find_string '"fullatt_block_indexes": [7, 15, 23, 31]').
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 32,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
    },
    "vocab_size": 152064,
}
# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json (Qwen3-4B; the Rust port's verbatim fixture, research hit
# 56328250317). Its model_index.json loads it as a Qwen3Model (INDEX_CLASSES): the layers without the LM head.
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
# black-forest-labs/FLUX.2-dev text_encoder/config.json: Mistral-Small-3.1-24B whole (language model and its Pixtral
# vision tower, which the pipeline never calls), as a config copy lists it (research hit 58697716367; §3).
MISTRAL_SMALL_31_24B = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "spatial_merge_size": 2,
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "vocab_size": 131072,
    },
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 1540,
        "intermediate_size": 4096,
        "model_type": "pixtral",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
    },
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
# SD 3.5's 16-channel VAE (stabilityai/stable-diffusion-3.5-* vae/config.json): FLUX's layout, its own scale and shift.
SD35_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# Qwen/Qwen-Image vae/config.json: Wan 2.1's causal 3D VAE (8x spatial: 2 ** len(temperal_downsample)), 16 channels,
# with per-channel latent statistics instead of a scale; its published values are AutoencoderKLQwenImage's defaults.
QWEN_IMAGE_VAE = {
    "_class_name": "AutoencoderKLQwenImage",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}
# black-forest-labs/FLUX.2-dev vae/config.json: FLUX.1's layout with 32 latent channels, its quant convs, and the
# batch norm over 2x2 patches of the latents (128 channels) whose statistics normalise them: AutoencoderKLFlux2's
# defaults (research §3).
FLUX2_VAE = {
    "_class_name": "AutoencoderKLFlux2",
    "batch_norm_eps": 0.0001,
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 32,
    "layers_per_block": 2,
    "sample_size": 1024,
}

# The flow-matching schedulers (scheduler/scheduler_config.json): SD 3.5 and Z-Image-Turbo (the Rust fixture) shift
# every schedule by 3; Qwen-Image shifts by the image's token count (up to 8192 tokens, exponentially, the last sigma
# stretched to 0.02: the research's §2.3); Chroma1-HD's is taken as FLUX.1's (by token count up to 4096), not read
# from its repository. No test here reads a scheduler: they complete the folders a family's loader sees.
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
SHIFTED_SCHEDULER = {**FLOW_SCHEDULER, "shift": 3.0}
CHROMA_SCHEDULER = {
    **FLOW_SCHEDULER,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
QWEN_IMAGE_SCHEDULER = {
    **FLOW_SCHEDULER,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
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
    "sd35-medium": (
        "StableDiffusion3Pipeline",
        {
            "transformer": SD35_MEDIUM_TRANSFORMER,
            "text_encoder": CLIP_L_PROJECTED_TEXT,
            "text_encoder_2": OPENCLIP_BIGG_TEXT,
            "text_encoder_3": T5_XXL_ENCODER,
            "vae": SD35_VAE,
            "scheduler": SHIFTED_SCHEDULER,
        },
    ),
    "sd35-large": (
        "StableDiffusion3Pipeline",
        {
            "transformer": SD35_LARGE_TRANSFORMER,
            "text_encoder": CLIP_L_PROJECTED_TEXT,
            "text_encoder_2": OPENCLIP_BIGG_TEXT,
            "text_encoder_3": T5_XXL_ENCODER,
            "vae": SD35_VAE,
            "scheduler": SHIFTED_SCHEDULER,
        },
    ),
    "chroma1-hd": (
        "ChromaPipeline",
        {
            "transformer": CHROMA_TRANSFORMER,
            "text_encoder": T5_XXL_ENCODER,
            "vae": FLUX_VAE,
            "scheduler": CHROMA_SCHEDULER,
        },
    ),
    "qwen-image": (
        "QwenImagePipeline",
        {
            "transformer": QWEN_IMAGE_TRANSFORMER,
            "text_encoder": QWEN25_VL_7B,
            "vae": QWEN_IMAGE_VAE,
            "scheduler": QWEN_IMAGE_SCHEDULER,
        },
    ),
    "z-image-turbo": (
        "ZImagePipeline",
        {
            "transformer": Z_IMAGE_TURBO_TRANSFORMER,
            "text_encoder": QWEN3_4B,
            "vae": FLUX_VAE,  # FLUX.1's VAE, as the same fixture shows
            "scheduler": SHIFTED_SCHEDULER,
        },
    ),    "flux2-dev": (
        "Flux2Pipeline",
        {
            "transformer": FLUX2_DEV_TRANSFORMER,
            "text_encoder": MISTRAL_SMALL_31_24B,
            "vae": FLUX2_VAE,
            "scheduler": CHROMA_SCHEDULER,  # FLUX.1's shift by token count, as Chroma's (not read from its repository)
        },
    ),
}
# model_index.json's class where it is not the config's first architecture (a transformers model loaded headless).
INDEX_CLASSES = {"z-image-turbo": {"text_encoder": "Qwen3Model"}}


def write_model_folder(model: str, folder: Path) -> Path:
    """`model`'s configs as a diffusers folder without weights; model_index.json names each component's
    library and class as diffusers writes them (a diffusers config's `_class_name`, a transformers one's
    `architectures`)."""
    pipeline, components = MODELS[model]
    index = {"_class_name": pipeline}
    for name, config in components.items():
        diffusers = "_class_name" in config
        index[name] = ["diffusers", config["_class_name"]] if diffusers else ["transformers", *config["architectures"]]
        if name in INDEX_CLASSES.get(model, {}):
            index[name][1] = INDEX_CLASSES[model][name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    for name, config in components.items():
        (folder / name).mkdir(exist_ok=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"  # diffusers' names for them
        (folder / name / file).write_text(json.dumps(config), encoding="utf-8")
    return folder
