"""get-training-status over HTTP (POST /mcp/tool): pollers against a training job, and the server's RSS.

Starts a real `lora-mcp http` process (token auth, loopback, free port) on a fresh temporary workspace,
writes an 8-image synthetic dataset into <workspace>/datasets/shapes and creates one config through POST
/mcp/tool (built-in tiny SD 1.x model, --resolution px, batch 2, rank 4, --steps steps, no sampling, one
checkpoint at the end). One server serves the whole bench. The bench builds the tiny model into
<workspace>/models itself before the server starts (a few seconds; --models DIR links an already built
folder instead): left to start-training, the build would happen inside the server process, which would
then hold torch for its lifetime (RSS ~85 -> ~440 MiB) and not be the server a client normally talks to.

1. Pollers. Alternating training runs of that config, --runs of each: "none" (no status calls while it
   trains) and "pollers" (--pollers threads, each with its own `requests` session, calling
   get-training-status once every --interval s, their phases spread evenly over the interval). Before
   each run's window the bench polls every 0.25 s until the status shows step >= 1 (the model is loaded
   and training), the same in both conditions; from then on it makes no calls of its own and waits for
   the trainer process (pid from status.json) to exit. A run's step time is the median of the
   `step_time` of its metrics.jsonl step rows that ended inside the window, the first --warmup-steps
   left out; a condition's figure is the median of its runs. Latency is per call in the poller (request
   sent to JSON parsed), over every poller call of every run.
2. RSS. On the same server, after the runs and --rss-warmup further calls, the server process's RSS
   (psutil, the `lora-mcp http` pid, children excluded) before and after --calls get-training-status
   calls of the last, finished job, made by --call-threads threads; sampled every 0.5 s meanwhile.

    python bench/http_load.py [--runs 7] [--pollers 10] [--steps 500] [--calls 10000] [--json FILE]
    python bench/http_load.py --quick    # 2 runs of each, 150 steps, 500 calls: checks the bench works

Bounds from issue 13: pollers' p95 under 50 ms, step time with pollers within 5% of without, RSS growth
over 10,000 calls under 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from bench.status_latency import BOUND_P95_MS, summary  # noqa: E402
from http_server import HttpServer, start_http_server  # noqa: E402

BOUND_STEP_DIFF_PCT = 5.0
BOUND_RSS_GROWTH_PCT = 10.0
TERMINAL = ("completed", "failed", "interrupted", "stopped")
CONFIG = "bench"


class Api:
    """POST /mcp/tool with the server's bearer token, on one `requests` session (one per thread:
    a session is not meant to be shared between threads)."""

    def __init__(self, server: HttpServer):
        self.url = f"{server.url}/mcp/tool"
        self.session = requests.Session()
        self.session.headers.update(server.headers)

    def call(self, tool: str, arguments: dict) -> dict:
        answer = self.session.post(self.url, json={"tool": tool, "arguments": arguments}, timeout=60)
        if answer.status_code != 200:
            raise RuntimeError(f"{tool}: HTTP {answer.status_code}: {answer.text}")
        return answer.json()["result"]

    def timed_status(self, job_id: str) -> float:
        """One get-training-status call's time (ms)."""
        start = time.perf_counter()
        self.call("get-training-status", {"job_id": job_id})
        return (time.perf_counter() - start) * 1000


def wait_for(api: Api, job_id: str, done, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = api.call("get-training-status", {"job_id": job_id})
        if done(current):
            return current
        if current["state"] in TERMINAL:
            raise RuntimeError(f"job ended as {current['state']} while waiting for {what}: {current.get('error')}")
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def poll(server: HttpServer, job_id: str, interval: float, offset: float, stop: threading.Event, out: dict) -> None:
    """One poller: get-training-status every `interval` s from `offset` s on, until `stop`. A call
    slower than the interval delays the next one rather than bunching calls to catch up."""
    api = Api(server)
    next_call = time.monotonic() + offset
    while not stop.wait(max(0.0, next_call - time.monotonic())):
        try:
            out["latencies"].append(api.timed_status(job_id))
        except Exception as exc:  # noqa: BLE001 - reported by the main thread, which fails the bench
            out["errors"].append(repr(exc))
            return
        next_call = max(next_call + interval, time.monotonic())


def window_step_times(run_dir: Path, since: float, warmup_steps: int) -> list[float]:
    """`step_time` (s) of the optimizer steps (rows without a `kind`: not validation or update rows)
    that ended at or after `since` (wall clock), past the first `warmup_steps`."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["step_time"] for r in rows if "kind" not in r and r["step"] > warmup_steps and r["time"] >= since]


def wait_for_trainer(run_dir: Path, timeout: float) -> None:
    """Wait for the trainer process (its pid is in status.json) to exit, without calling the server."""
    try:
        trainer = psutil.Process(json.loads((run_dir / "status.json").read_text())["pid"])
        trainer.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass  # already done


def train_once(server: HttpServer, api: Api, pollers: int, args: argparse.Namespace) -> dict:
    """One training run of the bench config with `pollers` pollers: its median step time and the
    pollers' latencies."""
    job_id = api.call("start-training", {"config_name": CONFIG})["job_id"]
    current = wait_for(api, job_id, lambda s: s["step"] >= 1, 600, "step >= 1")
    run_dir = Path(current["run_dir"])
    out: dict[str, list] = {"latencies": [], "errors": []}
    stop = threading.Event()
    threads = [
        threading.Thread(target=poll, args=(server, job_id, args.interval, i * args.interval / pollers, stop, out))
        for i in range(pollers)
    ]
    since = time.time()
    for thread in threads:
        thread.start()
    wait_for_trainer(run_dir, timeout=600 + args.steps * 2)
    stop.set()
    for thread in threads:
        thread.join()
    if out["errors"]:
        raise RuntimeError(f"{len(out['errors'])} poller calls failed, the first: {out['errors'][0]}")
    final = wait_for(api, job_id, lambda s: s["state"] in TERMINAL, 120, "the job's end")
    if final["state"] != "completed":
        raise RuntimeError(f"job {job_id} ended as {final['state']}: {final.get('error')}")
    times = window_step_times(run_dir, since, args.warmup_steps)
    if len(times) < 10:
        raise RuntimeError(f"only {len(times)} steps in the window: raise --steps")
    return {"job_id": job_id, "step_s": statistics.median(times), "steps": len(times), "latencies": out["latencies"]}


def alternate(server: HttpServer, api: Api, args: argparse.Namespace) -> tuple[dict[str, list[dict]], str]:
    """--runs alternating runs of each condition; the last job's id."""
    runs: dict[str, list[dict]] = {"none": [], "pollers": []}
    for index in range(args.runs):
        for condition, pollers in (("none", 0), ("pollers", args.pollers)):
            run = train_once(server, api, pollers, args)
            runs[condition].append(run)
            calls = f", {len(run['latencies'])} poller calls" if pollers else ""
            print(
                f"run {index + 1} {condition:8s} median step {run['step_s'] * 1000:7.2f} ms over {run['steps']} steps"
                f"{calls}",
                flush=True,
            )
    return runs, run["job_id"]


def rss_growth(server: HttpServer, job_id: str, args: argparse.Namespace) -> dict:
    """The server's RSS before and after --calls status calls of a finished job (after --rss-warmup)."""
    process = psutil.Process(server.process.pid)
    warm = Api(server)
    for _ in range(args.rss_warmup):
        warm.timed_status(job_id)
    before = process.memory_info().rss
    latencies: list[float] = []
    errors: list[str] = []
    share, extra = divmod(args.calls, args.call_threads)

    def caller(count: int) -> None:
        api = Api(server)
        try:
            for _ in range(count):
                latencies.append(api.timed_status(job_id))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=caller, args=(share + (i < extra),)) for i in range(args.call_threads)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    samples = [before]
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.5)
        samples.append(process.memory_info().rss)
    elapsed = time.monotonic() - start
    if errors:
        raise RuntimeError(f"{len(errors)} status calls failed, the first: {errors[0]}")
    after = process.memory_info().rss
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "rss_peak_mib": max(samples + [after]) / 2**20,
        "growth_pct": (after - before) / before * 100,
        "latencies": latencies,
    }


def stop_server(server: HttpServer) -> None:
    """Stop the server and, first, a trainer it still runs (a bench that failed mid-run): a job's
    process outlives the server by design, and would go on taking the cores."""
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        child.terminate()
    for child in psutil.wait_procs(children, timeout=10)[1]:
        child.kill()
    server.stop()


def prepare(server: HttpServer, dataset: Path, args: argparse.Namespace) -> Api:
    api = Api(server)
    api.call(
        "create-training-config",
        {
            "name": CONFIG,
            "model_name": "builtin:tiny-sd15",
            "dataset_path": str(dataset),
            "trigger_word": "xyz_shape",
            "resolution": args.resolution,
            "batch_size": 2,
            "rank": 4,
            "steps": args.steps,
            "save_every": args.steps,  # no checkpoint inside the window: writing one is not a step's cost
            "disable_sampling": True,
        },
    )
    return api


def report(runs: dict[str, list[dict]], rss: dict, args: argparse.Namespace) -> dict:
    step = {condition: statistics.median(r["step_s"] for r in rows) * 1000 for condition, rows in runs.items()}
    diff = (step["pollers"] - step["none"]) / step["none"] * 100
    print()
    print("| condition | runs | run medians (ms/step) | median (ms/step) |")
    print("|---|---|---|---|")
    for condition, rows in runs.items():
        medians = ", ".join(f"{r['step_s'] * 1000:.1f}" for r in rows)
        print(f"| {condition} | {len(rows)} | {medians} | {step[condition]:.2f} |")
    print()
    polled = summary(
        f"get-training-status, {args.pollers} pollers at 1 call / {args.interval:g} s while training",
        [ms for r in runs["pollers"] for ms in r["latencies"]],
    )
    bulk = summary(f"get-training-status, {rss['calls']} calls by {args.call_threads} threads", rss["latencies"])
    print(
        f"server RSS: {rss['rss_before_mib']:.1f} MiB before, {rss['rss_after_mib']:.1f} MiB after "
        f"{rss['calls']} calls in {rss['seconds']:.1f} s (peak {rss['rss_peak_mib']:.1f} MiB)"
    )
    print()
    verdicts = {
        "poller_p95": polled["p95"] < BOUND_P95_MS,
        "step_time": abs(diff) <= BOUND_STEP_DIFF_PCT,
        "rss": rss["growth_pct"] < BOUND_RSS_GROWTH_PCT,
    }
    word = {True: "met", False: "NOT met"}
    print(f"pollers' p95 {polled['p95']:.2f} ms (bound < {BOUND_P95_MS:.0f} ms: {word[verdicts['poller_p95']]})")
    print(
        f"step time with pollers {step['pollers']:.2f} ms vs {step['none']:.2f} ms without: {diff:+.2f}% "
        f"(bound within {BOUND_STEP_DIFF_PCT:.0f}%: {word[verdicts['step_time']]})"
    )
    print(f"RSS growth {rss['growth_pct']:+.2f}% (bound < {BOUND_RSS_GROWTH_PCT:.0f}%: {word[verdicts['rss']]})")
    return {
        "step_ms": step,
        "step_diff_pct": diff,
        "runs": {c: [{k: v for k, v in r.items() if k != "latencies"} for r in rows] for c, rows in runs.items()},
        "poller_calls": sum(len(r["latencies"]) for r in runs["pollers"]),
        "poller_latency_ms": polled,
        "bulk_latency_ms": bulk,
        "rss": {k: v for k, v in rss.items() if k != "latencies"},
        "met": verdicts,
    }


def bench_workspace(prefix: str, models: Path | None) -> tuple[Path, Path]:
    """(scratch folder, workspace in it) for a bench's `lora-mcp http`, with builtin:tiny-sd15 in its models
    (`models`, an already built folder, linked; else built here), made this process's LORA_MCP_HOME; a SIGTERM
    then still runs the bench's clean-up."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    workspace = scratch / "ws"
    workspace.mkdir()
    if models:
        (workspace / "models").symlink_to(models.resolve())
    else:  # here, not in the server: start-training would build it in the server process, which then
        # holds torch (~350 MiB more RSS) for its lifetime, and the RSS growth would be measured on that
        from training.models.builtin import ensure_builtin

        ensure_builtin("builtin:tiny-sd15", workspace / "models")
    # start_http_server links <LORA_MCP_HOME>/models into the workspace: here that is the workspace itself.
    os.environ.update(LORA_MCP_HOME=str(workspace), HF_HUB_OFFLINE="1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops what it started
    return scratch, workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="training runs per condition, alternating")
    parser.add_argument("--pollers", type=int, default=10, help="concurrent pollers in the 'pollers' runs")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between one poller's calls")
    parser.add_argument("--steps", type=int, default=500, help="training steps per run (~60 ms each at 64 px here)")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (px)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="first steps of a run left out of its step time")
    parser.add_argument("--calls", type=int, default=10000, help="status calls between the two RSS readings")
    parser.add_argument("--call-threads", type=int, default=4, help="threads making those calls")
    parser.add_argument("--rss-warmup", type=int, default=500, help="status calls before the first RSS reading")
    parser.add_argument("--quick", action="store_true", help="2 runs of each, 150 steps, 500 calls (100 warm-up)")
    parser.add_argument("--models", type=Path, help="an already built models folder to link into the workspace")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args()
    if args.quick:  # new defaults: what the command line gives still wins
        parser.set_defaults(runs=2, steps=150, calls=500, rss_warmup=100)
        args = parser.parse_args()

    from training.data.synthetic import make_shape_dataset

    scratch, workspace = bench_workspace("bench-http-load-", args.models)
    dataset = workspace / "datasets" / "shapes"  # inside the workspace: the server only reads folders it may use
    make_shape_dataset(dataset, 8, trigger_word="xyz_shape")
    server = start_http_server(workspace)
    try:
        rss = psutil.Process(server.process.pid).memory_info().rss
        print(f"server pid {server.process.pid}, RSS at start {rss / 2**20:.1f} MiB", flush=True)
        api = prepare(server, dataset, args)
        runs, last_job = alternate(server, api, args)
        rss = rss_growth(server, last_job, args)
    finally:
        stop_server(server)
        if args.keep:
            print(f"workspace kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results = report(runs, rss, args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), **results}, indent=2, default=str))  # default: Paths


if __name__ == "__main__":
    main()
