"""Downloading a base model from the Hugging Face hub: the `download` job's child
(`python -m training.downloads RUN_DIR`, queued by download-base-model, or by start-training for a model
that is not cached, which then waits for it), `lora-train`'s own download before it trains (the same
code, in its process), and what the cache holds of a model. download-base-model also fetches the
transformers models evaluate-lora scores with (CLIP, DINOv2): a repository with a top-level config.json
and no model_index.json.

Which files: those DiffusionPipeline.download fetches for a pipeline without a variant: model_index.json
and the folders of the parts it names, safetensors weights where a folder has them (else .bin), no
variant weights (`*.fp16.safetensors`), no other frameworks' weights (flax, ONNX, TF) and none of the
repository's top-level single-file checkpoints (SD 1.5's repository holds 12 GB of those beside the 5 GB
pipeline). For a transformers model, what from_pretrained reads: its top-level files (CLIP's tokenizer
and preprocessor files beside the weights; its subfolders hold other formats or copies), with the same
choice of weights. They are chosen here, from the hub's file list, because the job must know the sizes
first (for the disk-space check and the progress) and diffusers and transformers say neither.

Why not huggingface_hub's own download: since its PR 4228 (1.x) each file goes to a process-unique
temporary file that is deleted on failure, so a stopped or killed download starts every file again, and
it reports progress only to a console bar. Here each file is fetched with HTTP Range requests into
`blobs/<etag>.incomplete` of the HF cache, continued by the next run of the job, and placed as
huggingface_hub places its own (`blobs/<etag>`, `snapshots/<commit>/<path>` linked to it, `refs/main`),
so every cache lookup (huggingface_hub's, diffusers', transformers') finds it. model_index.json (a
transformers model's config.json) is placed last: a snapshot that has it is complete. The list of files
chosen is kept in the workspace (`models/downloads/<repo folder>.json`), so that offline, what is missing
can be named file by file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import psutil
from pydantic import BaseModel

from training.workspace import atomic_write_json, atomic_write_text, models_dir

log = logging.getLogger("training.downloads")

MODEL_INDEX = "model_index.json"  # what makes a repository a diffusers pipeline
CONFIG = "config.json"  # what makes a repository without MODEL_INDEX a transformers model
RESERVE_VARIABLE = "LORA_MCP_DOWNLOAD_RESERVE_MB"
# Space a download leaves free on the cache's disk: the workspace (checkpoints of ~100 MB, latent caches)
# often shares it, and a disk filled to the last byte fails every writer on it, not only this one.
DEFAULT_RESERVE_MB = 1024
OTHER_FRAMEWORKS = (".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".tflite", ".ot", ".ckpt")
TIMEOUT_S = 60.0  # of one read; a download of many GB takes as long as it takes


class DownloadRefused(RuntimeError):
    """The download cannot start or go on; the message says why and what to do."""


class PlannedFile(BaseModel):
    path: str  # in the repository, '/'-separated
    size: int
    etag: str  # the blob's name in the cache: an LFS file's sha256, else its git blob id
    sha256: str | None = None  # LFS files: checked once the file is complete


class DownloadPlan(BaseModel):
    repo_id: str
    commit: str
    files: list[PlannedFile]  # model_index.json (config.json) last

    @property
    def total(self) -> int:
        return sum(file.size for file in self.files)


def pipeline_files(model_index: dict, paths: list[str]) -> list[str]:
    """The files of a repository (`paths`) that its pipeline needs, model_index.json last."""
    parts = {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }
    chosen = []
    for part in sorted(parts):
        chosen.extend(_loaded([p for p in paths if p.startswith(f"{part}/")]))
    return [*chosen, MODEL_INDEX]


def transformers_files(paths: list[str]) -> list[str]:
    """The files of a transformers model's repository (`paths`) that from_pretrained reads: its top-level
    ones, config.json last."""
    return [*_loaded([p for p in paths if "/" not in p and p != CONFIG]), CONFIG]


def _loaded(paths: list[str]) -> list[str]:
    """Of one folder's files, those the loader reads: no other framework's weights, no variants, and no .bin
    where safetensors are there (diffusers and transformers load these and ignore .bin then)."""
    kept = [p for p in paths if not p.endswith(OTHER_FRAMEWORKS) and not _is_variant(p)]
    if any(p.endswith(".safetensors") for p in kept):
        kept = [p for p in kept if not (p.endswith(".bin") or p.endswith(".bin.index.json"))]
    return sorted(kept)


def _is_variant(path: str) -> bool:
    """`unet/diffusion_pytorch_model.fp16.safetensors` and its index `...safetensors.index.fp16.json`:
    a weight file with a segment between its name and its format."""
    name = PurePosixPath(path).name
    if name.endswith((".safetensors", ".bin")):
        return name.count(".") > 1
    if ".index." in name and name.endswith(".json"):
        return name.count(".") > 3
    return False


# --- the cache ---------------------------------------------------------------------------------
def repo_cache(repo_id: str) -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    return Path(HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _manifest(repo_id: str) -> Path:
    return models_dir() / "downloads" / f"{repo_cache(repo_id).name}.json"


def missing_files(repo_id: str) -> str:
    """What of `repo_id` is not in the cache, said file by file where a download job listed them."""
    folder = repo_cache(repo_id)
    snapshots = folder / "snapshots"
    cached = [p for p in snapshots.rglob("*") if p.is_file()] if snapshots.is_dir() else []
    try:
        plan = DownloadPlan.model_validate_json(_manifest(repo_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan = None
    if plan is None:
        if not cached:
            return f"nothing of {repo_id} is cached"
        return (
            f"{MODEL_INDEX} (a pipeline's) or {CONFIG} (a transformers model's) of {repo_id} is not cached "
            f"({len(cached)} other files of it are)"
        )
    snapshot = snapshots / plan.commit
    missing = [f for f in plan.files if not (snapshot / f.path).is_file()]
    listed = ", ".join(f"{f.path} ({f.size:,} bytes)" for f in missing[:8])
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    return f"{len(missing)} of the {len(plan.files)} files of {repo_id} are missing: {listed}{more}"


def _place(plan: DownloadPlan, file: PlannedFile, blob: Path) -> None:
    """Link snapshots/<commit>/<path> to the blob, as huggingface_hub does (a copy where links are refused)."""
    target = repo_cache(plan.repo_id) / "snapshots" / plan.commit / file.path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:  # Windows without developer mode
        shutil.copyfile(blob, target)


# --- the job -----------------------------------------------------------------------------------
class Progress:
    """Bytes present (files done plus partial files), and the speed of this run's own bytes."""

    def __init__(self, status, total: int, present: int):
        self._status, self.total, self.present = status, total, present
        self._fetched, self._started = 0, time.monotonic()

    def add(self, count: int) -> None:
        self.present += count
        self._fetched += count
        speed = self._fetched / max(time.monotonic() - self._started, 1e-6)
        eta = (self.total - self.present) / speed if speed > 0 else None
        self._status.update(
            bytes_done=self.present, bytes_total=self.total, bytes_per_s=round(speed), eta_s=eta and round(eta, 1)
        )


def plan_download(repo_id: str) -> DownloadPlan:
    """The hub's file list (with sizes) and model_index.json, read into the files to fetch; a repository
    without model_index.json but with a config.json is a transformers model."""
    from huggingface_hub import HfApi, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    info = HfApi().model_info(repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    if MODEL_INDEX in siblings:
        response = get_session().get(
            hf_hub_url(repo_id, MODEL_INDEX, revision=info.sha), headers=build_hf_headers(), follow_redirects=True
        )
        hf_raise_for_status(response)
        chosen = pipeline_files(response.json(), list(siblings))
    elif CONFIG in siblings:
        chosen = transformers_files(list(siblings))
    else:
        raise DownloadRefused(
            f"{repo_id} has neither {MODEL_INDEX} nor a top-level {CONFIG}: it is not a diffusers pipeline nor a "
            "transformers model, the two kinds download-base-model fetches. Give the id of a diffusers repository "
            "(or of a CLIP/DINOv2 model for evaluate-lora), or download a single-file checkpoint yourself and "
            "point model_name at the file"
        )
    files = []
    for path in chosen:
        sibling = siblings[path]
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        files.append(PlannedFile(path=path, size=sibling.size or 0, etag=sha256 or sibling.blob_id, sha256=sha256))
    return DownloadPlan(repo_id=repo_id, commit=info.sha, files=files)


def check_space(plan: DownloadPlan, blobs: Path) -> int:
    """The bytes already present; refused when the rest would leave less than the reserve free."""
    present = sum(_present(blobs, f) for f in plan.files)
    needed = plan.total - present
    reserve = int(float(os.environ.get(RESERVE_VARIABLE) or DEFAULT_RESERVE_MB) * 1024 * 1024)
    disk = blobs
    while not disk.exists():
        disk = disk.parent
    free = psutil.disk_usage(str(disk)).free
    if needed + reserve > free:
        raise DownloadRefused(
            f"not enough disk space for {plan.repo_id}: {needed:,} bytes still to download ({plan.total:,} in all), "
            f"{free:,} bytes free at {disk}, and {reserve:,} bytes are kept free ({RESERVE_VARIABLE}). Free space "
            "there (prune-runs, delete-job), or point HF_HOME at a larger disk and restart the server"
        )
    return present


def _present(blobs: Path, file: PlannedFile) -> int:
    if (blobs / file.etag).is_file():
        return file.size
    partial = blobs / f"{file.etag}.incomplete"
    return min(partial.stat().st_size, file.size) if partial.is_file() else 0


def fetch(plan: DownloadPlan, file: PlannedFile, blobs: Path, progress: Progress, stop: threading.Event) -> bool:
    """Fetch one file into its blob, continuing a partial one; False when stopped on the way."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    blob, partial = blobs / file.etag, blobs / f"{file.etag}.incomplete"
    if not blob.is_file():
        done = partial.stat().st_size if partial.is_file() else 0
        headers = build_hf_headers()
        if 0 < done < file.size:
            headers["Range"] = f"bytes={done}-"
        url = hf_hub_url(plan.repo_id, file.path, revision=plan.commit)
        with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=TIMEOUT_S) as response:
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            if response.status_code != 206 and done:  # the range was ignored: the whole file comes
                progress.add(-done)
                done = 0
            with partial.open("ab" if done else "wb") as out:
                for chunk in response.iter_bytes():  # as they arrive: progress and a stop request after each
                    out.write(chunk)
                    progress.add(len(chunk))
                    if stop.is_set():
                        return False
        _check_complete(file, partial)
        os.replace(partial, blob)
    _place(plan, file, blob)
    return True


def _check_complete(file: PlannedFile, partial: Path) -> None:
    """A complete file has the hub's size and, for an LFS file, its sha256. A damaged one is deleted: nothing
    takes it for complete, and the next run fetches it again."""
    size = partial.stat().st_size
    if size != file.size:
        damage = f"{size:,} of its {file.size:,} bytes"
    elif file.sha256 and (digest := _sha256(partial)) != file.sha256:
        damage = f"sha256 {digest}, not the hub's {file.sha256}"
    else:
        return
    partial.unlink()
    raise DownloadRefused(
        f"{file.path} arrived damaged ({damage}) and was deleted; resume-training this job (or run lora-train "
        "again) to fetch it again"
    )


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _hub_refusals(repo_id: str):
    """The hub's answers that asking again will not change, as refusals that say what to do instead. They
    come on the first requests (the file list, then model_index.json or a transformers model's first file: a
    gated repository shows its file list to anyone, its files only to accounts that accepted its licence)."""
    from huggingface_hub.constants import ENDPOINT
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        yield
    except HfHubHTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if isinstance(exc, RepositoryNotFoundError) and not isinstance(exc, GatedRepoError):
            raise DownloadRefused(
                f"no repository {repo_id} on {ENDPOINT}: check model_name (the hub answers so for a private "
                "repository too, when HF_TOKEN gives no access to it)"
            ) from None
        if isinstance(exc, GatedRepoError) or code in (401, 403):
            raise DownloadRefused(
                f"{ENDPOINT} refuses {repo_id}'s files (HTTP {code}: a gated model, or a token without access): "
                f"accept the model's licence on the hub ({ENDPOINT}/{repo_id}) and set HF_TOKEN to a token of that "
                "account where the server runs (or run `hf auth login` there)"
            ) from None
        raise


def download_model(repo_id: str, status, stop: threading.Event) -> bool:
    """Fetch `repo_id`'s pipeline (or transformers model) into the HF cache, continuing what an earlier run
    left; `status.update(...)` gets the phase, files and bytes done. False when `stop` ended it on the way;
    DownloadRefused or the hub's error when it cannot."""
    with _hub_refusals(repo_id):
        plan = plan_download(repo_id)
    atomic_write_json(_manifest(repo_id), plan.model_dump())
    blobs = repo_cache(repo_id) / "blobs"
    present = check_space(plan, blobs)
    blobs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(repo_cache(repo_id) / "refs" / "main", plan.commit)
    progress = Progress(status, plan.total, present)
    status.update(phase="downloading", total_steps=len(plan.files), bytes_done=present, bytes_total=plan.total)
    log.info("%s: %d files, %d bytes (%d present)", repo_id, len(plan.files), plan.total, present)
    with _hub_refusals(repo_id):  # a transformers model's plan read no file: a gated one refuses here
        for index, file in enumerate(plan.files):
            if not fetch(plan, file, blobs, progress, stop):
                log.info("stopped at %s", file.path)
                return False
            status.update(step=index + 1)
    log.info("done: %s is in %s", repo_id, repo_cache(repo_id))
    return True


def download_here(repo_id: str, *, quiet: bool) -> str | None:
    """`lora-train` by hand: download `repo_id` in this process before training, as diffusers would, with a
    progress bar on stderr unless `quiet`. None when done, else why not (with what is missing)."""
    from tqdm import tqdm

    with tqdm(desc=repo_id, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=quiet) as bar:
        try:
            download_model(repo_id, _BarStatus(bar), threading.Event())
            return None
        except DownloadRefused as exc:
            reason = str(exc)
        except Exception as exc:  # the hub unreachable (or gone), a full disk
            from huggingface_hub.constants import ENDPOINT

            reason = f"{type(exc).__name__}: {exc}. Run lora-train again to continue once the hub ({ENDPOINT}) answers"
    return f"download of {repo_id} failed: {reason} ({missing_files(repo_id)})"


class _BarStatus:
    """A download's progress as a tqdm bar (download_here) in place of a job's status."""

    def __init__(self, bar):
        self._bar = bar

    def update(self, bytes_done: int | None = None, bytes_total: int | None = None, **_) -> None:
        if bytes_total is not None:
            self._bar.total = bytes_total
        if bytes_done is not None:
            self._bar.update(bytes_done - self._bar.n)


def run_download_job(run_dir: Path, stop: threading.Event) -> str:
    """Run (or continue) the download job in `run_dir`; returns its final state."""
    from training.background_job import job_files

    repo_id = json.loads((run_dir / "request.json").read_text(encoding="utf-8"))["repo_id"]
    with job_files(run_dir, log, 0) as (_, status):
        status.update(phase="listing files")
        status.start()
        try:
            if not download_model(repo_id, status, stop):
                log.info("resume-training continues it")
                status.finish("stopped")
                return "stopped"
            status.finish("completed", eta_s=0, phase=None)
            return "completed"
        except DownloadRefused as exc:
            return _failed(status, repo_id, str(exc))
        except Exception as exc:  # the hub unreachable (or gone), a full disk
            from huggingface_hub.constants import ENDPOINT

            return _failed(
                status,
                repo_id,
                f"{type(exc).__name__}: {exc}. resume-training this job continues it once the hub ({ENDPOINT}) "
                f"answers; or download it elsewhere (huggingface-cli download {repo_id}) and copy the cache, or "
                "point model_name at a local diffusers folder",
            )


def _failed(status, repo_id: str, reason: str) -> str:
    log.error("download of %s failed: %s", repo_id, reason)
    status.finish("failed", error=f"download of {repo_id} failed: {reason} ({missing_files(repo_id)})")
    return "failed"


def main(argv: list[str] | None = None) -> int:
    """`python -m training.downloads RUN_DIR`: the server's background download job."""
    from training.background_job import job_main

    return job_main("training.downloads", argv, run_download_job)


if __name__ == "__main__":
    from training.jobs.queue import exit_as_job

    exit_as_job(main)  # a job the queue started ends its row and starts the next queued job, server or not
