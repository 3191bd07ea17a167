"""Files over HTTP against a real `lora-mcp http` process: an exported LoRA downloaded whole and by
Range, and datasets sent as a zip, with every bad zip refused file by file or whole, nothing written
outside the dataset, and a server that keeps answering."""

from __future__ import annotations

import base64
import io
import os
import random
import stat
import threading
import uuid
import zipfile
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from http_server import HttpServer, start_http_server

LORA = "http-files-lora"


def image_bytes(fmt: str = "PNG", size=(64, 64), seed: int = 0) -> bytes:
    """A noise image, the same bytes for the same arguments."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(buffer, format=fmt)
    return buffer.getvalue()


def zipped(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def post_zip(server: HttpServer, name: str, body, query: str = "") -> requests.Response:
    headers = {**server.headers, "Content-Type": "application/zip"}
    return requests.post(f"{server.url}/datasets/{name}{query}", data=body, headers=headers, timeout=120)


def assert_refused(response: requests.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"], response.text


def assert_answering(server: HttpServer) -> None:
    response = requests.get(f"{server.url}/mcp/tools", headers=server.headers, timeout=30)
    assert response.status_code == 200 and response.json()["tools"], response.text


def outcomes(response: requests.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {f["filename"]: f for f in response.json()["result"]["files"]}


def workspace_files(server: HttpServer) -> set[str]:
    """The workspace's files, less the lock files calls leave (server/name_locks.py)."""
    files = {p.relative_to(server.workspace) for p in server.workspace.rglob("*") if not p.is_dir()}
    return {str(p) for p in files if p.parts[0] != "locks"}


# --- GET /loras/{name}.safetensors -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(http_server, tmp_path_factory) -> bytes:
    """A real safetensors LoRA of about 200 KB, put in loras/ through the upload tools over /mcp/tool."""
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "made.safetensors"
    tensors = {
        "lora_unet_mid.lora_down.weight": torch.randn(64, 400, generator=generator),
        "lora_unet_mid.lora_up.weight": torch.randn(400, 64, generator=generator),
        "lora_unet_mid.alpha": torch.tensor(8.0),
    }
    save_file(tensors, str(path), metadata={"ss_sd_model_name": "sd15"})
    data = path.read_bytes()
    upload_id = str(uuid.uuid4())

    def tool(name: str, **arguments) -> dict:
        response = requests.post(
            f"{http_server.url}/mcp/tool",
            json={"tool": name, "arguments": arguments},
            headers=http_server.headers,
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["result"]

    name, size = f"{LORA}.safetensors", len(data)
    tool("upload-lora-chunked-start", upload_id=upload_id, filename=name, total_size=size, chunk_size=size)
    tool("upload-lora-chunked-append", upload_id=upload_id, chunk=base64.b64encode(data).decode(), chunk_index=0)
    tool("upload-lora-chunked-finish", upload_id=upload_id)
    assert (http_server.workspace / "loras" / f"{LORA}.safetensors").read_bytes() == data
    return data


def get_lora(server: HttpServer, name: str, **headers: str) -> requests.Response:
    return requests.get(f"{server.url}/loras/{name}.safetensors", headers={**server.headers, **headers}, timeout=60)


def test_an_exported_lora_downloads_whole_and_by_range(http_server, lora):
    whole = get_lora(http_server, LORA)
    assert whole.status_code == 200, whole.text
    assert whole.content == lora
    assert whole.headers["content-type"] == "application/octet-stream"
    assert f'filename="{LORA}.safetensors"' in whole.headers["content-disposition"]
    assert whole.headers["accept-ranges"] == "bytes"

    first = get_lora(http_server, LORA, Range="bytes=0-99")
    assert first.status_code == 206
    assert first.content == lora[:100]
    assert first.headers["content-range"] == f"bytes 0-99/{len(lora)}"

    middle = get_lora(http_server, LORA, Range=f"bytes=1000-{len(lora) + 500}")  # past the end: cut at the end
    assert middle.status_code == 206 and middle.content == lora[1000:]

    suffix = get_lora(http_server, LORA, Range="bytes=-300")
    assert suffix.status_code == 206 and suffix.content == lora[-300:]

    beyond = get_lora(http_server, LORA, Range=f"bytes={len(lora)}-")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(lora)}"

    head = requests.head(f"{http_server.url}/loras/{LORA}.safetensors", headers=http_server.headers, timeout=60)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(lora)


def test_unknown_malformed_and_unauthenticated_downloads_are_refused(http_server, lora):
    assert_refused(get_lora(http_server, "no-such-lora"), 404, "list-exported-models")
    assert_refused(get_lora(http_server, "x..y"), 400, "'..'")
    assert_refused(get_lora(http_server, ".hidden"), 400, "hidden")
    # A run file beside loras/ is not reachable by climbing: '%2F' decodes to a '/' no name matches.
    assert get_lora(http_server, "..%2Fhttp-token").status_code in (400, 404)
    anonymous = requests.get(f"{http_server.url}/loras/{LORA}.safetensors", timeout=60)
    assert anonymous.status_code == 401 and lora[:100] not in anonymous.content
    assert_answering(http_server)


# --- POST /datasets/{name} -------------------------------------------------------------------------------
def test_a_good_zip_becomes_a_dataset_with_its_folders_and_captions(http_server):
    body = zipped(
        ("a.png", image_bytes()),
        ("a.txt", "xyz_cat sitting on a chair"),
        ("b.jpg", image_bytes("JPEG", seed=1)),
        ("b.txt", "xyz_cat on grass"),
        ("10_xyz_cat/c.webp", image_bytes("WEBP", seed=2)),
        ("10_xyz_cat/c.txt", "xyz_cat, close-up"),
        ("validation/d.png", image_bytes(seed=3)),
        ("__MACOSX/._a.png", b"resource fork"),
        (".DS_Store", b"finder"),
    )
    response = post_zip(http_server, "zip-good", body)
    files = outcomes(response)
    result = response.json()["result"]
    assert set(files) == {"a.png", "b.jpg", "10_xyz_cat/c.webp", "validation/d.png"}
    assert all(f["saved"] for f in files.values()), files
    assert files["a.png"]["width"] == 64 and files["a.png"]["captioned"] and not files["validation/d.png"]["captioned"]
    assert result["saved"] == 4 and result["refused"] == 0 and "create-training-config" in result["next_step"]

    folder = http_server.workspace / "datasets" / "zip-good"
    assert (folder / "a.png").read_bytes() == image_bytes()
    assert (folder / "a.txt").read_text() == "xyz_cat sitting on a chair"
    assert (folder / "10_xyz_cat" / "c.txt").read_text() == "xyz_cat, close-up"
    assert (folder / "validation" / "d.png").is_file()
    assert not (folder / "__MACOSX").exists() and not (folder / ".DS_Store").exists()
    assert not list((http_server.workspace / "datasets").glob(".upload-*")), "the temporary zip is left behind"

    listed = requests.post(
        f"{http_server.url}/mcp/tool", json={"tool": "list-datasets"}, headers=http_server.headers, timeout=60
    ).json()["result"]["datasets"]
    assert {"name": "zip-good", "images": 4, "captioned": 3}.items() <= next(
        d for d in listed if d["name"] == "zip-good"
    ).items()


def test_bad_entries_are_refused_one_by_one_and_nothing_lands_outside(http_server):
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3  # Unix: the mode in external_attr is read
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    good = image_bytes(seed=4)
    before = workspace_files(http_server)
    body = zipped(
        ("ok.png", good),
        ("ok.txt", "a fine caption"),
        ("../evil.png", good),
        ("10_cat/../../evil2.png", good),
        ("/abs.png", good),
        ("C:/drive.png", good),
        (link, b"/etc/passwd"),
        ("notes.pdf", b"%PDF-1.4"),
        ("lonely.txt", "a caption without its image"),
        ("fake.png", b"this is not a png"),
        ("cut.png", good[: len(good) // 2]),
        ("photo.png", image_bytes("JPEG", seed=5)),
    )
    response = post_zip(http_server, "zip-mixed", body)
    files = outcomes(response)
    assert files["ok.png"]["saved"] and files["ok.png"]["captioned"]
    reasons = {name: outcome["reason"] for name, outcome in files.items() if not outcome["saved"]}
    assert "'..'" in reasons["../evil.png"] and "'..'" in reasons["10_cat/../../evil2.png"]
    assert "absolute path" in reasons["/abs.png"] and "absolute path" in reasons["C:/drive.png"]
    assert "symbolic link" in reasons["link.png"]
    assert "not an image" in reasons["notes.pdf"]
    assert "without a same-named image" in reasons["lonely.txt"]
    assert "not an image Pillow can read" in reasons["fake.png"]
    assert "cannot be decoded fully" in reasons["cut.png"]
    assert "rename it to photo.jpg" in reasons["photo.png"]
    assert response.json()["result"]["refused"] == len(reasons) == 10

    folder = http_server.workspace / "datasets" / "zip-mixed"
    assert sorted(p.name for p in folder.rglob("*")) == ["ok.png", "ok.txt"]
    assert workspace_files(http_server) - before == {"datasets/zip-mixed/ok.png", "datasets/zip-mixed/ok.txt"}
    assert not Path("/abs.png").exists()
    assert_answering(http_server)


def test_a_zip_whose_every_entry_is_refused_is_422_and_creates_nothing(http_server):
    response = post_zip(http_server, "zip-all-bad", zipped(("../evil.png", image_bytes()), ("x.gif", b"GIF89a")))
    assert_refused(response, 422, "every file was refused")
    assert "../evil.png" in response.json()["error"]["message"]
    assert not (http_server.workspace / "datasets" / "zip-all-bad").exists()

    assert_refused(post_zip(http_server, "zip-empty", zipped()), 422, "holds no files")
    many = zipped(*((f"{index}.txt", b"") for index in range(20_001)))
    assert_refused(post_zip(http_server, "zip-many", many), 422, "more than 20000 entries")
    assert not (http_server.workspace / "datasets" / "zip-many").exists()
    assert not (http_server.workspace / "datasets" / "zip-empty").exists()
    assert_answering(http_server)


def test_a_zip_bomb_is_refused_without_unpacking_it(http_server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, megabytes in (("huge.png", 200), ("dense.png", 40)):  # over the 50 MB image limit; under it
            with archive.open(name, "w") as member:
                for _ in range(megabytes):
                    member.write(bytes(2**20))
        archive.writestr("ok.png", image_bytes(seed=6))
    body = buffer.getvalue()
    assert len(body) < 2**20  # 240 MB of zeros in well under a megabyte

    files = outcomes(post_zip(http_server, "zip-bomb", body))
    assert files["ok.png"]["saved"]
    assert "200.0 MB unpacked; the limit is 50 MB" in files["huge.png"]["reason"]
    assert "zip bomb" in files["dense.png"]["reason"] and not files["dense.png"]["saved"]
    sizes = [p.stat().st_size for p in http_server.workspace.rglob("*") if p.is_file()]
    assert max(sizes) < 10 * 2**20, "something large was unpacked"
    assert_answering(http_server)


def test_a_body_that_is_not_a_zip_is_400(http_server):
    assert_refused(post_zip(http_server, "zip-junk", os.urandom(5000)), 400, "not a zip file")
    assert_refused(post_zip(http_server, "zip-junk", b""), 400, "body is empty")
    damaged = bytearray(zipped(("a.png", image_bytes())))
    directory = damaged.rfind(b"PK\x01\x02")  # the central directory's first record
    damaged[directory : directory + 4] = b"XXXX"
    assert_refused(post_zip(http_server, "zip-junk", bytes(damaged)), 400, "damaged")
    form = requests.post(
        f"{http_server.url}/datasets/zip-junk",
        files={"file": ("d.zip", zipped(("a.png", image_bytes())))},
        headers=http_server.headers,
        timeout=60,
    )
    assert_refused(form, 400, "--data-binary")
    assert_refused(post_zip(http_server, "zip..junk", zipped(("a.png", image_bytes()))), 422, "not allowed")
    assert_refused(post_zip(http_server, "zip-junk", b"PK", query="?overwrite=maybe"), 400, "overwrite")
    assert not (http_server.workspace / "datasets" / "zip-junk").exists()
    assert not list((http_server.workspace / "datasets").glob(".upload-*"))
    assert_answering(http_server)


def test_an_existing_dataset_takes_a_zip_only_with_overwrite(http_server):
    first, second = image_bytes(seed=7), image_bytes(seed=8)
    assert outcomes(post_zip(http_server, "zip-again", zipped(("a.png", first), ("a.txt", "one"))))["a.png"]["saved"]
    folder = http_server.workspace / "datasets" / "zip-again"

    again = zipped(("a.png", second), ("a.txt", "two"), ("b.png", second))
    assert_refused(post_zip(http_server, "zip-again", again), 409, "overwrite=true")
    assert (folder / "a.png").read_bytes() == first and not (folder / "b.png").exists()

    files = outcomes(post_zip(http_server, "zip-again", again, query="?overwrite=true"))
    assert files["a.png"]["saved"] and files["b.png"]["saved"]
    assert (folder / "a.png").read_bytes() == second and (folder / "a.txt").read_text() == "two"

    # A zip is judged as an upload is: an image that would share an existing image's caption is refused.
    twin_zip = zipped(("a.jpg", image_bytes("JPEG")), ("c.png", first))
    twin = outcomes(post_zip(http_server, "zip-again", twin_zip, query="?overwrite=true"))
    assert "would share the caption file a.txt" in twin["a.jpg"]["reason"] and twin["c.png"]["saved"]
    assert_answering(http_server)


def test_other_clients_are_answered_while_a_zip_streams_in(http_server):
    body = zipped(("a.png", image_bytes(seed=9)), ("a.txt", "streamed"))
    answered = threading.Event()
    responses: list[requests.Response] = []

    def halves():
        yield body[: len(body) // 2]
        answered.wait(60)  # the second half only once another client has been answered
        yield body[len(body) // 2 :]

    upload = threading.Thread(target=lambda: responses.append(post_zip(http_server, "zip-streamed", halves())))
    upload.start()
    try:
        assert_answering(http_server)
    finally:
        answered.set()
        upload.join(120)
    assert outcomes(responses[0])["a.png"]["saved"]


def test_a_zip_over_the_dataset_limit_is_413(tmp_path):
    server = start_http_server(tmp_path / "small-limit", env={"LORA_MCP_MAX_DATASET_MB": "1"})
    try:
        too_big = os.urandom(2**20 + 1000)
        assert_refused(post_zip(server, "big", too_big), 413, "LORA_MCP_MAX_DATASET_MB")
        # Without a declared length (chunked): refused once the streamed bytes pass the limit.
        pieces = (too_big[i : i + 65536] for i in range(0, len(too_big), 65536))
        assert_refused(post_zip(server, "big", pieces), 413, "1 MB")
        assert not (server.workspace / "datasets" / "big").exists()
        assert not list((server.workspace / "datasets").glob(".upload-*"))
        # Under the limit as sent, over it unpacked (four letters' text deflates about 4:1, not a bomb's ratio).
        dense = random.Random(0).choices(b"ACGT", k=5 * 2**19)
        assert_refused(post_zip(server, "dense", zipped(("a.png", bytes(dense)))), 422, "over a dataset's limit")
        assert not (server.workspace / "datasets" / "dense").exists()
        assert_answering(server)
        small = zipped(("a.png", image_bytes()))
        assert outcomes(post_zip(server, "small", small))["a.png"]["saved"]
    finally:
        server.stop()
