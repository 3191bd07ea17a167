"""Troubleshooting tools: diagnose a job, apply a finding's fix, compare runs, plan a config."""

from __future__ import annotations

from mcp.server import MCPServer
from pydantic import Field

from server.diagnostics import AppliedFix, Diagnosis, RunComparison, apply_fix, compare_runs, diagnose
from server.plans import recommend_training_plan
from server.tools import READ_ONLY, Services, add_tools, resource, tool
from training.config import LoraType
from training.guide import DEFAULT_LEARNING_RATE, STEPS_PER_IMAGE, lr_text
from training.plans import Goal, TrainingPlan


def register_diagnostic_tools(server: MCPServer, s: Services) -> None:
    add_tools(server, DiagnosticTools(s))


class DiagnosticTools:
    """What went wrong in a run, the config that fixes it, runs side by side, and a plan for a dataset."""

    def __init__(self, s: Services):
        self.call, self.resource_call = s.call, s.resource_call
        self.configs, self.jobs, self.workspace = s.configs, s.jobs, s.workspace

    @tool(
        "diagnose-training",
        "What is wrong with a training job, running or finished: findings by severity (loss spikes, "
        "plateau, oscillation, validation loss rising, no effect, samples copying the training images, style "
        "bleeding, exploding gradients, non-finite loss, the pre-flight checks, and where evaluate-lora measured "
        "the LoRA: no effect, copying, prompt following lost, style bleeding, from its numbers), each with its "
        "evidence and the config change that fixes it; plus the checkpoint to use and why.",
        READ_ONLY,
    )
    def diagnose_training(self, job_id: str = Field(description="Job id from start-training.")) -> Diagnosis:
        return self.call(diagnose, self.jobs, job_id)

    @tool(
        "apply-fix",
        "Write a new config from a finding's patch (a finding of diagnose-training for job_id, or of "
        "validate-training-config for config_name). The original is kept; the result names the new config and "
        "lists each change, so you can say what you changed and ask before starting it.",
    )
    def apply_fix_tool(
        self,
        finding_id: str = Field(description="The finding's rule id, e.g. 'loss-oscillation'."),
        job_id: str | None = Field(None, description="A job from diagnose-training."),
        config_name: str | None = Field(None, description="Or a config from validate-training-config."),
    ) -> AppliedFix:
        return self.call(
            lambda: apply_fix(self.configs, self.jobs, job_id=job_id, config_name=config_name, finding_id=finding_id)
        )

    @tool(
        "compare-training-runs",
        "Compare 2-8 jobs side by side: the config options that differ, and per run the latest and "
        "lowest loss, the best validation loss and its step, what evaluate-lora measured, speed, warnings and the "
        "recommended checkpoint; the best run by evaluate-lora's numbers where every run has them, else by "
        "validation loss.",
        READ_ONLY,
    )
    def compare_training_runs(
        self, job_ids: list[str] = Field(description="Job ids from list-training-jobs.")
    ) -> RunComparison:
        return self.call(compare_runs, self.jobs, job_ids)

    @tool(
        "recommend-training-plan",
        f"A full config for a dataset following the guide: steps = {STEPS_PER_IMAGE} x images, learning rate "
        f"{lr_text(DEFAULT_LEARNING_RATE)} "
        "(with its conservative, aggressive and fine-tuning alternatives), rank for the LoRA type with the "
        "expected file size, the memory/speed/quality preset for the goal, the model and CLIP strengths to use "
        "it at in ComfyUI, and an estimated time; each choice with its reason. Pass config to "
        "create-training-config.",
        READ_ONLY,
    )
    def recommend_training_plan_tool(
        self,
        dataset_name: str = Field(description="Dataset name, from list-datasets."),
        lora_type: LoraType = Field(description="What the LoRA is for."),
        model_name: str | None = Field(None, description="Base model; default: the config's default model."),
        goal: Goal = Field("balanced", description="balanced, memory (little VRAM), speed, or quality."),
    ) -> TrainingPlan:
        return self.call(
            lambda: recommend_training_plan(
                self.workspace, dataset_name=dataset_name, lora_type=lora_type, model_name=model_name, goal=goal
            )
        )

    @resource("lora://jobs/{job_id}/diagnosis", "application/json", "diagnose-training's findings for a job.")
    def diagnosis_resource(self, job_id: str) -> str:
        return self.resource_call(diagnose, self.jobs, job_id).model_dump_json(indent=2)
