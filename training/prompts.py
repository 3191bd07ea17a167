"""Text conditioning: captions and prompts to CLIP hidden states, kohya-compatible.

Long prompts: `max_token_length` of 150 or 225 encodes the caption in 75-token chunks, each
wrapped in its own start/end tokens, and joins the chunks' hidden states (dropping the inner
start/end states), so the UNet sees 75 x n + 2 positions; at 75 this is plain CLIP encoding.
clip_skip n takes the n-th hidden layer from the end, passed through the final layer norm
(A1111/kohya semantics: 1 = last layer, 2 = penultimate).

What each family encodes (SD's CLIP states, SDXL's two encoders and pooled projection, FLUX's T5
states and CLIP vector) is its module's encode_text, in training/families/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from training.guide import CAPTION_TOKENS  # a CLIP chunk: its 77 positions minus start and end

if TYPE_CHECKING:
    from training.models.loading import LoadedModel


def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], *, max_token_length: int, clip_skip: int
) -> torch.Tensor:
    """(batch, 75 * n + 2, hidden) conditioning for `prompts`, with n = max_token_length / 75."""
    chunks = chunk_ids(tokenizer, prompts, max_token_length=max_token_length, device=text_encoder.device)
    return join_chunks([_hidden_states(text_encoder, ids, clip_skip) for ids in chunks])


def chunk_ids(tokenizer, prompts: list[str], *, max_token_length: int, device) -> list[torch.Tensor]:
    """The captions' token ids as max_token_length / 75 CLIP inputs of (batch, 77), each with its own
    start and end tokens, as kohya splits them; one chunk is the tokenizer's ids unchanged."""
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_token_length + 2, return_tensors="pt"
    ).input_ids.to(device)
    if max_token_length == CAPTION_TOKENS:
        return [ids]
    start, last = ids[:, :1], ids[:, -1:]  # last: the caption's end token, or padding
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for first in range(1, max_token_length + 1, CAPTION_TOKENS):
        chunk = torch.cat([start, ids[:, first : first + CAPTION_TOKENS], last], dim=1)
        # kohya's two fixes, no-ops where padding is the end token (SD 1's tokenizer); SD 2's and SDXL's
        # second pad with "!": a chunk cut inside the caption ends with an end token, and an empty
        # chunk starts with one.
        cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
        chunk[:, -1] = torch.where(cut, eos, chunk[:, -1])
        chunk[:, 1] = torch.where(chunk[:, 1] == pad, eos, chunk[:, 1])
        chunks.append(chunk)
    return chunks


def join_chunks(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' hidden states as one sequence: the first start state, each chunk's 75 inner states,
    the last end state (kohya's layout: 75 * n + 2 positions)."""
    if len(chunks) == 1:
        return chunks[0]
    inner = [c[:, 1:-1] for c in chunks]
    return torch.cat([chunks[0][:, :1], *inner, chunks[-1][:, -1:]], dim=1)


def _hidden_states(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers < 5 wraps the CLIP text transformer in `.text_model`; 5.x does not.
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_norm(hidden)


@dataclass
class TextConditioning:
    states: torch.Tensor  # (batch, tokens, hidden): what the UNet (CLIP) or FLUX's transformer (T5) attends to
    # (batch, projection): SDXL's second encoder, for its text_time embedding; FLUX's CLIP vector
    pooled: torch.Tensor | None = None
    # (batch, tokens), 1 where the denoiser attends: the families whose text is of varying length (Qwen-Image,
    # Z-Image) or masked (Chroma: its T5 padding but the first pad token); None: every position counts.
    mask: torch.Tensor | None = None


def encode_text(
    model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int
) -> TextConditioning:
    """The conditioning of `prompts` for the model's family (once its encoders are released, as they were
    encoded before: see release_text_encoders)."""
    if model.encoded_prompts is not None:
        from training.data.loader import collate_text

        missing = [prompt for prompt in prompts if prompt not in model.encoded_prompts]
        if missing:
            raise RuntimeError(f"the text encoders were released after caching; {missing[0]!r} was not encoded before")
        return collate_text([model.encoded_prompts[prompt] for prompt in prompts])
    return model.family_rules.encode_text(model, prompts, max_token_length=max_token_length, clip_skip=clip_skip)


def release_text_encoders(model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int) -> None:
    """Encode `prompts` one by one (what a run still encodes once its captions are cached: the sample prompts,
    the control prompt, the empty negative one), keep their conditioning on the CPU, and drop the family's text
    encoders from the pipeline, freeing their memory (Qwen-Image's 8.3 B Qwen2.5-VL: 16.6 GB in bf16)."""
    import gc

    kept = {}
    for prompt in dict.fromkeys(prompts):
        text = encode_text(model, [prompt], max_token_length=max_token_length, clip_skip=clip_skip)
        tensors = (text.states, text.pooled, text.mask)
        kept[prompt] = TextConditioning(*(None if tensor is None else tensor[0].cpu() for tensor in tensors))
    for name in model.family_rules.text_encoders:
        setattr(model.pipeline, name, None)
    model.encoded_prompts = kept
    gc.collect()
