"""`lora-train`: train a LoRA from a YAML config, or continue a stopped run.

lora-train CONFIG.yaml [--run-dir DIR]
lora-train --resume RUN_DIR
lora-train CONFIG.yaml --machine-rank R --main-process-ip IP --main-process-port PORT   (num_machines > 1)

With num_processes x num_machines above 1 this process starts the data-parallel workers (training/launch.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path

from tqdm import tqdm


class _TqdmHandler(logging.Handler):
    """Log lines on stderr that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-train", description="Train a LoRA for Stable Diffusion 1.x/2.x.")
    parser.add_argument("config", nargs="?", type=Path, help="training config (YAML)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: <workspace>/runs/<name>-<UTC time>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    parser.add_argument("--options", action="store_true", help="list every config option with its default and exit")
    several = parser.add_argument_group("several machines (num_machines > 1 in the config; the same YAML on each)")
    several.add_argument("--machine-rank", type=int, default=0, help="this machine: 0 (writes the run's files) to N-1")
    several.add_argument("--main-process-ip", metavar="IP", help="the address of machine 0, as the others reach it")
    several.add_argument("--main-process-port", type=int, metavar="PORT", help="a free TCP port on machine 0")
    args = parser.parse_args(argv)
    if args.options:
        print(options_reference())
        return 0
    if (args.config is None) == (args.resume is None):
        parser.error("give either CONFIG or --resume RUN_DIR")

    # Library chatter (loading bars, optional-backend notices) would drown the run's own lines.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Imported here so that `lora-train --help` answers without loading torch.
    from training.config import ConfigError, TrainingConfig
    from training.distributed import in_worker
    from training.launch import MachineSettings
    from training.run_files import RunAlreadyExists, RunFiles, default_run_dir

    settings = MachineSettings(args.machine_rank, args.main_process_ip, args.main_process_port)
    try:
        if args.resume:
            config = TrainingConfig.load(args.resume / "config.yaml")
            run_dir = args.resume
            if not in_worker():  # a stop request left by a run killed before it read it would stop this one at once
                RunFiles(run_dir).clear_stop_request()
        else:
            config = TrainingConfig.load(args.config)
            run_dir = args.run_dir
        if not in_worker() and (errors := settings.errors(config.num_machines)):  # workers get no flags
            raise ConfigError(errors)
        if config.world_size > 1 and not in_worker():
            return _run_workers(args, config, run_dir or default_run_dir(config.name), settings)
    except (ConfigError, RunAlreadyExists) as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return 2
    return _train_here(args, config, run_dir)


def _train_here(args: argparse.Namespace, config, run_dir: Path | None) -> int:
    """This process trains: alone, or as one worker of a data-parallel run (which ends 0 unless it failed)."""
    from training.distributed import Distributed, in_worker
    from training.models.loading import pick_device
    from training.run_files import RunAlreadyExists
    from training.trainer import run_training

    dist = Distributed.from_environment(pick_device().type)
    show = not args.quiet and dist.is_main
    if show:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("training").addHandler(handler)
    try:
        result = run_training(config, run_dir, resume=args.resume is not None, progress=show, dist=dist)
    except RunAlreadyExists as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return 2
    if in_worker():
        if result.state == "failed":
            return 1
        dist.close()
        return 0
    return _report(vars(result))


def _run_workers(args: argparse.Namespace, config, run_dir: Path, settings) -> int:
    """Start this machine's share of a data-parallel run (training/launch.py) and wait for its end."""
    from training.launch import run_launcher
    from training.run_files import RunFiles

    RunFiles(run_dir).check_new(args.resume is not None)
    if args.resume:
        worker_args = ["--resume", str(run_dir.resolve())]
    else:  # every worker gets the same run directory, even the default one named by the time
        worker_args = [str(args.config.resolve()), "--run-dir", str(run_dir.resolve())]
    status = run_launcher(config, run_dir, worker_args + (["--quiet"] if args.quiet else []), settings)
    return _report({**status, "run_dir": run_dir})


def _report(status: dict) -> int:
    """The run's end on stdout/stderr, and lora-train's exit code: 0 done, 1 failed, 130 stopped."""
    if status["state"] == "failed":
        print(f"lora-train: failed: {status.get('error')}", file=sys.stderr)
        return 1
    if status["state"] == "stopped":
        print(f"stopped at step {status.get('step')}; continue with: lora-train --resume {status.get('run_dir')}")
        return 130
    print(f"done: {status.get('lora_path') or 'the processes of this machine ended well; machine 0 wrote the LoRA'}")
    return 0


def options_reference() -> str:
    """Every option with its aliases, default and description, from the config model itself."""
    from pydantic import AliasChoices

    from training.config import TrainingConfig
    from training.config_errors import allowed_values

    lines = []
    for name, info in TrainingConfig.model_fields.items():
        default = (
            "required"
            if info.is_required()
            else (
                "[]" if info.default_factory is list else "{}" if info.default_factory is dict else repr(info.default)
            )
        )
        aliases = (
            [a for a in info.validation_alias.choices if a != name]
            if isinstance(info.validation_alias, AliasChoices)
            else []
        )
        also = f" (also: {', '.join(aliases)})" if aliases else ""
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
        allowed = "one of " + ", ".join(map(str, choices)) if choices else allowed_values(TrainingConfig, name)
        limits = f" [{allowed}]" if allowed else ""
        lines.append(f"{name}{also} = {default}{limits}\n    {info.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    from training.jobs.queue import exit_as_job

    exit_as_job(main)  # a job the queue started ends its row and starts the next queued job, server or not
