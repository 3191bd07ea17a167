"""merge-loras and convert-lora: the service functions the MCP tools call, and how a tool's `lora`
argument names a file.

A `lora` is the name of an exported LoRA in `<workspace>/loras` (as list-exported-models shows it,
with or without `.safetensors`), or a path to a `.safetensors` file inside the workspace or a folder
this server may use (server/paths.py). Results are written to `loras/<output_name>.safetensors`
with the same `.json` sidecar as an export; an existing name is refused, never overwritten.

The merge and the conversion need torch and diffusers, which the server never imports: each runs as a
short-lived child process (`python -m training.merge` / `training.convert`, training/request_child.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, ValidationError

from server.errors import ServiceError, WorkspaceStateError
from server.loras import ExportedLora, exported_path
from server.name_locks import name_lock
from server.names import checked_name
from server.paths import check_user_path, looks_like_path
from server.safetensors_file import InvalidSafetensors, lora_layout, safetensors_metadata
from training.generation import MAX_STRENGTH
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


class MergeRequest(BaseModel):
    loras: list[MergeSource] = Field(description="[{lora: name or path, weight}], at least two.")
    output_name: str = Field(description="Name of the merged LoRA in loras/.")
    output_format: LoraTarget = Field(
        "comfyui",
        description="comfyui (default): what ComfyUI loads, the kohya layout for SD 1.x/2.x/SDXL and the "
        "diffusers layout with alphas for FLUX; kohya for A1111/Forge (not for FLUX); diffusers (peft keys).",
    )


class ConvertRequest(BaseModel):
    lora: str = Field(description="An exported LoRA's name or a .safetensors path.")
    to: LoraTarget = Field(description="The layout to write.")
    output_name: str | None = Field(None, description="Name in loras/; default '<lora>-<to>'.")


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
    workspace: Path, loras: list[MergeSource | dict], output_name: str, output_format: LoraTarget
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
    with _new_output(workspace, output_name) as target:
        paths = [lora_path(workspace, source.lora) for source in sources]
        weighted = [(str(path), source.weight) for path, source in zip(paths, sources)]
        try:
            run_request("training.merge", sources=weighted, target=str(target), output_format=output_format)
        except RequestRefused as exc:
            raise WorkspaceStateError(f"cannot merge these LoRAs: {exc}") from None
        return _record(target)


def convert_lora(workspace: Path, lora: str, to: LoraTarget, output_name: str | None = None) -> ExportedLora:
    """Write `lora` again in the layout `to` as `loras/<output_name>.safetensors` (default
    '<lora>-<to>'), losslessly. "comfyui" is what ComfyUI's LoraLoader reads: the kohya layout, or for
    FLUX the diffusers layout with alphas."""
    _checked_target(to)
    source = lora_path(workspace, lora)
    with _new_output(workspace, output_name or f"{source.stem}-{to}") as target:
        try:
            run_request("training.convert", source=str(source), target=str(target), output_format=to)
        except RequestRefused as exc:
            raise WorkspaceStateError(f"cannot convert {lora!r} to {to}: {exc}") from None
        return _record(target)


def _checked_target(output_format: str) -> None:
    if output_format not in get_args(LoraTarget):
        raise ServiceError(f"unknown LoRA format {output_format!r}; use one of {', '.join(get_args(LoraTarget))}")


@contextmanager
def _new_output(workspace: Path, output_name: str) -> Iterator[Path]:
    """The free path loras/<output_name>.safetensors, its name locked until the LoRA and its sidecar are
    written: two merges (or a merge and an upload) naming one file cannot both find it free."""
    name = checked_name("output", output_name.removesuffix(".safetensors"))
    with name_lock(workspace, "lora", name):
        target = Path(workspace) / "loras" / f"{name}.safetensors"
        if target.exists() or target.with_suffix(".json").exists():
            raise WorkspaceStateError(
                f"a LoRA named {name!r} exists already in loras/; choose another output_name "
                "(list-exported-models lists the names taken)"
            )
        yield target


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
