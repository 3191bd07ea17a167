"""evaluate-lora: a LoRA's measured quality (prompt adherence, likeness to its training images, trigger
effect, style bleed, diversity) across strengths. request.py and report.py hold no torch, so the server
imports them; scoring.py and run.py are the child's (`python -m training.evaluation.run RUN_DIR`)."""
