"""The models dataset calls take and return (the MCP tools show them as their schemas), and `Refused`,
the exception whose message becomes a refused file's or edit's reason.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from training.config import MaxTokenLength
from training.guide import CAPTION_TOKENS, DEFAULT_LORA_TYPE, LoraType

CAPTION_SHOWN_CHARS = 200  # captions in a result are cut to this
DatasetName = Annotated[str, Field(description="Dataset name, from list-datasets.")]
RootTriggerWord = Annotated[str | None, Field(description="Trigger word for images at the dataset's root.")]


class DatasetQuery(BaseModel):
    """get-dataset-info: what a dataset holds, judged for a kind of LoRA and a base model."""

    dataset_name: DatasetName
    lora_type: LoraType = Field(DEFAULT_LORA_TYPE, description="What the LoRA teaches; sets the image-count verdict.")
    model_name: str | None = Field(
        None, description="Base model to size-check against (its native resolution); default SD 1.5's 512 px."
    )
    trigger_word: RootTriggerWord = None


class CaptionLintRequest(BaseModel):
    """lint-captions: a dataset's captions against the guide and the model's tokenizer."""

    dataset_name: DatasetName
    model_name: str | None = Field(None, description="Base model: counts tokens with its tokenizer.")
    trigger_word: RootTriggerWord = None
    max_token_length: MaxTokenLength = Field(CAPTION_TOKENS, description="Tokens the training config reads.")


class UploadImage(BaseModel):
    """One item of upload-dataset's `images`."""

    filename: str = Field(
        description="File name inside the dataset, e.g. 'img001.png', or with one folder level: '10_cat/a.png' "
        "(a concept repeated 10 times), 'validation/b.png' (held out), 'class/c.png' (prior-preservation images); "
        "it must end in .jpg, .jpeg, .png or .webp and match the image's real format."
    )
    content: str | None = Field(
        None, description="The image file's bytes as standard base64 (a 'data:image/...;base64,' prefix is accepted)."
    )
    data: str | None = Field(None, description="Accepted as a synonym of content; give one of the two.")
    caption: str | None = Field(
        None,
        description="Caption saved as the same-named .txt file beside the image (e.g. img001.txt). A class/ image "
        "trains on its caption too (as kohya's regularization images); one without trains on class_prompt.",
    )


class FileOutcome(BaseModel):
    filename: str = Field(description="The file name as given.")
    saved: bool = Field(description="True when the image (and its caption, if given) is now in the dataset.")
    reason: str | None = Field(None, description="Why the file was refused, and what to do; None when saved.")
    width: int | None = Field(None, description="Image width in pixels, when saved.")
    height: int | None = Field(None, description="Image height in pixels, when saved.")
    captioned: bool = Field(False, description="True when a .txt caption now sits beside the saved image.")


class UploadResult(BaseModel):
    dataset_name: str = Field(description="The dataset's name; use it as dataset_path in a training config.")
    path: str = Field(description="The dataset folder on the server.")
    saved: int = Field(description="Images saved by this call.")
    refused: int = Field(description="Images refused by this call (see files[].reason).")
    files: list[FileOutcome] = Field(description="One outcome per uploaded item, in the order given.")
    next_step: str = Field(description="What to do next.")


class DatasetSummary(BaseModel):
    name: str = Field(description="The dataset's name; use it as dataset_path in a training config.")
    path: str = Field(description="The dataset folder on the server.")
    images: int = Field(description="Image files (.jpg/.jpeg/.png/.webp), subfolders included.")
    captioned: int = Field(description="Images that have a same-named .txt caption.")
    size_bytes: int = Field(description="Total size of the dataset's files in bytes.")


class ImportedConcept(BaseModel):
    folder: str = Field(
        description="The concept's folder inside the dataset, e.g. '10_xyz_cat'; '' for the images at the "
        "dataset's root."
    )
    name: str = Field(
        description="The concept's name: the folder name without its repeat count (e.g. 'xyz_cat'); training "
        "puts it first in the captions as the concept's trigger unless the config's trigger_words says otherwise "
        "or the captions all start with a trigger of their own (get-dataset-info says which). '' for root images."
    )
    repeats: int = Field(description="How often each image of the concept is used per epoch (the folder's N_ prefix).")
    images: int = Field(description="Images the concept holds now, subfolders included.")


class ImportResult(BaseModel):
    dataset_name: str = Field(description="The dataset's name; use it as dataset_path in a training config.")
    path: str = Field(description="The dataset folder on the server.")
    source: str = Field(description="The folder imported from, with links resolved.")
    mode: Literal["copy", "link"] = Field(
        description="copy: the dataset holds its own copies. link: the dataset holds links to the source files, "
        "which must stay where they are."
    )
    imported: int = Field(description="Images brought in by this call (each with its caption when it had one).")
    refused: int = Field(
        description="Files found but not brought in: bad images, links leading outside the allowed folders, "
        "files that are neither images nor captions (see files[].reason)."
    )
    concepts: list[ImportedConcept] = Field(
        description="The dataset's concepts as training will see them (after this import)."
    )
    validation_images: int = Field(description="Images in the dataset's validation/ folder (held out from training).")
    files: list[FileOutcome] = Field(
        description="One outcome per file found, by its path relative to the source folder (e.g. '10_xyz_cat/a.png'); "
        "captions that came with their image are not listed separately (see captioned)."
    )
    next_step: str = Field(description="What to do next.")


class CaptionOutcome(BaseModel):
    filename: str = Field(description="The image's path inside the dataset (for a refused edit: the key as given).")
    changed: bool = Field(description="True when this call rewrote the image's caption file.")
    caption: str | None = Field(
        None,
        description=f"The image's caption now (cut to {CAPTION_SHOWN_CHARS} characters); None when it has none.",
    )
    reason: str | None = Field(None, description="Why the edit was refused or failed, and what to do; None otherwise.")


class CaptionUpdateResult(BaseModel):
    dataset_name: str = Field(description="The dataset's name.")
    path: str = Field(description="The dataset folder on the server.")
    changed: int = Field(description="Images whose caption this call rewrote.")
    unchanged: int = Field(description="Images looked at whose caption was already as asked.")
    refused: int = Field(description="Edits refused or failed (see files[].reason); the others were applied.")
    files: list[CaptionOutcome] = Field(description="One outcome per image looked at, then one per refused edit.")
    next_step: str = Field(description="What to do next.")


class Refused(Exception):
    """One file is refused; the message is its reason."""
