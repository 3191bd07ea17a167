"""A tool's flat arguments, generated from the request model that declares them.

The guide's tools take flat arguments (`create-training-config name=... rank=16`), while a service,
a job's request file and a child process take one typed request. The request model is the only
declaration of the fields, defaults, bounds and descriptions: `request_tool` builds the tool's
signature (and so its schema, through the SDK) from the model's fields, and hands the handler the
validated model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import AliasChoices, BaseModel, Field, ValidationError


def request_parameters(
    model: type[BaseModel], *, omitted_means_default: bool = False, leave_out: tuple[str, ...] = ()
) -> list[inspect.Parameter]:
    """One keyword parameter per field of `model`, with the field's own annotation and `Field` (default,
    bounds, description). With `omitted_means_default`, optional fields default to None instead, so the
    handler can tell "left out" (the model's default applies, and is not stored) from "given"; fields
    with alias choices also get one parameter per alias."""
    parameters = []
    for name, info in model.model_fields.items():
        if name in leave_out:
            continue
        if not omitted_means_default:
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=info.annotation))
            continue
        if info.is_required():
            default, annotation = Field(description=info.description or ""), info.annotation
        else:
            default, annotation = Field(None, description=info.description or ""), info.annotation | None
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
        if isinstance(info.validation_alias, AliasChoices):
            for alias in info.validation_alias.choices:
                if alias != name:
                    parameters.append(
                        inspect.Parameter(
                            alias,
                            inspect.Parameter.KEYWORD_ONLY,
                            default=Field(None, description=f"Same as {name}."),
                            annotation=info.annotation | None,
                        )
                    )
    return parameters


def request_tool(
    model: type[BaseModel],
    handler: Callable[..., Any],
    *,
    function_name: str,
    returns: Any,
    extra: Sequence[inspect.Parameter] = (),
    leave_out: tuple[str, ...] = (),
) -> Callable[..., Any]:
    """A function for `server.add_tool` whose arguments are `model`'s fields (then `extra`, such as the
    request `Context` or a knob that is the server's and not the request's): it validates them into the
    model and returns `handler(request, **extra_values)`, awaited when the handler is async. A request
    the model refuses (a cross-field rule the schema cannot express) becomes the ToolError the assistant
    reads. `function_name` names the function, and so the schemas' titles, that clients see; fields in
    `leave_out` are not the tool's arguments (they keep their defaults)."""
    extra_names = {parameter.name for parameter in extra}

    def split(values: dict[str, Any]) -> tuple[BaseModel, dict[str, Any]]:
        extra_values = {name: values.pop(name) for name in list(values) if name in extra_names}
        try:
            return model.model_validate(values), extra_values
        except ValidationError as exc:
            raise ToolError("; ".join(_problem(error) for error in exc.errors())) from None

    if inspect.iscoroutinefunction(handler):

        async def tool(**values: Any) -> Any:
            request, extra_values = split(values)
            return await handler(request, **extra_values)

    else:

        def tool(**values: Any) -> Any:
            request, extra_values = split(values)
            return handler(request, **extra_values)

    parameters = [*request_parameters(model, leave_out=leave_out), *extra]
    # The SDK titles the argument and output schemas after the function ("generate_imageArguments").
    tool.__name__ = tool.__qualname__ = function_name
    tool.__signature__ = inspect.Signature(parameters, return_annotation=returns)
    # ...and finds the parameter that receives the request Context by its type hint.
    tool.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters} | {"return": returns}
    return tool


def _problem(error: dict[str, Any]) -> str:
    """A model's own check (a ValueError of a validator) already says what is wrong and what to do; a
    field's type or bound gets its place named."""
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return f"{'.'.join(map(str, error['loc'])) or 'request'}: {error['msg']}"
