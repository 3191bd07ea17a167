"""What importing a config from another trainer gives: our options, and every source key that could not be
mapped (fully) with the reason, so the user knows what the imported run leaves out."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from training.config import TrainingConfig
from training.config_errors import describe_error

# Reads a file the source config names (kohya's dataset_config and sample_prompts) as the caller allows:
# the CLI reads beside the config, the server only inside its allowed folders. Raises OSError with the reason.
FileReader = Callable[[str], str]

NO_EQUIVALENT = "no equivalent"
NOT_SUPPORTED = "value not supported"


class ConfigImportError(ValueError):
    """The source cannot be imported at all (unreadable, of no known format, or no dataset); the message says
    what to do."""


@dataclass(frozen=True)
class Unmapped:
    key: str  # where in the source, e.g. "train.ema_config" or "datasets[0].subsets[1]"
    reason: str

    def line(self) -> str:
        return f"{self.key}: {self.reason}"


@dataclass
class Draft:
    """The options gathered from a source, and the keys left out, as a mapper walks the source."""

    values: dict[str, Any] = field(default_factory=dict)
    unmapped: list[Unmapped] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # option -> the source key that gave it

    def set(self, option: str, value: Any, key: str) -> None:
        self.values[option] = value
        self.sources[option] = key

    def choice(self, option: str, value: Any, key: str) -> None:
        """A named choice (optimizer, schedule), in any case: set when ours has it, else listed with ours."""
        choices = typing.get_args(TrainingConfig.model_fields[option].annotation)
        if str(value).lower() in choices:
            self.set(option, str(value).lower(), key)
        else:
            self.skip(key, NOT_SUPPORTED, f"{value!r}; {option} is one of {', '.join(choices)}")

    def translate(self, option: str, table: dict[str, Any], value: Any, key: str) -> None:
        """A source's named value through `table` (theirs -> ours); one the table lacks is listed with its names."""
        if str(value) in table:
            self.set(option, table[str(value)], key)
        else:
            self.skip(key, NOT_SUPPORTED, f"{value!r} (one of {', '.join(table)})")

    def skip(self, key: str, why: str, detail: str = "") -> None:
        self.unmapped.append(Unmapped(key, f"{why}: {detail}" if detail else why))

    def finish(self, name: str, source_format: str) -> ImportResult:
        """The validated config. An option our config refuses (out of bounds, unknown choice) is dropped and
        listed, under its source key, with the refusal."""
        values = {"name": name, **self.values}
        while True:  # each round returns, raises, or drops at least one refused option
            try:
                config = TrainingConfig.model_validate(values)
            except ValidationError as exc:
                refused = {str(err["loc"][0]): err for err in exc.errors() if err["loc"] and err["loc"][0] in values}
                if not refused or "name" in refused or "dataset_path" in refused:
                    problems = [describe_error(err, TrainingConfig) for err in exc.errors()]
                    raise ConfigImportError("the imported options do not make a valid config: " + "; ".join(problems))
                for option, err in refused.items():
                    values.pop(option)
                    self.skip(self.sources.get(option, option), NOT_SUPPORTED, describe_error(err, TrainingConfig))
                continue
            return ImportResult(source_format, config, self.unmapped)


@dataclass(frozen=True)
class ImportResult:
    format: str  # kohya or ai-toolkit
    config: TrainingConfig
    unmapped: list[Unmapped]

    def stored_values(self) -> dict[str, Any]:
        """The options the source set, name first: what a saved config holds (defaults stay the model's)."""
        given = self.config.model_dump(mode="json", exclude_unset=True)
        return {"name": self.config.name, **{k: v for k, v in given.items() if k != "name" and v is not None}}
