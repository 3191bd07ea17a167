"""The trainer on the tiny built-in models: it learns, its files load in diffusers, and its
options do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fast_config, step_rows
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from training.data.images import load_pixels
from training.data.synthetic import make_shape_dataset
from training.trainer import Trainer, run_training


def load_pipeline(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_latents(pipe, dataset: Path):
    """VAE means and caption states of the dataset's images, as the trainer sees them at 64 px."""
    images = sorted(dataset.glob("*.png"))
    pixels = torch.stack([load_pixels(p, (64, 64), random_crop=False, flip=False, rng=None) for p in images])
    captions = [p.with_suffix(".txt").read_text() for p in images]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        conditioning = pipe.text_encoder(ids).last_hidden_state
    return latents, conditioning


def denoising_loss(pipe, latents, conditioning, *, seed: int) -> float:
    """Mean epsilon loss at 16 fixed timesteps with fixed noise (a seed training never used)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for t in torch.linspace(20, 980, 16).long():
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = t.repeat(latents.shape[0])
            prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, conditioning).sample
            losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


def generated_latents(pipe, prompt="xyz_shape a red circle") -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return pipe(prompt, num_inference_steps=4, height=64, width=64, generator=generator, output_type="latent").images


@pytest.mark.slow
def test_lora_overfits_two_images_and_loads_in_diffusers(tmp_path, tiny_sd15):
    dataset = tmp_path / "two"
    make_shape_dataset(dataset, 2, trigger_word="xyz_shape")
    config = fast_config(dataset, steps=120, learning_rate=1e-2, rank=8, batch_size=2)
    result = run_training(config, tmp_path / "run")
    assert result.state == "completed", result.error

    pipe = load_pipeline(tiny_sd15)
    base_image = generated_latents(pipe)
    latents, conditioning = training_latents(pipe, dataset)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")

    pipe.set_adapters(["trained"], [0.0])
    loss_at_0 = denoising_loss(pipe, latents, conditioning, seed=98765)
    assert torch.equal(generated_latents(pipe), base_image)  # strength 0 is exactly the base model

    pipe.set_adapters(["trained"], [1.0])
    loss_at_1 = denoising_loss(pipe, latents, conditioning, seed=98765)
    assert loss_at_1 <= 0.9 * loss_at_0, (loss_at_0, loss_at_1)
    assert (generated_latents(pipe) - base_image).abs().max() > 1e-3  # the LoRA changes what is generated


def test_run_directory_contract(tmp_path, shapes):
    config = fast_config(
        shapes,
        steps=4,
        save_every=2,
        disable_sampling=False,
        sample_every=2,
        sample_steps=2,
        test_prompts=["xyz_shape a red circle", "a green square"],
    )
    result = run_training(config, tmp_path / "run")
    assert result.state == "completed", result.error
    run = tmp_path / "run"

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed"
    assert status["step"] == status["total_steps"] == 4
    for key in (
        "epoch",
        "loss",
        "lr",
        "it_per_s",
        "eta_s",
        "last_checkpoint",
        "lora_path",
        "error",
        "pid",
        "heartbeat",
        "started_at",
        "updated_at",
    ):
        assert key in status
    assert Path(status["lora_path"]) == run / "test-run.safetensors"
    assert status["last_checkpoint"].endswith("step000002")

    rows = step_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert set(row) >= {"step", "loss", "lr", "grad_norm", "step_time", "time"}
        assert row["loss"] > 0 and row["grad_norm"] > 0 and row["step_time"] > 0
    assert status["grad_norm"] == rows[-1]["grad_norm"]  # the last step's, before clipping, beside loss and lr

    samples = [json.loads(line) for line in (run / "samples" / "index.jsonl").read_text().splitlines()]
    # Each step renders the two test prompts and the control prompt: the first one without its trigger word.
    assert [(s["step"], s["prompt_index"]) for s in samples] == [(t, i) for t in (0, 2, 4) for i in range(3)]
    assert [s["prompt"] for s in samples[:3]] == ["xyz_shape a red circle", "a green square", "a red circle"]
    assert [s["control"] for s in samples[:3]] == [False, False, True]
    for sample in samples:
        with Image.open(run / "samples" / sample["file"]) as image:
            assert image.size == (64, 64)
        assert sample["seed"] == config.seed
        assert 0 <= sample["mean"] <= 1 and 0 <= sample["contrast"] <= 0.5 and 0 <= sample["saturation"] <= 1
        assert (sample["baseline_distance"] is None) == (sample["step"] == 0)
        assert (sample["nearest_training_distance"] is None) == sample["control"]
    assert samples[3]["previous_distance"] == samples[3]["baseline_distance"]  # step 2's previous is the baseline
    assert samples[6]["previous_distance"] is not None and samples[6]["baseline_distance"] > 0  # the LoRA moved it

    kinds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind"' in line]
    assert [(r["kind"], r["step"]) for r in kinds] == [("lora_update", 0), ("lora_update", 4)]
    assert kinds[0]["max_ratio"] == 0.0 < kinds[1]["mean_ratio"] <= kinds[1]["max_ratio"]  # B starts at zero
    assert (run / "samples" / "step000000_p1.png").is_file()

    assert (run / "checkpoints" / "step000002" / "training_state.pt").is_file()
    assert (run / "checkpoints" / "step000002" / "test-run-step000002.safetensors").is_file()
    resolved = (run / "config.yaml").read_text()
    assert "steps: 4" in resolved and "resolution: 64" in resolved
    assert "step 4/4" in (run / "train.log").read_text()


def test_same_seed_same_losses_and_sampling_does_not_disturb_training(tmp_path, shapes):
    plain = run_training(fast_config(shapes, steps=3), tmp_path / "a")
    sampled = run_training(
        fast_config(
            shapes, steps=3, disable_sampling=False, sample_every=1, sample_steps=2, test_prompts=["xyz_shape"]
        ),
        tmp_path / "b",
    )
    assert plain.state == sampled.state == "completed"
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in step_rows(run)]


def _validation(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if row.get("kind") == "validation"]


class _StopAfter(Trainer):
    """Behaves as if SIGTERM arrived during step `stop_at`."""

    stop_at = 3

    def _record_step(self, *args, **kwargs):
        super()._record_step(*args, **kwargs)
        if self.step == self.stop_at:
            self.stop_requested = True


@pytest.mark.parametrize(
    "options",
    [
        {"flip_aug": True},
        {"cache_latents": False, "crop": "random", "shuffle_captions": True, "caption_dropout_rate": 0.3},
        # SDXL: both text encoders train, and the random crops feed its crop conditioning
        {
            "model_name": "builtin:tiny-sdxl",
            "train_text_encoder": True,
            "cache_latents": False,
            "crop": "random",
            "validation_split": 0.25,  # scored through the text encoders' LoRA, every 2 steps
            "validation_every": 2,
        },
        # FLUX: shifted logit-normal noise levels, VAE samples drawn per step, validation at fixed sigmas
        {
            "model_name": "builtin:tiny-flux",
            "timestep_shift": 3.0,
            "cache_latents": False,
            "validation_split": 0.25,
            "validation_every": 2,
        },
    ],
    ids=["cached", "live-augmented", "sdxl", "flux"],
)
def test_resume_continues_with_identical_losses(tmp_path, shapes, options):
    config = fast_config(shapes, steps=6, save_every=100, dropout=0.1, batch_size=1, **options)
    straight = run_training(config, tmp_path / "straight")
    assert straight.state == "completed"

    stopped = _StopAfter(config, tmp_path / "resumed")
    stopped.setup()
    stopped.train()
    result = stopped.cleanup(stopped.finish())
    assert result.state == "stopped" and result.step == 3
    status = json.loads((tmp_path / "resumed" / "status.json").read_text())
    assert status["state"] == "stopped" and status["last_checkpoint"].endswith("step000003")

    resumed = run_training(config, tmp_path / "resumed", resume=True)
    assert resumed.state == "completed" and resumed.step == 6
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert _validation(tmp_path / "resumed") == _validation(tmp_path / "straight")
    with safe_open(str(straight.lora_path), "pt") as a, safe_open(str(resumed.lora_path), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_new_run_refuses_a_used_run_directory(tmp_path, shapes):
    from training.trainer import RunAlreadyExists

    assert run_training(fast_config(shapes, steps=1), tmp_path / "run").state == "completed"
    before = (tmp_path / "run" / "status.json").read_text()
    with pytest.raises(RunAlreadyExists, match="--resume"):
        run_training(fast_config(shapes, steps=1), tmp_path / "run")
    assert (tmp_path / "run" / "status.json").read_text() == before


class _NanAt(Trainer):
    """A loss that becomes NaN at step 3, as a corrupt image or a too-high lr would make it."""

    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * float("nan") if self.step == 2 else loss


def test_non_finite_loss_fails_and_keeps_last_checkpoint(tmp_path, shapes):
    config = fast_config(shapes, steps=5, save_every=2)
    trainer = _NanAt(config, tmp_path / "run")
    trainer.setup()
    with pytest.raises(Exception) as raised:
        trainer.train()
    from training.trainer import NonFiniteLoss, RunResult

    assert isinstance(raised.value, NonFiniteLoss)
    message = str(raised.value)
    assert "step 3" in message and "learning_rate" in message and "step000002" in message
    assert "shape_" in message  # names the batch's files
    trainer.cleanup(RunResult("failed", trainer.files.dir, trainer.step, error=message))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "nan" in status["error"]
    assert (tmp_path / "run" / "checkpoints" / "step000002").is_dir()
    assert not (tmp_path / "run" / "test-run.safetensors").exists()


def test_v_prediction_model_trains(tmp_path, shapes, tiny_sd2v):
    result = run_training(fast_config(shapes, model_name="builtin:tiny-sd2-v", steps=3), tmp_path / "run")
    assert result.state == "completed", result.error
    log = (tmp_path / "run" / "train.log").read_text()
    assert "sd2, v_prediction" in log
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.prediction_type"] == "v"


def test_bucketing_trains_mixed_aspect_ratios(tmp_path):
    dataset = tmp_path / "mixed"
    make_shape_dataset(dataset, 2, trigger_word="xyz_shape", size=(64, 64))
    make_shape_dataset(dataset / "wide", 2, trigger_word="xyz_shape", size=(120, 72), seed=1)
    make_shape_dataset(dataset / "tall", 2, trigger_word="xyz_shape", size=(72, 120), seed=2)
    trainer = Trainer(
        fast_config(dataset, steps=6, trigger_words={"wide": "xyz_shape", "tall": "xyz_shape"}), tmp_path / "run"
    )
    trainer.setup()
    assert trainer.data.batches.bucket_sizes() == {(48, 80): 2, (64, 64): 2, (80, 48): 2}
    shapes_seen = {tuple(trainer.data.next_batch().latents.shape) for _ in range(6)}
    assert shapes_seen == {(2, 4, 10, 6), (2, 4, 8, 8), (2, 4, 6, 10)}
    trainer.train()
    assert trainer.cleanup(trainer.finish()).state == "completed"


def test_repeats_and_concepts_count_in_the_run(tmp_path):
    dataset = tmp_path / "concepts"
    make_shape_dataset(dataset / "3_xyz_cat", 2, trigger_word=None)
    make_shape_dataset(dataset / "xyz_dog", 1, trigger_word=None, seed=5)
    make_shape_dataset(dataset / "validation", 1, trigger_word=None, seed=6)
    trainer = Trainer(fast_config(dataset, trigger_word=None, batch_size=1, steps=1), tmp_path / "run")
    trainer.setup()
    assert trainer.dataset.num_images == 3
    assert len(trainer.data.samples) == 7  # 2 x 3 + 1; validation never trained on
    assert trainer.data.batches.batches_per_epoch == 7
    captions = sorted(r.caption.split()[0] for r in trainer.data.records)
    assert captions == ["xyz_cat", "xyz_cat", "xyz_dog"]
    assert trainer.config.steps == 1
    assert all("validation" not in str(r.path) for r in trainer.data.records)


def test_default_steps_are_100_per_image_and_resolution_native(tmp_path, shapes):
    trainer = Trainer(fast_config(shapes, steps=None, resolution=None), tmp_path / "run")
    trainer.setup()
    assert trainer.config.steps == 400 and trainer.config.resolution == 64
    assert "steps: 400" in (tmp_path / "run" / "config.yaml").read_text()


def test_prior_preservation_generates_and_uses_class_images(tmp_path, shapes):
    class_dir = tmp_path / "class"
    config = fast_config(
        shapes,
        steps=2,
        prior_preservation=True,
        class_prompt="a shape",
        num_class_images=3,
        class_data_dir=str(class_dir),
        prior_loss_weight=0.5,
    )
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    generated = sorted(class_dir.glob("*.png"))
    assert len(generated) == 3
    class_records = [r for r in trainer.data.records if r.concept == "class"]
    assert len(class_records) == 3
    assert all(r.caption == "a shape" and r.loss_weight == 0.5 for r in class_records)
    class_samples = sum(1 for s in trainer.data.samples if trainer.data.records[s].concept == "class")
    assert class_samples >= 3  # balanced against the 4 instance samples
    trainer.train()
    assert trainer.cleanup(trainer.finish()).state == "completed"

    mtimes = [p.stat().st_mtime_ns for p in generated]
    again = Trainer(config.model_copy(update={"name": "again"}), tmp_path / "run2")
    again.setup()  # enough class images now: none regenerated
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == mtimes


def test_corrupt_image_stops_the_run_before_step_one(tmp_path, shapes):
    (shapes / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    result = run_training(fast_config(shapes), tmp_path / "run")
    assert result.state == "failed"
    assert "broken.png" in result.error
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "broken.png" in status["error"] and status["step"] == 0
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "options",
    [
        {"cache_latents": False, "crop": "random", "flip_aug": True},
        {"cache_latents_to_disk": True, "flip_aug": True},
        {"shuffle_captions": True, "caption_dropout_rate": 0.5, "keep_tokens": 1},
        {"train_text_encoder": True, "text_encoder_lr": 5e-4, "clip_skip": 2, "max_token_length": 150},
        {"gradient_accumulation_steps": 2, "batch_size": 1, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
        {"min_snr_gamma": 5.0, "noise_offset": 0.05, "gradient_checkpointing": True, "max_grad_norm": 0.0},
        {"mixed_precision": "bf16", "low_vram": True, "output_format": "diffusers"},
    ],
    ids=[
        "no-cache-random-crop-flip",
        "disk-cache",
        "caption-aug",
        "text-encoder",
        "accumulation",
        "loss-options",
        "half-precision-low-vram",
    ],
)
def test_options_train(tmp_path, shapes, options):
    result = run_training(fast_config(shapes, steps=2, **options), tmp_path / "run")
    assert result.state == "completed", result.error
    rows = step_rows(tmp_path / "run")
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


def test_disk_cache_writes_both_orientations(tmp_path, shapes):
    trainer = Trainer(fast_config(shapes, cache_latents_to_disk=True, flip_aug=True), tmp_path / "run")
    trainer.setup()
    cached = sorted(p.name for p in (tmp_path / "run" / "latent_cache").iterdir())
    assert cached == [f"{i:06d}{flip}.pt" for i in range(4) for flip in ("", "_flip")]


def test_options_change_the_loss(tmp_path, shapes):
    """min-SNR weighting and noise offset are wired into the loss, not just accepted."""
    baseline = _first_loss(tmp_path / "base", shapes)
    assert _first_loss(tmp_path / "snr", shapes, min_snr_gamma=1.0) != baseline
    assert _first_loss(tmp_path / "offset", shapes, noise_offset=0.5) != baseline
    assert _first_loss(tmp_path / "again", shapes) == baseline


def _first_loss(run: Path, dataset: Path, **options) -> float:
    assert run_training(fast_config(dataset, steps=1, **options), run).state == "completed"
    return _losses(run)[0]


def test_recorded_only_options_say_so(tmp_path, shapes):
    run_training(fast_config(shapes, steps=1, mixed_precision="fp16", low_vram=True), tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "mixed_precision fp16 on cpu: the same fp16 gradients as on CUDA" in log  # it runs, with its reason
    assert "low_vram is recorded only" in log


def test_gradient_checkpointing_is_enabled(tmp_path, shapes):
    trainer = Trainer(fast_config(shapes, gradient_checkpointing=True), tmp_path / "run")
    trainer.setup()
    assert trainer.base.denoiser.is_gradient_checkpointing


def test_keep_last_n_checkpoints(tmp_path, shapes):
    result = run_training(fast_config(shapes, steps=5, save_every=1, keep_last_n_checkpoints=2), tmp_path / "run")
    assert result.state == "completed"
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step000003", "step000004"]


def test_clip_skip_beyond_the_text_encoder_is_refused(tmp_path, shapes):
    result = run_training(fast_config(shapes, clip_skip=6), tmp_path / "run")
    assert result.state == "failed"
    assert "clip_skip = 6" in result.error and "4 layers" in result.error


def test_config_warnings_reach_the_log(tmp_path, shapes):
    """The rank/network_dim conflict is reported although resolve() folds network_dim into rank."""
    result = run_training(fast_config(shapes, steps=1, rank=4, network_dim=8), tmp_path / "run")
    assert result.state == "completed"
    assert "network_dim wins" in (tmp_path / "run" / "train.log").read_text()
    assert "rank: 8" in (tmp_path / "run" / "config.yaml").read_text()


def test_more_options_have_their_effect(tmp_path, shapes):
    # seed: another seed, other noise, other losses
    baseline = _first_loss(tmp_path / "seed42", shapes)
    assert _first_loss(tmp_path / "seed7", shapes, seed=7) != baseline
    # dropout acts on the LoRA path, which is zero at step 1 (B starts at 0): it shows from step 2 on
    plain = run_training(fast_config(shapes, steps=2), tmp_path / "nodrop")
    dropped = run_training(fast_config(shapes, steps=2, dropout=0.5), tmp_path / "drop")
    assert plain.state == dropped.state == "completed"
    assert _losses(tmp_path / "nodrop")[0] == _losses(tmp_path / "drop")[0]
    assert _losses(tmp_path / "nodrop")[1] != _losses(tmp_path / "drop")[1]


def test_gradient_clipping_limits_the_update(tmp_path, shapes):
    """With SGD the update is proportional to the (clipped) gradient."""

    def update_size(max_grad_norm: float) -> float:
        trainer = Trainer(
            fast_config(shapes, steps=2, optimizer="sgd", max_grad_norm=max_grad_norm),
            tmp_path / f"clip{max_grad_norm}",
        )
        trainer.setup()
        before = [p.detach().clone() for p in trainer.trainable]
        trainer.train()
        return sum((p.detach() - b).norm().item() for p, b in zip(trainer.trainable, before))

    assert update_size(1e-4) < 0.1 * update_size(0.0)


def test_accumulation_and_text_encoder_lr(tmp_path, shapes):
    trainer = Trainer(
        fast_config(
            shapes, steps=1, batch_size=1, gradient_accumulation_steps=3, train_text_encoder=True, text_encoder_lr=3e-5
        ),
        tmp_path / "run",
    )
    trainer.setup()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 3e-5]
    trainer.train()
    assert trainer.data.batch_index == 3  # one optimizer step consumed three micro-batches
    assert len(_losses(tmp_path / "run")) == 1


def test_without_bucketing_every_image_is_square(tmp_path):
    dataset = tmp_path / "mixed"
    make_shape_dataset(dataset, 2, trigger_word="xyz_shape", size=(120, 72))  # would bucket as 80x48
    trainer = Trainer(fast_config(dataset, enable_bucketing=False), tmp_path / "run")
    trainer.setup()
    assert trainer.data.batches.bucket_sizes() == {(64, 64): 2}
    assert trainer.data.next_batch().latents.shape == (2, 4, 8, 8)


def test_sample_steps_and_guidance_change_the_sample(tmp_path, shapes):
    def baseline_sample(name: str, **options) -> bytes:
        config = fast_config(
            shapes, steps=1, disable_sampling=False, sample_every=100, test_prompts=["xyz_shape"], **options
        )
        assert run_training(config, tmp_path / name).state == "completed"
        with Image.open(tmp_path / name / "samples" / "step000000_p0.png") as image:
            return image.tobytes()

    reference = baseline_sample("ref", sample_steps=2)
    assert baseline_sample("same", sample_steps=2) == reference  # fixed seed: reproducible
    assert baseline_sample("steps", sample_steps=3) != reference
    assert baseline_sample("guidance", sample_steps=2, sample_guidance_scale=1.5) != reference
