"""Configs of other trainers as ours: kohya sd-scripts (TOML or JSON, with its dataset TOML) and ai-toolkit
(YAML). `import_config` returns the validated config and each source key it could not map, with the reason;
`import-config` (server/configs.py) and `lora-train --import` (training/cli.py) write it. No torch here."""

from __future__ import annotations

import tomllib
from typing import Any, Literal

from training.config_import import ai_toolkit, kohya
from training.config_import.result import ConfigImportError, FileReader, ImportResult, Unmapped

__all__ = ["FORMATS", "ConfigImportError", "ImportResult", "SourceFormat", "Unmapped", "import_config"]

SourceFormat = Literal["kohya", "ai-toolkit"]
FORMATS: tuple[str, ...] = (kohya.FORMAT, ai_toolkit.FORMAT)


def import_config(
    text: str,
    *,
    name: str,
    format: SourceFormat | None = None,
    read_file: FileReader | None = None,
    dataset_text: str | None = None,
) -> ImportResult:
    """`text` (a config file's content) as a config named `name`. `format` is detected when None.
    `read_file` reads the files a kohya config names (its dataset TOML, its prompt file); `dataset_text`
    is kohya's dataset TOML given separately."""
    data, format = _parsed(text, format)
    if format == kohya.FORMAT:
        return kohya.to_config(data, name, read_file, dataset_text)
    return ai_toolkit.to_config(data, name)


def _parsed(text: str, format: str | None) -> tuple[dict[str, Any], str]:
    if format == kohya.FORMAT:
        return kohya.parse(text), format
    if format == ai_toolkit.FORMAT:
        return _yaml(text), format
    if format is not None:
        raise ConfigImportError(f"unknown format {format!r}: give one of {', '.join(FORMATS)}, or none to detect it")
    try:
        data = tomllib.loads(text)  # a TOML document is never a YAML mapping, so TOML goes first
    except tomllib.TOMLDecodeError as toml_error:
        try:
            data = _yaml(text)  # JSON is YAML too
        except ConfigImportError as yaml_error:
            raise ConfigImportError(
                f"cannot read it as TOML ({toml_error}) nor as JSON or YAML ({yaml_error}): fix the file"
            ) from None
    if isinstance(data.get("config"), dict) and "process" in data["config"]:
        return data, ai_toolkit.FORMAT
    if any(key in data or any(isinstance(v, dict) and key in v for v in data.values()) for key in kohya.MARKERS):
        return data, kohya.FORMAT
    raise ConfigImportError(
        "not a config of a known format: a kohya config names pretrained_model_name_or_path (or its dataset "
        "TOML has [[datasets]]); an ai-toolkit config has config.process. Give format if it is one of them"
    )


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigImportError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigImportError("the file must hold a mapping (TOML tables, a JSON object or YAML keys)")
    return data
