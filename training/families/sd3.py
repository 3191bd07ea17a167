"""Stable Diffusion 3.5 (id sd3: SD 3.5 Medium and Large, and SD 3 Medium): an MMDiT transformer (joint
attention over image and text tokens) trained with rectified flow, conditioned on two CLIP encoders and T5.

- Recognised by a StableDiffusion3 pipeline or SD3Transformer2DModel in model_index.json, or by diffusers'
  single-file kinds sd3, sd35_medium and sd35_large; a single file is read for its transformer only, so it
  needs base_model_config (the released files ship the text encoders apart). Medium and Large differ by their
  configs only: Medium's first 13 blocks have a second image attention (`dual_attention_layers`), Large has
  38 blocks without one.
- Loading: the transformer can be loaded on its own, from a single file and/or with 8-bit weights
  (quantize_base, for Large's 8 B parameters); under fp16 T5 stays fp32 (its activations overflow). T5 is
  optional: a folder without text_encoder_3 trains on the CLIP states and zeros where T5's would be, as
  StableDiffusion3Pipeline renders it.
- Captions: both CLIPs' penultimate states (77 tokens, padded to T5's width) followed by T5's 256 token
  states, and the two CLIPs' pooled projections side by side, by StableDiffusion3Pipeline.encode_prompt;
  renders with an empty negative prompt (real classifier-free guidance).
- Objective: x_sigma = (1 - sigma) * x0 + sigma * noise; the transformer takes the (B, 16, h, w) latents as
  they are (it patchifies them itself) and the timestep sigma * 1000, and predicts the velocity noise - x0.
- LoRA: the joint attention of every block (image and text projections, Medium's second attention too),
  and with train_text_encoder the two CLIP encoders (T5 never); written as `transformer.<module>` with
  alpha / rank folded into lora_B: diffusers' SD3 loader refuses `.alpha` tensors and ComfyUI ignores the
  adapter config, so a folded file is the one both read at the trained strength.
- Not in the guide: its hardware row is Medium's, estimated from the parameter counts (2.24 B transformer,
  5.6 B of text encoders); plans train in bf16 with AdamW; samples render at guidance 4.5 with natural-language
  captions, as FLUX's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from training.families.base import FROM_PARAMETER_COUNTS, HardwareRow, read_config
from training.families.flow import JOINT_ATTENTION_MODULES, FlowFamily, RectifiedFlow
from training.families.flux import FLUX_CAPTION_ELEMENTS

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource

# The joint attention's projections (and Medium's second image attention, `attn2`, which has the same names), as
# diffusers' SD3 LoRA script adapts them. peft matches the names as module-name suffixes.
SD3_TARGET_MODULES = JOINT_ATTENTION_MODULES
# T5's sequence length: SD 3.5 was trained with 256 tokens (diffusers' and kohya's default).
SD3_T5_TOKENS = 256
# Not in the guide: Medium's row, from its parameter counts at 2 bytes each. The transformer is 2.24 B parameters
# (4.5 GB); CLIP-L 0.12 B + CLIP-G 0.69 B + T5-XXL 4.76 B + VAE 0.08 B = 11.3 GB, which low_vram keeps off the
# GPU. The memory and time figures sit at SDXL's (a 2.6 B UNet at 1024 px), a little above for the 4096 image
# tokens' joint attention.
SD3_HARDWARE = HardwareRow(
    1024, 12, 16, (40, 80), denoiser_gb=4.5, encoders_gb=11.3, estimated=FROM_PARAMETER_COUNTS
)
# Large: the 8.06 B transformer is 16.1 GB at 16 bits, the encoders and VAE as Medium's; its activations are 38 blocks
# of 2432 channels against Medium's 24 of 1536 (about 2.5x), and so is its time per step. On 24 GB it trains with the
# encoders off the GPU (low_vram): 16.1 GB + the LoRA's state + checkpointed activations.
SD35_LARGE_BLOCKS = 38  # Medium has 24
SD35_LARGE_HARDWARE = HardwareRow(
    1024, 24, 32, (100, 200), denoiser_gb=16.1, encoders_gb=11.3, estimated=FROM_PARAMETER_COUNTS
)
# Names of SD 3.x models: sd3, sd3.5, sd35, sd-3.5, stable-diffusion-3.5, stable_diffusion_3.
SD3_NAME = re.compile(r"(^|[^a-z0-9])(sd|stable[-_ ]?diffusion)[-_ ]?3")


class StableDiffusion3(FlowFamily):
    id = "sd3"
    described = "an SD 3.5"
    name = "SD 3.5"
    hardware = SD3_HARDWARE
    told_by_size = False  # 1024 px, as SDXL
    sample_guidance = 4.5  # Medium's model card (Large's says 3.5 to 4.5)
    memory_precision = "bf16"  # T5's activations overflow fp16
    caption_elements = FLUX_CAPTION_ELEMENTS  # T5 reads sentences: the same elements as FLUX's captions
    caption_example = "close-up portrait, in a sunlit studio, soft window light"
    denoiser_class = "SD3Transformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
    pooled_text = True  # both CLIPs' projections
    checkpoint_types = ("sd3", "sd35_medium", "sd35_large")
    fp16_overflows = ("vae", "text_encoder_3")
    lora_target_modules = SD3_TARGET_MODULES
    uses_negative_prompt = True
    # text_states_on_cpu, as FlowFamily's: 333 x 4096 states, 5.5 MB per caption
    kohya_layout_refusal = (
        "kohya's SD 3.5 layout (the MMDiT's fused qkv of joint_blocks) is not written: use diffusers or comfyui, "
        "the layout ComfyUI and diffusers load for SD 3.5"
    )
    single_file_example = "stabilityai/stable-diffusion-3.5-medium"  # the released files hold the encoders apart
    # comfyui_layout "diffusers", as FlowFamily's: `transformer.` names, which ComfyUI maps onto its MMDiT
    fold_alpha = True
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    clip_skip_note = "it is conditioned on both CLIPs' penultimate layers as it was trained"
    caption_reader = f"its CLIPs (77 tokens) and T5 (up to {SD3_T5_TOKENS} tokens) anyway"
    # text_encoder_refusal None: train_text_encoder adapts the two CLIPs

    def named_by(self, name: str) -> bool:
        return SD3_NAME.search(name) is not None

    def hardware_of(self, model_name: str) -> HardwareRow:
        """Large's row for a local folder whose transformer has Large's 38 blocks, else by the name (a hub id
        not downloaded yet: stabilityai/stable-diffusion-3.5-large)."""
        try:
            blocks = read_config(Path(model_name) / "transformer" / "config.json")["num_layers"]
        except (OSError, ValueError, KeyError, TypeError):
            return SD35_LARGE_HARDWARE if "large" in model_name.lower() else SD3_HARDWARE
        return SD35_LARGE_HARDWARE if blocks >= SD35_LARGE_BLOCKS else SD3_HARDWARE

    def recognises(self, index: Mapping, folder: Path) -> bool:
        return str(index.get("_class_name", "")).startswith("StableDiffusion3") or self.denoiser_class in str(
            index.get("transformer")
        )

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def lora_state_dict(self, path, models):
        # diffusers' SD3 reader converts no other layout (no kohya MMDiT names) and takes no alphas: scale 1.
        return self.pipeline_class().lora_state_dict(str(path)), None

    def load_pipeline(self, source: ModelSource, device, dtypes, *, quantize: str):
        """The pipeline from the diffusers folder, its transformer read on its own from a single file or in 8 bits;
        a folder saved without T5 (text_encoder_3 null in model_index.json) loads without it."""
        folder = source.config_folder if source.kind == "single_file" else source.path
        options = {"dtype": dtypes}
        try:
            index = read_config(folder / "model_index.json")
        except (OSError, ValueError):
            index = {}  # from_pretrained says what is missing
        if "text_encoder_3" in index and not any(index["text_encoder_3"] or ()):
            options |= {"text_encoder_3": None, "tokenizer_3": None}  # diffusers refuses a null component otherwise
        if quantize == "8bit" or source.kind == "single_file":
            from training.families.transformer_loading import load_transformer

            options["transformer"] = load_transformer(
                self.transformer_class(), source, device, quantize=quantize, dtype=dtypes["default"]
            )
        return self.pipeline_class().from_pretrained(str(folder), **options)

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        from training.prompts import TextConditioning

        states, _, pooled, _ = model.pipeline.encode_prompt(
            prompts,
            None,
            None,
            device=model.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=SD3_T5_TOKENS,
        )
        return TextConditioning(states.float(), pooled.float())

    def objective(self, model: LoadedModel, config: TrainingConfig) -> SD3Flow:
        return SD3Flow(model, config)

    def lora_models(self, model: LoadedModel) -> dict[str, torch.nn.Module]:
        """The transformer and the two CLIPs (adapted with train_text_encoder); T5 is never adapted."""
        encoders = {name: getattr(model.pipeline, name) for name in ("text_encoder", "text_encoder_2")}
        return {"transformer": model.denoiser, **encoders}

    def meta_lora_models(self, folder: Path) -> dict[str, torch.nn.Module]:
        """The transformer and the two CLIPs, from their configs."""
        import torch
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        clip_configs = {
            name: CLIPTextConfig.from_pretrained(str(folder), subfolder=name)
            for name in ("text_encoder", "text_encoder_2")
        }
        with torch.device("meta"):
            clips = {name: CLIPTextModelWithProjection(config) for name, config in clip_configs.items()}
        return super().meta_lora_models(folder) | clips

    def base_model_version(self, model: LoadedModel) -> str:
        return "sd3"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        """kohya's names: Medium 3.5 has dual-attention blocks; Large 3.5 has none but, as 3.5 Medium, normalises
        q and k; SD 3 Medium does neither."""
        config = model.denoiser.config
        if config.dual_attention_layers:
            return "stable-diffusion-3-5-medium"
        return "stable-diffusion-3-5-large" if config.qk_norm else "stable-diffusion-3-medium"

    def tiny_pipeline(self, spec: TinySpec):
        """An SD3Transformer2DModel of two blocks, the first with Medium's second attention, two CLIP encoders
        with projections (pooled 32 + 32) over the byte-level tokenizer, a T5 encoder as wide as both CLIPs'
        states side by side (the pipeline pads those to T5's width), SD 3.5's 16-channel VAE scaling and shift,
        and its scheduler's shift 3. Its latent size 8 is 64 px; pos_embed_max_size 16 allows up to 256 px."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        from training.models.builtin import (
            byte_level_clip_tokenizer,
            tiny_clip_config,
            tiny_flux_vae,
            tiny_t5,
            tiny_t5_tokenizer,
        )

        clip_tokenizer = byte_level_clip_tokenizer()
        t5_tokenizer = tiny_t5_tokenizer()
        clip_config = tiny_clip_config(clip_tokenizer, num_hidden_layers=2, hidden_act="gelu")
        width = 2 * clip_config.hidden_size  # T5's width: both CLIPs' states side by side
        torch.manual_seed(spec.seed)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=width,
            caption_projection_dim=32,
            pooled_projection_dim=2 * clip_config.projection_dim,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),  # as Medium's first blocks
            qk_norm="rms_norm",
        )
        vae = tiny_flux_vae(spec.seed + 1, scaling_factor=1.5305, shift_factor=0.0609)  # SD 3.5's scaling, shift
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModelWithProjection(clip_config)
        torch.manual_seed(spec.seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        text_encoder_3 = tiny_t5(spec.seed + 4, t5_tokenizer, d_model=width)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD 3.5's
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=clip_tokenizer,
            text_encoder_3=text_encoder_3,
            tokenizer_3=t5_tokenizer,
        )


SD3 = StableDiffusion3()


class SD3Flow(RectifiedFlow):
    """SD 3.5's transformer: the latents as they are (it cuts 2x2 patches itself), the timestep sigma * 1000 (what
    StableDiffusion3Pipeline passes), the text states and the pooled CLIP vectors."""

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        device = self.model.device
        return self.model.denoiser(
            hidden_states=noisy.to(dtype),
            timestep=(sigmas * 1000).to(dtype),
            encoder_hidden_states=batch.conditioning.to(device, dtype),
            pooled_projections=batch.pooled.to(device, dtype),
            return_dict=False,
        )[0]
