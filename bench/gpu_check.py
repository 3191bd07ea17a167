"""The GPU check: the code paths the README promises for NVIDIA GPUs, run once on a lent CUDA machine.

    python bench/gpu_check.py --out gpu_report.json            # on the CUDA machine (a few minutes)
    python bench/gpu_check.py --cpu --out cpu_report.json      # its tiny parts on a CPU (a test runs this)
    python bench/gpu_check.py --prepare-wheelhouse --python 3.12   # here, before: the wheels it installs there

A GPU machine may have torch and nothing else, and no network: when the project does not import, the script
installs it from `bench/wheelhouse/` (ignored by git, kept well under the 64 MiB a device call may carry),
without an index, and says what it skipped. Each check is one entry of the JSON report: `ok`, or `skipped`
with the reason (a library missing, no CUDA), or `failed` with the error; the report also names the device,
torch's version and CUDA's. The checks:

- tiny-model runs (`builtin:tiny-sd15`, and `builtin:tiny-flux` for 8-bit weights), 4 steps at 64 px each:
  fp16 (autocast with the gradient scaler, VAE kept fp32), bf16, `low_vram` (text encoders on the CPU),
  `quantize_base: 8bit` (bitsandbytes on CUDA, torchao elsewhere) and `adamw8bit` (bitsandbytes): each must
  end `completed` with finite losses and a LoRA file;
- a full-size SD 1.5 UNet (its published config, random weights) with the trainer's LoRA targets at 512 px
  (64x64 latents), 20 AdamW steps under fp16 autocast: seconds per step (median after 3 warm-up steps) and
  peak VRAM. CUDA only: on a CPU it is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Before anything imports huggingface_hub: the GPU machine has no network, and the report is the output.
for variable, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(variable, value)
REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / "bench" / "wheelhouse"
WHEELHOUSE_LIMIT = 60 * 2**20  # of the 64 MiB a device call carries, with room for the source tree (~2 MiB)
# What the trainer imports beyond torch (pyproject's dependencies less torch and the server's), as pip names.
TRAINER_REQUIREMENTS = [
    "diffusers>=0.42,<1",
    "peft>=0.17,<1",
    "transformers>=4.50,<5.24",
    "safetensors>=0.4",
    "pydantic>=2.7,<3",
    "pyyaml>=6",
    "pillow>=10",
    "tqdm>=4.66",
    "platformdirs>=4",
    "numpy>=1.26",
]
# ...and what those need that a torch-only machine lacks. Downloaded without dependencies, because pip
# would otherwise fetch torch (peft and accelerate depend on it): a ~900 MB wheel the machine already has.
THEIR_DEPENDENCIES = [
    "accelerate", "huggingface_hub", "hf_xet", "tokenizers", "regex", "requests", "urllib3", "idna", "certifi",
    "charset_normalizer", "packaging", "psutil", "importlib_metadata", "zipp", "pydantic_core", "annotated_types",
    "typing_inspection", "httpx", "httpcore", "h11", "anyio", "sniffio", "shellingham", "typer", "click",
    "rich", "markdown_it_py", "mdurl", "pygments",
]
# SD 1.5's UNet (stable-diffusion-v1-5/unet/config.json): 860 M parameters.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
FULL_SIZE_STEPS, WARM_UP_STEPS = 20, 3


def prepare_wheelhouse(python_version: str) -> None:
    """Download (here, online) the wheels the trainer needs beyond torch for a Linux x86-64 CPython of
    `python_version`: binary wheels only, so nothing is built on the GPU machine."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    platform_options = ["--platform", "manylinux2014_x86_64", "--python-version", python_version]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE), "--only-binary=:all:"]
    names = [*TRAINER_REQUIREMENTS, *THEIR_DEPENDENCIES]
    subprocess.run([*download, "--no-deps", *platform_options, *names], check=True)
    # bitsandbytes (about 60 MB) only if the wheelhouse stays within what a device call carries.
    subprocess.run([*download, "--no-deps", *platform_options, "bitsandbytes"], check=False)
    bitsandbytes = list(WHEELHOUSE.glob("bitsandbytes-*.whl"))
    if bitsandbytes and sum(path.stat().st_size for path in WHEELHOUSE.glob("*.whl")) > WHEELHOUSE_LIMIT:
        bitsandbytes[0].unlink()
        print("bitsandbytes left out: the wheelhouse would pass the 64 MiB a device call carries")
    total = sum(path.stat().st_size for path in WHEELHOUSE.glob("*.whl"))
    print(f"{WHEELHOUSE}: {total / 2**20:.1f} MiB of wheels for CPython {python_version}")


def ensure_project(notes: list[str]) -> None:
    """Make `training` importable: from the source tree, installing what it needs from the wheelhouse."""
    sys.path.insert(0, str(REPO))
    needed = ("diffusers", "peft", "transformers", "yaml", "pydantic")
    missing = [name for name in needed if not importlib.util.find_spec(name)]
    if not missing:
        return
    if not any(WHEELHOUSE.glob("*.whl")):
        raise SystemExit(f"missing {', '.join(missing)}, and {WHEELHOUSE} has no wheels: run --prepare-wheelhouse")
    wheels = [*TRAINER_REQUIREMENTS]
    if any(WHEELHOUSE.glob("bitsandbytes-*.whl")):
        wheels.append("bitsandbytes")
    else:
        notes.append("bitsandbytes is not in the wheelhouse: its checks are skipped")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(WHEELHOUSE), *wheels],
        check=True,
    )
    notes.append(f"installed {', '.join(missing)} (and their dependencies) from {WHEELHOUSE}")


def tiny_run(name: str, workspace: Path, dataset: Path, **options) -> dict:
    """Four steps of a tiny model with `options`: completed, finite losses, a LoRA file."""
    from training.config import TrainingConfig
    from training.trainer import run_training

    values = dict(
        name=name,
        model_name="builtin:tiny-sd15",
        dataset_path=str(dataset),
        resolution=64,
        steps=4,
        batch_size=2,
        rank=4,
        learning_rate=1e-3,
        trigger_word="xyz_shape",
        disable_sampling=True,
        save_every=1000,
    )
    values.update(options)
    started = time.perf_counter()
    result = run_training(TrainingConfig.from_dict(values), workspace / "runs" / name)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "kind" not in row]
    lora = result.run_dir / f"{name}.safetensors"
    ok = result.state == "completed" and losses and all(math.isfinite(x) for x in losses) and lora.is_file()
    return {
        "status": "ok" if ok else "failed",
        "state": result.state,
        "error": result.error,
        "losses": losses,
        "lora_bytes": lora.stat().st_size if lora.is_file() else None,
        "seconds": round(time.perf_counter() - started, 2),
    }


def full_size_unet(device) -> dict:
    """The SD 1.5 UNet at full size with random weights: s/step and peak VRAM of LoRA training at 512 px."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from training.families import SD1

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype=torch.float16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(SD1.lora_target_modules)))
    trained = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trained:
        parameter.data = parameter.data.float()  # LoRA weights train in fp32, as the trainer keeps them
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    latents = torch.randn(1, 4, 64, 64, device=device)
    text = torch.randn(1, 77, 768, device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(FULL_SIZE_STEPS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            prediction = unet(latents, torch.randint(0, 1000, (1,), device=device), text).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), latents)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {
        "status": "ok" if math.isfinite(loss.item()) else "failed",
        "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "lora_parameters_m": round(sum(p.numel() for p in trained) / 1e6, 2),
        "s_per_step": round(statistics.median(times[WARM_UP_STEPS:]), 4),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }


def run_checks(cpu: bool) -> dict:
    notes: list[str] = []
    ensure_project(notes)
    import torch

    from training.data.synthetic import make_shape_dataset

    cuda = torch.cuda.is_available() and not cpu
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "notes": notes,
        "checks": {},
    }
    bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    eight_bit = cuda and bitsandbytes or not cuda and importlib.util.find_spec("torchao") is not None
    tiny = {
        "tiny_fp32": ({}, None),
        "tiny_fp16": ({"mixed_precision": "fp16"}, None),
        "tiny_bf16": ({"mixed_precision": "bf16"}, None),
        "tiny_low_vram": ({"low_vram": True, "mixed_precision": "bf16"}, None),
        "tiny_flux_8bit": (
            {"model_name": "builtin:tiny-flux", "quantize_base": "8bit", "optimizer": "adafactor"},
            None if eight_bit else "needs bitsandbytes (CUDA) or torchao",
        ),
        "tiny_adamw8bit": (
            {"optimizer": "adamw8bit"},
            None if cuda and bitsandbytes else "needs bitsandbytes and CUDA",
        ),
    }
    with tempfile.TemporaryDirectory() as folder:
        workspace = Path(folder)
        os.environ["LORA_MCP_HOME"] = str(workspace)  # built-in models are built there, once
        if cpu:
            os.environ["LORA_TRAIN_DEVICE"] = "cpu"
        dataset = workspace / "shapes"
        make_shape_dataset(dataset, 4, trigger_word="xyz_shape")
        for name, (options, skip) in tiny.items():
            report["checks"][name] = _guarded(lambda n=name, o=options: tiny_run(n, workspace, dataset, **o), skip)
        report["checks"]["full_size_sd15_unet_512px"] = _guarded(
            lambda: full_size_unet(torch.device("cuda")), None if cuda else "CUDA only (860 M parameters)"
        )
    return report


def _guarded(check, skip: str | None) -> dict:
    if skip:
        return {"status": "skipped", "reason": skip}
    try:
        return check()
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the tiny checks on the CPU; skip CUDA-only ones")
    parser.add_argument("--out", type=Path, default=Path("gpu_report.json"), help="where the JSON report goes")
    parser.add_argument("--prepare-wheelhouse", action="store_true", help="download the wheels into bench/wheelhouse")
    parser.add_argument("--python", default="3.12", help="with --prepare-wheelhouse: the GPU machine's Python")
    args = parser.parse_args()
    if args.prepare_wheelhouse:
        prepare_wheelhouse(args.python)
        return 0
    report = run_checks(args.cpu)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, check in report["checks"].items():
        print(f"{name}: {check['status']} {check.get('reason') or check.get('error') or ''}".rstrip())
    return 1 if any(check["status"] == "failed" for check in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
