"""evaluate-lora, and the evaluation it writes as resources keyed by the training job evaluated."""

from __future__ import annotations

import anyio
from mcp.server import MCPServer

from server.evaluations import EvaluationStarted, evaluation_grid, evaluation_report, start_evaluation
from server.tools import Services, add_tools, resource, tool
from training.evaluation.request import EvaluationRequest


def register_evaluation_tools(server: MCPServer, s: Services) -> None:
    add_tools(server, EvaluationTools(s))


class EvaluationTools:
    """Whether a LoRA does its job, with numbers: prompt adherence, likeness, trigger effect, bleed, diversity."""

    def __init__(self, s: Services):
        self.call, self.resource_call = s.call, s.resource_call
        self.jobs, self.workspace = s.jobs, s.workspace

    @tool(
        "evaluate-lora",
        "Measure whether a LoRA works and at which strength: a training job's LoRA (or its checkpoint at step), or "
        "any LoRA file with its base model, rendered over fixed seeds at strength 0 (the base) and the given "
        "strengths, with and without the trigger word and with the control prompt, then scored: prompt adherence "
        "(CLIP text-image score), likeness to the training images (DINOv2 and CLIP image similarity, against the "
        "base model's), trigger effect, style bleed and diversity (collapse). A background job (job_id; watch it "
        "with get-training-status, whose verdicts say the best strength with the numbers, e.g. 'best strength "
        "about 0.75: likeness 0.71 vs base 0.42'). Every score: lora://jobs/{job_id}/evaluation, keyed by the "
        "training job (a checkpoint's: lora://jobs/{job_id}/evaluation-step{step}); the labelled grid: "
        "lora://jobs/{job_id}/evaluation-grid (-step{step}).",
        request=EvaluationRequest,
    )
    def evaluate_lora(self, request: EvaluationRequest) -> EvaluationStarted:
        return self.call(start_evaluation, self.workspace, self.jobs, request)

    @resource(
        "lora://jobs/{job_id}/evaluation",
        "application/json",
        "evaluate-lora's scores per strength and verdicts: of a training job's final LoRA, or of what an "
        "evaluation job scored.",
    )
    def evaluation_resource(self, job_id: str) -> str:
        return self.resource_call(evaluation_report, self.jobs, job_id).model_dump_json(indent=2)

    @resource(
        "lora://jobs/{job_id}/evaluation-grid",
        "image/jpeg",
        "evaluate-lora's images as one labelled grid.",
    )
    async def evaluation_grid_resource(self, job_id: str) -> bytes:
        return await anyio.to_thread.run_sync(lambda: self.resource_call(evaluation_grid, self.jobs, job_id))

    @resource(
        "lora://jobs/{job_id}/evaluation-step{step}",
        "application/json",
        "evaluate-lora's scores per strength and verdicts of a training job's checkpoint at that step.",
    )
    def checkpoint_evaluation_resource(self, job_id: str, step: str) -> str:
        return self.resource_call(evaluation_report, self.jobs, job_id, step).model_dump_json(indent=2)

    @resource(
        "lora://jobs/{job_id}/evaluation-grid-step{step}",
        "image/jpeg",
        "evaluate-lora's images of a training job's checkpoint at that step as one labelled grid.",
    )
    async def checkpoint_evaluation_grid_resource(self, job_id: str, step: str) -> bytes:
        return await anyio.to_thread.run_sync(lambda: self.resource_call(evaluation_grid, self.jobs, job_id, step))
