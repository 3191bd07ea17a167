"""Seconds per image for a BLIP-base-sized captioning model, through the server's own captioner.

Nothing can download BLIP here, so the bench builds the BLIP-base architecture (transformers'
default `BlipConfig`: ViT-B/16 at 384 px and a BERT-base text decoder, ~224 M parameters) with
random weights, saves it with its processor to a temp folder, and captions synthetic 512 px images
through `training.captioners.load_captioner`, batch by batch as generate-captions does. Random
weights never emit the end token, so every caption runs the full MAX_NEW_TOKENS: the worst case.
The figure sets `server.captions.INLINE_MODEL_IMAGES`, the count above which a set runs as a
background job.

    python bench/caption_time.py [--images 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()

    import torch
    from PIL import Image
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    from server.captions import INLINE_MODEL_IMAGES
    from training.captioners import MAX_NEW_TOKENS, load_captioner
    from training.captioning import BATCH

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(BlipConfig())
        vocab = root / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(str, range(30519))]) + "\n")
        processor = BlipProcessor(
            image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
            tokenizer=BertTokenizerFast(vocab_file=str(vocab)),
        )
        model.save_pretrained(root / "blip")
        processor.save_pretrained(root / "blip")
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        del model

        images = []
        for index in range(args.images):
            path = root / f"image_{index:03d}.png"
            Image.new("RGB", (512, 512), (index * 13 % 256, 90, 160)).save(path)
            images.append(path)

        started = time.perf_counter()
        describe = load_captioner(root / "blip")
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        for first in range(0, len(images), BATCH):
            describe(images[first : first + BATCH])
        caption_s = time.perf_counter() - started

    per_image = caption_s / len(images)
    print(
        f"BLIP-base architecture, {parameters:.0f} M parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {BATCH}, {MAX_NEW_TOKENS} new tokens"
    )
    print(f"load {load_s:.1f} s; {len(images)} images in {caption_s:.1f} s = {per_image:.2f} s/image")
    print(
        f"INLINE_MODEL_IMAGES = {INLINE_MODEL_IMAGES}: load + that many images = "
        f"{load_s + INLINE_MODEL_IMAGES * per_image:.0f} s inside one call"
    )


if __name__ == "__main__":
    main()
