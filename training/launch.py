"""Starting a data-parallel run (issue 14): `lora-train` with num_processes x num_machines above 1.

`lora-train` itself becomes the *wrapper*: it starts Accelerate's multi-GPU launcher (torch elastic, the
same launch on CPU and GPU: with no GPU the workers use gloo) in a session of its own, with
`-m training.cli` and the same arguments, and waits. Each worker finds LOCAL_RANK/WORLD_SIZE in its
environment and trains its share (training/distributed.py). Accelerate gives every worker
OMP_NUM_THREADS=1 unless it is set: one thread per process, as torchrun does.

- Stop: the server writes the run's stop-request file, then SIGTERMs the wrapper's process group.
  Torch elastic's agent would turn a SIGTERM into killing its workers at once (no checkpoint), so the
  launcher is out of that group, and the wrapper ignores the first SIGTERM/SIGINT (after writing the
  stop file itself, for a Ctrl-C, in this machine's run directory, which this machine's first worker reads):
  the workers agree on it after their step, stop together and save. A second signal kills the launcher's
  tree. `processes.kill_tree(wrapper)` still reaches every worker, and a launcher whose wrapper is gone
  (SIGKILLed alone) ends itself and its workers (`_watch_wrapper`).
- Failure: a worker that raises writes its error to torch elastic's error file (Distributed.record_failure);
  the agent then stops the others (SIGTERM, SIGKILL after 30 s). The launcher, run in-process by this
  module's `__main__`, writes every failure to a JSON file; the wrapper picks the cause (see `root_cause`)
  and marks status.json `failed` with it. `lora-train --resume` continues from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from training.processes import detached_options, kill_tree
from training.run_files import RunFiles, end_status

if TYPE_CHECKING:
    from training.config import TrainingConfig

FAILURE_FILE_ENV = "LORA_TRAIN_FAILURE_FILE"  # where the launcher writes its workers' failures


@dataclass(frozen=True)
class MachineSettings:
    """`lora-train`'s per-machine flags, so that one YAML serves every machine."""

    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def errors(self, num_machines: int) -> list[str]:
        found = []
        if not 0 <= self.machine_rank < num_machines:
            found.append(
                f"--machine-rank {self.machine_rank}: the config has num_machines {num_machines}, so the rank is "
                f"0 to {num_machines - 1} (0 on the machine that writes the run's files)"
            )
        if num_machines > 1 and (self.main_process_ip is None or self.main_process_port is None):
            found.append(
                f"num_machines is {num_machines}: give every machine --main-process-ip and --main-process-port, "
                "the address of machine 0 and a free port on it (e.g. --main-process-port 29500)"
            )
        if self.main_process_port is not None and not 1 <= self.main_process_port <= 65535:
            found.append(f"--main-process-port {self.main_process_port}: a TCP port is 1 to 65535")
        return found


def launcher_command(config: TrainingConfig, settings: MachineSettings, worker_args: list[str]) -> list[str]:
    """Accelerate's launcher, run by this module, with `lora-train`'s worker arguments. Its --num_processes
    is the total over all machines; one machine picks a free port itself (port 0)."""
    command = [sys.executable, "-m", "training.launch", "--multi_gpu", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--num_processes", str(config.world_size)]
    command += ["--num_machines", str(config.num_machines), "--machine_rank", str(settings.machine_rank)]
    command += ["--main_process_port", str(settings.main_process_port or 0)]
    if settings.main_process_ip:
        command += ["--main_process_ip", settings.main_process_ip]
    return [*command, "-m", "training.cli", *worker_args]


def run_launcher(config: TrainingConfig, run_dir: Path, worker_args: list[str], settings: MachineSettings) -> dict:
    """Run this machine's workers to their end; the run's final status (state, step, error, lora_path): on machine
    0 status.json's, on another machine {"state": "completed"} when all its workers ended well."""
    files = RunFiles(run_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    handle, failure_file = tempfile.mkstemp(prefix="lora-train-failures-", suffix=".json")
    os.close(handle)
    env = {**os.environ, FAILURE_FILE_ENV: failure_file}
    signals: list[int] = []
    launched: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) == 1:
            files.request_stop()  # the server wrote it already; a Ctrl-C did not
            print("lora-train: stopping after this step (again to stop at once)", file=sys.stderr)
        elif launched:
            kill_tree(launched[0].pid)

    # before the launcher starts, so that no signal finds the default handler (which would leave it running)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        command = launcher_command(config, settings, worker_args)
        launched.append(subprocess.Popen(command, env=env, **detached_options()))
        code = launched[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        failures = _read_failures(Path(failure_file))
    if len(signals) > 1:
        end_status(files.status, "stopped", error="interrupted twice: no final checkpoint")
    elif code != 0:
        cause = root_cause(failures)
        error = describe_failure(cause) if cause else f"the launcher ended with exit code {code} (see its output)"
        error += (
            "; once that is fixed, continue from the last checkpoint: resume with resume-training or "
            f"`lora-train --resume {run_dir}`"
        )
        end_status(files.status, "failed", error=error, failed_rank=cause["rank"] if cause else None)
    elif settings.machine_rank > 0:  # the run's files are machine 0's (a status.json here is a failed attempt's)
        return {"state": "completed"}
    return json.loads(files.status.read_text(encoding="utf-8"))


def root_cause(failures: list[dict]) -> dict | None:
    """The failure that ended the run: the earliest error a worker recorded itself; else the earliest worker
    killed by a signal other than the agent's SIGTERM (which stops the others); else the earliest. Workers
    that failed because a peer was lost record nothing (distributed.PeerLost)."""
    recorded = [f for f in failures if f["recorded"]]
    killed = [f for f in failures if f["signal"] not in (None, "SIGTERM")]
    for group in (recorded, killed, failures):
        if group:
            return min(group, key=lambda f: f["timestamp"])
    return None


def describe_failure(failure: dict) -> str:
    who = f"process {failure['rank']} (pid {failure['pid']} on {failure['host']})"
    if failure["recorded"]:
        return f"{who} failed: {failure['message']}"
    if failure["signal"]:
        return f"{who} was killed by {failure['signal']}; the others were stopped"
    return f"{who} exited with code {failure['exitcode']}; the others were stopped"


def _read_failures(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "[]")
    finally:
        path.unlink(missing_ok=True)


def _launch(argv: list[str]) -> int:
    """Accelerate's `launch` in this process, writing its workers' failures where the wrapper reads them."""
    import socket

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failures = [
            {
                "rank": rank,
                "pid": failure.pid,
                "host": socket.gethostname(),
                "exitcode": failure.exitcode,
                "signal": failure.signal_name() if failure.exitcode < 0 else None,
                "recorded": failure.error_file != "<N/A>",  # torch elastic's mark of "no error file"
                "message": failure.message["message"] if isinstance(failure.message, dict) else failure.message,
                "timestamp": failure.timestamp,
            }
            for rank, failure in exc.failures.items()
        ]
        if path := os.environ.get(FAILURE_FILE_ENV):
            Path(path).write_text(json.dumps(failures), encoding="utf-8")
        print(f"lora-train: {len(failures)} process(es) failed", file=sys.stderr)
        return 1
    return 0


def _watch_wrapper() -> None:
    """End this launcher and its workers when the wrapper that started it is gone (SIGKILLed: nothing else would
    stop them, since the launcher runs in a session of its own). A daemon thread checks the parent every second."""
    import threading
    import time

    wrapper = os.getppid()

    def watch() -> None:
        while os.getppid() == wrapper:  # an orphan is adopted by init (or a subreaper): another parent pid
            time.sleep(1)
        print("lora-train: the wrapper is gone; stopping this machine's processes", file=sys.stderr)
        kill_tree(os.getpid())

    threading.Thread(target=watch, name="watch-wrapper", daemon=True).start()


if __name__ == "__main__":
    _watch_wrapper()
    sys.exit(_launch(sys.argv[1:]))
