"""get-training-status latency while a job trains on the same cores.

Starts the MCP server (`python -m server.main --workspace <fresh temp dir>`) through the SDK's
stdio client, writes an 8-image synthetic dataset into <workspace>/datasets, creates a config for
the built-in tiny SD 1.x model (64 px, batch 2, rank 4, 3000 steps, no sampling; every other
option the default), starts it, waits until the status shows step >= 1 (--after-step), then calls
get-training-status `--calls` times back to back and times each call in the client (request sent
to result parsed); it also reports how many cores the trainer kept busy meanwhile. Then
stop-training, wait for the job to be `stopped`, and make the same calls once more on the idle
server, for comparison. The built-in model builds itself into <workspace>/models on first use
(a few seconds); pass --models DIR to link an already built models folder instead.

    python bench/status_latency.py [--calls 200] [--steps 3000] [--after-step 1] [--models DIR]

Bound from the issue: p95 under 50 ms while training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BOUND_P95_MS = 50.0


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), linearly interpolated like numpy's default."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary(label: str, values_ms: list[float]) -> dict[str, float]:
    row = {
        "p50": percentile(values_ms, 50),
        "p95": percentile(values_ms, 95),
        "p99": percentile(values_ms, 99),
        "max": max(values_ms),
        "mean": statistics.fmean(values_ms),
    }
    print(
        f"{label}: {len(values_ms)} calls, p50 {row['p50']:6.2f} ms, p95 {row['p95']:6.2f} ms, "
        f"p99 {row['p99']:6.2f} ms, max {row['max']:6.2f} ms, mean {row['mean']:6.2f} ms"
    )
    return row


async def status(session: ClientSession, job_id: str) -> dict:
    result = await session.call_tool("get-training-status", {"job_id": job_id})
    if result.is_error:
        raise RuntimeError(f"get-training-status failed: {result.content}")
    return result.structured_content


async def wait_for(session: ClientSession, job_id: str, done, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await status(session, job_id)
        if done(current):
            return current
        if current["state"] in ("completed", "failed", "interrupted", "stopped") and not done(current):
            raise RuntimeError(f"job ended as {current['state']} while waiting for {what}: {current.get('error')}")
        await anyio.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trainer_pid(run_dir: str) -> int | None:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def step_times(run_dir: str, start: float, end: float) -> tuple[list[float], list[float]]:
    """Trainer step times (s) from metrics.jsonl: steps that ended before `start` (first step
    left out: it includes warm-up) and steps that ended between `start` and `end` (wall clock)."""
    try:
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return [], []
    before = [row["step_time"] for row in rows if row["step"] > 1 and row["time"] < start]
    during = [row["step_time"] for row in rows if start <= row["time"] <= end]
    return before, during


async def timed_calls(session: ClientSession, job_id: str, calls: int) -> tuple[list[float], dict, dict]:
    times = []
    first = last = None
    for _ in range(calls):
        start = time.perf_counter()
        result = await session.call_tool("get-training-status", {"job_id": job_id})
        times.append((time.perf_counter() - start) * 1000)
        if result.is_error:
            raise RuntimeError(f"get-training-status failed: {result.content}")
        first = first or result.structured_content
        last = result.structured_content
    return times, first, last


def stdio_workspace(prefix: str, models: Path | None) -> tuple[Path, Path, StdioServerParameters]:
    """A fresh temporary folder holding a workspace (with `models` linked in, when given), and the
    parameters that start `python -m server.main` on that workspace."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    workspace = scratch / "ws"
    workspace.mkdir()
    if models:
        (workspace / "models").symlink_to(models.resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORA_MCP_HOME": str(workspace)}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "server.main", "--workspace", str(workspace)], cwd=str(REPO), env=env
    )
    return scratch, workspace, params


def print_verdict(what: str, row: dict[str, float]) -> None:
    verdict = "met" if row["p95"] < BOUND_P95_MS else "NOT met"
    print(f"p95 {what} {row['p95']:.2f} ms (bound < {BOUND_P95_MS:.0f} ms: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="back-to-back get-training-status calls")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (enough to outlast the calls)")
    parser.add_argument("--after-step", type=int, default=1, help="start measuring once the status shows this step")
    parser.add_argument("--models", type=Path, help="an already built models folder to link into the workspace")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args()

    from training.data.synthetic import make_shape_dataset

    scratch, workspace, params = stdio_workspace("bench-status-", args.models)
    dataset = workspace / "datasets" / "shapes"  # inside the workspace: the server only reads folders it may use
    make_shape_dataset(dataset, 8, trigger_word="xyz_shape")
    results: dict[str, list[float]] = {}

    async def run() -> None:
        with open(scratch / "server.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                created = await session.call_tool(
                    "create-training-config",
                    {
                        "name": "bench",
                        "model_name": "builtin:tiny-sd15",
                        "dataset_path": str(dataset),
                        "trigger_word": "xyz_shape",
                        "resolution": 64,
                        "batch_size": 2,
                        "rank": 4,
                        "steps": args.steps,
                        "disable_sampling": True,
                    },
                )
                if created.is_error:
                    raise RuntimeError(f"create-training-config failed: {created.content}")
                started = await session.call_tool("start-training", {"config_name": "bench"})
                if started.is_error:
                    raise RuntimeError(f"start-training failed: {started.content}")
                job_id = started.structured_content["job_id"]
                t0 = time.monotonic()
                current = await wait_for(
                    session, job_id, lambda s: s["step"] >= args.after_step, 600, f"step >= {args.after_step}"
                )
                print(f"job {job_id}: step {current['step']} after {time.monotonic() - t0:.1f} s; measuring")

                pid = trainer_pid(current["run_dir"])
                cpu_before = cpu_seconds(pid)
                t1, wall1 = time.monotonic(), time.time()
                times, first, last = await timed_calls(session, job_id, args.calls)
                elapsed, wall2 = time.monotonic() - t1, time.time()
                cpu_after = cpu_seconds(pid)
                busy = (
                    f", trainer used {(cpu_after - cpu_before) / elapsed:.2f} cores meanwhile"
                    if cpu_before is not None and cpu_after is not None
                    else ""
                )
                print(
                    f"while training: {args.calls} calls in {elapsed:.2f} s, job went from step {first['step']} "
                    f"to {last['step']} ({last['state']}, {last.get('it_per_s') or 0:.1f} it/s){busy}"
                )
                if last["state"] != "running":
                    raise RuntimeError(f"the job was {last['state']} at the end of the measurement, not running")
                results["training"] = times

                await session.call_tool("stop-training", {"job_id": job_id})
                t2 = time.monotonic()
                final = await wait_for(session, job_id, lambda s: s["state"] == "stopped", 180, "state stopped")
                print(f"stopped at step {final['step']} after {time.monotonic() - t2:.1f} s")
                before, during = step_times(current["run_dir"], wall1, wall2)
                if before and during:
                    print(
                        f"trainer step time: median {statistics.median(before) * 1000:.1f} ms over {len(before)} steps "
                        f"before the calls, {statistics.median(during) * 1000:.1f} ms over {len(during)} steps "
                        "that ended during them"
                    )
                else:
                    print(f"trainer step time: {len(before)} steps before the calls, {len(during)} during them")

                results["idle"], _, _ = await timed_calls(session, job_id, args.calls)

    try:
        anyio.run(run)
    finally:
        if args.keep:
            print(f"workspace kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print()
    training = summary("get-training-status while training", results["training"])
    summary("get-training-status idle (job stopped)", results["idle"])
    print_verdict("while training", training)


if __name__ == "__main__":
    main()
