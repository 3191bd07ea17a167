"""Loading a family's transformer on its own, for the pipeline to take as a component: from a single file
(a checkpoint that holds the transformer only, as BFL's FLUX files do), and/or with 8-bit weights
(quantize_base "8bit": about half of its bf16 memory, FLUX's 12 B parameters in ~12 GB instead of ~24 GB).
The transformer families (FLUX, and the larger new ones: Qwen-Image's 20 B, SD 3.5 Large's 8 B, Chroma's 8.9 B)
load it the same way, each with its own diffusers class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from training.models.source import ModelSource


class QuantizationUnavailable(RuntimeError):
    """quantize_base asks for a library that is not installed; the message names it."""


def load_transformer(
    transformer_class: type, source: ModelSource, device: torch.device, *, quantize: str, dtype: torch.dtype
):
    """`transformer_class` (a diffusers transformer model class) from the source's `transformer` folder, or from
    its single file with base_model_config's folder for the config; with `quantize` "8bit" through bitsandbytes'
    LLM.int8 on CUDA (its quantizer needs a GPU), else torchao's int8 weight-only (CPU or GPU). peft attaches
    trainable full-precision LoRA layers to either. QuantizationUnavailable when neither library is installed."""
    import torch

    options: dict = {"dtype": dtype}
    if quantize == "8bit":
        options["quantization_config"] = _int8_config(device)
        options["dtype"] = torch.float32  # the layers left unquantized (norms, embeddings): small
    if source.kind == "single_file":
        return transformer_class.from_single_file(
            str(source.path),
            config=str(source.config_folder) if source.config_folder else None,
            subfolder="transformer",
            local_files_only=True,
            **options,
        )
    return transformer_class.from_pretrained(str(source.path), subfolder="transformer", **options)


def load_with_transformer(
    pipeline_class: type,
    transformer_class: type,
    source: ModelSource,
    device: torch.device,
    dtypes: dict[str, torch.dtype],
    *,
    quantize: str,
    **options,
):
    """The pipeline with its transformer loaded by `load_transformer` (a single file, 8-bit weights), and the rest
    from the diffusers folder (a single file's base_model_config), its weights read straight into `dtypes`;
    `options` are more keyword arguments of from_pretrained (components given or left out)."""
    transformer = load_transformer(transformer_class, source, device, quantize=quantize, dtype=dtypes["default"])
    folder = source.config_folder if source.kind == "single_file" else source.path
    return pipeline_class.from_pretrained(str(folder), dtype=dtypes, transformer=transformer, **options)


def _int8_config(device: torch.device):
    """diffusers' quantization config for 8-bit weights on `device`, by the library installed."""
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes"):
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    if importlib.util.find_spec("torchao"):
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    raise QuantizationUnavailable(
        "quantize_base 8bit needs bitsandbytes (CUDA: pip install bitsandbytes) or torchao (pip install "
        "torchao); install one, or set quantize_base to none"
    )
