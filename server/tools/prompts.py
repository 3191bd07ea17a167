"""Prompts: guided flows an assistant can offer."""

from __future__ import annotations

from mcp.server import MCPServer
from pydantic import Field

from training.guide import (
    DEFAULT_LEARNING_RATE,
    GUIDE_IMAGE_RANGE,
    GUIDE_LOSS_TARGET,
    GUIDE_STRENGTHS,
    RANK_BY_TYPE,
    STANDARD_RANK,
    STEPS_PER_IMAGE,
    lr_text,
    span,
)


def register_prompts(server: MCPServer) -> None:
    server.prompt(
        name="train-lora",
        description="Walk through training a LoRA: dataset, captions, config, start, monitor, use.",
    )(train_lora)
    server.prompt(
        name="troubleshoot-training",
        description="Find out what is wrong with a training job and offer a fixed config.",
    )(troubleshoot_training)


def train_lora(
    goal: str = Field(description="What the LoRA should learn, e.g. 'a watercolor style' or 'my dog Rex'."),
    dataset: str = Field("", description="A dataset name or folder, if there is one already."),
) -> str:
    return TRAIN_LORA_PROMPT.format(goal=goal, dataset=dataset or "(not chosen yet)")


def troubleshoot_training(job_id: str = Field(description="The job to look at, from list-training-jobs.")) -> str:
    return TROUBLESHOOT_PROMPT.format(job_id=job_id)


# The guide's numbers, from training/guide.py.
TRAIN_LORA_PROMPT = f"""Help me train a LoRA for: {{goal}}. Dataset: {{dataset}}.
Work through these steps with the lora-trainer tools, telling me what you find at each one:
1. Dataset: list-datasets, or upload-dataset the images I give you (each image with a same-named caption).
   The guide's sizes: style {span(GUIDE_IMAGE_RANGE["style"])} images, character/person \
{span(GUIDE_IMAGE_RANGE["character"])}, object/concept {span(GUIDE_IMAGE_RANGE["object"])}, complex style \
{span(GUIDE_IMAGE_RANGE["complex_style"])}.
2. Captions: each caption starts with a unique trigger word (like xyz_style, never a plain word such as
   'style'), then the subject, details, style, quality and composition.
3. Config: create-training-config with name, model_name, dataset_path, trigger_word and 3-4 test_prompts that
   start with the trigger word. Defaults follow the guide: learning_rate {lr_text(DEFAULT_LEARNING_RATE)}, rank \
{STANDARD_RANK} ({RANK_BY_TYPE["style"][0]} for simple styles),
   alpha = rank, steps = {STEPS_PER_IMAGE} x images. Then validate-training-config and fix every error it reports.
4. Train: start-training, then get-training-status every minute or two (never wait inside a call);
   get-training-samples shows the test prompts as the LoRA learns (step 0 is the untrained baseline).
   Loss should fall, usually to {span(GUIDE_LOSS_TARGET)}; samples should move towards the dataset without copying it.
5. Finish: when the state is completed, its LoRA is in loras/ as exported_lora (export-model only for a checkpoint
   or another format); tell me the file, the trigger word and a strength
   to start from (style {span(GUIDE_STRENGTHS["style"][0])}, character {span(GUIDE_STRENGTHS["character"][0])}) \
for ComfyUI's LoraLoader or A1111.
If a job fails or is interrupted, read get-training-logs, explain the cause, and offer resume-training."""


TROUBLESHOOT_PROMPT = """Something may be wrong with training job {job_id}. Find out what, with the lora-trainer tools:
1. get-training-status job_id={job_id}: its state, step, loss and error.
2. diagnose-training job_id={job_id}: the findings by severity, each with evidence and a suggested config change.
   Explain each warning or error in plain words, with its numbers (steps, losses, files).
3. get-training-samples job_id={job_id}: look at the latest samples beside step 0 (the baseline). The last prompt
   is the control prompt, without the trigger word: if it changed too, the LoRA is bleeding into everything.
4. If a loss spike names files, look at them (lora://datasets/<name>/images/<file>) for corrupt or odd images.
5. Propose the fix of the most serious finding: apply-fix job_id={job_id} finding_id=<rule> writes a new config.
   Tell me exactly what it changed and why, and ask before start-training it. A stopped or failed job (out of
   memory, say) can instead continue from its last checkpoint with the fix: resume-training job_id={job_id}
   apply_fix=<rule>.
6. If the run is usable already, say which checkpoint diagnose-training recommends and why, and offer
   export-model with that step."""
