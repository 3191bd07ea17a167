"""Memory that stays flat with the dataset (issue 14, part 3): a trainer on 2,000 captioned images
peaks within 1.2x the RSS of one on 100, because latents and text-encoder states are cached on
disk (automatically for a large dataset) and read back memory-mapped per batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fast_config

from training.data.synthetic import make_shape_dataset
from training.workspace import atomic_write_text

# Peak RSS of one `lora-train` process, measured by a wrapper that runs exactly one child, so
# ru_maxrss(RUSAGE_CHILDREN) is that child's peak and nothing else's.
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run([sys.executable, '-m', 'training.cli', *sys.argv[1:]], capture_output=True, text=True)\n"
    "sys.stderr.write(done.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def captioned_dataset(folder: Path, count: int) -> Path:
    """`count` 64 px shapes, each with its own caption, so the text cache grows with the count."""
    for index, image in enumerate(make_shape_dataset(folder, count)):
        caption = image.with_suffix(".txt")
        caption.write_text(f"xyz_shape number {index}, {caption.read_text()}", encoding="utf-8")
    return folder


class PeakRss:
    """A 2-step tiny-FLUX run on `dataset` in a wrapper process that reports the run's peak RSS (KiB); runs
    started together train side by side, one thread each."""

    def __init__(self, tmp_path: Path, dataset: Path, name: str):
        self.run = tmp_path / f"run-{name}"
        config = fast_config(dataset, name=name, model_name="builtin:tiny-flux", steps=2, batch_size=2)
        config_file = tmp_path / f"{name}.yaml"
        atomic_write_text(config_file, config.to_yaml())
        self.wrapper = subprocess.Popen(
            [sys.executable, "-c", _PEAK_RSS, str(config_file), "--run-dir", str(self.run), "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.phases: set[str] = set()  # the phases its status.json showed while it ran

    def running(self) -> bool:
        if (self.run / "status.json").exists():  # replaced atomically: always whole
            self.phases.add(json.loads((self.run / "status.json").read_text()).get("phase"))
        return self.wrapper.poll() is None

    def peak_kib(self) -> int:
        while self.running():
            time.sleep(0.5)
        stdout, stderr = self.wrapper.communicate(timeout=60)
        assert self.wrapper.returncode == 0, stderr[-3000:]
        return int(stdout.strip().splitlines()[-1])


def cache_options(run: Path) -> dict:
    written = yaml.safe_load((run / "config.yaml").read_text())
    return {key: written[key] for key in ("cache_latents_to_disk", "cache_text_encoder_outputs_to_disk")}


@pytest.mark.slow
def test_peak_rss_stays_flat_from_100_to_2000_images(tmp_path, workspace):
    runs = [PeakRss(tmp_path, captioned_dataset(tmp_path / "small", 100), "small")]
    runs.append(PeakRss(tmp_path, captioned_dataset(tmp_path / "large", 2000), "large"))  # made as the first trains
    while any([run.running() for run in runs]):  # every run polled at each turn, for the phases it shows
        time.sleep(0.5)
    (small, small_run), (large, large_run) = [(run.peak_kib(), run.run) for run in runs]
    phases = runs[1].phases
    print(f"peak RSS: 100 images {small / 1024:.0f} MiB, 2000 images {large / 1024:.0f} MiB, {large / small:.2f}x")
    assert large <= 1.2 * small, f"2000 images peak at {large / 1024:.0f} MiB, 100 at {small / 1024:.0f} MiB"
    # the automatic choice, recorded: 100 x 64 KiB of T5 states stay in memory, 2,000 go to disk
    # (125 MiB, past 64 MiB); 2,000 latents of 4 KiB (8 MiB) stay in memory
    assert cache_options(small_run) == {"cache_latents_to_disk": False, "cache_text_encoder_outputs_to_disk": False}
    assert cache_options(large_run) == {"cache_latents_to_disk": False, "cache_text_encoder_outputs_to_disk": True}
    assert len(list((large_run / "text_cache").glob("*.safetensors"))) == 2000
    assert any(p.startswith("caching text ") and p.endswith("/2000") for p in phases), phases
    log = (large_run / "train.log").read_text()
    assert "caching text 2000/2000" in log and "caching latents 2000/2000" in log


@pytest.mark.parametrize(
    "options", [{}, {"caption_dropout_rate": 0.5, "flip_aug": True}], ids=["plain", "dropout-flip"]
)
def test_disk_caches_give_the_batches_of_the_memory_caches(tmp_path, shapes, tiny_sd15, options):
    """Forced on disk, both caches feed the same batches as in memory, the dropout's empty caption
    included; and a disk cache holds one file per caption, not one per use."""
    from training.data.dataset import scan_dataset
    from training.data.loader import TrainingData
    from training.models.loading import load_base_model
    from training.models.source import resolve_model

    base = load_base_model(resolve_model("builtin:tiny-sd15"), torch.device("cpu"))
    records = scan_dataset(shapes, trigger_word="xyz_shape", trigger_words={}).images
    batches = {}
    for on_disk in (False, True):
        config = fast_config(
            shapes, cache_latents_to_disk=on_disk, cache_text_encoder_outputs_to_disk=on_disk, **options
        ).resolve(native_resolution=64, num_images=len(records))
        data = TrainingData(records, base, config, tmp_path / f"{on_disk}" / "latent_cache")
        assert data.build_caches() == {"cache_latents_to_disk": on_disk, "cache_text_encoder_outputs_to_disk": on_disk}
        batches[on_disk] = [data.next_batch() for _ in range(6)]
    for memory, disk in zip(batches[False], batches[True]):
        assert torch.equal(memory.latents, disk.latents) and torch.equal(memory.conditioning, disk.conditioning)
    captions = {r.caption for r in records} | ({""} if options else set())
    assert len(list((tmp_path / "True" / "text_cache").glob("*.safetensors"))) == len(captions)
    assert not (tmp_path / "False" / "text_cache").exists()


def test_disk_cache_options_are_automatic_unless_set(shapes):
    from training.config import TrainingConfig
    from training.data.loader import AUTO_DISK_CACHE_BYTES, wants_disk_cache

    older = TrainingConfig.from_yaml(f"name: old\ndataset_path: {shapes}\n")  # a config from before the options
    assert older.cache_latents_to_disk is None and older.cache_text_encoder_outputs_to_disk is None
    assert wants_disk_cache(None, AUTO_DISK_CACHE_BYTES + 1) and not wants_disk_cache(None, AUTO_DISK_CACHE_BYTES)
    assert wants_disk_cache(True, 0) and not wants_disk_cache(False, 10 * AUTO_DISK_CACHE_BYTES)
    assert not fast_config(shapes).warnings()
    shuffled = fast_config(shapes, shuffle_captions=True, cache_text_encoder_outputs_to_disk=True).warnings()
    assert any("cache_text_encoder_outputs_to_disk has no effect" in w for w in shuffled)
    uncached = fast_config(shapes, cache_latents=False, cache_latents_to_disk=True).warnings()
    assert any("cache_latents_to_disk has no effect" in w for w in uncached)
    assert not fast_config(shapes, cache_latents=False).warnings()  # automatic is no request: nothing to warn of
