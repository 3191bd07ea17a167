"""get-dataset-info and lint-captions: what is in a dataset and what its captions get wrong."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from server.errors import ServiceError, WorkspaceStateError
from server.names import checked_name, plain_filename_problem
from training.config import LoraType
from training.data.caption_lint import CaptionFinding, lint_captions
from training.data.dataset import IMAGE_SUFFIXES, DatasetError, scan_dataset
from training.data.report import DatasetReport, inspect_dataset
from training.families import ModelFamily
from training.guide import CAPTION_TOKENS, DEFAULT_LORA_TYPE

SD15_GEOMETRY = (512, 64)  # native resolution and bucket step when no model is named
CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"


def dataset_info(
    workspace: Path,
    dataset_name: str,
    *,
    lora_type: LoraType = DEFAULT_LORA_TYPE,
    model_name: str | None = None,
    trigger_word: str | None = None,
) -> DatasetReport:
    folder = dataset_folder(workspace, dataset_name)
    native, step = model_geometry(model_name) if model_name else SD15_GEOMETRY
    try:
        return inspect_dataset(
            folder, lora_type=lora_type, trigger_word=trigger_word, native_resolution=native, bucket_step=step
        )
    except DatasetError as exc:
        raise WorkspaceStateError(f"dataset {dataset_name!r} cannot be inspected: {exc}") from None


def model_geometry(model_name: str) -> tuple[int, int]:
    """The model's native size and bucket step, read from its config files (no weights); a model that
    is not here, or whose size cannot be read, is a ServiceError."""
    from training.families import read_geometry
    from training.models.source import ModelNotFoundError, resolve_model

    try:
        source = resolve_model(model_name)
    except ModelNotFoundError as exc:
        raise ServiceError(f"model_name: {exc}") from None
    geometry = read_geometry(source.path) if source.path.is_dir() else None
    if geometry is None:
        raise ServiceError(
            f"cannot read the native resolution of {model_name!r} from its files (a single-file checkpoint has "
            "none): give a diffusers folder or Hugging Face id of the model instead"
        )
    return geometry


class CaptionLintResult(BaseModel):
    dataset_name: str
    captions_checked: int
    findings: list[CaptionFinding]
    next_step: str


def caption_lint(
    workspace: Path,
    dataset_name: str,
    *,
    model_name: str | None = None,
    trigger_word: str | None = None,
    max_token_length: int = CAPTION_TOKENS,
) -> CaptionLintResult:
    """lint-captions: the guide's caption rules over a dataset; with model_name, token lengths are
    counted with that model's tokenizer."""
    folder = dataset_folder(workspace, dataset_name)
    try:
        index = scan_dataset(folder, trigger_word=trigger_word, trigger_words={})
    except DatasetError as exc:
        raise WorkspaceStateError(f"dataset {dataset_name!r} cannot be read: {exc}") from None
    count_tokens = _token_counter(model_name) if model_name else None
    family = _model_family(model_name) if model_name else None
    findings = lint_captions(index, family=family, max_tokens=max_token_length, count_tokens=count_tokens)
    next_step = (
        "fix the captions with update-captions (edits, find/replace, or trigger_word to put it first), then lint again"
        if findings
        else "captions follow the guide; create-training-config next"
    )
    return CaptionLintResult(
        dataset_name=dataset_name, captions_checked=len(index.images), findings=findings, next_step=next_step
    )


def _model_family(model_name: str) -> ModelFamily:
    """The model's family by its own files where they can be read, else as its name suggests (FLUX, Flex)."""
    from training.families import FAMILIES, detect_family, guess_family
    from training.models.source import ModelNotFoundError, resolve_model

    try:
        family = detect_family(resolve_model(model_name))
    except (ModelNotFoundError, OSError):  # not here (or a built-in that cannot be built): judged by its name
        family = None
    return FAMILIES[family] if family else guess_family(model_name, None)


def dataset_folder(workspace: Path, dataset_name: str) -> Path:
    folder = Path(workspace) / "datasets" / checked_name("dataset", dataset_name)
    if not folder.is_dir():
        raise WorkspaceStateError(f"no dataset {dataset_name!r}; list-datasets shows the datasets there are")
    return folder


def dataset_image(workspace: Path, dataset_name: str, parts: list[str]) -> Path:
    """The image at `parts` (['a.png'], ['10_cat', 'a.png']) in the dataset; each part a plain name, so no
    path leaves the dataset's folder."""
    path = dataset_folder(workspace, dataset_name).joinpath(*parts)
    if (
        any(plain_filename_problem(part) for part in parts)
        or path.suffix.lower() not in IMAGE_SUFFIXES
        or not path.is_file()
    ):
        shown = "/".join(parts)
        raise WorkspaceStateError(f"dataset {dataset_name!r} has no image {shown!r}; get-dataset-info lists them")
    return path


def _token_counter(model_name: str):
    """Tokens of a caption in the model's own tokenizer, start and end tokens not counted."""
    from training.models.source import ModelNotFoundError, resolve_model

    try:
        source = resolve_model(model_name)
    except ModelNotFoundError as exc:
        raise ServiceError(f"model_name: {exc}") from None
    tokenizer_folder = source.path / "tokenizer"
    if not tokenizer_folder.is_dir():
        raise ServiceError(f"{model_name!r} has no tokenizer folder to count tokens with; leave model_name out")
    tokenizer = clip_tokenizer(tokenizer_folder)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def clip_tokenizer(folder: Path) -> Tokenizer:
    """A model's CLIP tokenizer, with the `tokenizers` library alone (transformers would pull torch into
    the server): its tokenizer.json, or the vocab.json and merges.txt of older folders (SD 1.5's) in the
    pipeline transformers' CLIPTokenizer builds from them: NFC, whitespace runs as one space, lower case,
    CLIP's word pattern, byte-level BPE with '</w>' ending a word."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split())
        for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=CLIP_END)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(words, behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.add_special_tokens([CLIP_START, CLIP_END])
    return tokenizer
