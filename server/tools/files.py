"""LoRA file tools: export, list, download in chunks, upload in chunks; and the machine's stats."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from pydantic import BaseModel, Field

from server.loras import Chunk, ChunkRequest, ExportedLora, ExportRequest
from server.system import SystemStats, system_stats
from server.tools import READ_ONLY, Services, add_tools, tool
from server.upload_arguments import DEFAULT_CHUNK_SIZE
from server.uploads import ChunkReceived, UploadFinished, UploadStarted


class LoraList(BaseModel):
    loras: list[ExportedLora]


class FileTools:
    """LoRA files in and out of the workspace, and the machine's stats."""

    def __init__(self, s: Services):
        self.s = s

    @tool(
        "list-exported-models",
        "LoRA files in the workspace's loras/ folder; a completed training job's final LoRA is there without "
        "export-model. Every tool that takes a LoRA accepts the names given here.",
        READ_ONLY,
    )
    def list_exported_models(self) -> LoraList:
        return LoraList(loras=self.s.call(self.s.loras.list))

    @tool(
        "export-model",
        "Copy a job's LoRA (the final one, or a checkpoint's with step) into loras/ with a metadata "
        "sidecar, ready for ComfyUI (models/loras) or A1111 (models/Lora). Named after the config (a checkpoint: "
        "'<config>-step000500'), numbered ('<config>-2') when another job's LoRA has that name.",
        request=ExportRequest,
    )
    def export_model(self, request: ExportRequest) -> ExportedLora:
        return self.s.call(self.s.loras.export, request, self.s.jobs)

    @tool(
        "download-model",
        "Read a file in pieces as base64: an exported LoRA (its name, with or without .safetensors) or a run file "
        "('<job_id>/<file>'). Call again with next_offset until eof is true.",
        READ_ONLY,
        request=ChunkRequest,
    )
    def download_model(self, request: ChunkRequest) -> Chunk:
        return self.s.call(self.s.loras.read_chunk, request, self.s.jobs)

    @tool(
        "upload-lora-chunked-start",
        "Begin uploading a LoRA file too large for one call: give a new upload_id (e.g. a uuid4), the "
        "filename (.safetensors), total_size in bytes, optional metadata {trigger_words, base_model} and sha256. "
        "Then send the file with upload-lora-chunked-append in chunk_size pieces (any order), then finish.",
    )
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

    @tool(
        "upload-lora-chunked-append",
        "Send one chunk: its bytes as base64 and its chunk_index (offset = chunk_index x chunk_size). "
        "Chunks may come in any order and may be re-sent.",
    )
    def upload_lora_chunked_append(
        self,
        upload_id: str = Field(description="The id given to upload-lora-chunked-start."),
        chunk: str = Field(description="The chunk's bytes, base64-encoded."),
        chunk_index: int = Field(ge=0, description="Which chunk this is, from 0."),
    ) -> ChunkReceived:
        return self.s.call(self.s.uploads.append, upload_id, chunk, chunk_index)

    @tool(
        "upload-lora-chunked-finish",
        "Check that every chunk arrived (size, sha256, a valid safetensors file) and move the LoRA "
        "into loras/ with its metadata; list-exported-models then shows it.",
    )
    def upload_lora_chunked_finish(
        self, upload_id: str = Field(description="The id given to upload-lora-chunked-start.")
    ) -> UploadFinished:
        return self.s.call(self.s.uploads.finish, upload_id)

    @tool(
        "get-system-stats",
        "GPU name and memory (when torch sees one), RAM, free disk in the workspace, how many "
        "jobs are running and queued, and the devices jobs get with the job that holds each.",
        READ_ONLY,
    )
    def get_system_stats(self) -> SystemStats:
        return system_stats(self.s.workspace, self.s.call(self.s.jobs.list))


def register_file_tools(server: MCPServer, s: Services) -> None:
    add_tools(server, FileTools(s))
