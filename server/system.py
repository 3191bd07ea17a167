"""What the machine has: GPU, memory, disk, and the job queue."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pynvml
from pydantic import BaseModel, Field

from server.jobs import JobStatus


class SystemStats(BaseModel):
    gpu_name: str | None = Field(None, description="NVIDIA GPU name, or null when there is none (or no driver).")
    gpu_memory_total_gb: float | None = None
    gpu_memory_free_gb: float | None = None
    ram_total_gb: float
    ram_available_gb: float
    disk_free_gb: float = Field(description="Free space where the workspace is.")
    cpu_count: int
    running_jobs: int
    queued_jobs: int


def system_stats(workspace: Path, jobs: list[JobStatus]) -> SystemStats:
    gpu_name, total, free = _nvidia_gpu() or (None, None, None)
    memory = psutil.virtual_memory()  # the RAM on every platform
    return SystemStats(
        gpu_name=gpu_name,
        gpu_memory_total_gb=total,
        gpu_memory_free_gb=free,
        ram_total_gb=round(memory.total / 2**30, 2),
        ram_available_gb=round(memory.available / 2**30, 2),
        disk_free_gb=round(shutil.disk_usage(workspace).free / 2**30, 2),
        cpu_count=os.cpu_count() or 1,
        running_jobs=sum(1 for job in jobs if job.state == "running"),
        queued_jobs=sum(1 for job in jobs if job.state == "queued"),
    )


def _nvidia_gpu() -> tuple[str, float, float] | None:
    """The name and total and free memory (GiB) of the GPU a training job gets (CUDA's device 0), from
    NVML, the driver's library that nvidia-smi reads: torch.cuda would create a CUDA context, which holds
    some 300-500 MB of that GPU for the server's whole life. None without an NVIDIA driver or GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else "0"
    if not first or first.startswith("-"):
        return None  # CUDA_VISIBLE_DEVICES hides every GPU from the jobs
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        # CUDA_VISIBLE_DEVICES names a GPU by its index or UUID; NVML itself does not read the variable.
        if first.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(first)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return pynvml.nvmlDeviceGetName(handle), round(memory.total / 2**30, 2), round(memory.free / 2**30, 2)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
