"""What the machine has: GPU, memory, disk, and the job queue."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil
import pynvml
from pydantic import BaseModel, Field

from server.jobs import JobStatus
from training.jobs.devices import machine_devices
from training.jobs.store import CPU


class DeviceUse(BaseModel):
    device: str = Field(description="A GPU id as CUDA names it, or 'cpu' on a machine without GPUs.")
    job_id: str | None = Field(None, description="The running job that holds it; null when it is free.")


class SystemStats(BaseModel):
    gpu_name: str | None = Field(
        None,
        description="The GPU training uses: an NVIDIA GPU's name, 'Apple GPU (MPS)' on Apple silicon, or null "
        "when training runs on the CPU.",
    )
    gpu_memory_total_gb: float | None = Field(
        None, description="Its memory; on Apple silicon the unified memory it shares with the CPU."
    )
    gpu_memory_free_gb: float | None = None
    ram_total_gb: float
    ram_available_gb: float
    disk_free_gb: float = Field(description="Free space where the workspace is.")
    cpu_count: int
    running_jobs: int
    queued_jobs: int
    devices: list[DeviceUse] = Field(
        description="The devices jobs are given (LORA_MCP_GPUS, else CUDA_VISIBLE_DEVICES, else every NVIDIA GPU; "
        "'cpu' without GPUs, where one device-taking job runs at a time) and which job holds each."
    )


def system_stats(workspace: Path, jobs: list[JobStatus]) -> SystemStats:
    memory = psutil.virtual_memory()  # the RAM on every platform
    gpu_name, total, free = _nvidia_gpu() or _apple_gpu(memory.total) or (None, None, None)
    holders = {device: job.job_id for job in jobs if job.state == "running" for device in job.devices}
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
        devices=[DeviceUse(device=device, job_id=holders.get(device)) for device in machine_devices() or [CPU]],
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


def _apple_gpu(unified_bytes: int) -> tuple[str, float, None] | None:
    """Apple silicon (macOS on arm64): training runs on its GPU through MPS, in the memory it shares with
    the CPU; what is free of it is the RAM's figure. None elsewhere."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    return "Apple GPU (MPS)", round(unified_bytes / 2**30, 2), None
