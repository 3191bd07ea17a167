"""get-training-status latency while the same client's get-dataset-info inspects 300 images of 512 px.

Starts the MCP server (`python -m server.main --workspace <fresh temp dir>`) through the SDK's
stdio client and, in its workspace, writes two synthetic datasets: `shapes` (8 images of 64 px,
with captions) and `big` (--images PNGs of --size px, drawn with PIL). It trains `shapes` on the
built-in tiny SD 1.x model for a few steps (64 px, rank 4, no sampling) and waits for the job to
be completed, so that the status read is a real job's (table row, status.json), and no trainer
competes for the cores while measuring. Then, on the one session, a task keeps get-dataset-info
dataset_name=big in flight (one call after another) while another task sends get-training-status
for the job back to back, `--calls` times, timing each in the client (request sent to result
parsed); only calls sent while an inspection was in flight count. The same
calls on the idle server follow, for comparison. The built-in model builds itself into
<workspace>/models on first use (a few seconds); --models DIR links an already built one.

    python bench/concurrency.py [--calls 100] [--images 300] [--size 512] [--models DIR]

Bound from issue 13: p95 under 50 ms while get-dataset-info runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.status_latency import print_verdict, stdio_workspace, summary, timed_calls, wait_for  # noqa: E402


async def call(session: ClientSession, tool: str, arguments: dict) -> dict:
    result = await session.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content}")
    return result.structured_content


async def trained_job(session: ClientSession, dataset: Path) -> str:
    """A completed 4-step tiny training job's id."""
    config = {
        "name": "bench",
        "model_name": "builtin:tiny-sd15",
        "dataset_path": str(dataset),
        "trigger_word": "xyz_shape",
        "resolution": 64,
        "batch_size": 2,
        "rank": 4,
        "steps": 4,
        "disable_sampling": True,
    }
    await call(session, "create-training-config", config)
    job_id = (await call(session, "start-training", {"config_name": "bench"}))["job_id"]
    await wait_for(session, job_id, lambda s: s["state"] == "completed", 600, "state completed")
    return job_id


async def status_while_inspecting(
    session: ClientSession, job_id: str, calls: int, images: int
) -> tuple[list[float], int, float]:
    """Times (ms) of the status calls sent while a get-dataset-info was in flight, the number of
    inspections, and their mean time (s)."""
    times: list[float] = []
    inspections: list[float] = []
    in_flight = anyio.Event()
    state = {"busy": False, "done": False}

    async def inspect() -> None:
        while not state["done"]:
            state["busy"] = True
            in_flight.set()
            start = time.perf_counter()
            report = await call(session, "get-dataset-info", {"dataset_name": "big"})
            inspections.append(time.perf_counter() - start)
            state["busy"] = False
            if report["images"] != images:
                raise RuntimeError(f"get-dataset-info saw {report['images']} images, not {images}")

    async def poll() -> None:
        await in_flight.wait()
        await anyio.sleep(0.2)  # let the inspection get going
        while len(times) < calls:
            sent_while_busy = state["busy"]  # at send time: a call the lock held would end after it
            start = time.perf_counter()
            await call(session, "get-training-status", {"job_id": job_id})
            if sent_while_busy:
                times.append((time.perf_counter() - start) * 1000)
        state["done"] = True

    async with anyio.create_task_group() as group:
        group.start_soon(inspect)
        group.start_soon(poll)
    return times, len(inspections), sum(inspections) / len(inspections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="get-training-status calls to time")
    parser.add_argument("--images", type=int, default=300, help="images in the inspected dataset")
    parser.add_argument("--size", type=int, default=512, help="their width and height (px)")
    parser.add_argument("--models", type=Path, help="an already built models folder to link into the workspace")
    args = parser.parse_args()

    from training.data.synthetic import make_shape_dataset

    scratch, workspace, params = stdio_workspace("bench-concurrency-", args.models)
    shapes = workspace / "datasets" / "shapes"
    make_shape_dataset(shapes, 8, trigger_word="xyz_shape")
    make_shape_dataset(workspace / "datasets" / "big", args.images, size=(args.size, args.size))
    results: dict[str, list[float]] = {}

    async def run() -> None:
        with open(scratch / "server.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                job_id = await trained_job(session, shapes)
                start = time.perf_counter()
                await call(session, "get-dataset-info", {"dataset_name": "big"})
                print(
                    f"get-dataset-info on {args.images} images of {args.size} px alone: "
                    f"{time.perf_counter() - start:.2f} s"
                )
                times, count, mean = await status_while_inspecting(session, job_id, args.calls, args.images)
                print(f"{len(times)} status calls during {count} get-dataset-info calls ({mean:.2f} s each)")
                results["busy"] = times
                results["idle"], _, _ = await timed_calls(session, job_id, args.calls)

    try:
        anyio.run(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print()
    busy = summary("get-training-status while get-dataset-info runs", results["busy"])
    summary("get-training-status idle", results["idle"])
    print_verdict("while inspecting", busy)


if __name__ == "__main__":
    main()
