"""Built-in tiny CLIP and DINOv2 models (`builtin:tiny-clip`, `builtin:tiny-dinov2`) for offline tests: the
real transformers architectures at toy size with random weights, built from a seed and saved as ordinary
model folders under `<workspace>/models/`, which evaluate-lora loads as it loads a downloaded one. Their
scores are arithmetic, not judgement: random weights measure nothing, but an image against itself still
scores 1 and fixed seeds still give the same numbers twice.

Sizes: 32 px inputs in 8 px patches (16 patches), width 32, 2 layers; CLIP's text side is the byte-level
tokenizer and text encoder of the tiny diffusion models (training/models/builtin.py)."""

from __future__ import annotations

from pathlib import Path

from training.models.builtin import BUILTIN_PREFIX, build_folder_once, byte_level_clip_tokenizer, tiny_clip_config

TINY_SCORERS = {"tiny-clip": 97, "tiny-dinov2": 98}  # name -> seed
TINY_SCORER_VERSION = 1  # bump when a builder changes, so stale folders are rebuilt instead of reused
_SIDE, _PATCH, _WIDTH = 32, 8, 32
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINOv2's own normalisation


def is_tiny_scorer(model_name: str) -> bool:
    return model_name.startswith(BUILTIN_PREFIX) and model_name.removeprefix(BUILTIN_PREFIX) in TINY_SCORERS


def tiny_scorer(model_name: str, models_root: Path) -> Path:
    """The folder of a built-in tiny scorer, built on first use (this imports torch and transformers: the
    evaluation child's work)."""
    key = model_name.removeprefix(BUILTIN_PREFIX)
    save = _save_tiny_clip if key == "tiny-clip" else _save_tiny_dinov2
    target = models_root / f"builtin-{key}-v{TINY_SCORER_VERSION}"
    return build_folder_once(target, "config.json", lambda folder: save(folder, TINY_SCORERS[key]))


def _save_tiny_clip(folder: Path, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=_WIDTH,
        intermediate_size=2 * _WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=_SIDE,
        patch_size=_PATCH,
        projection_dim=_WIDTH,
    )
    text = tiny_clip_config(tokenizer, num_hidden_layers=2)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=_WIDTH)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": _SIDE}, crop_size={"height": _SIDE, "width": _SIDE})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def _save_tiny_dinov2(folder: Path, seed: int) -> None:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=_WIDTH, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=_SIDE, patch_size=_PATCH
    )
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(
        size={"shortest_edge": _SIDE},
        crop_size={"height": _SIDE, "width": _SIDE},
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    ).save_pretrained(folder)
