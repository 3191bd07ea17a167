"""Using LoRAs: generate images with a stack of LoRAs, compare strengths, merge and convert files."""

from __future__ import annotations

import inspect
from functools import partial

from mcp.server import MCPServer
from pydantic import BaseModel, Field

from server.errors import ServiceError
from server.generation import render_or_queue
from server.images import images_within_budget
from server.lora_tools import ConvertRequest, MergeRequest, convert_lora, merge_loras
from server.loras import ExportedLora
from server.service_calls import tool_error
from server.tools import Services, add_tools, tool
from training.generation import GenerationRequest, StrengthComparison
from training.guide import GUIDE_STRENGTHS, span

# Not a field of the request: whether it renders inside the call is the server's choice, not the renderer's.
BACKGROUND = inspect.Parameter(
    "background",
    inspect.Parameter.KEYWORD_ONLY,
    default=Field(None, description="Force (true) or avoid (false) a background job."),
    annotation=bool | None,
)


class MergeResult(BaseModel):
    lora: ExportedLora
    next_step: str


class ImageTools:
    """generate-image and compare-lora-strengths: both render a GenerationRequest."""

    def __init__(self, s: Services):
        self.s = s

    @tool(
        "generate-image",
        "Generate images with a base model and any stack of LoRAs at given strengths (ComfyUI's "
        "strength_model / strength_clip), to show 'before / after' or check that a LoRA does something. "
        "Built-in tiny models answer at once; a real model renders as a background job (job_id; then "
        "get-training-status and get-training-samples).",
        request=GenerationRequest,
        extra=[BACKGROUND],
        leave_out=("strengths",),
    )
    def generate_image(self, request: GenerationRequest, background: bool | None) -> list:
        return self.render(request, background, "generate-image")

    @tool(
        "compare-lora-strengths",
        "One LoRA at several strengths with one seed, as images and a labelled grid, to choose the "
        "strength to use (the guide: "
        + ", ".join(f"{row} {span(model)}" for row, (model, _) in GUIDE_STRENGTHS.items())
        + ").",
        request=StrengthComparison,
        extra=[BACKGROUND],
    )
    def compare_lora_strengths(self, comparison: StrengthComparison, background: bool | None) -> list:
        return self.render(comparison.as_generation(), background, "compare-lora-strengths")

    def render(self, request: GenerationRequest, background: bool | None, what: str) -> list:
        """Render inside the call, or start a job; as content: a line per image and the images.
        The SDK runs these synchronous tools in a worker thread, so status calls do not wait for a render."""
        start_job = partial(self.s.call, self.s.jobs.start_generation)
        try:
            plan, outcome = render_or_queue(self.s.workspace, request, background, start_job)
        except ServiceError as exc:
            raise tool_error(exc) from None
        if not isinstance(outcome, list):
            return [
                f"{what} is rendering in the background as job {outcome.job_id} ({plan.request.model_name}). "
                f"Poll get-training-status job_id={outcome.job_id}; when it is completed, "
                f"get-training-samples job_id={outcome.job_id} shows the images."
            ]
        if not outcome:
            return ["no image made"]
        shown = [(f"{path.name} (full size: {path})", path) for path in outcome]
        return [
            f"{what}: {len(outcome)} image(s) in {outcome[0].parent}",
            *images_within_budget(shown, f"Every image is in {outcome[0].parent}."),
        ]


class LoraFileTools:
    """merge-loras and convert-lora: new LoRA files in loras/."""

    def __init__(self, s: Services):
        self.s = s

    @tool(
        "merge-loras",
        "Merge LoRAs for the same base model into one file, each at a weight: the merge at strength "
        "1 equals stacking them at those weights. LoRAs for different base models are refused with the reason.",
        request=MergeRequest,
    )
    def merge_loras_tool(self, request: MergeRequest) -> MergeResult:
        merged = self.s.call(
            merge_loras,
            self.s.workspace,
            request.loras,
            request.output_name,
            request.output_format,
            request.model_name,
        )
        return MergeResult(lora=merged, next_step=f"generate-image with loras=[{{lora: {merged.name!r}}}]")

    @tool(
        "convert-lora",
        "Rewrite a LoRA in another layout, losslessly: kohya (ComfyUI, A1111/Forge; SD and SDXL only), "
        "diffusers (peft keys), or comfyui (what ComfyUI's LoraLoader reads: the kohya layout for SD/SDXL, the "
        "diffusers layout with alphas for FLUX).",
        request=ConvertRequest,
    )
    def convert_lora_tool(self, request: ConvertRequest) -> ExportedLora:
        return self.s.call(
            convert_lora, self.s.workspace, request.lora, request.to, request.output_name, request.model_name
        )


def register_generation_tools(server: MCPServer, s: Services) -> None:
    add_tools(server, ImageTools(s))
    add_tools(server, LoraFileTools(s))
