"""Merging LoRA files into one, exactly: by concatenation, not by adding or SVD-compressing deltas.

LoRA i changes a layer by w_i * (alpha_i / r_i) * B_i @ A_i. Stacking the rows of every A and the
columns of every B (each B_i times w_i * alpha_i / r_i) gives one LoRA of rank R = sum(r_i) whose
B @ A is exactly that sum; written with alpha = R (scale 1), the merged file at strength 1 equals
loading every source at its weight. A module that a source lacks gets zero rows and columns in
that source's block, so every module has rank R. The price of exactness is the rank, hence the cap.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.convert import (
    LoraFormat,
    base_model_folder,
    empty_models,
    file_layout,
    lora_metadata,
    recorded_training_config,
    write_lora_weights,
)
from training.families import lora_family
from training.lora import LoraFileError, LoraWeights, read_lora_file
from training.models.source import ModelNotFoundError
from training.request_child import serve_request

MAX_WEIGHT = 2.0  # |weight| of one source; beyond this a LoRA is far outside what it was trained for
MAX_MERGED_RANK = 1024
# Metadata that describes the base model: the same for every source (checked), kept from the first.
_BASE_MODEL_KEYS = (
    "ss_base_model_version",
    "ss_v2",
    "ss_sd_model_name",
    "ss_resolution",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.resolution",
    "modelspec.prediction_type",
)


def merge_lora_files(
    sources: list[tuple[Path, float]],
    target: Path,
    *,
    output_format: LoraFormat = "comfyui",
    model_folder: Path | None = None,
    model_name: str | None = None,
) -> Path:
    """Write the LoRA that equals `sources` (file, weight) applied together, at `target`.

    The base model (for module names and layer shapes) is `model_folder`, else `model_name`, else the
    one named in the first source that records its training config. Raises LoraFileError, before writing anything,
    for fewer than two sources, a weight outside [-2, 2], sources made for different base models,
    layers whose shapes differ from the base model's, or a merged rank above 1024.
    """
    file_layout(output_format)  # an unknown format is refused before anything is read
    sources = [(Path(path), weight) for path, weight in sources]
    if len(sources) < 2:
        raise LoraFileError(f"merging needs at least 2 LoRA files, got {len(sources)}")
    for path, weight in sources:
        if not isinstance(weight, int | float) or not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise LoraFileError(f"the weight of {path.name} is {weight}; use a number from -2 to 2")
    metadatas = [lora_metadata(path) for path, _ in sources]
    configs = [recorded_training_config(path, metadata) for (path, _), metadata in zip(sources, metadatas)]
    _check_same_base_model([path for path, _ in sources], metadatas)

    # The first source that names its base model gives the architecture (and its training config).
    described = next((i for i, config in enumerate(configs) if "model_name" in config), 0)
    folder = base_model_folder(sources[described][0], metadatas[described], model_folder, model_name)
    models = empty_models(folder)
    family = lora_family(models)
    layout = file_layout(output_format, family)
    layers = _lora_layers(models)
    loras = []
    for path, _ in sources:
        weights = read_lora_file(path, models)
        if not weights:
            raise LoraFileError(f"{path} holds no LoRA weights")
        _check_shapes(path, weights, layers, folder)
        loras.append(weights)

    blocks = [max(w.down.shape[0] for w in lora.values()) for lora in loras]  # each source's rank
    rank = sum(blocks)
    if rank > MAX_MERGED_RANK:
        raise LoraFileError(
            f"the merged LoRA would have rank {rank} ({' + '.join(map(str, blocks))}), above {MAX_MERGED_RANK}: "
            "merge fewer or lower-rank LoRAs"
        )
    merged = {}
    for name in sorted(set().union(*loras)):
        down_shape, up_shape = _factor_shapes(layers[name], rank)
        down, up = torch.zeros(down_shape), torch.zeros(up_shape)
        start = 0
        for (_, weight), lora, block in zip(sources, loras, blocks):
            if name in lora:
                w = lora[name]
                r = w.down.shape[0]
                down[start : start + r] = w.down
                up[:, start : start + r] = w.up * (weight * w.alpha / r)
            start += block
        merged[name] = LoraWeights(down, up, float(rank))

    metadata = _merged_metadata(target, sources, metadatas, loras, blocks, rank, base=metadatas[described])
    names = ", ".join(path.name for path, _ in sources)
    return write_lora_weights(
        target, merged, output_format=layout, family=family, metadata=metadata, source=f"the merge of {names}"
    )


def _check_same_base_model(paths: list[Path], metadatas: list[dict]) -> None:
    """Refuse sources whose metadata names different architectures (SD 1.x, SD 2.x v-prediction, ...).
    The model names are not compared: LoRAs trained on two fine-tunes of SD 1.5, or on one model given
    by its hub id and by its folder, merge fine. Sources without metadata are checked by shape only."""
    recorded = [
        {"version": metadata.get("ss_base_model_version"), "SD 2.x": metadata.get("ss_v2")} for metadata in metadatas
    ]
    for path, record in zip(paths[1:], recorded[1:]):
        for field, value in record.items():
            first = recorded[0][field]
            if value and first and value != first:
                raise LoraFileError(
                    f"{paths[0].name} and {path.name} were trained for different base models ({field}: {first!r} vs "
                    f"{value!r}); merge only LoRAs of one base model"
                )


def _lora_layers(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Linear | torch.nn.Conv2d]:
    return {
        f"{prefix}.{name}": module
        for prefix, model in models.items()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def _factor_shapes(layer: torch.nn.Linear | torch.nn.Conv2d, rank: int) -> tuple[tuple, tuple]:
    """The shapes of A and B of a rank-`rank` LoRA of `layer`: (rank, in) and (out, rank) for a linear layer;
    for a conv layer (LoCon) A is a conv of the layer's kernel, B a 1x1 conv, as kohya, LyCORIS and peft make them."""
    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


def _check_shapes(path: Path, weights: dict[str, LoraWeights], layers: dict, folder: Path) -> None:
    for name, w in weights.items():
        expected = _factor_shapes(layers[name], w.down.shape[0])
        if (tuple(w.down.shape), tuple(w.up.shape)) != expected:
            raise LoraFileError(
                f"{path.name}: {name} has shapes A {tuple(w.down.shape)}, B {tuple(w.up.shape)}, but that layer of "
                f"the base model ({folder}) takes A {expected[0]}, B {expected[1]}: another architecture?"
            )
        if not (torch.isfinite(w.down).all() and torch.isfinite(w.up).all() and math.isfinite(w.alpha)):
            raise LoraFileError(f"{path.name}: {name} holds NaN or infinite values")


def _merged_metadata(
    target: Path, sources: list, metadatas: list[dict], loras: list[dict], blocks: list[int], rank: int, *, base: dict
) -> dict[str, str]:
    """The base model's keys and training config of `base` (the source that named the base model),
    the merged rank and alpha, and the sources with their weights."""
    merged_from = []
    for (path, weight), metadata, lora, block in zip(sources, metadatas, loras, blocks):
        alphas = sorted({w.alpha for w in lora.values()})
        merged_from.append(
            {
                "file": path.name,
                "weight": weight,
                "rank": block,
                "alpha": alphas[0] if len(alphas) == 1 else alphas,
                "base_model": metadata.get("ss_sd_model_name"),
                "trigger_word": metadata.get("modelspec.trigger_phrase"),
            }
        )
    metadata = {key: base[key] for key in (*_BASE_MODEL_KEYS, "training_config") if key in base}
    metadata |= {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_output_name": target.stem,
        "ss_merged_from": json.dumps(merged_from),
        "modelspec.title": target.stem,
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    triggers = list(dict.fromkeys(t for m in metadatas if (t := m.get("modelspec.trigger_phrase"))))
    if triggers:
        metadata["modelspec.trigger_phrase"] = ", ".join(triggers)
    return metadata


def main() -> int:
    """`python -m training.merge`: merge_lora_files for the server, which does not import torch
    (training/request_child.py): {sources: [[path, weight], ...], target, output_format, model_name} in,
    {path} out."""

    def merge(
        sources: list[tuple[str, float]], target: str, output_format: LoraFormat, model_name: str | None = None
    ) -> dict:
        weighted = [(Path(path), weight) for path, weight in sources]
        merged = merge_lora_files(weighted, Path(target), output_format=output_format, model_name=model_name)
        return {"path": str(merged)}

    return serve_request(merge, (LoraFileError, ModelNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
