"""Qwen2-VL and Qwen2.5-VL chat models, asked the caption instruction, with their prompts built here from the
image processor, the tokenizer and the chat template instead of through the model's processor class.

The processor class cannot be loaded without torchvision (transformers 5.23 loads its video processor
eagerly, huggingface/transformers#48558), which this project does not install and captioning never uses.
What the processor would do, done here: each image's one `<|image_pad|>` in the template becomes
t*h*w / merge_size**2 copies (its image_grid_thw row: a 448x448 image is 32x32 patches of 14 px, 256
tokens after the 2x2 merge), and the model is given image_grid_thw and the image-token mask, from which
it computes its 3D (time, height, width) rotary positions.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from training.captioners import Captioner, CaptionerUnavailable, rgb_images
from training.captioners.image_to_text import CHAT_MAX_NEW_TOKENS, load_model

IMAGE_TOKEN = "<|image_pad|>"


def load_parts(folder: str) -> tuple[Any, Any, str]:
    """(image processor, tokenizer, chat template) of the model in `folder`."""
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin

    # chat_template.jinja, or the chat_template.json the Qwen releases ship, read as the processor would.
    template = ProcessorMixin.get_processor_dict(folder)[0].get("chat_template")
    if isinstance(template, dict):  # several named templates: the default one is the chat
        template = template.get("default")
    if not template:
        raise CaptionerUnavailable(f"{folder} has no chat template (chat_template.jinja or chat_template.json)")
    return AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), template


def load(folder: Path, prompt: str) -> Captioner:
    """One user turn per image (the image, then `prompt`), answered greedily, as the other chat models are."""
    import torch

    (image_processor, tokenizer, template), model, device, dtype = load_model(folder, load_parts)
    tokenizer.padding_side = "left"  # the prompts end where the answers start (see image_to_text)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    if text.count(IMAGE_TOKEN) != 1:
        raise CaptionerUnavailable(f"{folder}'s chat template does not place one {IMAGE_TOKEN} for an image")
    # transformers 5 computes the rotary positions from this mask (mm_token_type_ids); 4.x from input_ids.
    takes_mask = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    def caption(paths: list[Path]) -> list[str]:
        pixels = image_processor(images=rgb_images(paths), return_tensors="pt")
        grid = pixels["image_grid_thw"]
        counts = (grid.prod(dim=-1) // image_processor.merge_size**2).tolist()
        texts = [text.replace(IMAGE_TOKEN, IMAGE_TOKEN * count) for count in counts]
        inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        if takes_mask:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()
        inputs = {name: value.to(device) for name, value in inputs.items()}
        pixel_values = pixels["pixel_values"].to(device, dtype)
        with torch.no_grad():
            ids = model.generate(
                **inputs,
                pixel_values=pixel_values,
                image_grid_thw=grid.to(device),
                max_new_tokens=CHAT_MAX_NEW_TOKENS,
                do_sample=False,
            )
        answers = tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [" ".join(answer.split()) for answer in answers]

    return caption
