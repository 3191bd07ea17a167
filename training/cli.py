"""`lora-train`: train a LoRA from a YAML config, or continue a stopped run.

lora-train CONFIG.yaml [--run-dir DIR]
lora-train --resume RUN_DIR
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
    from training.run_files import RunFiles
    from training.trainer import RunAlreadyExists, run_training

    try:
        if args.resume:
            config = TrainingConfig.load(args.resume / "config.yaml")
            run_dir = args.resume
            # A stop request left by a run that was killed before it read it would stop this one at once.
            RunFiles(run_dir).clear_stop_request()
        else:
            config = TrainingConfig.load(args.config)
            run_dir = args.run_dir
    except ConfigError as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return 2

    if not args.quiet:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("training").addHandler(handler)
    try:
        result = run_training(config, run_dir, resume=args.resume is not None, progress=not args.quiet)
    except RunAlreadyExists as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return 2
    if result.state == "failed":
        print(f"lora-train: failed: {result.error}", file=sys.stderr)
        return 1
    if result.state == "stopped":
        print(f"stopped at step {result.step}; continue with: lora-train --resume {result.run_dir}")
        return 130
    print(f"done: {result.lora_path}")
    return 0


def options_reference() -> str:
    """Every option with its aliases, default and description, from the config model itself."""
    from pydantic import AliasChoices

    from training.config import TrainingConfig, allowed_values

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
        allowed = "one of " + ", ".join(map(str, choices)) if choices else allowed_values(name)
        limits = f" [{allowed}]" if allowed else ""
        lines.append(f"{name}{also} = {default}{limits}\n    {info.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
