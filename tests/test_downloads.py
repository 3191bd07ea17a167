"""Base models that are not on the machine: `download` jobs, against a small hub served on a loopback
address (HF_ENDPOINT) that serves the tiny built-in SD 1.5 model's folder, through the real stdio client."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest
from conftest import fast_config
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from training.downloads import pipeline_files
from training.jobs.store import JobRecord, JobStore

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SLOW_FILE = "unet/diffusion_pytorch_model.safetensors"  # the largest file (6 MB): the one stopped half way
TRICKLE = 16 * 1024  # bytes per 0.1 s of the slow half
FINAL = ("completed", "failed", "stopped", "interrupted")
CORRUPT = "someone/corrupt"  # serves SLOW_FILE with one byte changed
GATED = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model someone/gated is restricted."}
REFUSED = {  # (repo id, endpoint): the hub's answer, as hf_raise_for_status reads it
    ("someone/missing", "api"): (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    ("someone/missing", "resolve"): (404, {"X-Error-Code": "RepoNotFound"}),
    ("someone/gated", "resolve"): (401, GATED),  # its file list is public, its files are not
    ("someone/forbidden", "resolve"): (403, {"X-Error-Message": "Your token has no read access"}),
}


class TinyHub(ThreadingHTTPServer):
    """The two endpoints huggingface_hub 2.4 and the download job call: the model info with its file list
    and sizes (`/api/models/{repo}/revision/{rev}?blobs=true`; weights as LFS files, with their sha256), and
    a file (`/{repo}/resolve/{rev}/{path}`, with X-Repo-Commit, ETag (an LFS file's sha256, as the hub's
    X-Linked-Etag), Content-Length and Range). Every repository id serves `folder`, except the refusals of
    REFUSED and CORRUPT's damaged SLOW_FILE. While `slow` is set, the second half of SLOW_FILE trickles out
    TRICKLE bytes at a time; while `down` is set, every request gets a 503."""

    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.folder = folder
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.slow = threading.Event()
        self.down = threading.Event()
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every ranged request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: TinyHub

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.server.down.is_set():
            return self.send_error(503)
        if parts[:2] == ["api", "models"]:
            return self._info("/".join(parts[2:4]))
        if len(parts) > 4 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), "/".join(parts[4:]))
        self.send_error(404)

    def _refuse(self, repo_id: str, where: str) -> bool:
        """The hub's refusal for `repo_id` at `where` (api, resolve), with the headers hf_raise_for_status reads."""
        status, headers = REFUSED.get((repo_id, where), (None, {}))
        if status is None:
            return False
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _info(self, repo_id: str):
        if self._refuse(repo_id, "api"):
            return
        siblings = []
        for path, data in sorted(self.server.files.items()):
            siblings.append({"rfilename": path, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()})
            if sha256 := lfs(path, data):
                siblings[-1]["lfs"] = {"sha256": sha256, "size": len(data), "pointerSize": 134}
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, repo_id: str, path: str):
        if self._refuse(repo_id, "resolve"):
            return
        data = self.server.files.get(path)
        if data is None:
            return self.send_error(404)
        etag = lfs(path, data) or hashlib.sha1(data).hexdigest()
        if repo_id == CORRUPT and path == SLOW_FILE:  # one byte flipped on the way: same size, another sha256
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        start = 0
        if ranged := self.headers.get("Range"):
            self.server.ranges.append((path, ranged))
            start = int(ranged.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        if lfs(path, data):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        if path != SLOW_FILE or not self.server.slow.is_set():
            return self.wfile.write(body)
        half = len(data) // 2 - start
        self.wfile.write(body[:half])
        try:
            for offset in range(max(half, 0), len(body), TRICKLE):
                self.wfile.flush()
                time.sleep(0.1)
                self.wfile.write(body[offset : offset + TRICKLE])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the job stopped reading: what the test wants


def lfs(path: str, data: bytes) -> str | None:
    """The sha256 of a file the hub keeps in LFS (weights, as in real repositories), else None."""
    return hashlib.sha256(data).hexdigest() if path.endswith((".safetensors", ".bin")) else None


@contextlib.contextmanager
def serving(folder: Path):
    """A TinyHub of `folder`, listening until the block ends."""
    server = TinyHub(folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()  # again, for a test that closed it: nothing happens
        server.server_close()


@pytest.fixture
def hub(tiny_sd15):
    with serving(tiny_sd15) as server:
        yield server


def run_session(workspace: Path, hub: TinyHub, script, **env: str):
    """`lora-mcp --workspace` over stdio, online against `hub` unless env says otherwise."""
    environment = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(workspace.parent / "hf"),
        "LORA_MCP_ALLOWED_DIRS": str(workspace.parent),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **env,
    }
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "server.main", "--workspace", str(workspace)],
        cwd=str(REPO),
        env=environment,
    )

    async def main():
        with open(workspace.parent / "server.err", "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                return await script(session)

    return anyio.run(main)


def config_arguments(dataset: Path, name: str, model_name: str, **overrides) -> dict:
    """create-training-config's arguments for conftest's fast config of `model_name`."""
    config = fast_config(dataset, name=name, model_name=model_name, **overrides)
    return config.model_dump(mode="json", exclude_defaults=True) | {"name": name, "model_name": model_name}


async def call(session, tool: str, arguments: dict) -> dict:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def wait_for(session, job_id: str, states: tuple[str, ...], until=None) -> dict:
    for _ in range(2400):
        status = await call(session, "get-training-status", {"job_id": job_id})
        if status["state"] in states or (until and until(status)):
            return status
        await anyio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states}: {status}")


def test_a_download_job_stops_resumes_and_feeds_a_training(tmp_path, hub, shapes):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    blobs = tmp_path / "hf" / "hub" / "models--someone--tiny-sd" / "blobs"
    unet = hub.files[SLOW_FILE]
    hub.slow.set()

    async def stopped_half_way(session):
        refused = await session.call_tool("download-base-model", {"model_name": "builtin:tiny-sd15"})
        assert refused.is_error and "built-in" in refused.content[0].text
        job = await call(session, "download-base-model", {"model_name": "someone/tiny-sd"})
        assert job["kind"] == "download" and job["config_name"] == "someone/tiny-sd" and job["devices"] == []
        partial = blobs / f"{hashlib.sha256(unet).hexdigest()}.incomplete"  # an LFS blob: named by its sha256
        for _ in range(600):  # the first half of the unet is there, the rest trickles
            if partial.is_file() and partial.stat().st_size >= len(unet) // 2:
                break
            await anyio.sleep(0.1)
        await call(session, "stop-training", {"job_id": job["job_id"]})
        stopped = await wait_for(session, job["job_id"], ("stopped", "completed", "failed", "interrupted"))
        assert stopped["state"] == "stopped", stopped
        assert 0 < partial.stat().st_size < len(unet)
        assert 0 < stopped["bytes_done"] < stopped["bytes_total"]
        return job["job_id"]

    job_id = run_session(workspace, hub, stopped_half_way)

    async def offline(session):  # what is missing, file by file, and how to get it
        await call(session, "create-training-config", config_arguments(shapes, "test-run", "someone/tiny-sd"))
        report = await call(session, "validate-training-config", {"name": "test-run"})
        refused = await session.call_tool("download-base-model", {"model_name": "someone/other"})
        return report, refused

    report, refused = run_session(workspace, hub, offline, HF_HUB_OFFLINE="1")
    message = " ".join(report["errors"])
    assert not report["valid"] and SLOW_FILE in message and "model_index.json" in message, message
    assert "download-base-model" in message and "huggingface-cli download" in message
    assert refused.is_error and "offline" in refused.content[0].text

    hub.slow.clear()

    async def resumed_then_trained(session):
        resumed = await call(session, "resume-training", {"job_id": job_id})
        done = await wait_for(session, resumed["job_id"], FINAL)
        await call(session, "create-training-config", config_arguments(shapes, "from-the-hub", "someone/tiny-sd-copy"))
        training = await call(session, "start-training", {"config_name": "from-the-hub"})
        trained = await wait_for(session, training["job_id"], FINAL)
        fetched = await call(session, "get-training-status", {"job_id": training["waits_for"]})
        return done, training, trained, fetched

    done, training, trained, fetched = run_session(workspace, hub, resumed_then_trained)
    assert done["state"] == "completed" and done["bytes_done"] == done["bytes_total"] > 0, done
    assert any(path == SLOW_FILE and not rng.startswith("bytes=0-") for path, rng in hub.ranges), hub.ranges
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-sd" / "snapshots" / COMMIT
    assert (snapshot / SLOW_FILE).read_bytes() == unet
    assert (snapshot / SLOW_FILE).resolve() == (blobs / hashlib.sha256(unet).hexdigest()).resolve()
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == sorted(
        pipeline_files(json.loads(hub.files["model_index.json"]), list(hub.files))
    )
    assert training["state"] == "queued" and training["waits_for"], training
    assert fetched["kind"] == "download" and fetched["state"] == "completed", fetched
    assert trained["state"] == "completed", trained
    assert trained["started_at"] >= fetched["finished_at"]  # it started only once the download had completed


def test_evaluate_loras_scorer_model_is_downloaded_top_level_files_only_config_last(monkeypatch, tmp_path):
    """A transformers model (config.json, no model_index.json), as evaluate-lora's CLIP or DINOv2: the refusal
    of a scorer that is not cached names the download-base-model call; that job fetches its top-level files
    (safetensors, not the .bin; no other framework's weights; no subfolder) with config.json last, where the
    scorer check finds it; and a second download of it is refused as cached."""
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache

    from server.errors import ServiceError
    from server.evaluations import _check_scorers
    from training.evaluation.request import EvaluationRequest

    repo, cache = tmp_path / "repo", tmp_path / "hf" / "hub"
    files = {
        "config.json": b'{"model_type": "dinov2"}',
        "model.safetensors": bytes(range(256)) * 64,
        "pytorch_model.bin": b"\x80" * 4096,  # the same weights in PyTorch's format: skipped for the safetensors
        "tf_model.h5": b"\x89HDF" * 256,
        "preprocessor_config.json": b'{"crop_size": {"height": 224, "width": 224}}',
        "onnx/model.safetensors": b"\x00" * 512,  # a subfolder: another format's copy in real repositories
    }
    for path, data in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(data)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # the server's, from HF_HOME
    request = EvaluationRequest(lora="some.safetensors", clip_model="builtin:tiny-clip", dino_model="someone/dinov2")
    with pytest.raises(ServiceError) as refused:
        _check_scorers(request)
    assert "start download-base-model model_name=someone/dinov2" in str(refused.value), refused.value
    workspace = tmp_path / "ws"
    workspace.mkdir()

    async def script(session):
        job = await call(session, "download-base-model", {"model_name": "someone/dinov2"})
        done = await wait_for(session, job["job_id"], FINAL)
        again = await session.call_tool("download-base-model", {"model_name": "someone/dinov2"})
        return done, again

    with serving(repo) as hub:
        done, again = run_session(workspace, hub, script)
    assert done["state"] == "completed", done
    manifest = json.loads((workspace / "models" / "downloads" / "models--someone--dinov2.json").read_text())
    planned = [f["path"] for f in manifest["files"]]  # in the order fetched
    assert planned == ["model.safetensors", "preprocessor_config.json", "config.json"], planned
    snapshot = cache / "models--someone--dinov2" / "snapshots" / COMMIT
    fetched = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert fetched == {path: files[path] for path in planned}
    assert try_to_load_from_cache("someone/dinov2", "config.json", cache_dir=cache) == str(snapshot / "config.json")
    _check_scorers(request)  # refused before the download, passes now
    assert again.is_error and "already in the Hugging Face cache" in again.content[0].text, again.content


def test_a_repository_neither_a_pipeline_nor_a_transformers_model_is_refused_saying_what_is_fetched(
    monkeypatch, tmp_path
):
    """A config.json only in a subfolder does not make a transformers model: the plan refuses before any file."""
    import huggingface_hub.constants

    from training.downloads import DownloadRefused, plan_download

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "README.md").write_text("a model card")
    (repo / "sub" / "config.json").write_text("{}")
    with serving(repo) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest's, for the real hub
        with pytest.raises(DownloadRefused) as refused:
            plan_download("someone/neither")
    message = str(refused.value)
    assert "someone/neither has neither model_index.json nor a top-level config.json" in message, message
    assert "the two kinds download-base-model fetches" in message and "CLIP/DINOv2" in message


def test_a_download_that_would_fill_the_disk_is_refused_with_the_numbers(tmp_path, hub):
    """The reserve (LORA_MCP_DOWNLOAD_RESERVE_MB, what a download leaves free) set above any disk's size: the
    real free space of the cache's disk, measured by the job, is then too small, and nothing is fetched."""
    workspace = tmp_path / "ws"
    workspace.mkdir()

    async def script(session):
        job = await call(session, "download-base-model", {"model_name": "someone/tiny-sd"})
        return await wait_for(session, job["job_id"], FINAL)

    failed = run_session(workspace, hub, script, LORA_MCP_DOWNLOAD_RESERVE_MB=str(10**12))
    assert failed["state"] == "failed" and "not enough disk space" in failed["error"], failed
    assert "bytes free at" in failed["error"] and f"{SLOW_FILE} (" in failed["error"]  # what is missing
    assert not list((tmp_path / "hf" / "hub" / "models--someone--tiny-sd").rglob("*.incomplete"))


def test_an_unreachable_hub_fails_the_download_saying_what_is_missing_and_how_to_get_it(tmp_path, hub):
    """The hub's port closed (a machine that is online but cannot reach the hub)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    closed = hub.url
    hub.shutdown()
    hub.server_close()

    async def script(session):
        job = await call(session, "download-base-model", {"model_name": "someone/tiny-sd"})
        return await wait_for(session, job["job_id"], FINAL)

    failed = run_session(workspace, hub, script, HF_ENDPOINT=closed)
    assert failed["state"] == "failed" and "nothing of someone/tiny-sd is cached" in failed["error"], failed
    assert "resume-training this job" in failed["error"] and "huggingface-cli download" in failed["error"]


def test_the_hubs_refusals_and_a_damaged_file_fail_the_download_saying_what_to_do(tmp_path, hub):
    """An unknown id and a gated model are refusals that no resume changes; a file whose sha256 is not the
    one the hub lists is deleted, not placed in the cache as complete."""
    workspace = tmp_path / "ws"
    workspace.mkdir()

    async def script(session):
        repos = ("someone/missing", "someone/gated", "someone/forbidden", CORRUPT)
        jobs = {repo: (await call(session, "download-base-model", {"model_name": repo}))["job_id"] for repo in repos}
        return {repo: (await wait_for(session, job_id, FINAL))["error"] for repo, job_id in jobs.items()}

    errors = run_session(workspace, hub, script)
    missing = errors["someone/missing"]
    assert f"no repository someone/missing on {hub.url}: check model_name" in missing, missing
    for repo, code in (("someone/gated", 401), ("someone/forbidden", 403)):
        assert f"HTTP {code}" in errors[repo] and "accept the model's licence on the hub" in errors[repo], errors
        assert f"{hub.url}/{repo}" in errors[repo] and "set HF_TOKEN" in errors[repo]
    assert not any("resume-training" in errors[repo] for repo in ("someone/missing", "someone/gated")), errors

    damaged, unet = errors[CORRUPT], hashlib.sha256(hub.files[SLOW_FILE]).hexdigest()
    assert f"{SLOW_FILE} arrived damaged (sha256 " in damaged and f"not the hub's {unet}" in damaged, damaged
    assert f"{SLOW_FILE} (" in damaged  # and what is missing, file by file
    cache = tmp_path / "hf" / "hub" / "models--someone--corrupt"
    assert not (cache / "blobs" / unet).exists() and not list(cache.rglob("*.incomplete"))
    assert not (cache / "snapshots" / COMMIT / SLOW_FILE).exists()
    assert not (cache / "snapshots" / COMMIT / "model_index.json").exists()  # the snapshot is not complete


def test_a_training_whose_download_failed_trains_once_both_are_resumed(tmp_path, hub, shapes):
    """The training never started: its run folder has its request and no config.yaml, so resumed, it starts
    afresh from its request (`lora-train --resume` needs the config.yaml a run writes)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    hub.down.set()

    async def script(session):
        await call(session, "create-training-config", config_arguments(shapes, "waits", "someone/tiny-sd", steps=2))
        training = await call(session, "start-training", {"config_name": "waits"})
        failed = await wait_for(session, training["job_id"], FINAL)
        download = await call(session, "get-training-status", {"job_id": training["waits_for"]})
        hub.down.clear()
        await call(session, "resume-training", {"job_id": download["job_id"]})
        fetched = await wait_for(session, download["job_id"], FINAL)
        await call(session, "resume-training", {"job_id": training["job_id"]})
        return failed, download, fetched, await wait_for(session, training["job_id"], FINAL)

    failed, download, fetched, trained = run_session(workspace, hub, script)
    assert download["state"] == "failed" and "503" in download["error"], download
    assert failed["state"] == "failed" and "the hub" in failed["error"], failed
    assert f"resume-training {download['job_id']}, then resume-training this job" in failed["error"]
    assert fetched["state"] == "completed", fetched
    assert trained["state"] == "completed" and trained["step"] == 2, trained
    assert (workspace / "runs" / trained["job_id"] / "waits.safetensors").is_file()


def test_a_training_waiting_for_a_failed_download_fails_with_its_error(tmp_path):
    """And an old state.db (no after_job column) is migrated on open."""
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'training', config_name TEXT "
            "NOT NULL, state TEXT NOT NULL, run_dir TEXT NOT NULL, pid INTEGER, pid_created_at REAL, resume INTEGER "
            "NOT NULL DEFAULT 0, stop_requested_at REAL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
            "error TEXT, devices_wanted INTEGER NOT NULL DEFAULT 1, devices TEXT)"
        )
    store = JobStore(path)
    now = time.time()
    download = JobRecord(
        job_id="dl", kind="download", config_name="a/b", state="running", run_dir="x", created_at=now, devices_wanted=0
    )
    store.insert(download)
    store.insert(JobRecord(job_id="tr", config_name="c", state="queued", run_dir="y", created_at=now, after_job="dl"))
    assert store.claim_next([]) is None  # waits while the download runs
    store.update("dl", state="failed", error="the hub could not be reached")
    assert store.claim_next([]) is None
    waiting = store.get("tr")
    assert waiting.state == "failed" and "the hub could not be reached" in waiting.error
    assert "resume-training dl" in waiting.error


def test_offline_an_uncached_id_says_nothing_is_cached_and_the_old_sd15_id_is_its_mirror(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from training.models.source import ModelNotFoundError, renamed_note, resolve_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model("runwayml/stable-diffusion-v1-5")
    message = str(raised.value)
    assert "nothing of stable-diffusion-v1-5/stable-diffusion-v1-5 is cached" in message, message
    assert "download-base-model" in message and "huggingface-cli download" in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in renamed_note("runwayml/stable-diffusion-v1-5")

    old = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5"  # a user who has the old id keeps it
    (old / "snapshots" / COMMIT).mkdir(parents=True)
    (old / "snapshots" / COMMIT / "model_index.json").write_text("{}")
    (old / "refs").mkdir()
    (old / "refs" / "main").write_text(COMMIT)
    assert resolve_model("runwayml/stable-diffusion-v1-5").path == old / "snapshots" / COMMIT
    assert renamed_note("runwayml/stable-diffusion-v1-5") is None


def test_lora_train_by_hand_downloads_an_uncached_id_first_and_trains(tmp_path, hub, shapes):
    """`lora-train config.yaml` on a hub id not in the cache: offline, the files that are missing; online, it
    downloads them itself (the download job's code, a progress bar on stderr), then trains."""
    import os
    import subprocess

    config = tmp_path / "from-the-hub.yaml"
    config.write_text(fast_config(shapes, name="from-the-hub", model_name="someone/tiny-sd", steps=2).to_yaml())
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "LORA_MCP_HOME": str(tmp_path / "ws"),
        "OMP_NUM_THREADS": "1",
    }

    def lora_train(run: str, offline: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "training.cli", str(config), "--run-dir", str(tmp_path / run)]
        return subprocess.run(
            command, cwd=REPO, env={**env, "HF_HUB_OFFLINE": offline}, capture_output=True, text=True, timeout=300
        )

    offline = lora_train("offline", "1")
    assert offline.returncode == 1 and "nothing of someone/tiny-sd is cached" in offline.stderr, offline.stderr
    online = lora_train("online", "0")
    assert online.returncode == 0, online.stderr
    assert "someone/tiny-sd" in online.stderr and "B/s" in online.stderr  # tqdm's bar, in bytes
    assert online.stdout.startswith("done: ") and (tmp_path / "online" / "from-the-hub.safetensors").is_file()
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-sd" / "snapshots" / COMMIT
    assert (snapshot / SLOW_FILE).read_bytes() == hub.files[SLOW_FILE]
