"""The captioners people use now, each end to end through generate-captions over the real stdio client, on
a tiny random model of the real architecture built offline: Florence-2, a LLaVA-class chat model, Qwen2.5-VL,
a WD14 tagger (ONNX). Random weights write nonsense: the tests check that the pipeline ran and its rules held."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_mcp_server import run_session

from training.captioners import find_caption_model
from training.captioners.wd14 import CHARACTER_THRESHOLD, GENERAL_THRESHOLD
from training.data.synthetic import make_shape_dataset
from training.models.builtin import byte_symbols


def byte_level_tokenizer(tokenizer_class, specials: list[str], **options):
    """A byte-level BPE tokenizer of `tokenizer_class` (GPT-2 layout): every byte a token, no merges."""
    vocab = {s: i for i, s in enumerate(specials + byte_symbols())}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return tokenizer_class(str(Path(tmp, "vocab.json")), str(Path(tmp, "merges.txt")), **options)


@pytest.fixture(scope="session")
def tiny_florence2(tmp_path_factory) -> Path:
    """Florence-2 (DaViT + BART) at toy size, its processor as the florence-community conversions save it."""
    import torch
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    tokenizer = byte_level_tokenizer(BartTokenizer, specials, extra_special_tokens={"image_token": "<image>"})
    # 64 px through strides 4*2*2*2 = 2x2 positions, plus one temporal token: 5 image tokens.
    image_processor = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config={"pure_text": {}}
    )
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 8, 16, 16],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=16,
        max_temporal_embeddings=2,
        max_position_embeddings=8,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(
        Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    )
    folder = tmp_path_factory.mktemp("tiny-florence2")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A LLaVA-class chat model (CLIP vision tower + Llama), JoyCaption's architecture, with a chat template."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GPT2Tokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<image>"]
    tokenizer = byte_level_tokenizer(
        GPT2Tokenizer, specials, pad_token="<|pad|>", eos_token="<|end|>", bos_token="<|end|>", unk_token="<|pad|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[2:]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy then drops
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Qwen2-VL/Qwen2.5-VL's chat template, as their releases ship it in chat_template.json (the video and
# add_vision_id branches left out): the default system turn, then one image placeholder per image.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_qwen25_vl(tmp_path_factory) -> Path:
    """Qwen2.5-VL at toy size, laid out as its releases are: config, weights, tokenizer, the image processor's
    preprocessor_config.json and chat_template.json. Its processor class cannot be built here (it needs
    torchvision for its video half), so the parts are saved one by one."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|image_pad|>", "<|video_pad|>"]
    vocab = {s: i for i, s in enumerate(specials + byte_symbols())}  # byte-level BPE: every byte a token
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials
    )
    # The 64 px images become 56x56 (a multiple of 14 px patches * 2x2 merge): 4x4 patches, 4 image tokens.
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    token_id = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        # head size 8: 4 rotary frequencies, split over time, height and width
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        "bos_token_id": tokenizer.pad_token_id,  # <|endoftext|>, as in the releases
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.3,  # at the default 0.02 every prompt gets the same answer
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={**vision, "fullatt_block_indexes": [0]},
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}), encoding="utf-8")
    return folder


# The tiny tagger's tags (selected_tags.csv rows), and the logit each one gets whatever the image: the model
# is a constant sigmoid(0 * mean(image) + bias), so which tags pass is known.
TAGS = [
    ("general", 9, 4.0),  # rating: dropped however sure
    ("long_hair", 0, 2.0),  # 0.88
    ("smile", 0, 0.0),  # 0.50
    ("^_^", 0, -0.5),  # 0.38: a kaomoji, underscores kept
    ("blue_sky", 0, -1.0),  # 0.27: under GENERAL_THRESHOLD
    ("hatsune_miku", 4, 2.0),  # 0.88: a character over CHARACTER_THRESHOLD
    ("kagamine_rin", 4, 1.0),  # 0.73: a character under it
]


@pytest.fixture(scope="session")
def tiny_wd14(tmp_path_factory) -> Path:
    """A WD14-layout tagger built with onnx.helper: input (batch, 16, 16, 3) float, sigmoid scores out."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    side = 16
    bias = np.array([[logit for _, _, logit in TAGS]], dtype=np.float32)
    weight = np.zeros((1, len(TAGS)), dtype=np.float32)  # the image's mean times 0: the bias decides
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Unsqueeze", ["mean", "axis"], ["column"]),
            helper.make_node("Gemm", ["column", "weight", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    folder = tmp_path_factory.mktemp("tiny-wd14")
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{kind},100" for i, (name, kind, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def caption_through_the_server(tmp_path: Path, model: Path, *calls: dict) -> list[dict]:
    """generate-captions on 3 uncaptioned images, over stdio, once per extra arguments in `calls` (one call
    when none): the results, each with the captions then in the files as `written`."""
    workspace = tmp_path / "ws"
    folder = workspace / "datasets" / "d"
    make_shape_dataset(folder, 3)
    for caption in folder.glob("*.txt"):
        caption.unlink()

    async def script(session):
        results = []
        for arguments in calls or ({},):
            call = {"dataset_name": "d", "caption_model": str(model), "trigger_word": "xyz_shape", **arguments}
            result = await session.call_tool("generate-captions", call)
            assert not result.is_error, result.content
            written = [path.read_text(encoding="utf-8").strip() for path in sorted(folder.glob("*.txt"))]
            results.append({**result.structured_content, "written": written})
        return results

    return run_session(workspace, script)


def test_florence2_captions_with_its_task_prompt(tmp_path, tiny_florence2):
    [result] = caption_through_the_server(tmp_path, tiny_florence2)
    assert result["captioned"] == 3 and len(result["written"]) == 3
    for caption in result["written"]:
        assert caption.startswith("xyz_shape ") and len(caption) > len("xyz_shape ")
        assert not any(token in caption for token in ("<s>", "</s>", "<pad>", "<image>"))


def assert_asked_the_caption_prompt(tmp_path: Path, model: Path, template_text: tuple[str, ...]) -> None:
    """Two runs with two instructions: each caption the trigger word then the answer alone (neither the
    instruction nor any of `template_text`, the chat template's turns and image tokens), and other answers
    to the other instruction, which therefore reached the model."""
    prompt = "Describe the picture in one sentence."
    first, second = caption_through_the_server(
        tmp_path, model, {"caption_prompt": prompt}, {"caption_prompt": "List its colours.", "overwrite": True}
    )
    assert first["captioned"] == second["captioned"] == 3 and len(first["written"]) == 3
    for caption in first["written"]:
        assert caption.startswith("xyz_shape ") and len(caption) > len("xyz_shape ") and prompt not in caption
        assert not any(text in caption for text in template_text)
    assert first["written"] != second["written"]


def test_a_chat_model_is_asked_the_caption_prompt(tmp_path, tiny_llava):
    from transformers import AutoProcessor

    assert_asked_the_caption_prompt(tmp_path, tiny_llava, ("<|end|>", "<|user|>", "<image>", "<|assistant|>"))
    assert AutoProcessor.from_pretrained(tiny_llava).chat_template == CHAT_TEMPLATE


def test_a_qwen25_vl_model_is_asked_the_caption_prompt(tmp_path, tiny_qwen25_vl):
    # Through the image processor, tokenizer and chat template: the processor class needs torchvision.
    assert_asked_the_caption_prompt(tmp_path, tiny_qwen25_vl, ("<|im_", "<|vision_", "<|image_pad|>", "helpful"))


def test_a_wd14_tagger_writes_its_tags_after_the_trigger_word(tmp_path, tiny_wd14):
    [result] = caption_through_the_server(tmp_path, tiny_wd14)
    assert result["captioned"] == 3
    assert GENERAL_THRESHOLD == 0.35 and CHARACTER_THRESHOLD == 0.85
    # Characters first, then general tags most probable first; underscores as spaces except in the kaomoji;
    # the rating tag, the tag under 0.35 and the character under 0.85 left out.
    expected = "xyz_shape, hatsune miku, long hair, smile, ^_^"
    assert result["written"] == [expected] * 3


def test_a_tagger_without_onnxruntime_is_refused_with_the_install_command(tiny_wd14):
    import subprocess
    import sys

    # A Python where importing onnxruntime fails, as on an install without the wd14 extra.
    script = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from training.captioners import CaptionerUnavailable, find_caption_model\n"
        f"try: find_caption_model({str(tiny_wd14)!r})\n"
        "except CaptionerUnavailable as exc: print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "needs onnxruntime" in out and 'pip install "lora-mcp[wd14]"' in out
    assert find_caption_model(str(tiny_wd14)) == tiny_wd14  # here, with onnxruntime, it is found
