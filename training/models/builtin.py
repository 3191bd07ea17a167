"""Built-in tiny base models for offline tests and the demo.

Each is a real Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, scheduler) at toy size with random weights, built
deterministically from a seed and saved as an ordinary diffusers folder under
`<workspace>/models/`. The trainer loads that folder like any other: nothing about the
built-ins is special-cased outside this module.

Sizes: 64 px images, an 8x VAE (8x8 latents, as SD's 512 px -> 64x64), a two-level UNet
with cross-attention at both levels, a 4-layer CLIP text encoder of width 32, and a
byte-level BPE vocabulary of 514 tokens (every byte, as word-inner and word-final token,
plus start/end), so any caption tokenizes without a downloaded vocabulary.

`tiny-sdxl` is a StableDiffusionXLPipeline of the same scale: two text encoders (the second with
a projection, whose pooled output and the size/crop time ids feed the UNet's `text_time`
embedding), cross-attention over both encoders' states (32 + 32), SDXL's VAE scaling factor and
an Euler scheduler, as the real SDXL base has.

`tiny-flux` is a FluxPipeline of the same scale: a FluxTransformer2DModel (one double- and one
single-stream block, guidance embedding), a CLIP encoder for the pooled prompt and a T5 encoder
for the token states, with a T5 tokenizer made from a byte vocabulary, and a 16-channel VAE with
FLUX's scaling and shift (its config's sample size, 64, is the native resolution the trainer reads).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.workspace import DIR_MODE

BUILTIN_PREFIX = "builtin:"
# Bump when a builder changes, so stale caches are rebuilt instead of reused.
BUILDER_VERSION = 1


@dataclass(frozen=True)
class TinySpec:
    description: str
    prediction_type: str  # "epsilon" or "v_prediction"
    # sd2: linear attention projections, gelu text encoder, DDIM scheduler; sdxl: see the module docstring
    family: Literal["sd1", "sd2", "sdxl", "flux"]
    seed: int

    @property
    def sd2(self) -> bool:
        return self.family == "sd2"


BUILTINS: dict[str, TinySpec] = {
    "tiny-sd15": TinySpec("tiny random SD 1.x (epsilon prediction)", "epsilon", family="sd1", seed=1234),
    "tiny-sd2-v": TinySpec("tiny random SD 2.x (v-prediction)", "v_prediction", family="sd2", seed=4321),
    "tiny-sdxl": TinySpec("tiny random SDXL (two text encoders, epsilon)", "epsilon", family="sdxl", seed=2468),
    "tiny-flux": TinySpec("tiny random FLUX-class (flow matching)", "flow_prediction", family="flux", seed=1357),
}


def is_builtin(model_name: str) -> bool:
    return model_name.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + key for key in BUILTINS]


def ensure_builtin(model_name: str, models_root: Path) -> Path:
    """Return the folder of a built-in model, building it on first use.

    The folder appears in one rename, so concurrent first uses never see a half-built model:
    each builds into its own temporary folder and the loser of the rename discards its copy.
    """
    key = model_name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTINS:
        raise KeyError(f"unknown built-in model {model_name!r}; built-ins are: {', '.join(builtin_names())}")
    target = models_root / f"builtin-{key}-v{BUILDER_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    models_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{key}-", dir=models_root))
    try:
        _build_pipeline(BUILTINS[key]).save_pretrained(staging, safe_serialization=True)
        try:
            os.chmod(staging, DIR_MODE)
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_pipeline(spec: TinySpec):
    if spec.family == "sdxl":
        return _build_sdxl_pipeline(spec)
    if spec.family == "flux":
        return _build_flux_pipeline(spec)
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _byte_level_clip_tokenizer()

    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(
        sample_size=8,  # latent side; x8 VAE -> 64 px native resolution
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if spec.sd2 else 8,
        use_linear_projection=spec.sd2,
    )
    vae = _tiny_vae(spec.seed + 1)
    torch.manual_seed(spec.seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, hidden_act="gelu" if spec.sd2 else "quick_gelu"))
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if spec.sd2:
        scheduler = DDIMScheduler(
            **betas, prediction_type=spec.prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
    else:
        scheduler = PNDMScheduler(**betas, skip_prk_steps=True, steps_offset=1, prediction_type=spec.prediction_type)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl_pipeline(spec: TinySpec):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _byte_level_clip_tokenizer()
    text_config = _tiny_clip_config(tokenizer, hidden_act="gelu")
    time_embed_dim = 8  # per time id; SDXL has 6 ids (original size, crop top-left, target size)
    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at the first level
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # both text encoders' states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=text_config.projection_dim + 6 * time_embed_dim,
    )
    # SDXL's scaling factor; its VAE overflows in fp16, so diffusers decodes it in fp32.
    vae = _tiny_vae(spec.seed + 1, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(spec.seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(spec.seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=spec.prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def _build_flux_pipeline(spec: TinySpec):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    clip_tokenizer = _byte_level_clip_tokenizer()
    # T5's SentencePiece vocabulary, rebuilt offline: the special tokens, then every byte symbol.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(symbol, -1.0) for symbol in _byte_symbols()]
    t5_tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=64)
    width = 32
    torch.manual_seed(spec.seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 2x2 patches of the 16-channel latents, packed as FLUX packs them
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width,  # T5 states
        pooled_projection_dim=width,  # CLIP pooled
        guidance_embeds=True,  # as FLUX.1-dev and Flex.1
        axes_dims_rope=(4, 6, 6),  # sums to the head dimension
    )
    vae = _tiny_vae(  # FLUX's 16 latent channels, scaling and shift, no quant convs
        spec.seed + 1,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(spec.seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config(clip_tokenizer, num_hidden_layers=2))
    torch.manual_seed(spec.seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _tiny_vae(seed: int, **overrides):
    """An 8x AutoencoderKL for 64 px images (4 latent channels unless overridden), seeded."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    layout = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    return AutoencoderKL(**{**layout, **overrides})


def _tiny_clip_config(tokenizer, **overrides):
    """A CLIP text encoder of width 32 and 4 layers over the byte-level tokenizer."""
    from transformers import CLIPTextConfig

    layout = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**{**layout, **overrides})


def _byte_level_clip_tokenizer():
    """A CLIPTokenizer whose vocabulary is every byte (word-inner and word-final) and no merges."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that GPT-2/CLIP byte-level BPE uses for the byte values:
    printable Latin-1 bytes stand for themselves, the other 68 map to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
