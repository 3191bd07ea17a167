"""The full-size architectures, without a weight: SD 1.5, SD 2.1, SDXL, FLUX.1-dev, SD 3.5 Medium and Large,
Chroma1-HD, Qwen-Image, Z-Image-Turbo and FLUX.2-dev built on the meta device from their published configs
(tests/full_size_configs.py), through the trainer's own recognition, meta-model building, LoRA attachment
and LoRA-file writing. What the tiny built-in models cannot show:
how many layers a real LoRA adapts, that every key of a written file names a layer of the real model
with its real shape, and that the memory estimate's weights are the real parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from full_size_configs import MODELS, write_model_folder
from training.convert import empty_models
from training.estimates import LORA_PARAMS_PER_RANK
from training.export import write_lora_file
from training.families import FAMILIES, ModelFamily, detect_family, read_geometry
from training.lora import attach_lora, lora_components, lora_state_dict, read_lora_file
from training.models.loading import LoadedModel
from training.models.source import ModelSource

FAMILY = {
    "sd15": "sd1",
    "sd21": "sd2",
    "sdxl": "sdxl",
    "flux-dev": "flux",
    "sd35-medium": "sd3",
    "sd35-large": "sd3",
    "chroma1-hd": "chroma",
    "qwen-image": "qwen_image",
    "z-image-turbo": "z_image",
    "flux2-dev": "flux2",
}

# Layers a LoRA adapts, with train_text_encoder (the trainer adapts FLUX's transformer only).
# UNets: to_q, to_k, to_v, to_out.0 of both attentions (self, cross) of every transformer block.
#   SD 1.x/2.x: 2 blocks in each of 3 down levels + 1 in the middle + 3 in each of 3 up levels = 16 blocks,
#   x 2 attentions x 4 = 128.
#   SDXL: transformer_layers_per_block (1, 2, 10) at its two attention levels (640, 1280 channels): down
#   2 x 2 + 2 x 10 = 24, middle 10, up (3 attentions each, the levels reversed) 3 x 10 + 3 x 2 = 36:
#   70 blocks x 2 x 4 = 560.
# FLUX: 19 double-stream blocks x 12 (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, ff and ff_context
#   net.0.proj and net.2) = 228, and 38 single-stream blocks x 5 (to_q/k/v, proj_mlp, proj_out; no to_out)
#   = 190: 418; the transformer's final proj_out (excluded) is not one of them.
# CLIP: q_proj, k_proj, v_proj, out_proj per layer: CLIP-L 12 x 4 = 48, OpenCLIP-H 23 x 4 = 92,
#   OpenCLIP-bigG 32 x 4 = 128 (SD 3.5's two CLIPs as SDXL's; its T5 is never adapted).
# SD 3.5: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out of each joint block, but the last block's text stream
#   ends before its output (context_pre_only: no to_add_out): Medium 24 x 8 - 1 = 191, + to_q/k/v, to_out.0 of
#   the 13 dual-attention blocks' attn2 (52) = 243; Large 38 x 8 - 1 = 303.
# Chroma: FLUX's blocks and targets (its modulation is one approximator outside the blocks): FLUX's 418.
# Qwen-Image: the same 8 attention projections of each of its 60 dual-stream blocks: 480.
# Z-Image: to_q/k/v, to_out.0 of the 30 main layers, the 2 noise and the 2 context refiner layers: 34 x 4 = 136.
# FLUX.2: the 8 attention projections of each of 8 double blocks (64) and the fused qkv + MLP input
#   (to_qkv_mlp_proj) of each of 48 single blocks: 112.
ADAPTED = {
    "sd15": {"unet": 128, "text_encoder": 48},
    "sd21": {"unet": 128, "text_encoder": 92},
    "sdxl": {"unet": 560, "text_encoder": 48, "text_encoder_2": 128},
    "flux-dev": {"transformer": 418},
    "sd35-medium": {"transformer": 243, "text_encoder": 48, "text_encoder_2": 128},
    "sd35-large": {"transformer": 303, "text_encoder": 48, "text_encoder_2": 128},
    "chroma1-hd": {"transformer": 418},
    "qwen-image": {"transformer": 480},
    "z-image-turbo": {"transformer": 136},
    "flux2-dev": {"transformer": 112},
}
# LoRA parameters per unit of rank: sum of in + out features of the adapted layers. SD 1.5's UNet: per
# transformer block of width C, self-attention 4 x 2C and cross-attention 2 x 2C + 2 x (768 + C), i.e.
# 14C + 1536; 5 blocks at 320, 5 at 640, 6 at 1280 channels: 199,296.
# The transformers' adapted layers are all square, heads x head dim wide (the text stream projected to it first):
# SD 3.5 Medium 24 x 64 = 1536, 243 x 2 x 1536 = 746,496; Large 38 x 64 = 2432, 303 x 2 x 2432 = 1,473,792;
# Chroma FLUX's 4,085,760; Qwen-Image 24 x 128 = 3072, 480 x 2 x 3072 = 2,949,120; Z-Image 3840 (30 heads and 30
# key/value heads of 128), 136 x 2 x 3840 = 1,044,480. FLUX.2 (48 x 128 = 6144 wide): 64 x 2 x 6144 = 786,432 in the
# double blocks, and its single blocks' fused input is not square: 48 x (6144 in + 3 x 6144 of q, k, v + 2 x 18432 of
# the gated MLP out) = 2,949,120; 3,735,552 in all.
LORA_PARAMS_PER_RANK_OF = {
    "sd15": {"unet": 199_296, "text_encoder": 12 * 8 * 768},
    "sd21": {"unet": 207_488, "text_encoder": 23 * 8 * 1024},
    "sdxl": {"unet": 1_451_520, "text_encoder": 12 * 8 * 768, "text_encoder_2": 32 * 8 * 1280},
    "flux-dev": {"transformer": 4_085_760},
    "sd35-medium": {"transformer": 746_496, "text_encoder": 12 * 8 * 768, "text_encoder_2": 32 * 8 * 1280},
    "sd35-large": {"transformer": 1_473_792, "text_encoder": 12 * 8 * 768, "text_encoder_2": 32 * 8 * 1280},
    "chroma1-hd": {"transformer": 4_085_760},
    "qwen-image": {"transformer": 2_949_120},
    "z-image-turbo": {"transformer": 1_044_480},
    "flux2-dev": {"transformer": 3_735_552},
}
# Parameter counts of the published models (the model cards' 860M UNet, 2.6B SDXL UNet, 12B FLUX transformer).
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd21": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
    "flux-dev": {
        "transformer": 11_901_408_320,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,  # T5-XXL's encoder, with its 32128 x 4096 embedding
        "vae": 83_819_683,
    },
    # SD 3.5: CLIP-L with its 768 x 768 projection (123,060,480 + 589,824), SDXL's CLIP-G, FLUX's T5 and VAE layout.
    "sd35-medium": {
        "transformer": 2_243_171_520,
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
        "vae": 83_819_683,
    },
    "sd35-large": {
        "transformer": 8_056_627_520,
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
        "vae": 83_819_683,
    },
    "chroma1-hd": {"transformer": 8_899_983_424, "text_encoder": 4_762_310_656, "vae": 83_819_683},
    "qwen-image": {
        "transformer": 20_430_401_088,  # the 20B of its model card, 40.86 GB of bf16 shards
        # Qwen2.5-VL-7B whole: its language model (7.07B), LM head (0.55B) and vision tower (0.68B), all loaded
        "text_encoder": 8_292_166_656,
        "vae": 126_892_531,
    },
    "z-image-turbo": {"transformer": 6_154_908_736, "text_encoder": 4_022_468_096, "vae": 83_819_683},
    "flux2-dev": {
        "transformer": 32_223_281_152,  # the 32 B of its model card
        "text_encoder": 23_340_272_640,  # Mistral-Small-3.1-24B whole: language model, LM head and vision tower
        "vae": 84_046_115,
    },
}
# The hardware rows hold GB rounded to 0.1: each must be within half of that of the counted weights.
ROUNDING_GB = 0.05
# Components the guide's rows hold in 8 bits: its FLUX row's 24 GB leave room for the 12B transformer and T5
# only at 8 bits, as ai-toolkit quantizes them. quantize_base quantizes the transformer alone; this trainer's
# T5 stays at 16 bits (9.5 GB), which low_vram keeps off the GPU: the estimate errs on the safe side there.
# The rows of the families not in the guide (from_guide=False) hold the transformer in 8 bits where plans quantize
# it (Chroma, Qwen-Image, FLUX.2), the encoders at 16 bits.
EIGHT_BIT = {
    "flux-dev": ("transformer", "text_encoder_2"),
    "chroma1-hd": ("transformer",),
    "qwen-image": ("transformer",),
    "flux2-dev": ("transformer",),
}


@dataclass
class FullSize:
    model: str
    folder: Path
    family: ModelFamily
    loaded: LoadedModel  # its pipeline: every component on the meta device
    lora_models: dict[str, torch.nn.Module]  # as the trainer adapts them, with train_text_encoder


def build_full_size(model: str, folder: Path) -> FullSize:
    """The model's components on the meta device: those a LoRA may adapt as LoRA conversion builds them (the
    family's meta_lora_models), every other one of model_index.json (the other text encoders, the VAE) from
    its config by the class the index names; the LoRA (rank 1) on the layers training adapts."""
    write_model_folder(model, folder)
    family = FAMILIES[FAMILY[model]]
    parts = empty_models(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        for name, entry in index.items():
            # the scheduler holds no weights; "_class_name" and the like are the index's own keys
            if isinstance(entry, list) and name not in parts and name != "scheduler":
                parts[name] = meta_component(folder / name, *entry)
    native, step = read_geometry(folder)
    loaded = LoadedModel(
        source=ModelSource("folder", folder),
        pipeline=SimpleNamespace(**parts),
        noise_scheduler=None,
        family=family.id,
        native_resolution=native,
        vae_scale_factor=family.vae_scale_factor(parts["vae"].config),
        bucket_step=step,
    )
    lora_models = loaded.lora_models
    attach_lora(lora_models, rank=1, alpha=1.0, dropout=0.0, seed=0, train_text_encoder=True)
    return FullSize(model, folder, family, loaded, lora_models)


def meta_component(folder: Path, library: str, class_name: str) -> torch.nn.Module:
    """A pipeline component from its config.json, as from_pretrained would build it before reading weights
    (under the caller's meta device)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if library == "diffusers":
        return getattr(diffusers, class_name).from_config(config)
    return getattr(transformers, class_name)(transformers.AutoConfig.for_model(**config))


@pytest.fixture(scope="module", params=list(MODELS))
def full_size(request, tmp_path_factory) -> FullSize:
    return build_full_size(request.param, tmp_path_factory.mktemp(request.param))


def adapted_layers(models: dict[str, torch.nn.Module]) -> dict[str, LoraLayer]:
    return {
        f"{prefix}.{name}": module
        for prefix, model in lora_components(models).items()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def test_the_family_is_read_from_the_published_configs(full_size):
    assert detect_family(ModelSource("folder", full_size.folder)) == full_size.family.id
    assert full_size.loaded.native_resolution == full_size.family.hardware.native  # 512, 768, 1024, 1024


def test_lora_adapts_the_layers_of_the_full_size_model(full_size):
    layers = adapted_layers(full_size.lora_models)
    counts = {prefix: sum(name.startswith(f"{prefix}.") for name in layers) for prefix in full_size.lora_models}
    assert counts == ADAPTED[full_size.model]
    per_rank = dict.fromkeys(full_size.lora_models, 0)
    for name, layer in layers.items():
        per_rank[name.split(".", 1)[0]] += layer.in_features + layer.out_features
    assert per_rank == LORA_PARAMS_PER_RANK_OF[full_size.model]


def written_layouts(family: ModelFamily) -> list[str]:
    """The layouts a LoRA of the family is written in (comfyui is one of them): kohya, unless the family
    refuses it, and diffusers."""
    return ["diffusers"] if family.kohya_layout_refusal else ["kohya", "diffusers"]


def test_every_exported_key_names_a_layer_of_the_full_size_model(full_size, tmp_path):
    """The trainer's files (kohya and diffusers; FLUX, Chroma: diffusers with alphas; SD 3.5, Qwen-Image,
    Z-Image: diffusers with alpha folded into lora_B) of a LoRA on every adapted layer: each key maps to a
    linear layer of an unadapted full-size model (kohya by its flattened name) with the LoRA's shapes, every
    adapted layer is in the file, and the trainer reads each file back whole."""
    family, models = full_size.family, full_size.lora_models
    state = {key: torch.zeros(value.shape) for key, value in lora_state_dict(models).items()}
    adapter_configs = {prefix: m.peft_config["default"].to_dict() for prefix, m in lora_components(models).items()}
    adapted = set(adapted_layers(models))
    reference = empty_models(full_size.folder)  # the same architecture without adapters: the layers a file names
    for layout in written_layouts(family):
        path = write_lora_file(
            tmp_path / f"{layout}.safetensors",
            state,
            alpha=1.0,
            output_format=layout,
            metadata={},
            adapter_configs=adapter_configs,
            family=family,
        )
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        named = kohya_layers(shapes, reference) if layout == "kohya" else diffusers_layers(shapes, reference, family)
        assert set(named) == adapted, layout
        for name, (down, up) in named.items():
            prefix, module_name = name.split(".", 1)
            layer = reference[prefix].get_submodule(module_name)
            assert isinstance(layer, torch.nn.Linear), name
            assert down == (1, layer.in_features) and up == (layer.out_features, 1), name
        assert set(read_lora_file(path, reference)) == adapted


KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def kohya_layers(shapes: dict[str, tuple], reference: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """{'<prefix>.<module>': (down shape, up shape)} of a kohya file: kohya names a module by its path with
    dots made underscores, after lora_unet_, lora_te_ (SD 1.x/2.x) or lora_te1_ / lora_te2_ (SDXL), and the
    text encoders' paths under CLIP's original `text_model.` wrapper."""
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    if "text_encoder_2" in reference:
        kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    by_kohya_name = {}
    for prefix, model in reference.items():
        for name, module in model.named_modules():
            # transformers 5's CLIPTextModel has no text_model wrapper; CLIPTextModelWithProjection keeps it.
            wrapped = f"text_model.{name}" if prefix.startswith("text_encoder") and "text_model." not in name else name
            if isinstance(module, torch.nn.Linear):
                by_kohya_name[kohya_prefixes[prefix] + wrapped.replace(".", "_")] = f"{prefix}.{name}"
    stems = {key.removesuffix(suffix) for key in shapes for suffix in KOHYA_SUFFIXES if key.endswith(suffix)}
    assert len(stems) * 3 == len(shapes)  # down, up and alpha of each module, and nothing else
    assert stems <= set(by_kohya_name), sorted(stems - set(by_kohya_name))[:5]
    return {by_kohya_name[s]: (shapes[f"{s}.lora_down.weight"], shapes[f"{s}.lora_up.weight"]) for s in stems}


def diffusers_layers(shapes: dict[str, tuple], reference: dict[str, torch.nn.Module], family: ModelFamily) -> dict:
    """{'<prefix>.<module>': (lora_A shape, lora_B shape)} of a diffusers file: peft's module paths after the
    model's prefix (text encoders under `text_model.`), with an `.alpha` per module for FLUX."""
    suffixes = (".lora_A.weight", ".lora_B.weight") + ((".alpha",) if family.alpha_tensors else ())
    stems = {key.removesuffix(suffix) for key in shapes for suffix in suffixes if key.endswith(suffix)}
    assert len(stems) * len(suffixes) == len(shapes)
    modules = {f"{prefix}.{name}" for prefix, model in reference.items() for name, _ in model.named_modules()}
    layers = {}
    for stem in stems:
        prefix, module = stem.split(".", 1)
        if stem not in modules and prefix.startswith("text_encoder"):
            module = module.removeprefix("text_model.")  # written canonically, built without the wrapper
        layers[f"{prefix}.{module}"] = (shapes[f"{stem}.lora_A.weight"], shapes[f"{stem}.lora_B.weight"])
    assert set(layers) <= modules, sorted(set(layers) - modules)[:5]
    return layers


def test_the_memory_estimate_weighs_the_real_parameters(full_size):
    """The family's hardware row (training/families/, read by training/estimates.py) holds the denoiser's
    and the encoders' (text encoders + VAE: what low_vram keeps off the GPU) weights in GB: the published
    models' parameter counts at 2 bytes (the anchor's fp16/bf16), at 1 byte those the row holds in 8 bits
    (FLUX: the transformer and T5; Chroma, Qwen-Image: the transformer). The row is the model's by its name
    (`hardware_of`: SD 3.5 Large has its own)."""
    parts = vars(full_size.loaded.pipeline)
    counts = {
        name: sum(p.numel() for key, p in part.named_parameters() if ".lora_" not in key)
        for name, part in parts.items()
    }
    assert counts == PARAMETERS[full_size.model]
    row, denoiser = full_size.family.hardware_of(str(full_size.folder)), full_size.family.denoiser_prefix
    eight_bit = EIGHT_BIT.get(full_size.model, ())
    gb = {name: count * (1 if name in eight_bit else 2) / 1e9 for name, count in counts.items()}
    denoiser_gb = gb.pop(denoiser)
    assert sum(gb.values()) == pytest.approx(row.encoders_gb, abs=ROUNDING_GB)
    assert row.quantized == (denoiser in eight_bit)
    assert denoiser_gb == pytest.approx(row.denoiser_gb, abs=ROUNDING_GB)


def test_the_lora_size_per_rank_is_the_guides_not_one_familys():
    """LORA_PARAMS_PER_RANK (1.2M) comes from the guide's file sizes, for any family. The adapted layers
    of the full-size models hold 0.2M (SD 1.5's UNet) to 4.1M (FLUX's transformer) per rank: the estimate's
    LoRA state is the guide's, closest to SDXL's UNet (1.45M)."""
    denoisers = {
        model: per_rank[FAMILIES[FAMILY[model]].denoiser_prefix] for model, per_rank in LORA_PARAMS_PER_RANK_OF.items()
    }
    assert min(denoisers.values()) < LORA_PARAMS_PER_RANK < max(denoisers.values())
    assert LORA_PARAMS_PER_RANK == pytest.approx(denoisers["sdxl"], rel=0.2)
