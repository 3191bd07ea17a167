"""get-dataset-info: the dataset report for a dataset of the workspace, sized for a model."""

from __future__ import annotations

from pathlib import Path

from server.errors import ServiceError
from server.names import checked_name
from training.config import LoraType
from training.data.dataset import DatasetError
from training.data.report import DatasetReport, inspect_dataset

SD15_GEOMETRY = (512, 64)  # native resolution and bucket step when no model is named


def dataset_info(
    workspace: Path,
    dataset_name: str,
    *,
    lora_type: LoraType = "style",
    model_name: str | None = None,
    trigger_word: str | None = None,
) -> DatasetReport:
    folder = Path(workspace) / "datasets" / checked_name("dataset", dataset_name)
    if not folder.is_dir():
        raise ServiceError(f"no dataset {dataset_name!r}; list-datasets shows the datasets there are")
    native, step = _geometry(model_name) if model_name else SD15_GEOMETRY
    try:
        return inspect_dataset(
            folder, lora_type=lora_type, trigger_word=trigger_word, native_resolution=native, bucket_step=step
        )
    except DatasetError as exc:
        raise ServiceError(f"dataset {dataset_name!r} cannot be inspected: {exc}") from None


def _geometry(model_name: str) -> tuple[int, int]:
    """The model's native size and bucket step, read from its config files (no weights)."""
    from training.models.loading import ModelNotFoundError, read_geometry, resolve_model

    try:
        source = resolve_model(model_name)
    except ModelNotFoundError as exc:
        raise ServiceError(f"model_name: {exc}") from None
    geometry = read_geometry(source.path) if source.path.is_dir() else None
    if geometry is None:
        raise ServiceError(
            f"cannot read the native resolution of {model_name!r} from its files; leave model_name out to "
            "check against Stable Diffusion 1.5's 512 px"
        )
    return geometry
