"""Using LoRAs: generate images with a stack of LoRAs, compare strengths, merge and convert files."""

from __future__ import annotations

from typing import Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from pydantic import BaseModel, Field

from server.errors import ServiceError
from server.generation import LoraStrength, plan_generation, render_now, request_json, runs_in_background
from server.images import thumbnail_png
from server.lora_tools import MergeSource, convert_lora, merge_loras
from server.loras import ExportedLora
from server.tools import Services

MAX_IMAGES_IN_RESULT = 4  # thumbnails of at most 384 px: four stay well under the ~1 MB a result may hold


class MergeResult(BaseModel):
    lora: ExportedLora
    next_step: str


def register_generation_tools(server: MCPServer, s: Services) -> None:
    call, jobs, workspace = s.call, s.jobs, s.workspace

    async def render(plan_arguments: dict, background: bool | None, what: str) -> list:
        """Render inside the call, or start a job; as content: a line per image and the images."""

        def run() -> list:
            try:
                plan = plan_generation(workspace, **plan_arguments)
                if runs_in_background(plan, background):
                    record = call(jobs.start_generation, plan.label, request_json(plan))
                    return [
                        f"{what} is rendering in the background as job {record.job_id} ({plan.request['model_name']}). "
                        f"Poll get-training-status job_id={record.job_id}; when it is completed, "
                        f"get-training-samples job_id={record.job_id} shows the images."
                    ]
                paths = render_now(workspace, plan)
            except ServiceError as exc:
                raise ToolError(str(exc)) from None
            content: list = [f"{what}: {len(paths)} image(s) in {paths[0].parent}" if paths else "no image made"]
            for path in paths[-MAX_IMAGES_IN_RESULT:]:
                content.append(f"{path.name} (full size: {path})")
                content.append(Image(data=thumbnail_png(path), format="png"))
            return content

        return await anyio.to_thread.run_sync(run)

    @server.tool(
        name="generate-image",
        description="Generate images with a base model and any stack of LoRAs at given strengths (ComfyUI's "
        "strength_model / strength_clip), to show 'before / after' or check that a LoRA does something. "
        "Built-in tiny models answer at once; a real model renders as a background job (job_id; then "
        "get-training-status and get-training-samples).",
    )
    async def generate_image(
        prompt: str = Field(description="What to draw; start with the LoRA's trigger word."),
        model_name: str | None = Field(None, description="Base model; default: the first LoRA's base model."),
        negative_prompt: str = Field(
            "", description="What to avoid (SD 1.x/2.x and SDXL; FLUX is guidance-distilled and ignores it)."
        ),
        loras: list[LoraStrength] = Field(default_factory=list, description="LoRAs to apply, in order."),
        steps: int = Field(20, ge=1, le=150, description="Denoising steps."),
        guidance: float | None = Field(
            None, ge=0.0, le=30.0, description="Guidance scale; default 7.5 for SD 1.x/2.x/SDXL, 3.5 for FLUX."
        ),
        width: int | None = Field(None, description="Pixels; default: the model's native size."),
        height: int | None = Field(None, description="Pixels; default: the model's native size."),
        seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the first image; image i uses seed + i."),
        count: int = Field(1, ge=1, le=16, description="Images to make."),
        background: bool | None = Field(None, description="Force (true) or avoid (false) a background job."),
    ) -> list:
        arguments = dict(
            model_name=model_name,
            prompt=prompt,
            negative_prompt=negative_prompt,
            loras=loras,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            seed=seed,
            count=count,
        )
        return await render(arguments, background, "generate-image")

    @server.tool(
        name="compare-lora-strengths",
        description="One LoRA at several strengths with one seed, as images and a labelled grid, to choose the "
        "strength to use (the guide: style 0.6-1.0, character 0.7-0.9, pose 0.4-0.7, details 0.3-0.6).",
    )
    async def compare_lora_strengths(
        lora: str = Field(description="An exported LoRA's name or a .safetensors path."),
        prompt: str = Field(description="A prompt with the LoRA's trigger word."),
        strengths: list[float] = Field([0.0, 0.4, 0.7, 1.0], min_length=2, max_length=8),
        model_name: str | None = Field(None, description="Base model; default: the LoRA's own base model."),
        steps: int = Field(20, ge=1, le=150),
        seed: int = Field(0, ge=0, le=2**32 - 1),
        background: bool | None = Field(None, description="Force (true) or avoid (false) a background job."),
    ) -> list:
        if any(not -2.0 <= strength <= 2.0 for strength in strengths):
            raise ToolError(f"strengths {strengths} must lie between -2 and 2 (usually 0 to 1)")
        arguments = dict(
            model_name=model_name,
            prompt=prompt,
            negative_prompt="",
            loras=[LoraStrength(lora=lora)],
            steps=steps,
            guidance=None,
            width=None,
            height=None,
            seed=seed,
            count=1,
            strengths=strengths,
        )
        return await render(arguments, background, "compare-lora-strengths")

    @server.tool(
        name="merge-loras",
        description="Merge LoRAs for the same base model into one file, each at a weight: the merge at strength "
        "1 equals stacking them at those weights. LoRAs for different base models are refused with the reason.",
    )
    def merge_loras_tool(
        loras: list[MergeSource] = Field(description="[{lora: name or path, weight}], at least two."),
        output_name: str = Field(description="Name of the merged LoRA in loras/."),
        output_format: Literal["kohya", "diffusers", "comfyui"] = Field(
            "comfyui",
            description="comfyui (default): what ComfyUI loads, the kohya layout for SD 1.x/2.x/SDXL and the "
            "diffusers layout with alphas for FLUX; kohya for A1111/Forge (not for FLUX); diffusers (peft keys).",
        ),
    ) -> MergeResult:
        merged = call(lambda: merge_loras(workspace, loras, output_name, output_format))
        return MergeResult(lora=merged, next_step=f"generate-image with loras=[{{lora: {merged.name!r}}}]")

    @server.tool(
        name="convert-lora",
        description="Rewrite a LoRA in another layout, losslessly: kohya (ComfyUI, A1111/Forge; SD and SDXL only), "
        "diffusers (peft keys), or comfyui (what ComfyUI's LoraLoader reads: the kohya layout for SD/SDXL, the "
        "diffusers layout with alphas for FLUX).",
    )
    def convert_lora_tool(
        lora: str = Field(description="An exported LoRA's name or a .safetensors path."),
        to: Literal["kohya", "diffusers", "comfyui"] = Field(description="The layout to write."),
        output_name: str | None = Field(None, description="Name in loras/; default '<lora>-<to>'."),
    ) -> ExportedLora:
        return call(lambda: convert_lora(workspace, lora, to, output_name))
