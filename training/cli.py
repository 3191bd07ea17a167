"""`lora-train`: train a LoRA from a YAML config, or continue a stopped run.

lora-train CONFIG.yaml [--run-dir DIR]
lora-train --resume RUN_DIR
lora-train --import FILE -o OUT.yaml [--format kohya|ai-toolkit]   (a kohya or ai-toolkit config as ours)
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
    imports = parser.add_argument_group("configs of other trainers (the keys left out are listed on stderr)")
    imports.add_argument(
        "--import", dest="import_file", type=Path, metavar="FILE", help="kohya TOML/JSON or ai-toolkit YAML"
    )
    imports.add_argument("-o", "--output", type=Path, metavar="OUT.yaml", help="the config to write (named OUT)")
    imports.add_argument("--format", choices=("kohya", "ai-toolkit"), help="the file's format (default: detected)")
    several = parser.add_argument_group("several machines (num_machines > 1 in the config; the same YAML on each)")
    several.add_argument("--machine-rank", type=int, default=0, help="this machine: 0 (writes the run's files) to N-1")
    several.add_argument("--main-process-ip", metavar="IP", help="the address of machine 0, as the others reach it")
    several.add_argument("--main-process-port", type=int, metavar="PORT", help="a free TCP port on machine 0")
    args = parser.parse_args(argv)
    if args.options:
        print(options_reference())
        return 0
    if args.import_file is not None or args.output is not None:
        if args.import_file is None or args.output is None or args.config or args.resume:
            parser.error("give --import FILE and -o OUT.yaml, and no CONFIG or --resume")
        return import_file(args.import_file, args.output, args.format)
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
        if not in_worker() and (failed := _download_base_model(config, args.quiet)):  # workers find it cached
            print(f"lora-train: {failed}", file=sys.stderr)
            return 1
        if config.world_size > 1 and not in_worker():
            return _run_workers(args, config, run_dir or default_run_dir(config.name), settings)
    except (ConfigError, RunAlreadyExists) as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return 2
    return _train_here(args, config, run_dir)


def _download_base_model(config, quiet: bool) -> str | None:
    """A hub id not in the cache is downloaded here first when online, as diffusers would (the server's jobs
    get theirs from a download job queued before them): by this process alone, before any worker starts,
    resumable (training/downloads.py). None when there is nothing to fetch or it is done, else why not;
    offline, or for a model that is not found, the trainer reports what is missing."""
    from training.models.source import ModelNotCachedError, ModelNotFoundError, resolve_model

    try:
        resolve_model(config.model_name, config.base_model_config)
    except ModelNotCachedError as exc:
        from training.downloads import download_here

        return download_here(exc.repo_id, quiet=quiet)
    except ModelNotFoundError:
        pass
    return None


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


def import_file(source: Path, output: Path, source_format: str | None) -> int:
    """`lora-train --import`: write `output` from another trainer's config, list what it leaves out on stderr."""
    import yaml

    from training.config_import import ConfigImportError, import_config
    from training.workspace import atomic_write_text

    try:
        if output.exists():
            raise ConfigImportError(f"{output} exists: remove it or give another -o")
        text = source.read_text(encoding="utf-8")
        beside = source.parent  # kohya's dataset_config and sample_prompts, relative to the config's folder

        def read_beside(given: str) -> str:
            return (beside / Path(given).expanduser()).read_text(encoding="utf-8")

        result = import_config(text, name=output.stem, format=source_format, read_file=read_beside)
        atomic_write_text(output, yaml.safe_dump(result.stored_values(), sort_keys=False, allow_unicode=True))
    except (ConfigImportError, OSError, UnicodeDecodeError) as exc:
        print(f"lora-train: {source} not imported: {exc}", file=sys.stderr)
        return 2
    for unmapped in result.unmapped:
        print(f"not imported: {unmapped.line()}", file=sys.stderr)
    print(f"wrote {output} ({result.format}); train it with: lora-train {output}")
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
