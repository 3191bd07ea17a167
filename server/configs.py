"""Saved training configs: `<workspace>/configs/<name>.yaml`, one per config.

A file holds only what the user gave (plus the name), so every default stays the config
model's and a later change of default reaches old configs too. A file is written atomically
and only after the values passed `TrainingConfig` validation, so whatever is on disk is a
usable config unless someone edited it by hand (`validate` reports that case).

This module is a plain service: the MCP tools wrap it, tests call it directly. It imports
no torch or diffusers at import time; `validate` imports the model loader lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import AliasChoices, BaseModel, Field, TypeAdapter, ValidationError

from server.errors import ServiceError, WorkspaceStateError
from server.name_locks import name_lock
from server.names import checked_name, is_safe_name
from server.paths import check_user_path
from training.config import STEPS_PER_IMAGE, ConfigError, TrainingConfig
from training.config_import import ConfigImportError, SourceFormat, Unmapped, import_config
from training.data.dataset import DatasetError, DatasetIndex, hold_out, locate_dataset, scan_dataset
from training.diagnostics import Finding, preflight_findings
from training.resume_source import ResumeSourceError, find_resume_lora
from training.run_loggers import missing_loggers
from training.workspace import atomic_write_text, datasets_dir

CONFIG_SUFFIX = ".yaml"
# A training config is a few KB; a kohya_ss JSON with every GUI field about 10 KB.
MAX_IMPORT_BYTES = 2**20
# Folders and files a run reads or writes: in the workspace or an allowed folder.
_RUN_PATHS = ("dataset_path", "class_data_dir", "resume_from")
# Model sources that are diffusers folders, whose sizes can be read from their config.json files.
_DIFFUSERS_KINDS = ("builtin", "folder", "hub")


class ConfigSummary(BaseModel):
    name: str = Field(description="The config's name (its file is configs/<name>.yaml).")
    model_name: str = Field(description="Base model as given.")
    dataset_path: str = Field(description="Dataset folder or dataset name as given.")
    steps: int | None = Field(description=f"Optimizer steps, or None for the default ({STEPS_PER_IMAGE} x images).")
    updated_at: float = Field(description="Last change, unix time in seconds.")
    error: str | None = Field(
        None, description="Set when the stored file no longer validates (edited by hand); see validate-training-config."
    )


class ValidationReport(BaseModel):
    name: str
    valid: bool = Field(description="True when there are no errors (warnings do not count).")
    errors: list[str] = Field(default_factory=list, description="What stops a run, one line each.")
    warnings: list[str] = Field(default_factory=list, description="Allowed but probably unintended.")
    findings: list[Finding] = Field(
        default_factory=list,
        description="The pre-flight rules' findings (also in warnings, as lines); apply-fix config_name=<name> "
        "finding_id=<rule> writes a copy of the config with a finding's patch.",
    )
    images: int | None = Field(None, description="Training images found in the dataset (validation excluded).")
    native_resolution: int | None = Field(
        None, description="The base model's native size in pixels, when readable without loading it."
    )


class ImportConfigRequest(BaseModel):
    """import-config: a config of another trainer (kohya sd-scripts, ai-toolkit) as a saved config."""

    name: str = Field(description="Name of the config to write: letters, digits, '.', '_' or '-'.")
    content: str | None = Field(
        None,
        max_length=MAX_IMPORT_BYTES,
        description="The config file's text: a kohya sd-scripts TOML (--config_file, and/or its dataset TOML with "
        "[[datasets]]), a kohya_ss JSON, or an ai-toolkit YAML (config.process). Give content or path.",
    )
    path: str | None = Field(
        None,
        description="The config file, in the workspace or an allowed folder (a kohya config's dataset_config and "
        "sample_prompts files are read from beside it when they are allowed too). Give content or path.",
    )
    format: SourceFormat | None = Field(None, description="kohya or ai-toolkit; detected from the text when left out.")


class UnmappedKey(BaseModel):
    key: str = Field(description="Where in the source file, e.g. 'train.ema_config' or 'network_args.conv_dim'.")
    reason: str = Field(description="Why it is not in the config (no equivalent, value not supported, ...).")


class ImportedConfig(BaseModel):
    name: str
    format: str = Field(description="The source's format: kohya or ai-toolkit.")
    config: dict[str, Any] = Field(description="Every option of the written config, defaults included.")
    unmapped: list[UnmappedKey] = Field(description="Source keys the config does not carry (fully), with why.")
    next_step: str


class ConfigService:
    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.folder = self.workspace / "configs"

    # --- create / read -------------------------------------------------------------------------
    def create(self, values: dict[str, Any]) -> TrainingConfig:
        values = _mapping(values, "values")
        if "name" not in values:
            raise ServiceError("name is required: give the config a name (letters, digits, '.', '_' or '-')")
        name = checked_name("config", values["name"])
        with name_lock(self.workspace, "config", name):  # the exists check and the write, as one
            path = self._path(name)
            if path.exists():
                raise WorkspaceStateError(
                    f"config {name!r} already exists: change it with update-training-config, "
                    "or remove it with delete-config first"
                )
            config = _validated(name, values, doing="created")
            self._check_paths(config)
            atomic_write_text(path, _stored_yaml(config))
            return config

    def import_config(self, request: ImportConfigRequest) -> ImportedConfig:
        """A kohya or ai-toolkit config as a saved config, written as `create` writes one. Run folders outside
        the allowed ones are not kept: the dataset becomes the workspace dataset of the folder's name."""
        name = checked_name("config", request.name)
        if (request.content is None) == (request.path is None):
            raise ServiceError("give the config file's text as content, or the file as path: one of the two")
        if request.path is not None:
            source = self._allowed_file("path", request.path, self.workspace)
            text, beside = self._read_source("path", source), source.parent
        else:
            text, beside = request.content, self.workspace

        def read_beside(given: str) -> str:  # the files a kohya config names, under the same rules
            try:
                return self._read_source("file", self._allowed_file("file", given, beside))
            except ServiceError as exc:
                raise OSError(str(exc)) from None

        try:
            result = import_config(text, name=name, format=request.format, read_file=read_beside)
        except ConfigImportError as exc:
            raise ServiceError(f"config {name!r} not imported: {exc}") from None
        values, unmapped = result.stored_values(), list(result.unmapped)
        for field in _RUN_PATHS:
            if values.get(field):
                try:
                    check_user_path(field, values[field], self.workspace)
                except ServiceError:
                    unmapped.append(self._outside(field, values))
        config = self.create(values)
        return ImportedConfig(
            name=name,
            format=result.format,
            config=config.model_dump(mode="json"),
            unmapped=[UnmappedKey(key=u.key, reason=u.reason) for u in unmapped],
            next_step=f"set dataset_path and model_name to this machine's with update-training-config if they "
            f"differ, then validate-training-config name={name}",
        )

    def _allowed_file(self, field: str, value: str, base: Path) -> Path:
        given = Path(value).expanduser()
        path = given if given.is_absolute() else base / given
        check_user_path(field, str(path), self.workspace)
        return path

    def _read_source(self, field: str, path: Path) -> str:
        try:
            if path.stat().st_size > MAX_IMPORT_BYTES:
                raise ServiceError(f"{field} {str(path)!r} is over {MAX_IMPORT_BYTES} bytes: not a training config")
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ServiceError(f"cannot read {field} {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None

    @staticmethod
    def _outside(field: str, values: dict[str, Any]) -> Unmapped:
        """A run folder of another machine: dataset_path becomes the folder's name (a workspace dataset, made
        with upload-dataset or import-dataset), the others are left out (their defaults apply)."""
        given = values.pop(field)
        if field != "dataset_path":
            return Unmapped(field, f"{given!r} is outside the folders this server may use: left out")
        values[field] = Path(given.replace("\\", "/")).name or "dataset"
        return Unmapped(
            field,
            f"{given!r} is outside the folders this server may use: the config names the workspace dataset "
            f"{values[field]!r} instead (upload-dataset or import-dataset it, or set dataset_path)",
        )

    def list(self) -> list[ConfigSummary]:
        if not self.folder.is_dir():
            return []
        summaries = []
        for path in sorted(self.folder.glob("*" + CONFIG_SUFFIX)):
            name = path.name.removesuffix(CONFIG_SUFFIX)
            if not path.is_file() or not is_safe_name(name):
                continue  # temporary files start with '.', and nothing else is ours
            try:
                updated_at = path.stat().st_mtime
                raw = _read_raw(path)
            except OSError:
                continue  # deleted while we listed
            except ServiceError as exc:
                raw, error = {}, str(exc)
            else:
                error = _problems_of(raw)
            summaries.append(
                ConfigSummary(
                    name=name,
                    model_name=_usable_value(raw, "model_name"),
                    dataset_path=_usable_value(raw, "dataset_path") or "",
                    steps=raw.get("steps") if isinstance(raw.get("steps"), int) else None,
                    updated_at=updated_at,
                    error=error,
                )
            )
        return summaries

    def get(self, name: str) -> TrainingConfig:
        name, path = self._existing(name)
        raw = self._read(name, path)
        try:
            return TrainingConfig.from_dict(raw)
        except ConfigError as exc:
            raise WorkspaceStateError(
                f"config {name!r} on disk no longer validates (edited by hand?): {'; '.join(exc.problems)}. "
                "Fix it with update-training-config."
            ) from None

    def exists(self, name: str) -> bool:
        """Whether a config of that name is saved (for `server.names.free_name`)."""
        return self._path(name).is_file()

    def get_yaml(self, name: str) -> str:
        name, path = self._existing(name)
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise WorkspaceStateError(f"cannot read config {name!r}: {exc.strerror}") from None

    # --- change ----------------------------------------------------------------------------------
    def update(self, name: str, changes: dict[str, Any]) -> TrainingConfig:
        """Merge `changes` into the stored values. A change to None resets that option to its default."""
        with name_lock(self.workspace, "config", checked_name("config", name)):  # read, merge, write: as one
            return self._update(name, changes)

    def _update(self, name: str, changes: dict[str, Any]) -> TrainingConfig:
        name, path = self._existing(name)
        changes = _mapping(changes, "changes")
        if "name" in changes and changes["name"] != name:
            raise ServiceError(
                f"a config cannot be renamed ({name!r} -> {changes['name']!r}): create a new config instead "
                "(create-training-config), then delete the old one with delete-config if you like"
            )
        merged = self._read(name, path)
        for key, value in _by_field_name(changes).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        merged["name"] = name
        config = _validated(name, merged, doing="updated")
        self._check_paths(config)
        text = _stored_yaml(config)
        if _read_text_or_none(path) != text:
            atomic_write_text(path, text)
        return config

    def delete(self, name: str) -> None:
        with name_lock(self.workspace, "config", checked_name("config", name)):
            self._delete(name)

    def _delete(self, name: str) -> None:
        name, path = self._existing(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise self._unknown(name) from None
        except OSError as exc:
            raise WorkspaceStateError(f"cannot delete config {name!r}: {exc.strerror}") from None

    # --- validate ------------------------------------------------------------------------------
    def validate(self, name: str) -> ValidationReport:
        """Everything a run would check before loading weights: fields, dataset, model."""
        name, path = self._existing(name)
        raw = self._read(name, path)
        errors: list[str] = []
        warnings: list[str] = []
        config: TrainingConfig | None = None
        findings: list[Finding] = []
        try:
            config = TrainingConfig.from_dict(raw)
        except ConfigError as exc:
            errors.extend(exc.problems)

        # With invalid fields, still check dataset and model from whatever values are usable.
        def option(field: str) -> Any:
            return getattr(config, field) if config is not None else _usable_value(raw, field)

        trigger_words = option("trigger_words") or {}
        dataset = check_dataset(
            option("dataset_path") or "",
            trigger_word=option("trigger_word"),
            trigger_words={str(k): v for k, v in trigger_words.items() if isinstance(v, str) and v.strip()},
            instance_prompt=option("instance_prompt"),
            errors=errors,
            warnings=warnings,
            validation_split=option("validation_split"),
            seed=option("seed"),
        )
        native, family = check_model(
            option("model_name"),
            option("base_model_config"),
            errors=errors,
            warnings=warnings,
            model_family=option("model_family"),
        )
        if option("resume_from"):
            try:  # here, not when the job has started: a name that finds nothing fails before any work
                find_resume_lora(option("resume_from"), relative_to=self.workspace)
            except ResumeSourceError as exc:
                errors.append(str(exc))

        images = dataset.num_images if dataset is not None else None
        if config is not None:
            captions = [record.caption for record in dataset.images] if dataset is not None else []
            warnings.extend(config.warnings(captions))
            if dataset is not None:
                try:
                    config.check_prior_class(captions)
                except ConfigError as exc:
                    errors.extend(exc.problems)
            family_errors, family_warnings = config.family_conflicts(family)
            errors.extend(family_errors + missing_loggers(config.log_with))  # the packages found, not imported
            warnings.extend(family_warnings)
            # Only what is at hand: a DatasetReport would read every image's pixels, and the server does not
            # know the training device's memory.
            from training.diagnostics.evidence import RunEvidence

            evidence = RunEvidence(config=config, images=images, native_resolution=native, model_family=family)
            findings = preflight_findings(evidence)
            warnings.extend(finding.line() for finding in findings)
            if config.steps is None and images is not None:
                warnings.append(
                    f"steps not set: the run will use {STEPS_PER_IMAGE} x {images} images = "
                    f"{max(1, STEPS_PER_IMAGE * images)} steps"
                )
            if config.resolution is None and native is not None:
                warnings.append(f"resolution not set: the run will use the model's native {native}px")
        return ValidationReport(
            name=name,
            valid=not errors,
            errors=errors,
            warnings=warnings,
            findings=findings,
            images=images,
            native_resolution=native,
        )

    # --- files -----------------------------------------------------------------------------------
    def _check_paths(self, config: TrainingConfig) -> None:
        """Folders and files the run reads or writes must be in the workspace or an allowed folder
        (model_name and base_model_config are only read, and may be anywhere)."""
        for field in _RUN_PATHS:
            value = getattr(config, field)
            if value:
                check_user_path(field, value, self.workspace)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}{CONFIG_SUFFIX}"

    def _existing(self, name: str) -> tuple[str, Path]:
        name = checked_name("config", name)
        path = self._path(name)
        if not path.is_file():
            raise self._unknown(name)
        return name, path

    def _unknown(self, name: str) -> WorkspaceStateError:
        known = [p.name.removesuffix(CONFIG_SUFFIX) for p in sorted(self.folder.glob("*" + CONFIG_SUFFIX))]
        known = [n for n in known if is_safe_name(n)]
        hint = f" (saved configs: {', '.join(known[:20])})" if known else " (there are no saved configs yet)"
        return WorkspaceStateError(f"no config named {name!r}{hint}: call list-configs to see the saved configs")

    def _read(self, name: str, path: Path) -> dict[str, Any]:
        try:
            raw = _read_raw(path)
        except FileNotFoundError:
            raise self._unknown(name) from None
        except OSError as exc:
            raise WorkspaceStateError(f"cannot read config {name!r}: {exc.strerror}") from None
        raw["name"] = name  # the file name is the config's name, whatever a hand edit put inside
        return raw


def _validated(name: str, values: dict[str, Any], *, doing: str) -> TrainingConfig:
    try:
        return TrainingConfig.from_dict(values)
    except ConfigError as exc:
        raise ServiceError(f"config {name!r} not {doing}: " + "; ".join(exc.problems)) from None


def _usable_value(raw: dict[str, Any], field: str) -> Any:
    """The stored value of `field` if it is valid on its own, else the config model's default (None for a
    required field): a config with some invalid options still has its dataset and model checked."""
    info = TrainingConfig.model_fields[field]
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if field not in raw:
        return default
    try:
        # Annotated needs at least one annotation besides the type: the field's bounds, where it has any.
        checked = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        return TypeAdapter(checked).validate_python(raw[field])
    except ValidationError:
        return default


def _stored_yaml(config: TrainingConfig) -> str:
    """Only the values the user set (None means 'the default', so it is left out), name first."""
    given = config.model_dump(mode="json", exclude_unset=True)
    stored = {"name": config.name, **{k: v for k, v in given.items() if k != "name" and v is not None}}
    import yaml  # lazily: start-up time

    return yaml.safe_dump(stored, sort_keys=False, allow_unicode=True)


def _read_raw(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkspaceStateError(
            f"config file {path.name} is not valid YAML (edited by hand?): {exc}. "
            "Fix the file or delete it with delete-config."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WorkspaceStateError(
            f"config file {path.name} must hold a mapping of option: value. "
            "Fix the file or delete it with delete-config."
        )
    return data


def _read_text_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _problems_of(raw: dict[str, Any]) -> str | None:
    try:
        TrainingConfig.from_dict(raw)
    except ConfigError as exc:
        return "; ".join(exc.problems)
    return None


def _mapping(values: Any, what: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ServiceError(f"{what} must be a mapping of option: value, not {type(values).__name__}")
    return dict(values)


def _by_field_name(changes: dict[str, Any]) -> dict[str, Any]:
    """Changes keyed by field name (lr -> learning_rate), so a change given under an alias
    replaces the stored value instead of losing to it."""
    aliases = {}
    for field, info in TrainingConfig.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices):
            for choice in info.validation_alias.choices:
                aliases[choice] = field
    result: dict[str, Any] = {}
    for key, value in changes.items():
        field = aliases.get(key, key) if isinstance(key, str) else key
        if field in result and result[field] != value:
            raise ServiceError(f"{field} is given twice (as {key!r} and another name) with different values")
        result[field] = value
    return result


def check_dataset(
    dataset_path: str,
    *,
    trigger_word: str | None,
    trigger_words: dict[str, str],
    instance_prompt: str | None,
    errors: list[str],
    warnings: list[str],
    validation_split: float,
    seed: int,
) -> DatasetIndex | None:
    """The dataset as the run reads it (validation_split held out), or None with the reason appended to
    `errors`."""
    try:
        folder = locate_dataset(dataset_path, datasets_dir())
        index = scan_dataset(
            folder, trigger_word=trigger_word, trigger_words=trigger_words, instance_prompt=instance_prompt
        )
        index = hold_out(index, validation_split, seed)
    except DatasetError as exc:
        errors.append(f"dataset: {exc}")
        return None
    except OSError as exc:
        errors.append(f"dataset {dataset_path!r} cannot be read: {exc}")
        return None
    warnings.extend(f"dataset: {w}" for w in index.warnings)
    return index


class ModelCheck(NamedTuple):
    native_resolution: int | None  # when the model's folder says so
    family: str | None  # sd1, sd2, sdxl or flux: the config's model_family, else read from the files


def check_model(
    model_name: str,
    base_model_config: str | None,
    *,
    errors: list[str],
    warnings: list[str] | None = None,
    model_family: str = "auto",
) -> ModelCheck:
    """What the model's files say, without loading weights; a missing model, or one of a family this
    trainer cannot train, goes to `errors`. A hub model not downloaded yet on a machine that is online is
    a warning: start-training downloads it first (its files are checked by the training job then)."""
    from training.families import check_family, read_geometry
    from training.models.source import ModelNotCachedError, ModelNotFoundError, renamed_note, resolve_model

    warnings = [] if warnings is None else warnings
    try:
        if note := renamed_note(model_name):
            warnings.append(f"model: {note}")
        source = resolve_model(model_name, base_model_config)
    except ModelNotCachedError as exc:
        warnings.append(f"model: {exc}")
        return ModelCheck(None, None if model_family == "auto" else model_family)
    except ModelNotFoundError as exc:
        errors.append(f"model: {exc}")
        return ModelCheck(None, None if model_family == "auto" else model_family)
    except OSError as exc:  # e.g. building a built-in model into an unwritable workspace
        errors.append(f"model {model_name!r} cannot be prepared: {exc}")
        return ModelCheck(None, None if model_family == "auto" else model_family)
    family, refusal = check_family(source, model_family, model_name=model_name)
    if refusal:
        errors.append(f"model: {refusal}")
    geometry = read_geometry(source.path) if source.kind in _DIFFUSERS_KINDS else None
    return ModelCheck(geometry[0] if geometry else None, family)
