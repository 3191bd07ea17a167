"""Which devices this machine has for jobs, and how many each job takes.

The devices are GPU ids as CUDA names them (an index or a UUID), found in this order:
`LORA_MCP_GPUS=0,1,2,3` (an override; it also lets the tests pretend to have GPUs on a CPU), else
`CUDA_VISIBLE_DEVICES`, else NVML's device count (the driver's library that nvidia-smi reads; no torch,
which would hold a CUDA context in the server), else none: a CPU or an Apple GPU, which the queue treats
as one device that a job taking any device takes whole (one training at a time).

A job's child gets `CUDA_VISIBLE_DEVICES=<its devices>`, and `LORA_MCP_GPUS=<the machine's devices>`
so that the queue it runs when it ends (`training.jobs.queue.finish_and_start_next`) sees the machine the
server saw, not the one GPU it was given.
"""

from __future__ import annotations

import os
from pathlib import Path

import pynvml

from training.captioners import is_tagger
from training.config import ConfigError, TrainingConfig
from training.jobs.store import QueueError, too_many_devices

OVERRIDE = "LORA_MCP_GPUS"
# A captioning model this small shares a device with whatever runs there instead of taking one: BLIP-base
# (blip, 990 MB of fp32 weights), GIT-base (git, 710 MB) and Florence-2-base (florence2-base, 0.23B
# parameters, ~0.5 GB in fp16) need about 1.5 GB with a batch of 8 images, the headroom a training sized for
# its card usually leaves (SD 1.5 at batch 1 needs ~8 GB of a 12 GB card). BLIP-large (1.9 GB), GIT-large
# (1.6 GB), Florence-2-large (florence2, 0.77B, ~1.5 GB in fp16), BLIP-2 OPT-2.7b (blip2, about 3.9B
# parameters: 7.7 GB in fp16, 15.5 GB in fp32) and the chat models (Qwen2.5-VL-3B ~7.5 GB, JoyCaption's 8B
# ~16 GB in bf16) take a device of their own. Weights are measured as stored; a captioner loads them in bf16
# (fp16) on a GPU.
SHARED_CAPTION_MODEL_BYTES = 1_200_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def machine_devices() -> list[str]:
    """This machine's GPU ids for jobs; [] when it has none."""
    for variable in (OVERRIDE, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(variable)
        if value is not None:
            ids = [part.strip() for part in value.split(",") if part.strip()]
            # CUDA reads the list up to its first invalid entry ('-1' hides every GPU from a process).
            valid = []
            for device in ids:
                if device.startswith("-"):
                    break
                valid.append(device)
            return valid
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [str(index) for index in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def child_environment(devices: list[str], machine: list[str]) -> dict[str, str]:
    """The variables a job's child gets on top of the server's: its own GPUs, and the machine's."""
    if not machine:
        return {}  # no GPUs: nothing to choose, and the child sees what the server sees
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices), OVERRIDE: ",".join(machine)}


def training_devices(config_yaml: str, machine: list[str]) -> int:
    """How many devices a training job of this config takes (its num_processes, as the trainer reads
    it), refused when the config does not validate, when this machine cannot give them, or when the job
    spans machines."""
    try:
        config = TrainingConfig.from_yaml(config_yaml)
    except ConfigError as exc:
        raise QueueError(f"{exc}; validate-training-config lists what to fix") from None
    if config.num_machines > 1:
        raise QueueError(
            f"the config spans {config.num_machines} machines (num_machines): the server starts jobs on this "
            "machine only. Run `lora-train CONFIG --machine-rank R --main-process-ip IP --main-process-port PORT` "
            "on each machine yourself (see the README), or set num_machines to 1 to train here"
        )
    if machine and config.num_processes > len(machine):
        raise QueueError(too_many_devices(config.num_processes, machine))
    return config.num_processes


def captioning_devices(caption_model: str) -> int:
    """0 for the template captioner (no model), a WD14 tagger and a model small enough to share; else 1."""
    if caption_model == "template":
        return 0
    folder = Path(caption_model)
    if is_tagger(folder):
        return 0  # the wd14 extra's onnxruntime runs it on the CPU; onnxruntime-gpu's use of ~0.5 GB can share
    weights = sum(
        path.stat().st_size for path in folder.rglob("*") if path.suffix in WEIGHT_SUFFIXES and path.is_file()
    )
    return 0 if weights <= SHARED_CAPTION_MODEL_BYTES else 1
