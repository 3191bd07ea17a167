"""merge-loras and convert-lora: the service functions the MCP tools call, and how a tool's `lora`
argument names a file.

A `lora` is the name of an exported LoRA in `<workspace>/loras` (as list-exported-models shows it,
with or without `.safetensors`), or a path to a `.safetensors` file inside the workspace or a folder
this server may use (server/paths.py); any layout diffusers loads is read (training/lora.py). Results
are published into `loras/<output_name>.safetensors` (training/published_loras.py) with the same
`.json` sidecar as an export. Nothing there is ever overwritten: an output_name the user gave is exact,
and a taken one is refused (checked before the work and again as the file is linked into place, where a
completing job may have taken it meanwhile); convert-lora's default name takes the next free number.

The merge and the conversion need torch and diffusers, which the server never imports: each runs as a
short-lived child process (`python -m training.merge` / `training.convert`, training/request_child.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, ValidationError

from server.errors import ServiceError, WorkspaceStateError
from server.loras import ExportedLora, exported_path
from server.names import checked_name
from server.paths import check_user_path, looks_like_path
from server.safetensors_file import InvalidSafetensors, lora_layout, safetensors_metadata
from training.generation import MAX_STRENGTH
from training.published_loras import NameTaken, name_taken, publish
from training.request_child import RequestRefused, run_request
from training.workspace import atomic_write_json

# The targets of training.convert.LoraFormat, here without importing torch (a test keeps them equal).
LoraTarget = Literal["kohya", "diffusers", "comfyui"]
_NAMES_SHOWN = 20  # exported names listed in a "no such LoRA" message


class MergeSource(BaseModel):
    lora: str = Field(description="An exported LoRA's name (list-exported-models) or a .safetensors path.")
    weight: float = Field(
        1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, description="Its strength in the merge (1 = as trained)."
    )


_MODEL_NAME = (
    "The base model the LoRA(s) were trained for (an id, a diffusers folder or builtin:...). Default: the one "
    "a LoRA of ours records; a LoRA made elsewhere (kohya, LoCon, civitai) needs it."
)


class MergeRequest(BaseModel):
    loras: list[MergeSource] = Field(description="[{lora: name or path, weight}], at least two.")
    output_name: str = Field(description="Name of the merged LoRA in loras/, exact: a taken name is refused.")
    output_format: LoraTarget = Field(
        "comfyui",
        description="comfyui (default): what ComfyUI loads, the kohya layout for SD 1.x/2.x/SDXL and the "
        "diffusers layout with alphas for FLUX; kohya for A1111/Forge (not for FLUX); diffusers (peft keys).",
    )
    model_name: str | None = Field(None, description=_MODEL_NAME)


class ConvertRequest(BaseModel):
    lora: str = Field(description="An exported LoRA's name or a .safetensors path.")
    to: LoraTarget = Field(description="The layout to write.")
    output_name: str | None = Field(
        None,
        description="Name in loras/, exact: a taken name is refused. Default '<lora>-<to>', or '<lora>-<to>-2', "
        "... when that is taken; the result's name says which.",
    )
    model_name: str | None = Field(None, description=_MODEL_NAME)


def lora_path(workspace: Path, reference: str) -> Path:
    """The file a `lora` argument names: an exported LoRA's name, or a .safetensors path inside the
    allowed folders (relative paths are taken from the workspace). Anything else is a ServiceError
    that says what is accepted."""
    workspace = Path(workspace)
    if not looks_like_path(reference):
        path = exported_path(workspace / "loras", reference)
        if not path.stem or ".." in reference or not path.is_file():
            exported = sorted(p.stem for p in (workspace / "loras").glob("*.safetensors"))
            shown = ", ".join(exported[:_NAMES_SHOWN]) + (", ..." if len(exported) > _NAMES_SHOWN else "")
            raise WorkspaceStateError(
                f"no exported LoRA named {reference!r} (exported: {shown or 'none yet'}; list-exported-models lists "
                "them). Give an exported LoRA's name, or the path of a .safetensors file in the workspace or a "
                "folder this server may use."
            )
    else:
        check_user_path("lora", reference, workspace)
        given = Path(reference).expanduser()
        path = (given if given.is_absolute() else workspace / given).resolve()
        if path.suffix != ".safetensors" or not path.is_file():
            raise ServiceError(
                f"lora {reference!r} is not a .safetensors file ({path}). Give an exported LoRA's name "
                "(list-exported-models) or the path of a .safetensors LoRA file."
            )
    try:
        safetensors_metadata(path)
    except InvalidSafetensors as exc:
        raise WorkspaceStateError(f"lora {reference!r} ({path}) is not a valid .safetensors file: {exc}") from None
    return path


def merge_loras(
    workspace: Path,
    loras: list[MergeSource | dict],
    output_name: str,
    output_format: LoraTarget,
    model_name: str | None = None,
) -> ExportedLora:
    """Merge `loras` (each at its weight) into `loras/<output_name>.safetensors`: at strength 1 the
    result equals loading them together at those weights (training/merge.py)."""
    try:
        sources = [item if isinstance(item, MergeSource) else MergeSource.model_validate(item) for item in loras]
    except ValidationError as exc:
        raise ServiceError(f"loras must be a list of {{lora, weight}} with weights from -2 to 2: {exc}") from None
    if len(sources) < 2:
        raise ServiceError(f"merging needs at least 2 LoRAs, got {len(sources)}; list-exported-models lists them")
    _checked_target(output_format)
    name = _output_name(workspace, output_name, exact=True)
    paths = [lora_path(workspace, source.lora) for source in sources]
    weighted = [(str(path), source.weight) for path, source in zip(paths, sources)]

    def merge(target: Path) -> None:
        try:
            run_request(
                "training.merge",
                sources=weighted,
                target=str(target),
                output_format=output_format,
                model_name=model_name,
            )
        except RequestRefused as exc:
            raise WorkspaceStateError(f"cannot merge these LoRAs: {exc}") from None

    return _published(workspace, name, merge, exact=True)


def convert_lora(
    workspace: Path, lora: str, to: LoraTarget, output_name: str | None = None, model_name: str | None = None
) -> ExportedLora:
    """Write `lora` again in the layout `to` as `loras/<output_name>.safetensors` (default
    '<lora>-<to>'), losslessly. "comfyui" is what ComfyUI's LoraLoader reads: the kohya layout, or for
    FLUX the diffusers layout with alphas."""
    _checked_target(to)
    source = lora_path(workspace, lora)
    exact = output_name is not None
    name = _output_name(workspace, output_name or f"{source.stem}-{to}", exact=exact)

    def convert(target: Path) -> None:
        try:
            run_request(
                "training.convert", source=str(source), target=str(target), output_format=to, model_name=model_name
            )
        except RequestRefused as exc:
            raise WorkspaceStateError(f"cannot convert {lora!r} to {to}: {exc}") from None

    return _published(workspace, name, convert, exact=exact)


def _checked_target(output_format: str) -> None:
    if output_format not in get_args(LoraTarget):
        raise ServiceError(f"unknown LoRA format {output_format!r}; use one of {', '.join(get_args(LoraTarget))}")


def _output_name(workspace: Path, output_name: str, *, exact: bool) -> str:
    """The checked name; an exact one that is taken is refused now, before the work (publish checks again)."""
    name = checked_name("output", output_name.removesuffix(".safetensors"))
    if exact and name_taken(Path(workspace) / "loras", name):
        raise _taken(name)
    return name


def _taken(name: str) -> WorkspaceStateError:
    return WorkspaceStateError(
        f"a LoRA named {name!r} exists already in loras/ and is never overwritten; choose another output_name "
        "(list-exported-models lists the names taken)"
    )


def _published(workspace: Path, name: str, write: Callable[[Path], None], *, exact: bool) -> ExportedLora:
    """`write` (a child process writing a LoRA file) published into loras/ as `name` (a numbered name when
    it is taken and not `exact`), with its sidecar."""
    try:
        target = publish(Path(workspace) / "loras", name, None, write, exact=exact)
    except NameTaken:
        raise _taken(name) from None
    return _record(target)


def _record(target: Path) -> ExportedLora:
    """The written file's sidecar, as LoraService.export writes it; output_format is the file's layout
    ("comfyui" is one of the two)."""
    metadata = safetensors_metadata(target)
    layout = lora_layout(target)
    record = ExportedLora(
        name=target.stem,
        path=str(target),
        size_bytes=target.stat().st_size,
        trigger_word=metadata.get("modelspec.trigger_phrase"),
        base_model=metadata.get("ss_sd_model_name"),
        output_format=layout,
    )
    atomic_write_json(target.with_suffix(".json"), record.model_dump(mode="json"))
    return record
