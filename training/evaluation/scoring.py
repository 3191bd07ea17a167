"""What evaluate-lora measures with: CLIP (text-image scores, image embeddings) and DINOv2 (image
embeddings), and the cosine arithmetic over unit-length embeddings.

CLIP's text-image cosine is the CLIP score of the literature before its 2.5x/100x scaling (ViT-L/14 gives a
matching prompt about 0.25-0.35). Likeness to the training images follows DreamBench (DINO and CLIP-I):
the cosine between a generated image's embedding and the training images', here each generated image's best
match, since a subject LoRA should resemble some training image, not their average. DINOv2's embedding is
its class token (after the final layer norm), which tells one subject from a similar one better than CLIP's
image embedding does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from training.evaluation.tiny_scorers import is_tiny_scorer, tiny_scorer
from training.workspace import models_dir

if TYPE_CHECKING:
    from PIL.Image import Image

BATCH = 16  # images per forward pass: ViT-L/14 at 224 px takes ~1 GB of activations for 16 in fp32


class ScorerNotFound(RuntimeError):
    """A CLIP or DINOv2 model is neither a local folder nor in the Hugging Face cache."""


def scorer_location(model_name: str) -> str:
    """A built-in tiny scorer's folder (built on first use), else the name as given: a local folder or a hub id
    that from_pretrained finds in the cache (nothing is downloaded here)."""
    return str(tiny_scorer(model_name, models_dir())) if is_tiny_scorer(model_name) else model_name


def _load(loader, model_name: str, role: str):
    try:
        return loader.from_pretrained(scorer_location(model_name), local_files_only=True)
    except OSError as exc:
        raise ScorerNotFound(
            f"the {role} model {model_name!r} is not a local folder and not in the Hugging Face cache ({exc}). "
            f"Download it once (huggingface-cli download {model_name}) or pass a local folder; the built-in tiny "
            "builtin:tiny-clip and builtin:tiny-dinov2 only test the arithmetic."
        ) from None


class Scorer:
    """CLIP and DINOv2 on one device, giving unit-length fp32 embeddings on the CPU."""

    def __init__(self, clip_model: str, dino_model: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

        self.device = device
        self.clip = _load(CLIPModel, clip_model, "CLIP").to(device).eval()
        self.clip_processor = _load(AutoProcessor, clip_model, "CLIP")
        self.dino = _load(AutoModel, dino_model, "DINOv2").to(device).eval()
        self.dino_processor = _load(AutoImageProcessor, dino_model, "DINOv2")

    @torch.no_grad()
    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.clip_processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return _unit(_pooled(self.clip.get_text_features(**tokens.to(self.device))))

    @torch.no_grad()
    def clip_images(self, images: Sequence[Image]) -> torch.Tensor:
        return self._batched(images, lambda batch: _pooled(self.clip.get_image_features(**self._clip_pixels(batch))))

    @torch.no_grad()
    def dino_images(self, images: Sequence[Image]) -> torch.Tensor:
        def embed(batch):
            pixels = self.dino_processor(images=[image.convert("RGB") for image in batch], return_tensors="pt")
            return self.dino(**pixels.to(self.device)).pooler_output

        return self._batched(images, embed)

    def _clip_pixels(self, batch: Sequence[Image]):
        return self.clip_processor.image_processor(
            images=[image.convert("RGB") for image in batch], return_tensors="pt"
        ).to(self.device)

    def _batched(self, images: Sequence[Image], embed) -> torch.Tensor:
        parts = [embed(images[start : start + BATCH]) for start in range(0, len(images), BATCH)]
        return _unit(torch.cat(parts))


def _pooled(output) -> torch.Tensor:
    """get_*_features returns the projected embeddings (transformers 4) or an output whose pooler_output they
    are (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float().cpu(), dim=-1)


# --- arithmetic over unit-length embeddings (rows) ------------------------------------------------------


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of `a` with the same row of `b`."""
    return (a * b).sum(dim=-1)


@dataclass(frozen=True)
class Likeness:
    mean: float  # over generated images, of each one's best match among the references
    max: float  # the closest single generated-reference pair
    nearest: int  # the reference of that pair


def likeness(generated: torch.Tensor, references: torch.Tensor) -> Likeness:
    """How close the generated images come to the reference (training) images."""
    similarity = generated @ references.T
    best = similarity.max(dim=1).values
    flat = int(similarity.argmax())
    return Likeness(float(best.mean()), float(similarity.max()), flat % similarity.shape[1])


def mean_pairwise(embeddings: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of rows (at least two): near 1 when they are all alike."""
    count = embeddings.shape[0]
    similarity = embeddings @ embeddings.T
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))
