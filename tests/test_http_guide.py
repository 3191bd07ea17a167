"""The guide's HTTP samples, run as written against a real `lora-mcp http --no-auth` on loopback.

The samples are tests/data/guide_http_samples.md, copied verbatim from the guide. Each runs with
`exec` and the `requests` client it uses; the test supplies only what a sample leaves undefined (its
input files, and the modules another section of the guide imports) and rewrites three things: the
server's URL (a free port instead of 8190), the model (a built-in tiny one) and the dataset path (the
dataset the upload sample made).
"""

from __future__ import annotations

import base64
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from training.data.synthetic import make_shape_dataset

SAMPLES = Path(__file__).parent / "data" / "guide_http_samples.md"
GUIDE_URL = "http://localhost:8190"
ENDED = ("completed", "failed", "stopped", "interrupted")


def sample(section: str) -> str:
    """The Python block under the guide's `### section` heading."""
    found = re.search(rf"^### {re.escape(section)}\n\n```python\n(.*?)\n```$", SAMPLES.read_text(), re.S | re.M)
    assert found, f"no sample under '### {section}' in {SAMPLES}"
    return found.group(1)


def rewritten(code: str, server_url: str, **replacements: str) -> str:
    """`code` against the test's server, with each of `replacements` (old: new) made exactly where the
    guide has it: a sample that no longer says what is replaced fails here instead of running unchanged."""
    for old, new in replacements.items():
        assert old in code, f"the sample no longer contains {old!r}"
        code = code.replace(old, new)
    assert GUIDE_URL in code
    # `localhost`, as the guide writes it: the server's Host check must take it.
    return code.replace(GUIDE_URL, f"http://localhost:{server_url.rsplit(':', 1)[1]}")


def call(server_url: str, tool: str, **arguments) -> dict:
    response = requests.post(f"{server_url}/mcp/tool", json={"tool": tool, "arguments": arguments}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["result"]


def wait_until_ended(server_url: str, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = call(server_url, "get-training-status", job_id=job_id)
        if status["state"] in ENDED:
            return status
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not end within {timeout} s after stop-training")


@pytest.fixture
def dataset_files(tmp_path) -> list[tuple[str, str]]:
    """The (image, caption) path pairs the upload sample reads: four small PNGs with .txt captions."""
    images = make_shape_dataset(tmp_path / "my-style-source", 4, trigger_word="xyz_style")
    return [(str(image), str(image.with_suffix(".txt"))) for image in images]


def test_the_guides_training_samples_run_as_written(open_http_server, dataset_files):
    url = open_http_server.url
    # `requests` is imported by the config sample, which runs after the upload sample that already uses it.
    names: dict = {"dataset_files": dataset_files, "os": os, "requests": requests}

    exec(rewritten(sample("Direct Upload (Small Datasets)"), url), names)
    assert names["response"].status_code == 200, names["response"].text
    uploaded = names["response"].json()["result"]
    assert uploaded["dataset_name"] == "my-style" and uploaded["saved"] == 4 and uploaded["refused"] == 0, uploaded

    config_sample = rewritten(
        sample("Basic Configuration via MCP"),
        url,
        **{
            '"model_name": "runwayml/stable-diffusion-v1-5"': '"model_name": "builtin:tiny-sd15"',
            '"dataset_path": "/ai-toolkit/datasets/my-style"': '"dataset_path": "my-style"',
        },
    )
    exec(config_sample, names)
    assert names["response"].status_code == 200, names["response"].text
    config = names["response"].json()["result"]["config"]
    assert config["name"] == "my-style-lora" and config["steps"] == 2000 and config["trigger_word"] == "xyz_style"

    exec(rewritten(sample("Starting Training"), url), names)
    job_id = names["job_id"]
    assert names["response"].status_code == 200 and job_id, names["response"].text
    assert names["response"].json()["result"]["state"] in ("queued", "running")

    # The monitoring sample reads the status, then the logs, into the same `response`: run its two halves.
    status_half, logs_half = sample("Monitoring Progress").split("# Get training logs")
    exec(rewritten(status_half, url), names)
    assert names["response"].status_code == 200, names["response"].text
    status = names["response"].json()["result"]
    assert status["job_id"] == job_id and status["config_name"] == "my-style-lora"
    assert status["state"] in ("queued", "running"), status

    exec(rewritten("# Get training logs" + logs_half, url), names)
    assert names["response"].status_code == 200, names["response"].text
    logs = names["response"].json()["result"]["result"]  # a tool that returns text: structured as {"result": text}
    assert "== process.log ==" in logs, logs

    # 2000 steps at 512 px is the guide's real run: stop it once it has been watched.
    if call(url, "get-training-status", job_id=job_id)["state"] in ("queued", "running"):
        call(url, "stop-training", job_id=job_id)
    final = wait_until_ended(url, job_id)
    assert final["state"] in ("stopped", "interrupted", "completed"), final
    jobs = call(url, "list-training-jobs")["jobs"]
    assert job_id in [job["job_id"] for job in jobs]


def test_the_guides_chunked_upload_runs_as_written(open_http_server, lora_bytes):
    names: dict = {
        "base64": base64,  # imported in the guide's direct-upload sample
        "requests": requests,
        "uuid": uuid,
        "file_data": lora_bytes,  # two of the sample's 256 KB chunks, the last one short
        "file_size": len(lora_bytes),
    }
    exec(rewritten(sample("Chunked Upload (Large Files)"), open_http_server.url), names)

    assert names["response"].status_code == 200, names["response"].text
    finished = names["response"].json()["result"]
    path = Path(finished["path"])
    assert path.name == "large_lora.safetensors" and path.read_bytes() == lora_bytes, finished
    listed = call(open_http_server.url, "list-exported-models")["loras"]
    lora = next(item for item in listed if item["name"] == "large_lora")
    assert lora["trigger_word"] == "xyz_style", lora  # the sample's metadata, over the file's own file_phrase
