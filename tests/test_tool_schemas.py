"""The tools a client sees, through the SDK's real stdio client, against the list recorded in
`tests/data/tools_list.json`: names, input and output schemas and annotations must not drift when the
server's code is reorganised. Descriptions may change (they quote the guide's numbers from one place),
so they are compared apart: the test prints the ones that changed. Regenerate the file with
`python tests/test_tool_schemas.py` only when a change to the tools is intended."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

REPO = Path(__file__).resolve().parent.parent
RECORDED = Path(__file__).resolve().parent / "data" / "tools_list.json"


def listed_tools(workspace: Path) -> list[dict]:
    async def main() -> list[dict]:
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "server.main", "--workspace", str(workspace)],
            cwd=str(REPO),
            env={"HF_HUB_OFFLINE": "1"},
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            result = await session.list_tools()
            return [tool.model_dump(mode="json", exclude_none=True) for tool in result.tools]

    return anyio.run(main)


def without_descriptions(value):
    """The schema with every `description` (of a tool, an argument or a nested field) left out."""
    if isinstance(value, dict):
        return {key: without_descriptions(item) for key, item in value.items() if key != "description"}
    if isinstance(value, list):
        return [without_descriptions(item) for item in value]
    return value


def test_tool_names_and_schemas_are_unchanged(tmp_path):
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    listed = listed_tools(tmp_path / "ws")
    assert [tool["name"] for tool in listed] == [tool["name"] for tool in recorded]
    for now, before in zip(listed, recorded):
        assert without_descriptions(now) == without_descriptions(before), now["name"]
    changed = [now["name"] for now, before in zip(listed, recorded) if now != before]
    print("descriptions changed:", ", ".join(changed) or "none")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tools = listed_tools(Path(folder) / "ws")
    RECORDED.write_text(json.dumps(tools, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(tools)} tools written to {RECORDED}")
