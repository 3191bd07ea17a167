"""Files over HTTP against a real `lora-mcp http` process: an exported LoRA downloaded whole and by
Range, and datasets sent as a zip, with every bad zip refused file by file or whole, nothing written
outside the dataset, and a server that keeps answering."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import random
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import torch
import uvicorn
from PIL import Image
from safetensors.torch import save_file
from starlette.applications import Starlette

from http_server import HttpServer, start_http_server
from server.datasets import DatasetService
from server.http.files import file_routes

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


def test_entries_that_would_crash_the_unpacking_are_refused_one_by_one(http_server):
    good = image_bytes(seed=10)
    body = bytearray(
        zipped(
            ("ok.png", good),
            ("n" * 300 + ".png", good),  # a file name no file system takes (255 bytes at most)
            ("/".join(["d" * 200] * 3) + "/deep.png", good),  # parts that fit, a whole path that does not
            ("utf8name.png", good),
            ("Case.png", good),
            ("case.png", image_bytes(seed=11)),  # the same file as Case.png on macOS and Windows
            ("Pair.png", good),
            ("pair.jpg", image_bytes("JPEG", seed=12)),  # would share Pair.png's caption there
        )
    )
    # The local header of utf8name.png says its name is UTF-8, and the name is not (the directory's is).
    name_at = body.find(b"utf8name.png")
    header = name_at - 30
    assert body[header : header + 4] == b"PK\x03\x04"
    body[header + 7] |= 0x08  # general purpose flag bit 11: the name is UTF-8
    body[name_at] = 0xFF
    files = outcomes(post_zip(http_server, "zip-crashers", bytes(body)))

    assert files["ok.png"]["saved"] and files["Case.png"]["saved"] and files["Pair.png"]["saved"]
    assert "longer than 255 bytes" in files["n" * 300 + ".png"]["reason"]
    assert "longer than 512 bytes" in files["/".join(["d" * 200] * 3) + "/deep.png"]["reason"]
    assert "cannot be unpacked" in files["utf8name.png"]["reason"]
    assert "only in letter case" in files["case.png"]["reason"] and "Case.png" in files["case.png"]["reason"]
    assert "share the caption file" in files["pair.jpg"]["reason"]
    folder = http_server.workspace / "datasets" / "zip-crashers"
    assert sorted(p.name for p in folder.iterdir()) == ["Case.png", "Pair.png", "ok.png"]
    assert (folder / "Case.png").read_bytes() == good
    assert_answering(http_server)


def test_a_damaged_zip_structure_is_400_not_a_crash(http_server, monkeypatch):
    # zip64 end records are read (zipfile writes them from 65,535 entries on; here from 2), also with bytes
    # put before the zip as a self-extractor has.
    with monkeypatch.context() as patched:
        patched.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
        zip64 = zipped(("a.png", image_bytes(seed=13)), ("a.txt", "sixty-four"))
    assert b"PK\x06\x06" in zip64
    assert outcomes(post_zip(http_server, "zip-64", b"MZ" * 1000 + zip64))["a.png"]["captioned"]

    plain = zipped(("a.png", image_bytes(seed=13)))
    end = plain.rfind(b"PK\x05\x06")

    # A central directory record that asks for a newer unzipper ("zip file version 10.0").
    newer = bytearray(plain)
    record = newer.rfind(b"PK\x01\x02")
    newer[record + 6 : record + 8] = (100).to_bytes(2, "little")
    assert_refused(post_zip(http_server, "zip-broken", bytes(newer)), 400, "damaged")

    # A zip64 locator before the end record that says the zip spans two disks, the end record's fields
    # overflowed as zip64 writes them; and the same end record with no zip64 records before it.
    zip64_end = b"PK\x06\x06" + bytes(52)
    locator = b"PK\x06\x07" + (0).to_bytes(4, "little") + (0).to_bytes(8, "little") + (2).to_bytes(4, "little")
    overflowed = plain[end : end + 8] + b"\xff\xff\xff\xff" + plain[end + 12 : end + 16] + b"\xff\xff\xff\xff\x00\x00"
    disks = plain[:end] + zip64_end + locator + overflowed
    assert_refused(post_zip(http_server, "zip-broken", disks), 400, "spans 2 disks")
    assert_refused(post_zip(http_server, "zip-broken", plain[:end] + overflowed), 400, "zip64")
    assert not (http_server.workspace / "datasets" / "zip-broken").exists()
    assert_answering(http_server)


def test_a_zip_that_understates_its_entries_or_hides_a_bomb_in_many_is_refused_whole(http_server):
    many = bytearray(zipped(*((f"{index}.txt", b"") for index in range(20_001))))
    end = many.rfind(b"PK\x05\x06")
    many[end + 8 : end + 12] = (1).to_bytes(2, "little") * 2  # "1 entry", in both of the end record's counts
    assert_refused(post_zip(http_server, "zip-liar", bytes(many)), 422, "more than 20000 entries")

    # 110 entries of 1 MB of zeros each: each under the size from which one entry's ratio is judged.
    megabyte = bytes(2**20)
    bombs = zipped(*((f"{index}.png", megabyte) for index in range(110)), ("ok.png", image_bytes(seed=14)))
    assert len(bombs) < 2 * 2**20
    assert_refused(post_zip(http_server, "zip-bombs", bombs), 422, "zip bomb")
    assert not (http_server.workspace / "datasets" / "zip-bombs").exists()
    assert not (http_server.workspace / "datasets" / "zip-liar").exists()
    assert_answering(http_server)


def test_a_zip_of_1500_images_is_saved_whole(http_server):
    """Each image once checked the dataset's size by walking the whole folder, and listed its folder for
    same-stem images: quadratic, 91 s for 2,000 images. Now the folder is read once per upload."""
    entries = []
    for index in range(1500):
        folder = "" if index % 3 else "10_xyz_cat/"
        entries.append((f"{folder}{index:04d}.png", image_bytes(size=(8, 8), seed=index)))
        if index % 2:
            entries.append((f"{folder}{index:04d}.txt", f"caption {index}"))
    response = post_zip(http_server, "zip-many-images", zipped(*entries))
    result = response.json()["result"]
    assert response.status_code == 200 and result["saved"] == 1500 and result["refused"] == 0
    folder = http_server.workspace / "datasets" / "zip-many-images"
    assert len(list(folder.glob("*.png"))) == 1000 and len(list(folder.glob("10_xyz_cat/*.png"))) == 500
    assert (folder / "10_xyz_cat" / "0003.txt").read_text() == "caption 3"

    # Again with overwrite: every image replaces itself, none is taken for its own same-stem twin.
    again = post_zip(http_server, "zip-many-images", zipped(*entries[:300]), query="?overwrite=true")
    assert outcomes(again) and again.json()["result"]["saved"] == 200


def test_an_existing_dataset_is_refused_before_the_body_is_received(http_server):
    assert outcomes(post_zip(http_server, "zip-early", zipped(("a.png", image_bytes(seed=15)))))["a.png"]["saved"]
    connection = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=30)
    try:
        # 50 MB announced, none sent: an answer can only come before the body.
        connection.putrequest("POST", "/datasets/zip-early")
        for header, value in {**http_server.headers, "Content-Type": "application/zip"}.items():
            connection.putheader(header, value)
        connection.putheader("Content-Length", str(50 * 2**20))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 409
        assert "overwrite=true" in json.loads(response.read())["error"]["message"]
    finally:
        connection.close()
    assert not list((http_server.workspace / "datasets").glob(".upload-*"))


def test_uploads_a_killed_server_left_behind_are_swept(http_server):
    datasets = http_server.workspace / "datasets"
    datasets.mkdir(exist_ok=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_started = int(psutil.Process(gone.pid).create_time())
    gone.wait()
    me = f"{os.getpid()}-{int(psutil.Process().create_time())}"
    stale_zip = datasets / f".upload-{gone.pid}-{gone_started}-x1.zip"
    stale_zip.write_bytes(b"PK half a zip")
    stale_staging = datasets / f".staging-{gone.pid}-{gone_started}-x2"
    (stale_staging / "10_cat").mkdir(parents=True)
    (stale_staging / "10_cat" / "a.png").write_bytes(image_bytes())
    reused_pid = datasets / f".upload-{os.getpid()}-{int(psutil.Process().create_time()) - 3600}-x3.zip"
    reused_pid.write_bytes(b"the pid lives on in another process")
    old_unowned = datasets / ".upload-abcdefgh.zip"
    old_unowned.write_bytes(b"from before names carried a pid")
    os.utime(old_unowned, (time.time() - 7200, time.time() - 7200))
    live = [datasets / f".upload-{me}-x4.zip", datasets / f".staging-{me}-x5", datasets / ".upload-recent.zip"]
    live[0].write_bytes(b"being received")
    live[1].mkdir()
    live[2].write_bytes(b"from before names carried a pid, still being received")
    try:
        assert outcomes(post_zip(http_server, "zip-swept", zipped(("a.png", image_bytes()))))["a.png"]["saved"]
        assert not stale_zip.exists() and not stale_staging.exists()
        assert not reused_pid.exists() and not old_unowned.exists()
        assert all(path.exists() for path in live)
    finally:
        live[0].unlink()
        live[1].rmdir()
        live[2].unlink()


def test_a_fault_of_the_server_is_a_logged_json_500_and_leaves_no_new_dataset(tmp_path, caplog):
    """A real route over real HTTP on a dataset service whose second image save fails unexpectedly."""

    class FailingDatasets(DatasetService):
        saves = 0

        def _save_image(self, *args, **kwargs):
            FailingDatasets.saves += 1
            if FailingDatasets.saves == 2:
                raise RuntimeError("the disk controller fell over")
            return super()._save_image(*args, **kwargs)

    datasets = FailingDatasets(tmp_path)
    app = Starlette(routes=file_routes(SimpleNamespace(datasets=datasets, loras=SimpleNamespace(folder=tmp_path))))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.1)
        port = server.servers[0].sockets[0].getsockname()[1]
        body = zipped(("a.png", image_bytes()), ("b.png", image_bytes(seed=1)), ("c.png", image_bytes(seed=2)))
        with caplog.at_level(logging.ERROR, logger="server.http"):
            response = requests.post(f"http://127.0.0.1:{port}/datasets/faulty", data=body, timeout=60)
    finally:
        server.should_exit = True
        thread.join(30)
    assert_refused(response, 500, "RuntimeError: the disk controller fell over")
    assert "a new dataset was not created" in response.json()["error"]["message"]
    logged = [record for record in caplog.records if record.name == "server.http.files"]
    assert logged and logged[0].exc_info and "disk controller" in str(logged[0].exc_info[1])
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == []  # no dataset, staging or zip left
