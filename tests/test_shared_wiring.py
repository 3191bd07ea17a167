"""The shared code every model family goes through (issue 18): text of varying length with its mask, batched and
cached; a LoRA's family told by its denoiser's class where every transformer family's prefix is `transformer`;
alpha folded into the up weights for the families whose loaders refuse alpha tensors, and read back."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from safetensors import safe_open

from training.data.caches import TextCache
from training.data.loader import collate_text
from training.export import write_lora_file
from training.families import FAMILIES, lora_family
from training.lora import read_lora_file
from training.prompts import TextConditioning


def test_captions_of_one_length_without_masks_are_stacked_as_before():
    entries = [TextConditioning(torch.randn(4, 3), torch.randn(2)) for _ in range(2)]
    batch = collate_text(entries)
    assert batch.mask is None
    assert torch.equal(batch.states, torch.stack([entries[0].states, entries[1].states]))
    assert torch.equal(batch.pooled, torch.stack([entries[0].pooled, entries[1].pooled]))


def test_captions_of_varying_length_are_padded_and_masked():
    short = TextConditioning(torch.ones(2, 3))  # no mask: all of its 2 positions count
    masked = TextConditioning(torch.full((5, 3), 2.0), mask=torch.tensor([1, 1, 1, 0, 0]))
    batch = collate_text([short, masked])
    assert batch.states.shape == (2, 5, 3) and batch.pooled is None
    assert torch.equal(batch.states[0, :2], short.states) and not batch.states[0, 2:].any()
    assert torch.equal(batch.states[1], masked.states)
    assert batch.mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_the_text_cache_keeps_masks_in_memory_and_on_disk(tmp_path):
    entry = TextConditioning(torch.randn(5, 3), mask=torch.tensor([1, 1, 0, 0, 0]))
    for on_disk in (False, True):
        cache = TextCache(tmp_path / str(on_disk), max_token_length=75, clip_skip=1)
        cache.folder.mkdir()
        cache.on_disk = on_disk
        cache.put("a cat", entry)
        read = cache.get("a cat")
        assert torch.equal(read.states, entry.states) and torch.equal(read.mask, entry.mask) and read.pooled is None


def _tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=16,
    )


def test_a_loras_family_is_told_by_its_denoisers_class():
    with torch.device("meta"):
        flux = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
        unet = UNet2DConditionModel(
            block_out_channels=(32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
        )
    assert lora_family({"transformer": _tiny_sd3()}).id == "sd3"
    assert lora_family({"transformer": flux, "text_encoder": torch.nn.Linear(1, 1)}).id == "flux"
    assert lora_family({"unet": unet}).id == "sd1"  # SDXL's UNet is SD's class: the first family of it
    assert lora_family({"transformer": torch.nn.Linear(1, 1)}).id == "flux"  # a class no family names: by prefix


def test_a_folded_alpha_is_written_into_the_up_weights_and_read_back_as_the_rank(tmp_path):
    sd3 = FAMILIES["sd3"]
    assert sd3.fold_alpha
    transformer = _tiny_sd3()
    module = "transformer.transformer_blocks.0.attn.to_q"
    layer = transformer.transformer_blocks[0].attn.to_q
    down, up = torch.randn(4, layer.in_features), torch.randn(layer.out_features, 4)
    path = tmp_path / "folded.safetensors"
    write_lora_file(
        path,
        {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up},
        alpha=2.0,
        output_format="diffusers",
        metadata={"ss_network_alpha": "2.0", "ss_network_dim": "4", "lora_adapter_metadata": "{}"},
        adapter_configs={"transformer": {"r": 4, "lora_alpha": 2.0}},
        family=sd3,
    )
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]  # no .alpha
        assert f.metadata() == {"ss_network_alpha": "2.0", "ss_network_dim": "4"}  # no adapter config
        assert torch.equal(f.get_tensor(f"{module}.lora_B.weight"), up * 0.5)  # alpha / rank = 2 / 4
    [(name, read)] = read_lora_file(path, {"transformer": transformer}).items()
    assert name == module and read.alpha == 4.0  # alpha = rank: the same scale, 1, as the folded file has
    assert torch.equal(read.down, down) and torch.equal(read.up, up * 0.5)
