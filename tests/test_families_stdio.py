"""The transformer families end to end through the SDK's real stdio client, each on its tiny built-in: a config
that validates, a trainer child process, the exported LoRA (in the layout ComfyUI maps for the family, tagged
with its kohya base-model version) and an image with it, whose renderer loads the file in the family's diffusers
pipeline. One server serves every family: the trainings queue, two at a time, and each family's export and
image are asked for as soon as its training completes, while the next ones train (the SDK runs the tools in
worker threads). Strength grids, merges and conversions of each family are its tests/test_family_*.py's,
in-process: each tool call here is a child process that imports torch (about 6 s); FLUX's merge and its refused
kohya conversion are checked here as the server answers them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import anyio
from PIL import Image
from safetensors import safe_open
from test_mcp_server import create, run_session, server_workspace, start, wait_for_state  # noqa: F401 (fixture)

# builtin model -> the kohya `ss_base_model_version` its LoRAs carry
FAMILIES = {
    "builtin:tiny-flux": "flux1",
    "builtin:tiny-sd35": "sd3",
    "builtin:tiny-chroma": "chroma",
    "builtin:tiny-qwen-image": "qwen_image",
    "builtin:tiny-z-image": "z_image",
    "builtin:tiny-flux2": "flux2",
}


async def export_and_render(session, model_name: str, job_id: str) -> str:
    """The completed job's LoRA in the diffusers layout with its family's base-model version, and a 64 px image
    with it; returns the LoRA's name."""
    final = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
    assert final["state"] == "completed", (model_name, final)
    exported = await session.call_tool("export-model", {"job_id": job_id})
    assert not exported.is_error, (model_name, exported.content)
    assert exported.structured_content["output_format"] == "diffusers", model_name  # what ComfyUI maps
    with safe_open(exported.structured_content["path"], "pt") as lora:
        assert lora.metadata()["ss_base_model_version"] == FAMILIES[model_name]
        assert all(key.startswith("transformer.") for key in lora.keys()), model_name
    name = exported.structured_content["name"]

    image = await session.call_tool(
        "generate-image", {"model_name": model_name, "prompt": "xyz_shape", "loras": [{"lora": name}], "steps": 2}
    )
    assert not image.is_error, (model_name, image.content)
    with Image.open(io.BytesIO(base64.b64decode(image.content[-1].data))) as decoded:
        assert decoded.size == (64, 64)
    return name


async def flux_merge_and_kohya_refusal(session, name: str) -> None:
    merged = await session.call_tool(
        "merge-loras", {"loras": [{"lora": name}, {"lora": name, "weight": 0.5}], "output_name": "flux-merged"}
    )
    assert not merged.is_error, merged.content
    assert merged.structured_content["lora"]["output_format"] == "diffusers"  # what ComfyUI loads for FLUX
    refused = await session.call_tool("convert-lora", {"lora": name, "to": "kohya"})
    assert refused.is_error and "kohya's FLUX layout" in refused.content[0].text


def test_each_transformer_family_trains_exports_and_renders_over_mcp(server_workspace, shapes):  # noqa: F811
    async def script(session):
        jobs = {}
        for model_name in FAMILIES:
            name = model_name.removeprefix("builtin:tiny-")
            await create(
                session, name, shapes, model_name=model_name, steps=3, learning_rate=5e-2, resolution=64
            )
            report = await session.call_tool("validate-training-config", {"name": name})
            assert report.structured_content["valid"], (model_name, report.structured_content)
            jobs[model_name] = (await start(session, name))["job_id"]

        names = {}

        async def finish(model_name: str) -> None:
            names[model_name] = await export_and_render(session, model_name, jobs[model_name])

        async with anyio.create_task_group() as group:
            for model_name in FAMILIES:
                group.start_soon(finish, model_name)
        assert set(names) == set(FAMILIES)
        await flux_merge_and_kohya_refusal(session, names["builtin:tiny-flux"])

    # Two pretended GPUs (the queue's override): two trainings at a time, one per core.
    run_session(server_workspace, script, LORA_MCP_GPUS="0,1")
