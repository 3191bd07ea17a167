"""The server never imports torch, diffusers or transformers: what it used them for is done without them
(token counts with the `tokenizers` library) and checked here against them (this test process may import
them), and every tool called over stdio leaves them out of the server's modules."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

import anyio
import pytest
from transformers import CLIPTokenizer

from server.inspection import clip_tokenizer
from training.models.builtin import byte_symbols

REPO = Path(__file__).resolve().parent.parent

CAPTIONS = [
    "wc_style, a watercolor painting of a red fox in the snow",
    "  Mixed   CASE\twith\ttabs and\nnew lines  ",
    "numbers 1234 and 3.5 and -7, punctuation!!! (brackets) [more] {braces} 'quotes' \"double\"",
    "it's they're we've I'm you'll he'd",
    "café naïve Zürich déjà vu, ÅNGSTRÖM",
    "日本語のキャプション and emoji 🦊🎨",
    "the the the thethe there their",
    "<|endoftext|> inside a caption",
    "",
]


def merged_clip_folder(folder: Path) -> Path:
    """vocab.json and merges.txt (no tokenizer.json, as SD 1.5's folder) with byte-level symbols and a few
    merges, so that words are split into more than bytes."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "t"), ("i", "n"), ("in", "g</w>"), ("r", "e")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab and merges"])
def test_token_counts_equal_transformers_clip_tokenizer(layout, tiny_sd15, tmp_path):
    folder = tiny_sd15 / "tokenizer" if layout == "tokenizer.json" else merged_clip_folder(tmp_path / "tokenizer")
    reference = CLIPTokenizer.from_pretrained(str(folder))
    ours = clip_tokenizer(folder)
    for caption in CAPTIONS:
        expected = len(reference(caption).input_ids) - 2  # as lint-captions counted with transformers
        assert len(ours.encode(caption, add_special_tokens=False).ids) == expected, caption
    if layout != "tokenizer.json":  # the merges are used: fewer tokens than bytes
        assert len(ours.encode("the thing", add_special_tokens=False).ids) < len("thething")


HEAVY = ("torch", "diffusers", "transformers", "peft")
HUB_ID = "lora-test/tiny-sd15"  # a Hugging Face id, found in a local cache made for the test


def hf_cache_with(folder: Path, root: Path) -> Path:
    """A Hugging Face cache (hub layout: refs/main names the snapshot) holding `folder` as HUB_ID."""
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / commit).symlink_to(folder, target_is_directory=True)
    return root


def imported_modules(importtime_log: Path) -> set[str]:
    """Every module a process started with `-X importtime` imported, from the lines it wrote to stderr
    ('import time: self | cumulative | name'), whether or not it is still in sys.modules."""
    lines = importtime_log.read_text(encoding="utf-8", errors="replace").splitlines()
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:") and "|" in line}


class ToolCalls:
    """The session, remembering which tools were called; `ok` results are checked."""

    def __init__(self, session):
        self.session, self.called = session, set()

    async def __call__(self, name: str, arguments: dict, *, ok: bool = True):
        self.called.add(name)
        result = await self.session.call_tool(name, arguments)
        assert result.is_error != ok, (name, result.content)
        return result

    async def until_done(self, job_id: str) -> dict:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = (await self("get-training-status", {"job_id": job_id})).structured_content
            if status["state"] in ("completed", "failed", "interrupted", "stopped"):
                return status
            await anyio.sleep(0.25)
        raise AssertionError(f"job {job_id} did not end")


async def dataset_tools(call: ToolCalls, shapes: Path, caption_model: Path) -> None:
    image = base64.b64encode((shapes / "shape_000.png").read_bytes()).decode()
    await call("upload-dataset", {"dataset_name": "up", "images": [{"filename": "a.png", "content": image}]})
    await call("import-dataset", {"dataset_name": "shapes", "source_path": str(shapes), "mode": "copy"})
    await call("generate-captions", {"dataset_name": "up", "caption_model": "template", "trigger_word": "xyz_shape"})
    by_model = {"dataset_name": "up", "caption_model": str(caption_model), "overwrite": True}
    captioned = await call("generate-captions", {**by_model, "background": False})  # inside the call
    assert captioned.structured_content["captioned"] == 1
    await call("update-captions", {"dataset_name": "up", "find": "a", "replace": "one"})
    await call("get-dataset-info", {"dataset_name": "shapes", "lora_type": "style", "model_name": HUB_ID})
    for model in ("builtin:tiny-sd15", HUB_ID):  # token counts with the model's tokenizer
        await call("lint-captions", {"dataset_name": "shapes", "model_name": model})
    await call("list-datasets", {})
    await call("recommend-training-plan", {"dataset_name": "shapes", "lora_type": "style", "model_name": HUB_ID})
    await call("delete-dataset", {"dataset_name": "up"})


async def config_tools(call: ToolCalls, shapes: Path, checkpoint: Path) -> str:
    """Configs of a built-in, a Hugging Face id and a single-file checkpoint; returns a finding's config."""
    base = {"dataset_path": str(shapes), "rank": 4, "resolution": 64, "test_prompts": ["xyz_shape a red circle"]}
    base |= {"sample_every": 100, "sample_steps": 2}  # step 0's samples only: get-training-samples shows them
    for name, model in (("tiny", "builtin:tiny-sd15"), ("hub", HUB_ID), ("single", str(checkpoint))):
        await call("create-training-config", {**base, "name": name, "model_name": model, "steps": 2})
        report = await call("validate-training-config", {"name": name})
        assert report.structured_content["valid"], (name, report.structured_content)
    await call("create-training-config", {**base, "name": "long", "model_name": "builtin:tiny-sd15", "steps": 5000})
    findings = (await call("validate-training-config", {"name": "long"})).structured_content["findings"]
    assert "steps-vs-images" in [finding["rule"] for finding in findings]
    await call("apply-fix", {"config_name": "long", "finding_id": "steps-vs-images"})
    resumes = {**base, "name": "stage2", "model_name": "builtin:tiny-sd15", "resume_from": "no-such-run"}
    await call("create-training-config", resumes)  # resume_from is looked up without torch too
    errors = (await call("validate-training-config", {"name": "stage2"})).structured_content["errors"]
    assert any("resume_from 'no-such-run'" in error for error in errors), errors
    await call("update-training-config", {"name": "hub", "changes": {"steps": 3}})
    await call("get-config", {"name": "hub"})
    await call("list-configs", {})
    cached = await call("download-base-model", {"model_name": HUB_ID}, ok=False)  # the cache is read without torch
    assert "already in the Hugging Face cache" in cached.content[0].text
    await call("delete-config", {"name": "long"})
    kohya = f"pretrained_model_name_or_path = 'builtin:tiny-sd15'\ntrain_data_dir = '{shapes}'\nxformers = true\n"
    await call("import-config", {"name": "imported", "content": kohya})  # the importers read no torch either
    return "tiny"


async def job_tools(call: ToolCalls) -> list[str]:
    """Two runs (the second stopped as it starts), and what the job tools say of them."""
    first = (await call("start-training", {"config_name": "tiny"})).structured_content["job_id"]
    second = (await call("start-training", {"config_name": "single"})).structured_content["job_id"]
    await call("stop-training", {"job_id": second})
    assert (await call.until_done(first))["state"] == "completed"
    assert (await call.until_done(second))["state"] == "stopped"
    refused = await call("resume-training", {"job_id": first}, ok=False)
    assert "only a stopped, interrupted or failed job" in refused.content[0].text
    await call("get-training-logs", {"job_id": first, "lines": 5})
    await call("list-training-jobs", {})
    await call("get-training-samples", {"job_id": first})
    await call("diagnose-training", {"job_id": first})
    await call("show-training-dashboard", {"job_id": first})  # metrics, samples, diagnosis and config, read at once
    await call("compare-training-runs", {"job_ids": [first, second]})
    await call("prune-runs", {"dry_run": True})  # reads the runs' evidence to keep the recommended checkpoint
    await call("delete-job", {"job_id": second})
    return [first, second]


async def lora_tools(call: ToolCalls, job_id: str) -> None:
    exported = (await call("export-model", {"job_id": job_id, "output_format": "diffusers"})).structured_content
    await call("export-model", {"job_id": job_id})
    await call("list-exported-models", {})
    data = (await call("download-model", {"path": f"{exported['name']}.safetensors"})).structured_content
    upload = {"upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30"}
    size = len(base64.b64decode(data["data"]))
    await call("upload-lora-chunked-start", {**upload, "filename": "uploaded.safetensors", "total_size": size})
    await call("upload-lora-chunked-append", {**upload, "chunk": data["data"], "chunk_index": 0})
    await call("upload-lora-chunked-finish", upload)
    await call("convert-lora", {"lora": "tiny", "to": "diffusers"})
    await call("merge-loras", {"loras": [{"lora": "tiny"}, {"lora": "uploaded", "weight": 0.5}], "output_name": "m"})
    image = await call("generate-image", {"prompt": "xyz_shape", "loras": [{"lora": "m"}], "steps": 2})
    assert image.content[-1].type == "image"
    await call("compare-lora-strengths", {"lora": "tiny", "prompt": "xyz_shape", "strengths": [0, 1], "steps": 2})
    scorers = {"clip_model": "builtin:tiny-clip", "dino_model": "builtin:tiny-dinov2"}
    evaluation = await call("evaluate-lora", {"job_id": job_id, "prompts": ["xyz_shape"], **scorers})
    await call("stop-training", {"job_id": evaluation.structured_content["job_id"]})  # started is enough here
    await call("get-system-stats", {})


def test_every_tool_leaves_torch_diffusers_and_transformers_out_of_the_server(
    tmp_path, tiny_sd15, shapes, tiny_git
):
    """Every tool, on the paths that used to import them (a Hugging Face id, a single-file checkpoint, a
    conversion, a merge, images and model captions inside the call, system stats), through the SDK's client over stdio. The
    server runs with `-X importtime`, which writes every module it ever imports to its stderr."""
    from ldm_checkpoint import diffusers_to_ldm
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from safetensors.torch import save_file

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "models").symlink_to(tiny_sd15.parent)  # share the session's built-in models
    checkpoint = tmp_path / "tiny-sd15.safetensors"
    save_file(diffusers_to_ldm(tiny_sd15), str(checkpoint))
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hf_cache_with(tiny_sd15, tmp_path / "hf")),
        "LORA_MCP_ALLOWED_DIRS": str(tmp_path),
    }
    params = StdioServerParameters(
        command=sys.executable,
        args=["-X", "importtime", "-m", "server.main", "--workspace", str(workspace)],
        cwd=str(REPO),
        env=env,
    )
    stderr = tmp_path / "server.err"

    async def main():
        with open(stderr, "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                call = ToolCalls(session)
                await dataset_tools(call, shapes, tiny_git)
                await config_tools(call, shapes, checkpoint)
                first, _ = await job_tools(call)
                await lora_tools(call, first)
                listed = {tool.name for tool in (await session.list_tools()).tools}
                return listed, call.called

    listed, called = anyio.run(main)
    assert called == listed  # a new tool must be called here too
    modules = imported_modules(stderr)
    assert {"server.app", "tokenizers", "pynvml"} <= modules, "the import log is read"
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []


def test_validating_a_config_on_a_built_in_not_yet_built_builds_it_in_a_child(tmp_path):
    """The first config naming a built-in model builds it (torch, diffusers) in a child process: the
    server that validates the config keeps its ~80 MB instead of holding torch for its lifetime."""
    import os
    import subprocess

    probe = (
        "import sys\n"
        "from server.configs import check_model\n"
        "errors = []\n"
        "check = check_model('builtin:tiny-sd15', None, errors=errors)\n"
        "print(errors, check.family, sorted(m for m in sys.modules if m.split('.')[0] in %r))\n" % (HEAVY,)
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LORA_MCP_HOME": str(tmp_path)},
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] sd1 []"
    assert (tmp_path / "models" / "builtin-tiny-sd15-v1" / "model_index.json").is_file()


def test_the_http_front_end_leaves_them_out_too(tmp_path, tiny_sd15, shapes):
    """What only HTTP has (the JSON API, a zip of images, a LoRA download, Streamable HTTP start-up) imports
    none of them either: `lora-mcp http` under `-X importtime`."""
    import io
    import zipfile

    import requests
    from http_server import start_http_server

    server = start_http_server(tmp_path / "ws", python_flags=("-X", "importtime"))
    try:

        def call(tool: str, **arguments):
            response = requests.post(
                f"{server.url}/mcp/tool", json={"tool": tool, "arguments": arguments}, headers=server.headers, timeout=120
            )
            assert response.status_code == 200, response.text
            return response.json()["result"]

        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zipped:
            for image in sorted(shapes.glob("*.png")):
                zipped.write(image, image.name)
                zipped.write(image.with_suffix(".txt"), image.with_suffix(".txt").name)
        sent = requests.post(
            f"{server.url}/datasets/zipped",
            data=archive.getvalue(),
            headers={**server.headers, "Content-Type": "application/zip"},
            timeout=120,
        )
        assert sent.status_code == 200, sent.text
        call("get-dataset-info", dataset_name="zipped")
        call("create-training-config", name="c", model_name="builtin:tiny-sd15", dataset_path="zipped", trigger_word="xyz_shape")
        call("validate-training-config", name="c")
        missing = requests.get(f"{server.url}/loras/none.safetensors", headers=server.headers, timeout=30)
        assert missing.status_code == 404
    finally:
        server.stop()
    modules = imported_modules(server.log)
    assert {"server.http.app", "uvicorn", "tokenizers"} <= modules, "the import log is read"
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
