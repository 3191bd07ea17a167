"""`lora-mcp demo`: the whole flow a user would drive from a chat, against the real server.

It starts `lora-mcp` over stdio on a fresh workspace, connects with the SDK's client, uploads a
generated dataset, creates a config on `builtin:tiny-sd15`, trains, watches the status with a
progress bar, fetches the samples and the loss curve, exports the LoRA, and prints where
everything is. About a minute on 2 CPU cores; nothing is downloaded.

This is a client: its stdout is the user's terminal. The server it starts is a child process
whose stdout is the protocol stream, which nothing here writes to.
"""

from __future__ import annotations

import base64
import io
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from tqdm import tqdm

DATASET, CONFIG = "demo-shapes", "demo-shapes-style"


async def run_demo(workspace: Path, steps: int) -> int:
    from training.data.synthetic import make_shape_dataset

    out = workspace / "demo-output"
    out.mkdir(parents=True, exist_ok=True)
    params = StdioServerParameters(command=sys.executable, args=["-m", "server.main", "--workspace", str(workspace)])
    with open(workspace / "demo-server.err", "a") as server_log:
        async with stdio_client(params, errlog=server_log) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            print(f"connected to lora-mcp: {len(tools)} tools, workspace {workspace}")

            with tempfile.TemporaryDirectory() as tmp:
                images = make_shape_dataset(Path(tmp), 8, trigger_word="xyz_shape")
                payload = [
                    {
                        "filename": p.name,
                        "content": base64.b64encode(p.read_bytes()).decode(),
                        "caption": p.with_suffix(".txt").read_text(),
                    }
                    for p in images
                ]
            uploaded = await _call(session, "upload-dataset", dataset_name=DATASET, images=payload)
            print(f"upload-dataset: {uploaded['saved']} images saved")

            await _call(
                session,
                "create-training-config",
                name=CONFIG,
                model_name="builtin:tiny-sd15",
                dataset_path=DATASET,
                trigger_word="xyz_shape",
                resolution=64,
                steps=steps,
                batch_size=2,
                rank=8,
                learning_rate=1e-3,
                test_prompts=["xyz_shape a red circle on a blue background", "xyz_shape a yellow square"],
                sample_every=max(1, steps // 2),
                sample_steps=10,
                save_every=max(1, steps // 2),
            )
            report = await _call(session, "validate-training-config", name=CONFIG)
            print(f"validate-training-config: valid={report['valid']}, {report['images']} images")
            job = await _call(session, "start-training", config_name=CONFIG)
            job_id = job["job_id"]
            print(f"start-training: job {job_id}")

            status = await _watch(session, job_id, steps)
            if status["state"] != "completed":
                logs = await session.call_tool("get-training-logs", {"job_id": job_id, "lines": 20})
                print(f"the job ended {status['state']}: {status['error']}\n{logs.content[0].text}", file=sys.stderr)
                return 1

            samples = await session.call_tool("get-training-samples", {"job_id": job_id})
            saved = _save_images(samples.content, out, f"samples-step{status['step']}")
            curve = await session.read_resource(f"lora://jobs/{job_id}/loss-curve")
            (out / "loss-curve.png").write_bytes(base64.b64decode(curve.contents[0].blob))
            exported = await _call(session, "export-model", job_id=job_id)

    print(f"final loss (smoothed): {status['loss']:.4f} after {status['step']} steps")
    print(f"samples: {', '.join(str(p) for p in saved)}")
    print(f"loss curve: {out / 'loss-curve.png'}")
    print(f"LoRA: {exported['path']} (trigger word {exported['trigger_word']})")
    print(f"run directory: {status['run_dir']}")
    return 0


async def _call(session: ClientSession, tool: str, **arguments) -> dict:
    result = await session.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content[0].text}")
    return result.structured_content


async def _watch(session: ClientSession, job_id: str, steps: int) -> dict:
    """Poll get-training-status as an assistant would, drawing a progress bar."""
    with tqdm(total=steps, unit="step", desc="training", file=sys.stdout) as bar:
        while True:
            status = await _call(session, "get-training-status", job_id=job_id)
            bar.update(status["step"] - bar.n)
            if status["loss"] is not None:
                bar.set_postfix(loss=f"{status['loss']:.4f}", state=status["state"], refresh=False)
            if status["state"] not in ("queued", "running"):
                return status
            await anyio.sleep(0.5)


def _save_images(content: list, folder: Path, stem: str) -> list[Path]:
    from PIL import Image

    saved = []
    for item in content:
        if item.type == "image":
            path = folder / f"{stem}-{len(saved)}.png"
            Image.open(io.BytesIO(base64.b64decode(item.data))).save(path)
            saved.append(path)
    return saved


def main(workspace: Path | None, steps: int) -> int:
    workspace = workspace or Path(tempfile.mkdtemp(prefix="lora-mcp-demo-"))
    workspace.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code = anyio.run(run_demo, workspace, steps)
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return code
