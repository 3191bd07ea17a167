"""LoRA file tools: export, list, download in chunks, upload in chunks; and the machine's stats."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from pydantic import BaseModel, Field

from server.loras import Chunk, ChunkRequest, ExportedLora, ExportRequest
from server.system import SystemStats, system_stats
from server.tools import READ_ONLY, Services
from server.tools.arguments import request_tool
from server.upload_arguments import DEFAULT_CHUNK_SIZE
from server.uploads import ChunkReceived, UploadFinished, UploadStarted


class LoraList(BaseModel):
    loras: list[ExportedLora]


class FileTools:
    """LoRA files in and out of the workspace, and the machine's stats."""

    def __init__(self, s: Services):
        self.s = s

    def list_exported_models(self) -> LoraList:
        return LoraList(loras=self.s.call(self.s.loras.list))

    def export_model(self, request: ExportRequest) -> ExportedLora:
        return self.s.call(self.s.loras.export, request, self.s.jobs)

    def download_model(self, request: ChunkRequest) -> Chunk:
        return self.s.call(self.s.loras.read_chunk, request, self.s.jobs)

    def upload_lora_chunked_start(
        self,
        upload_id: str = Field(description="Your id for this upload, e.g. a uuid4."),
        filename: str = Field(description="Name of the LoRA file, ending in .safetensors."),
        total_size: int = Field(ge=1, description="File size in bytes."),
        metadata: dict[str, Any] | None = Field(None, description="Optional: trigger_words (list), base_model."),
        chunk_size: int = Field(DEFAULT_CHUNK_SIZE, description="Bytes per chunk (default 262144)."),
        sha256: str | None = Field(None, description="Optional hex sha256 of the whole file, checked at finish."),
    ) -> UploadStarted:
        return self.s.call(self.s.uploads.start, upload_id, filename, total_size, metadata, chunk_size, sha256)

    def upload_lora_chunked_append(
        self,
        upload_id: str = Field(description="The id given to upload-lora-chunked-start."),
        chunk: str = Field(description="The chunk's bytes, base64-encoded."),
        chunk_index: int = Field(ge=0, description="Which chunk this is, from 0."),
    ) -> ChunkReceived:
        return self.s.call(self.s.uploads.append, upload_id, chunk, chunk_index)

    def upload_lora_chunked_finish(
        self, upload_id: str = Field(description="The id given to upload-lora-chunked-start.")
    ) -> UploadFinished:
        return self.s.call(self.s.uploads.finish, upload_id)

    def get_system_stats(self) -> SystemStats:
        return system_stats(self.s.workspace, self.s.call(self.s.jobs.list))


def register_file_tools(server: MCPServer, s: Services) -> None:
    tools = FileTools(s)
    server.add_tool(
        tools.list_exported_models,
        name="list-exported-models",
        description="LoRA files in the workspace's loras/ folder.",
        annotations=READ_ONLY,
    )
    server.add_tool(
        request_tool(ExportRequest, tools.export_model, function_name="export_model", returns=ExportedLora),
        name="export-model",
        description="Copy a job's LoRA (the final one, or a checkpoint's with step) into loras/ with a metadata "
        "sidecar, ready for ComfyUI (models/loras) or A1111 (models/Lora).",
    )
    server.add_tool(
        request_tool(ChunkRequest, tools.download_model, function_name="download_model", returns=Chunk),
        name="download-model",
        description="Read a file in pieces as base64: an exported LoRA ('name.safetensors') or a run file "
        "('<job_id>/<file>'). Call again with next_offset until eof is true.",
        annotations=READ_ONLY,
    )
    server.add_tool(
        tools.upload_lora_chunked_start,
        name="upload-lora-chunked-start",
        description="Begin uploading a LoRA file too large for one call: give a new upload_id (e.g. a uuid4), the "
        "filename (.safetensors), total_size in bytes, optional metadata {trigger_words, base_model} and sha256. "
        "Then send the file with upload-lora-chunked-append in chunk_size pieces (any order), then finish.",
    )
    server.add_tool(
        tools.upload_lora_chunked_append,
        name="upload-lora-chunked-append",
        description="Send one chunk: its bytes as base64 and its chunk_index (offset = chunk_index x chunk_size). "
        "Chunks may come in any order and may be re-sent.",
    )
    server.add_tool(
        tools.upload_lora_chunked_finish,
        name="upload-lora-chunked-finish",
        description="Check that every chunk arrived (size, sha256, a valid safetensors file) and move the LoRA "
        "into loras/ with its metadata; list-exported-models then shows it.",
    )
    server.add_tool(
        tools.get_system_stats,
        name="get-system-stats",
        description="GPU name and memory (when torch sees one), RAM, free disk in the workspace, and how many "
        "jobs are running and queued.",
        annotations=READ_ONLY,
    )
