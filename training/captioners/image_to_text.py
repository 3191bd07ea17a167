"""Captioners transformers loads with AutoModelForImageTextToText and AutoProcessor: image-to-text models
(BLIP, BLIP-2, GIT), which describe an image unprompted, and chat models (JoyCaption, LLaVA class;
their processor has a chat template), which are asked the caption instruction. Qwen2-VL and Qwen2.5-VL, whose
processor needs torchvision, are in qwen_vl."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.captioners import MAX_NEW_TOKENS, Captioner, CaptionerUnavailable, rgb_images

# A chat model's answer to the caption instruction: two sentences run to ~60 tokens; the bound keeps a model
# that rambles from writing a page per image (and from taking minutes each on a CPU).
CHAT_MAX_NEW_TOKENS = 96


def load_model(folder: Path, load_processor: Callable[[str], Any] | None = None) -> tuple[Any, Any, Any, Any]:
    """(processor, model, device, dtype) for the model in `folder`, on the GPU where there is one: in bf16
    there (fp16 where the GPU has no bf16), halving the memory (BLIP-2 OPT-2.7b: 7.7 GB instead of 15.5 GB);
    fp32 on a CPU, where half precision is slow or missing. The processor is AutoProcessor's, or what
    `load_processor` returns for the folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.models.loading import pick_device

    device = pick_device()  # the GPU where there is one: BLIP-base takes ~2 s an image on 2 CPU cores
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    try:
        processor = (load_processor or AutoProcessor.from_pretrained)(str(folder))
        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype).eval().to(device)
    except (OSError, ValueError, KeyError, ImportError) as exc:  # ImportError: a backend it needs is missing
        raise CaptionerUnavailable(f"{folder} is not an image-to-text model transformers can load: {exc}") from None
    return processor, model, device, dtype


def load(folder: Path, prompt: str) -> Captioner:
    """A chat model's captioner when the processor has a chat template, else an image-to-text model's."""
    processor, model, device, dtype = load_model(folder)
    if getattr(processor, "chat_template", None):
        return _chat_captioner(processor, model, device, dtype, prompt)
    import torch

    def caption(paths: list[Path]) -> list[str]:
        inputs = processor(images=rgb_images(paths), return_tensors="pt").to(device, dtype)
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=MAX_NEW_TOKENS)
        return [" ".join(text.split()) for text in processor.batch_decode(ids, skip_special_tokens=True)]

    return caption


def _chat_captioner(processor: Any, model: Any, device: Any, dtype: Any, prompt: str) -> Captioner:
    """One user turn per image (the image, then `prompt`), answered greedily: the same image gets the same
    caption on every run."""
    import torch

    # Decoder-only models continue the prompt's last token: pad a batch on the left so every prompt ends there.
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def caption(paths: list[Path]) -> list[str]:
        images = rgb_images(paths)
        inputs = processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")
        inputs = inputs.to(device, dtype)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=CHAT_MAX_NEW_TOKENS, do_sample=False)
        answers = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [" ".join(answer.split()) for answer in answers]

    return caption
