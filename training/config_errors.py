"""How a config's problems are worded: one line per problem naming the option, the value and the rule,
with the option's bounds, so a user (or the assistant) can fix it without reading the model."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel


class ConfigError(ValueError):
    """A config that cannot be used, with one line per problem naming field, value and rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid training config: " + "; ".join(problems))


def _field_of(key: str, model: type[BaseModel]) -> str:
    """The field a key names, through aliases such as lr -> learning_rate."""
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and key in alias.choices:
            return name
    return key


def describe_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One pydantic error as 'field = value: rule (allowed ...)'."""
    loc = ".".join(str(part) for part in err["loc"]) or "config"
    field = err["loc"][0] if err["loc"] else None
    if err["type"] == "extra_forbidden":
        return f"unknown option '{loc}' (check the spelling; see the config reference)"
    if err["type"] == "missing":
        return f"{loc} is required"
    message = err["msg"].removeprefix("Value error, ")
    if field is None:  # a rule across fields: its message names them
        return message
    text = f"{loc} = {err['input']!r}: {message}"
    allowed = allowed_values(model, _field_of(field, model)) if isinstance(field, str) else None
    return f"{text} (allowed: {allowed})" if allowed else text


def allowed_values(model: type[BaseModel], field: str) -> str | None:
    """The numeric bounds of an option, as words ('>= 1 and <= 1024'); None for an option without any."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    bounds = {}
    for meta in info.metadata:
        for key in ("ge", "gt", "le", "lt", "multiple_of"):
            if getattr(meta, key, None) is not None:
                bounds[key] = getattr(meta, key)
    if not bounds:
        return None
    low = f">= {bounds['ge']}" if "ge" in bounds else f"> {bounds['gt']}" if "gt" in bounds else None
    high = f"<= {bounds['le']}" if "le" in bounds else f"< {bounds['lt']}" if "lt" in bounds else None
    parts = [p for p in (low, high) if p]
    if "multiple_of" in bounds:
        parts.append(f"a multiple of {bounds['multiple_of']}")
    return " and ".join(parts)
