"""The transformer families of issue 18 end to end through the SDK's real stdio client, each on its tiny
built-in: a config that validates, a trainer child process, the exported LoRA (in the layout ComfyUI maps
for the family, tagged with its kohya base-model version) and an image with it, whose renderer loads the file in
the family's diffusers pipeline. One server serves every family; the four trainings queue behind each other.
Strength grids, merges and conversions of each family are its tests/test_family_*.py's, in-process: each tool call
here is a child process that imports torch (about 6 s)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image
from safetensors import safe_open
from test_mcp_server import create, run_session, server_workspace, start, wait_for_state  # noqa: F401 (fixture)

# builtin model -> the kohya `ss_base_model_version` its LoRAs carry
FAMILIES = {
    "builtin:tiny-sd35": "sd3",
    "builtin:tiny-chroma": "chroma",
    "builtin:tiny-qwen-image": "qwen_image",
    "builtin:tiny-z-image": "z_image",
}


def test_each_new_family_trains_exports_and_renders_over_mcp(server_workspace, shapes):  # noqa: F811
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

        for model_name, version in FAMILIES.items():
            final = await wait_for_state(session, jobs[model_name], ("completed", "failed", "interrupted"))
            assert final["state"] == "completed", (model_name, final)
            exported = await session.call_tool("export-model", {"job_id": jobs[model_name]})
            assert not exported.is_error, (model_name, exported.content)
            assert exported.structured_content["output_format"] == "diffusers", model_name  # what ComfyUI maps
            path = Path(exported.structured_content["path"])
            with safe_open(str(path), "pt") as lora:
                assert lora.metadata()["ss_base_model_version"] == version
                assert all(key.startswith("transformer.") for key in lora.keys()), model_name
            name = exported.structured_content["name"]

            image = await session.call_tool(
                "generate-image",
                {"model_name": model_name, "prompt": "xyz_shape", "loras": [{"lora": name}], "steps": 2},
            )
            assert not image.is_error, (model_name, image.content)
            with Image.open(io.BytesIO(base64.b64decode(image.content[-1].data))) as decoded:
                assert decoded.size == (64, 64)

    run_session(server_workspace, script)
