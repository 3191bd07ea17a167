"""LoRAs made by other tools (issue 15, item 5): a kohya-layout FLUX LoRA (fused qkv, `lora_unet_double_blocks_*`)
and an SD LoCon with conv layers are loaded by generate-image (the bar), converted by convert-lora, merged by
merge-loras and continued with `resume_from`, all through the real stdio MCP server; each result has the
source's effect on the image, and that effect is not nothing. Also: nothing in loras/ is ever overwritten."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest
import test_mcp_server as mcp
import torch
from conftest import fast_config, tiny_pipeline
from safetensors.torch import load_file, save_file

from training.lora import LoraFileError, read_lora_file
from training.models.builtin import ensure_builtin
from training.trainer import run_training

RANK, ALPHA = 4, 2.0


def _pair(generator, inputs: int, outputs: int, kernel: tuple[int, int] | None = None):
    down_shape = (RANK, inputs, *kernel) if kernel else (RANK, inputs)
    up_shape = (outputs, RANK, 1, 1) if kernel else (outputs, RANK)
    return torch.randn(down_shape, generator=generator) * 0.5, torch.randn(up_shape, generator=generator) * 0.5


def _save_kohya(path: Path, layers: dict, seed: int, metadata: dict) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, shape in layers.items():
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = _pair(generator, *shape)
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_flux_lora(model: Path, path: Path) -> Path:
    """kohya sd-scripts' FLUX layout (BFL's module names, fused img qkv), sized from the tiny model's config.
    (single_blocks' linear1 is left out: diffusers splits it at FLUX.1's full-size widths, 3072/12288.)"""
    config = json.loads((model / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(inner * config.get("mlp_ratio", 4.0))
    layers = {
        "lora_unet_double_blocks_0_img_attn_qkv": (inner, 3 * inner),
        "lora_unet_double_blocks_0_txt_attn_proj": (inner, inner),
        "lora_unet_single_blocks_0_linear2": (inner + mlp, inner),
    }
    return _save_kohya(path, layers, 7, {"ss_network_module": "networks.lora_flux"})


def locon_lora(model: Path, path: Path) -> Path:
    """A LyCORIS/kohya LoCon: 3x3 conv layers of the first down block's resnet beside an attention projection."""
    channels = json.loads((model / "unet" / "config.json").read_text())["block_out_channels"][0]
    layers = {
        "lora_unet_down_blocks_0_resnets_0_conv1": (channels, channels, (3, 3)),
        "lora_unet_down_blocks_0_resnets_0_conv2": (channels, channels, (3, 3)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (channels, channels),
    }
    return _save_kohya(path, layers, 8, {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon"}'})


KINDS = {
    # kind: (built-in model, file writer, LoRA modules a resumed run must train (None: the family's defaults))
    "kohya-flux": ("builtin:tiny-flux", kohya_flux_lora, None),
    "locon": ("builtin:tiny-sd15", locon_lora, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]),
}


def latents(model: Path, lora: Path | None = None) -> torch.Tensor:
    """The tiny model's latents for a fixed prompt and seed, the LoRA loaded by diffusers itself."""
    from diffusers import FluxPipeline

    pipe = tiny_pipeline(model, FluxPipeline if "flux" in model.name else None)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    generator = torch.Generator().manual_seed(3)
    return pipe("xyz_shape a red circle", num_inference_steps=2, height=64, width=64, generator=generator,
                output_type="latent").images


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_lora_from_elsewhere_generates_converts_merges_and_resumes_over_mcp(kind, tmp_path, tiny_sd15, shapes):
    model_name, make, targets = KINDS[kind]
    workspace = tmp_path / "ws"
    (workspace / "loras").mkdir(parents=True)
    (workspace / "models").symlink_to(tiny_sd15.parent)
    model = ensure_builtin(model_name, tiny_sd15.parent)
    source = make(model, workspace / "loras" / f"{kind}.safetensors")

    async def script(session):
        # The resumed run trains while the other tools answer (the SDK runs them in worker threads).
        options = {"model_name": model_name, "resume_from": kind, "rank": RANK, "alpha": 8, "steps": 1,
                   "learning_rate": 1e-9, "batch_size": 1, "disable_sampling": True}
        if targets:
            options["target_modules"] = targets
        await mcp.create(session, f"{kind}-resumed", shapes, **options)
        job = await mcp.start(session, f"{kind}-resumed")
        paths = {}

        async def generate():
            image = await session.call_tool(
                "generate-image",
                {"model_name": model_name, "prompt": "xyz_shape", "loras": [{"lora": kind}], "steps": 2},
            )
            assert not image.is_error, image.content
            assert image.content[-1].type == "image"

        async def convert():
            unnamed = await session.call_tool("convert-lora", {"lora": kind, "to": "comfyui"})
            assert unnamed.is_error and "give model_name" in unnamed.content[0].text, unnamed.content
            arguments = {"lora": kind, "to": "comfyui", "model_name": model_name}
            converted = await session.call_tool("convert-lora", arguments)
            assert not converted.is_error, converted.content
            # Named after the source and the layout (numbered when taken: test_merge_convert.py).
            assert converted.structured_content["name"] == f"{kind}-comfyui"
            paths["converted"] = converted.structured_content["path"]
            exact = await session.call_tool(
                "convert-lora", {"lora": kind, "to": "diffusers", "output_name": kind, "model_name": model_name}
            )
            assert exact.is_error and "never overwritten" in exact.content[0].text, exact.content

        async def merge():
            merged = await session.call_tool(
                "merge-loras",
                {"loras": [{"lora": kind, "weight": 0.5}, {"lora": kind, "weight": 0.5}],
                 "output_name": f"{kind}-merged", "model_name": model_name},
            )
            assert not merged.is_error, merged.content
            paths["merged"] = merged.structured_content["lora"]["path"]

        async with anyio.create_task_group() as group:
            for call in (generate, convert, merge):
                group.start_soon(call)
        final = await mcp.wait_for_state(session, job["job_id"], ("completed", "failed", "interrupted"))
        assert final["state"] == "completed", final
        return paths["converted"], paths["merged"]

    converted, merged = mcp.run_session(workspace, script)
    assert (workspace / "loras" / f"{kind}.safetensors").read_bytes() == source.read_bytes()  # never overwritten
    resumed = workspace / "loras" / f"{kind}-resumed.safetensors"  # the completed job's published LoRA

    plain, expected = latents(model), latents(model, source)
    assert (expected - plain).abs().max() > 1e-2  # the LoRA changes the image: the comparisons below mean something
    for path in (converted, merged, resumed):
        # A 1e-9 learning rate moves the resumed run's weights by ~1e-9: it starts from the file.
        torch.testing.assert_close(latents(model, Path(path)), expected, atol=1e-4, rtol=1e-4, msg=str(path))


TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_TO_Q = "lora_unet_" + TO_Q.replace(".", "_")


@pytest.mark.parametrize(
    "key, kind",
    [
        (f"{KOHYA_TO_Q}.dora_scale", "DoRA magnitudes"),  # kohya's DoRA (dora_wd); diffusers drops it with a log line
        (f"unet.{TO_Q}.lora_magnitude_vector", "DoRA magnitudes"),  # peft's DoRA
        (f"unet.{TO_Q}.lora_B.bias", "LoRA biases"),  # peft's lora_bias
        (f"{KOHYA_TO_Q}.diff", "full-weight differences"),
    ],
)
def test_tensors_the_tools_cannot_carry_are_refused_with_their_keys(key, kind, tmp_path, tiny_sd15):
    """convert-lora, merge-loras and resume_from carry down/up matrices and alphas: a file with more is
    refused with what it holds and what to do, not converted into a different LoRA."""
    pipe = tiny_pipeline(tiny_sd15)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    plain = tmp_path / "plain.safetensors"
    if key.startswith("lora_unet_"):
        tensors = load_file(_save_kohya(plain, {KOHYA_TO_Q: (32, 32)}, 1, {}))
    else:
        tensors = {f"unet.{TO_Q}.lora_A.weight": torch.ones(RANK, 32)}
        tensors[f"unet.{TO_Q}.lora_B.weight"] = torch.ones(32, RANK)
        save_file(tensors, str(plain))
    assert set(read_lora_file(plain, models)) == {f"unet.{TO_Q}"}  # without the extra tensor, it reads

    shape = (32, 32) if key.endswith(".diff") else (1, 32) if "dora_scale" in key else (32,)
    save_file(tensors | {key: torch.ones(shape)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(LoraFileError, match=rf"extra.safetensors holds {kind} \({re.escape(key)}\), .*plain LoRA"):
        read_lora_file(tmp_path / "extra.safetensors", models)


def test_zero_diffs_change_nothing_and_pass_as_diffusers_purges_them(tmp_path, tiny_sd15):
    """Some trainers write all-zero `.diff_b` tensors in kohya FLUX files; diffusers drops them as ineffective."""
    from diffusers import FluxPipeline

    model = ensure_builtin("builtin:tiny-flux", tiny_sd15.parent)
    models = {"transformer": tiny_pipeline(model, FluxPipeline).transformer}
    tensors = load_file(kohya_flux_lora(model, tmp_path / "plain.safetensors"))
    bias = "lora_unet_double_blocks_0_txt_attn_proj.diff_b"
    width = tensors["lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight"].shape[0]
    save_file(tensors | {bias: torch.zeros(width)}, str(tmp_path / "zero.safetensors"))
    zero = read_lora_file(tmp_path / "zero.safetensors", models)
    plain = read_lora_file(tmp_path / "plain.safetensors", models)
    assert zero.keys() == plain.keys() and all(torch.equal(zero[k].up, plain[k].up) for k in plain)
    save_file(tensors | {bias: torch.ones(width)}, str(tmp_path / "bias.safetensors"))
    with pytest.raises(LoraFileError, match=f"bias.safetensors holds LoRA biases \\({bias}\\)"):
        read_lora_file(tmp_path / "bias.safetensors", models)


def test_resume_from_a_layer_of_another_kernel_is_refused_naming_the_layer(tmp_path, tiny_sd15, shapes):
    """A LoCon's 3x3 down matrix for a layer that is a 1x1 conv in this model (SD 1.x's proj_in): the kernel
    differs where inputs, outputs and rank all fit."""
    layers = {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, (3, 3))}
    lora = _save_kohya(tmp_path / "locon.safetensors", layers, 9, {})
    config = fast_config(shapes, resume_from=str(lora), rank=RANK, target_modules=["to_q", "proj_in"])
    result = run_training(config, tmp_path / "run")
    assert result.state == "failed"
    assert "layer unet.down_blocks.0.attentions.0.proj_in is 32 -> 32 features, 3x3 kernel, this run's is 32 -> 32 " \
        "features, 1x1 kernel" in result.error, result.error
