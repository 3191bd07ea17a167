"""Batches for the training step: bucketed samples, cached latents and text embeddings.

A *record* is one image (dataset or class image); a *sample* is one appearance of a record in
an epoch (a record with repeats N is N samples). Batches hold samples of one bucket. All
randomness of a sample (flip, crop, caption dropout and shuffle) comes from a generator seeded
by its position (seed, epoch, batch, slot), so resuming needs only that position.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.data.buckets import Bucket, BucketBatches, assign_bucket, make_buckets, square_bucket
from training.data.caches import CacheProgress, PhaseReport, TextCache
from training.data.captions import augment_caption
from training.distributed import Distributed
from training.data.dataset import ImageRecord
from training.data.images import covering_size, crop_top_left, load_pixels
from training.prompts import TextConditioning, encode_text
from training.workspace import atomic_output

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import LoadedModel

log = logging.getLogger("training")
ENCODE_BATCH = 8  # images per VAE call while caching; text prompts per text-encoder call is 4x this
# An automatic *_to_disk cache goes to disk past this size: a tiny model's trainer peaks at about
# 460 MiB, and 2,000 tiny-FLUX captions held 125 MiB more in memory (issue 14); a real FLUX caption
# holds 8 MiB, so a real model's dataset passes it at once.
AUTO_DISK_CACHE_BYTES = 64 * 2**20


@dataclass
class Batch:
    # (batch, channels, height / 8, width / 8), shifted and scaled as the VAE's config says;
    # 4 channels for SD, 16 for FLUX
    latents: torch.Tensor
    conditioning: torch.Tensor  # (batch, tokens, hidden): CLIP states of the captions (FLUX: T5 states)
    loss_weights: torch.Tensor  # (batch,): 1 for dataset images, prior_loss_weight for class images
    files: list[str]  # the images, so a loss spike can be traced to its data
    # SDXL: the second text encoder's pooled embedding, and the size and crop conditioning
    # (original height, width; crop top, left; target height, width), which its UNet embeds.
    # FLUX: CLIP's pooled embedding, and no time ids.
    pooled: torch.Tensor | None = None  # (batch, projection)
    time_ids: torch.Tensor | None = None  # (batch, 6)
    # (batch, tokens), 1 where the transformer attends (TextConditioning.mask): Chroma, Qwen-Image, Z-Image
    text_mask: torch.Tensor | None = None
    # Data parallel: this process's samples are [first, first + batch) of a global batch of global_size
    # samples (None: the batch is the whole step's batch). `files` then lists the global batch's images.
    first: int = 0
    global_size: int | None = None

    def added_conditions(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The UNet's added_cond_kwargs (SDXL), or None."""
        if self.time_ids is None:
            return None
        return {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}


class TrainingData:
    def __init__(
        self,
        records: list[ImageRecord],
        base: LoadedModel,
        config: TrainingConfig,
        latent_cache_dir: Path,
        text_cache_dir: Path | None = None,
        dist: Distributed | None = None,
    ):
        self.records = records
        self._base = base
        self._config = config
        self._latent_cache_dir = latent_cache_dir
        step = base.bucket_step
        if config.enable_bucketing:
            buckets = make_buckets(config.resolution, step)
            self.record_buckets = [assign_bucket(r.size, buckets, step) for r in records]
        else:
            self.record_buckets = [square_bucket(config.resolution, step)] * len(records)
        self.samples = [i for i, record in enumerate(records) for _ in range(record.repeats)]
        self._dist = dist or Distributed.single()
        # Every process forms the global batches (batch_size x processes) and takes its slice of each.
        self.global_batch = config.batch_size * self._dist.world_size
        self.batches = BucketBatches([self.record_buckets[i] for i in self.samples], self.global_batch, config.seed)
        self.epoch, self.batch_index = 0, 0
        self._epoch_batches = self.batches.epoch(0)
        self._latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.latents_on_disk: bool | None = None  # decided by cache_latents from the first chunk's size
        self.text = TextCache(
            text_cache_dir or latent_cache_dir.with_name("text_cache"),
            max_token_length=config.max_token_length,
            clip_skip=config.clip_skip,
        )
        self._size_conditioning = base.family_rules.conditions_on_image_size
        # Cached latents are the same on every machine; latents encoded per step draw a stream per process.
        vae_seed = config.seed if config.cache_latents else config.seed + self._dist.rank
        self._vae_generator = torch.Generator(base.vae.device).manual_seed(vae_seed)
        self._needs_rng = (
            config.flip_aug or config.crop == "random" or config.caption_dropout_rate > 0 or config.shuffle_captions
        )

    # --- caches ----------------------------------------------------------------------------
    def build_caches(self, report: PhaseReport | None = None) -> dict[str, bool]:
        """The caches the config asks for (latents; captions where they map to fixed states), and
        where each went: the *_to_disk values the run used, for its config.yaml. With several processes
        the caches go to disk, built by each machine's first process while the others wait, then read by all."""
        with self._dist.local_main_first():
            if not self._dist.is_local_main:
                return self.adopt_disk_caches()
            chosen = {}
            if self._config.cache_latents:
                self.cache_latents(report)
                chosen["cache_latents_to_disk"] = bool(self.latents_on_disk)
            if self._config.static_text:
                self.cache_text(report)
                chosen["cache_text_encoder_outputs_to_disk"] = bool(self.text.on_disk)
            return chosen

    def adopt_disk_caches(self) -> dict[str, bool]:
        """Read the caches this machine's first process built on disk, instead of building them again."""
        self.latents_on_disk = True
        self.text.on_disk = self.text.ready = bool(self._config.static_text)
        chosen = {"cache_latents_to_disk": True} if self._config.cache_latents else {}
        return chosen | ({"cache_text_encoder_outputs_to_disk": True} if self._config.static_text else {})

    def cache_latents(self, report: PhaseReport | None = None) -> None:
        """Encode every record (both orientations with flip_aug) once, by bucket, with the VAE, into
        memory or (cache_latents_to_disk, automatic by the size the first chunk implies) onto disk."""
        by_bucket: dict[Bucket, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.record_buckets):
            by_bucket[bucket].append(index)
        flips = (False, True) if self._config.flip_aug else (False,)
        progress = CacheProgress("caching latents", len(self.records) * len(flips), report)
        for bucket, indices in by_bucket.items():
            for first in range(0, len(indices), ENCODE_BATCH):
                chunk = indices[first : first + ENCODE_BATCH]
                for flip in flips:
                    pixels = [self._pixels(i, bucket, flip, rng=None) for i in chunk]
                    latents = self._encode_pixels(pixels)
                    if self.latents_on_disk is None:
                        self._choose_latent_storage(latents[0], bucket, len(flips))
                    for index, latent in zip(chunk, latents):
                        if self.latents_on_disk:
                            with atomic_output(self._latent_file(index, flip)) as tmp:
                                torch.save(latent.cpu().clone(), tmp)
                        else:
                            self._latents[(index, flip)] = latent
                    progress.advance(len(chunk))
        where = f"on disk in {self._latent_cache_dir}" if self.latents_on_disk else "in memory"
        log.info("cached the latents of %d image(s) %s", len(self.records), where)

    def cache_text(self, report: PhaseReport | None = None) -> None:
        """Encode every caption (and the empty one of caption dropout) once, into memory or
        (cache_text_encoder_outputs_to_disk, automatic by size) onto disk."""
        captions = sorted(
            {r.caption for r in self.records} | ({""} if self._config.caption_dropout_rate > 0 else set())
        )
        step = ENCODE_BATCH * 4
        progress = CacheProgress("caching text", len(captions), report)
        with torch.no_grad():
            for first in range(0, len(captions), step):
                chunk = captions[first : first + step]
                encoded = self._encode_text(chunk)
                if self._base.family_rules.text_states_on_cpu:  # FLUX's T5 states: 8 MB per caption
                    encoded = moved_text(encoded, torch.device("cpu"))
                entries = [_entry(encoded, i) for i in range(len(chunk))]
                if self.text.on_disk is None:
                    tensors = (entries[0].states, entries[0].pooled, entries[0].mask)
                    per_caption = sum(tensor.nbytes for tensor in tensors if tensor is not None)
                    choice = True if self._dist.multi else self._config.cache_text_encoder_outputs_to_disk
                    self.text.on_disk = wants_disk_cache(choice, per_caption * len(captions))
                for caption, entry in zip(chunk, entries):
                    self.text.put(caption, entry)
                progress.advance(len(chunk))
        self.text.ready = True
        where = f"on disk in {self.text.folder}" if self.text.on_disk else "in memory"
        log.info("cached the text-encoder states of %d caption(s) %s", len(captions), where)

    # --- batches ---------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        if self.batch_index >= len(self._epoch_batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._epoch_batches = self.batches.epoch(self.epoch)
        samples = self._epoch_batches[self.batch_index]
        position = (self._config.seed, self.epoch, self.batch_index)
        self.batch_index += 1

        first, end = self._dist.shard(len(samples))
        every = [self.samples[s] for s in samples]  # the global batch
        records = every[first:end]
        bucket = self.record_buckets[every[0]]
        files = [str(self.records[r].path) for r in every]
        if not records:  # a small last batch of a bucket left this process nothing: it joins with no loss
            return self._empty_batch(bucket, files, first, len(every))
        rngs = [np.random.default_rng([*position, slot]) if self._needs_rng else None for slot in range(first, end)]
        flips = [bool(self._config.flip_aug and rng.random() < 0.5) for rng in rngs]
        captions = [
            augment_caption(
                self.records[r].caption,
                dropout_rate=self._config.caption_dropout_rate,
                shuffle=self._config.shuffle_captions,
                keep_tokens=self._config.keep_tokens,
                rng=rng,
            )
            if rng is not None
            else self.records[r].caption
            for r, rng in zip(records, rngs)
        ]
        # SDXL's time ids before the crops use the rngs
        time_ids = self._time_ids(records, bucket, rngs, flips) if self._size_conditioning else None
        if self._config.cache_latents:
            latents = torch.stack([self._cached_latent(r, flip) for r, flip in zip(records, flips)])
        else:
            with torch.no_grad():
                latents = self._encode_pixels(
                    [self._pixels(r, bucket, f, rng) for r, f, rng in zip(records, flips, rngs)]
                )
        if self.text.ready:
            text = moved_text(collate_text([self.text.get(c) for c in captions]), self._base.device)
        else:
            text = self._encode_text(captions)
        weights = torch.tensor([self.records[r].loss_weight for r in records], device=latents.device)
        global_size = len(every) if self._dist.multi else None
        return Batch(
            latents, text.states, weights, files, text.pooled, time_ids, text.mask, first=first, global_size=global_size
        )

    def _empty_batch(self, bucket: Bucket, files: list[str], first: int, global_size: int) -> Batch:
        """No samples, but the latents' shape, so the step still draws the global batch's noise."""
        factor, channels = self._base.vae_scale_factor, self._base.family_rules.latent_channels(self._base.vae.config)
        shape = (0, channels, bucket[1] // factor, bucket[0] // factor)
        empty = torch.zeros(0, device=self._base.device)
        latents = torch.zeros(shape, device=self._base.device)
        return Batch(latents, empty, empty, files, first=first, global_size=global_size)

    def state(self) -> dict:
        """The position in the data order (with the batch size and epoch length it counts in), and the VAE's
        sampling RNG (used per step when latents are not cached)."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "global_batch": self.global_batch,
            "epoch_batches": len(self._epoch_batches),
            "vae_rng": self._vae_generator.get_state(),
        }

    def restore(self, state: dict) -> None:
        """The saved position. A resume with another batch size (resume-training apply_fix out-of-memory: batch 2
        to 1) or other buckets (a new resolution) has epochs of another length and order: its position goes to the
        same share of the epoch (batch 1 of 2 -> batch 2 of 4), so that the epoch is neither replayed nor overrun,
        and the resume is no longer exact (the rest of that epoch's images are not exactly the ones left)."""
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
        self._epoch_batches = self.batches.epoch(self.epoch)
        saved = (state.get("global_batch"), state.get("epoch_batches"))  # None: a checkpoint from before they were
        now = (self.global_batch, len(self._epoch_batches))
        if None not in saved and saved != now:
            self.batch_index = state["batch_index"] * now[1] // saved[1]  # rounded down: at most a batch seen again
            log.warning(
                f"batches of {now[0]} image(s), {now[1]} an epoch (the checkpoint's: {saved[0]}, {saved[1]}): epoch "
                f"{self.epoch} continues at batch {self.batch_index} instead of {state['batch_index']}, the same share "
                "of it; this resume is not exact"
            )
        self._vae_generator.set_state(state["vae_rng"])

    # --- encoding --------------------------------------------------------------------------
    def _pixels(self, index: int, bucket: Bucket, flip: bool, rng: np.random.Generator | None) -> torch.Tensor:
        random_crop = self._config.crop == "random"
        return load_pixels(self.records[index].path, bucket, random_crop=random_crop, flip=flip, rng=rng)

    def _encode_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        vae = self._base.vae
        with torch.no_grad():
            batch = torch.stack(pixels).to(vae.device, vae.dtype)
            return self._base.family_rules.encode_latents(vae, batch, self._vae_generator)

    def _encode_text(self, captions: list[str]) -> TextConditioning:
        return encode_text(
            self._base, captions, max_token_length=self._config.max_token_length, clip_skip=self._config.clip_skip
        )

    def _time_ids(self, records: list[int], bucket: Bucket, rngs: list, flips: list[bool]) -> torch.Tensor:
        """SDXL's size and crop conditioning of each sample: the crop is worked out on a copy of the
        sample's generator, so load_pixels draws the same offsets from the original; a mirrored
        sample's crop is measured from the other edge, as in the image the UNet sees."""
        random_crop = self._config.crop == "random" and not self._config.cache_latents
        rows = []
        for r, rng, flip in zip(records, rngs, flips):
            width, height = self.records[r].size
            resized = covering_size((width, height), bucket)
            left, top = crop_top_left(resized, bucket, random_crop=random_crop, rng=copy.deepcopy(rng))
            if flip:
                left = resized[0] - bucket[0] - left
            rows.append([height, width, top, left, bucket[1], bucket[0]])
        return torch.tensor(rows, dtype=torch.float32, device=self._base.device)

    def _choose_latent_storage(self, latent: torch.Tensor, bucket: Bucket, orientations: int) -> None:
        """Disk or memory for the latents, from one latent's bytes per pixel of its bucket."""
        per_pixel = latent.nbytes / (bucket[0] * bucket[1])
        estimate = per_pixel * orientations * sum(width * height for width, height in self.record_buckets)
        choice = True if self._dist.multi else self._config.cache_latents_to_disk
        self.latents_on_disk = wants_disk_cache(choice, int(estimate))
        if self.latents_on_disk:
            self._latent_cache_dir.mkdir(parents=True, exist_ok=True)

    def _latent_file(self, index: int, flip: bool) -> Path:
        return self._latent_cache_dir / f"{index:06d}{'_flip' if flip else ''}.pt"

    def _cached_latent(self, index: int, flip: bool) -> torch.Tensor:
        if (index, flip) in self._latents:
            return self._latents[(index, flip)]
        # memory-mapped: the file's pages are read for this batch and not kept
        return torch.load(self._latent_file(index, flip), weights_only=True, mmap=True).to(self._base.device)


def collate_text(entries: list[TextConditioning]) -> TextConditioning:
    """One batch's conditioning from its captions' (each without a batch dimension). States of one length and no
    masks are stacked (SD, SDXL, FLUX); otherwise the states are padded with zeros to the longest and the mask
    says which positions count (an entry without a mask: all of its own length)."""
    pooled = torch.stack([entry.pooled for entry in entries]) if entries[0].pooled is not None else None
    lengths = [entry.states.shape[0] for entry in entries]
    masks = [entry.mask for entry in entries]
    if len(set(lengths)) == 1 and all(mask is None for mask in masks):
        return TextConditioning(torch.stack([entry.states for entry in entries]), pooled)
    first = entries[0].states
    states = first.new_zeros((len(entries), max(lengths), first.shape[-1]))
    mask_type = next((mask.dtype for mask in masks if mask is not None), torch.long)
    mask = torch.zeros(states.shape[:2], dtype=mask_type, device=first.device)
    for row, (entry, length) in enumerate(zip(entries, lengths)):
        states[row, :length] = entry.states
        mask[row, :length] = 1 if entry.mask is None else entry.mask
    return TextConditioning(states, pooled, mask)


def _entry(text: TextConditioning, index: int) -> TextConditioning:
    """The `index`-th prompt's conditioning of a batch's, without the batch dimension."""
    tensors = (text.states, text.pooled, text.mask)
    return TextConditioning(*(None if tensor is None else tensor[index] for tensor in tensors))


def moved_text(text: TextConditioning, device: torch.device) -> TextConditioning:
    """The conditioning with its tensors on `device`."""
    tensors = (text.states, text.pooled, text.mask)
    return TextConditioning(*(None if tensor is None else tensor.to(device) for tensor in tensors))


def wants_disk_cache(choice: bool | None, estimated_bytes: int) -> bool:
    """A *_to_disk option's value for a cache of `estimated_bytes`: as set, or (None) automatic."""
    return choice if choice is not None else estimated_bytes > AUTO_DISK_CACHE_BYTES
