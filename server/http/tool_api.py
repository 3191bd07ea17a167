"""The guide's JSON API: `POST /mcp/tool` with {"tool": NAME, "arguments": {...}} and `GET /mcp/tools`.

A call runs the very tool an MCP client calls (`MCPServer.call_tool`), so its arguments, checks and
messages are the same. The answer is `{"result": <the tool's structured content>}`, or for a tool
that answers with images `{"result": {"text": ..., "images": [{"mime_type", "data"}]}}`; a failure
is `{"error": {"message": <what the assistant would read>}}` with a status that says why (arguments the
tool's schema refuses are worded field by field, with where to find the schema).
"""

from __future__ import annotations

import logging
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.http.access import error_response
from server.limits import MB
from server.service_calls import WorkspaceStateToolError

log = logging.getLogger("server.http")


class ToolCall(BaseModel):
    """The body of POST /mcp/tool."""

    model_config = ConfigDict(extra="forbid")
    tool: str = Field(min_length=1, description="The tool's name, as GET /mcp/tools lists it.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="The tool's arguments.")


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def tool_result(result: CallToolResult) -> Any:
    """What a JSON client reads as `result`: the structured content, else the text and the images."""
    if result.structured_content is not None:
        return result.structured_content
    text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
    images = [
        {"mime_type": block.mime_type, "data": block.data} for block in result.content if isinstance(block, ImageContent)
    ]
    return {"text": text, "images": images}


def failure_status(exc: ToolError) -> int:
    """409 when the workspace's state refuses the call (unknown id, name taken, job not stoppable);
    422 for arguments refused by the tool's schema or its checks; 500 for a fault of ours."""
    if isinstance(exc, UnexpectedToolError):
        return 500
    if isinstance(exc.__cause__, WorkspaceStateToolError):
        return 409
    return 422


def tool_routes(server: MCPServer, max_body_bytes: int) -> list[Route]:
    async def list_tools(_request: Request) -> JSONResponse:
        tools = await server.list_tools()
        return JSONResponse(
            {"tools": [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in tools]}
        )

    async def call_tool(request: Request) -> JSONResponse:
        try:
            call = ToolCall.model_validate_json(await read_body(request, max_body_bytes))
        except BodyTooLarge:
            return error_response(
                413,
                f"the request body is over {max_body_bytes / MB:.0f} MB (LORA_MCP_MAX_REQUEST_MB on the server): "
                "send fewer images per upload-dataset call, or POST a zip to /datasets/<name>",
            )
        except ClientDisconnect:
            return error_response(400, "the client went away before sending the whole body")
        except ValidationError as exc:
            return error_response(400, f"the body must be a JSON object {{\"tool\": NAME, \"arguments\": {{...}}}}: "
                                  f"{_problems(exc)}")
        if call.tool not in {t.name for t in await server.list_tools()}:
            return error_response(404, f"there is no tool {call.tool!r}: GET /mcp/tools lists the tools")
        try:
            result = await server.call_tool(call.tool, call.arguments)
        except ToolError as exc:
            status = failure_status(exc)
            if status == 500:
                log.error("tool %s failed over HTTP", call.tool, exc_info=exc.__cause__)
            # The schema refused them: name each field and what it needs, without pydantic's URLs and reprs.
            if isinstance(exc.__cause__, ValidationError):
                return error_response(status, f"{call.tool} refused its arguments: {_problems(exc.__cause__)}. "
                                      f"GET /mcp/tools gives each tool's input_schema")
            return error_response(status, str(exc))
        if isinstance(result, CallToolResult) and result.is_error:  # a tool that answers its error as content
            return error_response(422, tool_result(result)["text"])
        if not isinstance(result, CallToolResult):  # a result kind no tool of ours returns (e.g. input required)
            return JSONResponse({"result": result.model_dump(mode="json", by_alias=True, exclude_none=True)})
        return JSONResponse({"result": tool_result(result)})

    return [Route("/mcp/tools", list_tools, methods=["GET"]), Route("/mcp/tool", call_tool, methods=["POST"])]


def _problems(exc: ValidationError) -> str:
    """Each refused field as `where: what`."""
    problems = []
    for error in exc.errors():
        if error["type"] == "json_invalid":
            return f"it is not valid JSON ({error['ctx']['error']})" if "ctx" in error else "it is not valid JSON"
        where = ".".join(str(part) for part in error["loc"]) or "the body"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)
