"""LoRA file tools: export, list, download in chunks, upload in chunks; and the machine's stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mcp.server import MCPServer
from pydantic import BaseModel, Field

from server.loras import DEFAULT_CHUNK, MAX_CHUNK, Chunk, ExportedLora
from server.system import SystemStats, system_stats
from server.tools import READ_ONLY, Services
from server.upload_arguments import DEFAULT_CHUNK_SIZE
from server.uploads import ChunkReceived, UploadFinished, UploadStarted


class LoraList(BaseModel):
    loras: list[ExportedLora]


def register_file_tools(server: MCPServer, s: Services) -> None:
    call, workspace, jobs, loras, uploads = s.call, s.workspace, s.jobs, s.loras, s.uploads
    read_only = READ_ONLY

    # --- LoRA files and the machine --------------------------------------------------------------
    @server.tool(
        name="list-exported-models", description="LoRA files in the workspace's loras/ folder.", annotations=read_only
    )
    def list_exported_models() -> LoraList:
        return LoraList(loras=call(loras.list))

    @server.tool(
        name="export-model",
        description="Copy a job's LoRA (the final one, or a checkpoint's with step) into loras/ with a metadata "
        "sidecar, ready for ComfyUI (models/loras) or A1111 (models/Lora).",
    )
    def export_model(
        job_id: str = Field(description="Job id from start-training."),
        step: int | None = Field(None, ge=1, description="A checkpoint step; default: the final LoRA."),
        output_format: Literal["kohya", "diffusers"] | None = Field(
            None,
            description="kohya for ComfyUI/A1111, or diffusers; default: as the run wrote it (kohya for SD 1.x/2.x "
            "and SDXL, diffusers for FLUX, which ComfyUI loads too).",
        ),
    ) -> ExportedLora:
        status = call(jobs.training_status, job_id)
        return call(loras.export, job_id, Path(status.run_dir), status.config_name, step, output_format)

    @server.tool(
        name="download-model",
        description="Read a file in pieces as base64: an exported LoRA ('name.safetensors') or a run file "
        "('<job_id>/<file>'). Call again with next_offset until eof is true.",
        annotations=read_only,
    )
    def download_model(
        path: str = Field(description="'name.safetensors' in loras/, or '<job_id>/<file>' in a job's run directory."),
        offset: int = Field(0, ge=0, description="Byte offset to start at."),
        length: int = Field(DEFAULT_CHUNK, ge=1, le=MAX_CHUNK, description="Bytes to read (at most 720 KiB)."),
    ) -> Chunk:
        run_dirs = {job.job_id: Path(job.run_dir) for job in call(jobs.list)}
        return call(loras.read_chunk, path, offset, length, run_dirs)

    @server.tool(
        name="upload-lora-chunked-start",
        description="Begin uploading a LoRA file too large for one call: give a new upload_id (e.g. a uuid4), the "
        "filename (.safetensors), total_size in bytes, optional metadata {trigger_words, base_model} and sha256. "
        "Then send the file with upload-lora-chunked-append in chunk_size pieces (any order), then finish.",
    )
    def upload_lora_chunked_start(
        upload_id: str = Field(description="Your id for this upload, e.g. a uuid4."),
        filename: str = Field(description="Name of the LoRA file, ending in .safetensors."),
        total_size: int = Field(ge=1, description="File size in bytes."),
        metadata: dict[str, Any] | None = Field(None, description="Optional: trigger_words (list), base_model."),
        chunk_size: int = Field(DEFAULT_CHUNK_SIZE, description="Bytes per chunk (default 262144)."),
        sha256: str | None = Field(None, description="Optional hex sha256 of the whole file, checked at finish."),
    ) -> UploadStarted:
        return call(lambda: uploads.start(upload_id, filename, total_size, metadata, chunk_size, sha256))

    @server.tool(
        name="upload-lora-chunked-append",
        description="Send one chunk: its bytes as base64 and its chunk_index (offset = chunk_index x chunk_size). "
        "Chunks may come in any order and may be re-sent.",
    )
    def upload_lora_chunked_append(
        upload_id: str = Field(description="The id given to upload-lora-chunked-start."),
        chunk: str = Field(description="The chunk's bytes, base64-encoded."),
        chunk_index: int = Field(ge=0, description="Which chunk this is, from 0."),
    ) -> ChunkReceived:
        return call(uploads.append, upload_id, chunk, chunk_index)

    @server.tool(
        name="upload-lora-chunked-finish",
        description="Check that every chunk arrived (size, sha256, a valid safetensors file) and move the LoRA "
        "into loras/ with its metadata; list-exported-models then shows it.",
    )
    def upload_lora_chunked_finish(
        upload_id: str = Field(description="The id given to upload-lora-chunked-start."),
    ) -> UploadFinished:
        return call(uploads.finish, upload_id)

    @server.tool(
        name="get-system-stats",
        description="GPU name and memory (when torch sees one), RAM, free disk in the workspace, and how many "
        "jobs are running and queued.",
        annotations=read_only,
    )
    def get_system_stats() -> SystemStats:
        return system_stats(workspace, call(jobs.list))
