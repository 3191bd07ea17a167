"""Built-in tiny base models for offline tests and the demo.

Each is a real pipeline of its family (training/families/) at toy size with random weights, built
deterministically from a seed by the family's `tiny_pipeline` and saved as an ordinary diffusers folder
under `<workspace>/models/`. The trainer loads that folder like any other: nothing about the built-ins
is special-cased outside this module and the families' builders.

Sizes, shared by every family's builder through the pieces below: 64 px images, an 8x VAE (8x8
latents, as SD's 512 px -> 64x64), a CLIP text encoder of width 32 and 4 layers, and a byte-level BPE
vocabulary of 514 tokens (every byte, as word-inner and word-final token, plus start/end), so any
caption tokenizes without a downloaded vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from training.families import FAMILIES
from training.request_child import RequestChildFailed, RequestRefused, run_request, serve_request
from training.workspace import DIR_MODE

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

BUILTIN_PREFIX = "builtin:"
MODEL_INDEX_FILE = "model_index.json"  # a diffusers pipeline folder's, saved last: a folder with it is complete
# Bump when a builder changes, so stale caches are rebuilt instead of reused.
BUILDER_VERSION = 1


@dataclass(frozen=True)
class TinySpec:
    description: str
    # epsilon or v_prediction: what a UNet's scheduler is configured for; flow_prediction: FLUX's, fixed
    prediction_type: str
    family: str  # the FAMILIES id whose tiny_pipeline builds it
    seed: int


BUILTINS: dict[str, TinySpec] = {
    "tiny-sd15": TinySpec("tiny random SD 1.x (epsilon prediction)", "epsilon", family="sd1", seed=1234),
    "tiny-sd2-v": TinySpec("tiny random SD 2.x (v-prediction)", "v_prediction", family="sd2", seed=4321),
    "tiny-sdxl": TinySpec("tiny random SDXL (two text encoders, epsilon)", "epsilon", family="sdxl", seed=2468),
    "tiny-flux": TinySpec("tiny random FLUX-class (flow matching)", "flow_prediction", family="flux", seed=1357),
    "tiny-sd35": TinySpec(
        "tiny random SD 3.5 (three text encoders, flow matching)", "flow_prediction", family="sd3", seed=3535
    ),
    "tiny-chroma": TinySpec(
        "tiny random Chroma (T5 only, masked, flow matching)", "flow_prediction", family="chroma", seed=9753
    ),
    "tiny-qwen-image": TinySpec(
        "tiny random Qwen-Image (Qwen2.5-VL text encoder, own VAE, flow matching)",
        "flow_prediction",
        family="qwen_image",
        seed=2020,
    ),
    "tiny-z-image": TinySpec(
        "tiny random Z-Image (Qwen3 text encoder, single-stream, flow matching)",
        "flow_prediction",
        family="z_image",
        seed=8642,
    ),
    "tiny-flux2": TinySpec(
        "tiny random FLUX.2 (Mistral text encoder, own VAE, flow matching)",
        "flow_prediction",
        family="flux2",
        seed=2626,
    ),
}


def is_builtin(model_name: str) -> bool:
    return model_name.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + key for key in BUILTINS]


def ensure_builtin(model_name: str, models_root: Path) -> Path:
    """Return the folder of a built-in model, building it on first use in a child process
    (training/request_child.py): the builders need torch, diffusers and transformers, which the MCP
    server, validating a config that names a built-in, must not import.

    The folder appears in one rename, so concurrent first uses never see a half-built model:
    each builds into its own temporary folder and the loser of the rename discards its copy.
    """
    key = model_name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTINS:
        raise KeyError(f"unknown built-in model {model_name!r}; built-ins are: {', '.join(builtin_names())}")
    target = builtin_folder(key, models_root)
    if not (target / MODEL_INDEX_FILE).is_file():
        try:
            run_request("training.models.builtin", model_name=model_name, models_root=str(models_root))
        except (RequestRefused, RequestChildFailed) as exc:
            raise OSError(f"building {model_name} in {models_root} failed: {exc}") from None
    return target


def builtin_folder(key: str, models_root: Path) -> Path:
    return models_root / f"builtin-{key}-v{BUILDER_VERSION}"


def build_builtin(model_name: str, models_root: Path) -> Path:
    """Build a built-in model's folder (in this process: it imports torch) unless it is there already."""
    key = model_name.removeprefix(BUILTIN_PREFIX)
    spec = BUILTINS[key]
    return build_folder_once(
        builtin_folder(key, models_root),
        MODEL_INDEX_FILE,
        lambda staging: FAMILIES[spec.family].tiny_pipeline(spec).save_pretrained(staging, safe_serialization=True),
    )


def build_folder_once(target: Path, marker: str, save: Callable[[Path], None]) -> Path:
    """`target`, made by `save(folder)` into a temporary folder beside it and one rename, unless it holds
    `marker` already: concurrent first uses never see a half-built folder, and the loser of the rename
    discards its copy."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=target.parent))
    try:
        save(staging)
        try:
            os.chmod(staging, DIR_MODE)
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_vae(seed: int, **overrides) -> AutoencoderKL:
    """An 8x AutoencoderKL for 64 px images (4 latent channels unless overridden), seeded."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    layout = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    return AutoencoderKL(**{**layout, **overrides})


def tiny_flux_vae(seed: int, **overrides) -> AutoencoderKL:
    """tiny_vae with FLUX's 16 latent channels, scaling and shift and no quant convs (FLUX, Chroma, Z-Image; SD 3.5's
    is the same with its own scaling and shift as `overrides`)."""
    layout = dict(scaling_factor=0.3611, shift_factor=0.1159)
    return tiny_vae(
        seed, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **{**layout, **overrides}
    )


def tiny_clip_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """A CLIP text encoder of width 32 and 4 layers over the byte-level tokenizer."""
    from transformers import CLIPTextConfig

    layout = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**{**layout, **overrides})


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer over T5's SentencePiece vocabulary rebuilt offline: the special tokens, then every byte symbol."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(symbol, -1.0) for symbol in byte_symbols()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=64)


def tiny_t5(seed: int, tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    """A 2-layer T5 encoder of width `d_model` over `tokenizer` (tiny_t5_tokenizer's), seeded."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is every byte (word-inner and word-final) and no merges."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins that GPT-2/CLIP byte-level BPE uses for the byte values:
    printable Latin-1 bytes stand for themselves, the other 68 map to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def main() -> int:
    """`python -m training.models.builtin`: build_builtin for a torch-free parent (training/request_child.py):
    {model_name, models_root} in, {path} out."""
    return serve_request(lambda model_name, models_root: {"path": str(build_builtin(model_name, Path(models_root)))}, ())


if __name__ == "__main__":
    sys.exit(main())
