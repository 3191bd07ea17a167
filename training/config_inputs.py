"""The first group of TrainingConfig's options: what a run trains (its name, the base model, the dataset and
its trigger words) and how the images and captions are read and cached. TrainingConfig (config.py) derives
from TrainingInputs, so these options come first in its schema, its tool arguments and every config.yaml,
as they did when they were declared there; their checks (the name, the trigger words, crop against
cache_latents) stay TrainingConfig's validators.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.families import FAMILIES

# SD 1.5's community mirror: runwayml's own repository was removed in 2024; its id is still accepted
# (training/models/source.py RENAMED).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

CropMode = Literal["center", "random"]
# auto (read from the model's files) or a family's id: sd1, sd2, sdxl, flux (training/families/).
ModelFamilyChoice = Literal[("auto", *FAMILIES)]


class TrainingInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    # --- what to train -------------------------------------------------------------------
    name: str = Field(
        description="Run and output name: letters, digits, '.', '_' or '-' (no '/' or '..'); "
        "the LoRA is written as <name>.safetensors."
    )
    model_name: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Base model: a local diffusers folder, a .safetensors/.ckpt file, a Hugging Face id (one not "
        "in the local HF cache is downloaded by start-training first, when the machine is online), or a built-in "
        "id such as 'builtin:tiny-sd15'.",
    )
    model_family: ModelFamilyChoice = Field(
        "auto",
        description="The model's architecture. auto reads it from the model's files; set it for a single-file "
        "checkpoint without base_model_config, whose file alone does not say.",
    )
    base_model_config: str | None = Field(
        None,
        description="Only for a single-file model_name: a diffusers folder or built-in id of the same "
        "architecture whose configs are used (offline, they cannot be fetched).",
    )
    dataset_path: str = Field(
        min_length=1,
        description="Folder of images with same-named .txt captions; subfolders are concepts, "
        "'N_name' folders repeat N times, a 'validation' folder is held out.",
    )
    trigger_word: str | None = Field(
        None, description="Unique token put first in every caption that lacks it, e.g. 'xyz_style'."
    )
    trigger_words: dict[str, str] = Field(
        default_factory=dict,
        description="Trigger word per concept subfolder ({folder: word}). A folder not listed gets trigger_word "
        "when it is the only concept or every caption holds it; else the first word all its captions start with "
        "when it starts no other folder's captions, is no stop word ('a', 'photo') and looks like a trigger "
        "('xyz_cat', 'sks1') or the folder's name is neutral ('concept1', 'images': any word, 'ohwx', counts) "
        "(nothing added); else its own name (without the 'N_' repeat prefix), put first in each caption.",
    )

    # --- resolution and data ---------------------------------------------------------------
    resolution: int | None = Field(
        None,
        ge=64,
        le=4096,
        multiple_of=8,
        description="Training resolution in pixels (64-4096, multiple of 8); default: the model's native size.",
    )
    enable_bucketing: bool = Field(True, description="Group images by aspect ratio instead of squaring them.")
    crop: CropMode = Field("center", description="How an image is cropped to its bucket.")
    flip_aug: bool = Field(False, description="Randomly mirror images left-right (not for asymmetric subjects).")
    caption_dropout_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of steps trained with an empty caption."
    )
    shuffle_captions: bool = Field(False, description="Shuffle the comma-separated tags of each caption.")
    keep_tokens: int = Field(
        1, ge=0, le=100, description="Leading comma-separated tags kept in place when shuffling (the trigger word)."
    )
    cache_latents: bool = Field(True, description="Encode every image with the VAE once before training.")
    # Disk caches cost little at step time (one memory-mapped read of a cached entry from the page
    # cache, well under a millisecond per MB, against steps of 100 ms and more) and keep the
    # process's memory flat with the dataset, so they are on by themselves past AUTO_DISK_CACHE_BYTES
    # (training/data/loader.py).
    cache_latents_to_disk: bool | None = Field(
        None,
        description="Keep cached latents on disk (memory-mapped per batch) instead of in memory. Default: "
        "automatic, on when the latents would take over 64 MiB (e.g. SD 1.5 at 512 px: 64 KiB per image, "
        "about 1,000 images; FLUX at 1024 px: 1 MiB per image, 64 images). The run's config.yaml records the choice.",
    )
    cache_text_encoder_outputs_to_disk: bool | None = Field(
        None,
        description="Keep the cached text-encoder outputs (one per distinct caption) on disk, memory-mapped per "
        "batch, instead of in memory (kohya's name). Default: automatic, on when they would take over 64 MiB "
        "(SD 1.5: 77 x 768 floats, 231 KiB per caption, about 280 captions; FLUX: T5's 512 x 4096 floats, 8 MiB "
        "per caption, 8 captions). Used when captions are cached: the text encoder is frozen and tags are not "
        "shuffled. The run's config.yaml records the choice.",
    )
