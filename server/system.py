"""What the machine has: GPU, memory, disk, and the job queue."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from server.jobs import JobStatus


class SystemStats(BaseModel):
    gpu_name: str | None = Field(None, description="CUDA device name, or null when torch sees no GPU.")
    gpu_memory_total_gb: float | None = None
    gpu_memory_free_gb: float | None = None
    ram_total_gb: float
    ram_available_gb: float
    disk_free_gb: float = Field(description="Free space where the workspace is.")
    cpu_count: int
    running_jobs: int
    queued_jobs: int


def system_stats(workspace: Path, jobs: list[JobStatus]) -> SystemStats:
    gpu_name = total = free = None
    import torch  # imported here, not at server start-up: it costs seconds

    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
        free_bytes, total_bytes = torch.cuda.mem_get_info(0)
        total, free = round(total_bytes / 2**30, 2), round(free_bytes / 2**30, 2)
    memory = _meminfo()
    return SystemStats(
        gpu_name=gpu_name,
        gpu_memory_total_gb=total,
        gpu_memory_free_gb=free,
        ram_total_gb=round(memory.get("MemTotal", 0) / 2**20, 2),
        ram_available_gb=round(memory.get("MemAvailable", 0) / 2**20, 2),
        disk_free_gb=round(shutil.disk_usage(workspace).free / 2**30, 2),
        cpu_count=os.cpu_count() or 1,
        running_jobs=sum(1 for job in jobs if job.state == "running"),
        queued_jobs=sum(1 for job in jobs if job.state == "queued"),
    )


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {
        line.split(":")[0]: int(line.split()[1]) for line in lines if line.split()[1:2] and line.split()[1].isdigit()
    }
