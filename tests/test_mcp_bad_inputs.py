"""Every bad dataset or upload input of the dataset issue, each in its own test over stdio: a clear
ToolError (or a per-file refusal), the workspace as it was, and a server that keeps answering."""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
UPLOAD_ID = "5d0c7f7e-0a51-4c1b-8a0e-0d2b3c4e5f60"


def png(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def snapshot(workspace: Path) -> dict[str, bytes]:
    """Every file of the workspace but the server's own log and job table."""
    return {
        str(p.relative_to(workspace)): p.read_bytes()
        for p in workspace.rglob("*")
        if p.is_file() and "logs" not in p.parts and not p.name.startswith("state.db")
    }


def refused(
    workspace: Path, tool: str, arguments: dict, expected: str, env: dict | None = None, same_files: bool = True
) -> None:
    """Call `tool` once: it must fail with `expected` in its message, change no file (unless
    `same_files` is false), and leave the server answering the next call."""

    async def main():
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "server.main", "--workspace", str(workspace)],
            cwd=str(REPO),
            env={"LORA_MCP_ALLOWED_DIRS": str(workspace.parent / "allowed"), **(env or {})},
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            before = snapshot(workspace)
            result = await session.call_tool(tool, arguments)
            assert result.is_error, result.content
            assert expected in result.content[0].text, result.content[0].text
            if same_files:
                assert snapshot(workspace) == before
            still = await session.call_tool("list-datasets", {})
            assert not still.is_error

    anyio.run(main)


@pytest.fixture
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "allowed").mkdir()
    return root


def upload(name: str, filename: str, content: str) -> dict:
    return {"dataset_name": name, "images": [{"filename": filename, "content": content}]}


def test_a_name_with_a_separator(workspace):
    refused(workspace, "upload-dataset", upload("a/b", "x.png", b64(png())), "not allowed")


def test_a_name_with_dot_dot(workspace):
    refused(workspace, "upload-dataset", upload("..", "x.png", b64(png())), "not allowed")


def test_an_absolute_path_outside_the_allowed_roots(workspace):
    refused(workspace, "import-dataset", {"dataset_name": "d", "source_path": "/etc"}, "LORA_MCP_ALLOWED_DIRS")


def test_a_link_escaping_the_allowed_roots(workspace):
    source = workspace.parent / "allowed" / "set"
    source.mkdir()
    (source / "escape.png").symlink_to("/etc/hostname")
    refused(workspace, "import-dataset", {"dataset_name": "d", "source_path": str(source)}, "escape.png")


def test_a_dataset_path_outside_the_allowed_roots(workspace):
    refused(
        workspace, "generate-captions", {"dataset_path": "/etc", "caption_model": "template"}, "LORA_MCP_ALLOWED_DIRS"
    )


def test_invalid_base64(workspace):
    refused(workspace, "upload-dataset", upload("d", "x.png", "not base64 at all!"), "base64")


@pytest.mark.parametrize(
    "content",
    [b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', b"<html><body>hello</body></html>"],
    ids=["svg", "html"],
)
def test_a_non_image_named_jpg(workspace, content):
    refused(workspace, "upload-dataset", upload("d", "x.jpg", b64(content)), "not an image")


@pytest.mark.parametrize("data", [png()[:200], b""], ids=["truncated", "empty"])
def test_a_truncated_or_empty_image(workspace, data):
    refused(workspace, "upload-dataset", upload("d", "x.png", b64(data)), "x.png")


def test_a_decompression_bomb(workspace):
    refused(
        workspace,
        "upload-dataset",
        upload("d", "x.png", b64(png())),
        "too many pixels",
        env={"LORA_MCP_MAX_IMAGE_PIXELS": "1000"},
    )


def test_an_image_over_the_size_limit(workspace):
    refused(
        workspace,
        "upload-dataset",
        upload("d", "x.png", b64(png((128, 128)))),
        "LORA_MCP_MAX_IMAGE_MB",
        env={"LORA_MCP_MAX_IMAGE_MB": "0.01"},
    )


def test_a_dataset_over_its_size_limit(workspace):
    refused(
        workspace,
        "upload-dataset",
        upload("d", "x.png", b64(png((128, 128)))),
        "LORA_MCP_MAX_DATASET_MB",
        env={"LORA_MCP_MAX_DATASET_MB": "0.01"},
    )


def test_an_upload_over_its_size_limit(workspace):
    arguments = {"upload_id": UPLOAD_ID, "filename": "big.safetensors", "total_size": 2 * 1024 * 1024}
    refused(workspace, "upload-lora-chunked-start", arguments, "total_size", env={"LORA_MCP_MAX_UPLOAD_MB": "1"})


def start_upload(workspace: Path, data: bytes) -> None:
    """An upload of `data` in 1 KiB chunks with every chunk sent (through the service, as a
    previous session would have)."""
    from server.uploads import UploadService

    service = UploadService(workspace)
    service.start(UPLOAD_ID, "lora.safetensors", len(data), chunk_size=1024)
    for index in range(0, len(data), 1024):
        service.append(UPLOAD_ID, b64(data[index : index + 1024]), index // 1024)


def test_a_chunk_index_out_of_range(workspace):
    from server.uploads import UploadService

    UploadService(workspace).start(UPLOAD_ID, "lora.safetensors", 4096, chunk_size=1024)
    arguments = {"upload_id": UPLOAD_ID, "chunk": b64(b"x" * 1024), "chunk_index": 4}
    refused(workspace, "upload-lora-chunked-append", arguments, "chunk_index")


def test_finish_before_every_chunk_arrived(workspace):
    from server.uploads import UploadService

    UploadService(workspace).start(UPLOAD_ID, "lora.safetensors", 4096, chunk_size=1024)
    refused(workspace, "upload-lora-chunked-finish", {"upload_id": UPLOAD_ID}, "have not arrived")


def test_a_second_finish(workspace, tmp_path):
    import torch
    from safetensors.torch import save_file

    from server.uploads import UploadService

    save_file({"w": torch.zeros(16, 16)}, str(tmp_path / "lora.safetensors"))
    start_upload(workspace, (tmp_path / "lora.safetensors").read_bytes())
    UploadService(workspace).finish(UPLOAD_ID)
    refused(workspace, "upload-lora-chunked-finish", {"upload_id": UPLOAD_ID}, "already finished")


def test_a_finished_file_that_is_not_safetensors(workspace):
    start_upload(workspace, os.urandom(3000))
    # A refused finish discards the upload (its bytes can never become valid): the one change allowed.
    refused(workspace, "upload-lora-chunked-finish", {"upload_id": UPLOAD_ID}, "safetensors", same_files=False)
    assert not (workspace / "loras").exists() or not any((workspace / "loras").iterdir())
