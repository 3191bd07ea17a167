"""Florence-2 (Microsoft), as transformers runs it natively (the florence-community conversions): one task
prompt per image, the answer post-processed to plain text by the processor.

The task is `<DETAILED_CAPTION>`: one or two sentences (~30-50 tokens), which fit the 77-token window of
the CLIP text encoders SD 1.x/2.x and SDXL train with. `<MORE_DETAILED_CAPTION>` writes a paragraph of
80-150 words that would be cut off there, and `<CAPTION>` a few words with no style or composition.
"""

from __future__ import annotations

from pathlib import Path

from training.captioners import Captioner, rgb_images
from training.captioners.image_to_text import load_model

TASK = "<DETAILED_CAPTION>"
MAX_NEW_TOKENS = 96  # a detailed caption's ~50 tokens, with room; it ends at its own end token before that


def load(folder: Path) -> Captioner:
    import torch

    processor, model, device, dtype = load_model(folder)

    def caption(paths: list[Path]) -> list[str]:
        images = rgb_images(paths)
        inputs = processor(text=[TASK] * len(images), images=images, return_tensors="pt").to(device, dtype)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
        # Decoded with the special tokens, as post_process_generation expects: it strips <s> and </s>; the
        # padding after an answer that ended before the batch's longest is left to drop here.
        texts = processor.batch_decode(ids, skip_special_tokens=False)
        answers = [
            processor.post_process_generation(text, task=TASK, image_size=image.size)[TASK]
            for text, image in zip(texts, images)
        ]
        return [" ".join(answer.replace(processor.tokenizer.pad_token, " ").split()) for answer in answers]

    return caption
