"""Files over HTTP, so a remote client moves gigabytes as bytes rather than as base64 through the chat:

    GET /loras/{name}.safetensors       an exported LoRA (a name list-exported-models shows), streamed;
                                        Range gives 206 with the part, an unsatisfiable one 416; HEAD too
    POST /datasets/{name}[?overwrite=true]
                                        a zip of images and captions (the raw body), saved to the dataset
                                        file by file as upload-dataset saves images; answers its report

The body of a zip upload goes to a hidden temporary file in <workspace>/datasets/ (never into memory),
refused with 413 once it passes a dataset's size limit (LORA_MCP_MAX_DATASET_MB); the dataset service
then judges the zip's entries (server/dataset_zip.py) and the images, in a worker thread. A failure
has the JSON API's error shape: 400 for a body that cannot be taken (not a zip, a form upload, a bad
query), 404 for an unknown LoRA, 409 when the workspace's state refuses the call (the dataset exists and
overwrite is not set: answered before the body is received), 422 for a dataset name that cannot be taken
and when every file of the zip was refused, 500 (logged with its traceback) for a fault of the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import BinaryIO

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from server.dataset_zip import NotAZip
from server.errors import ServiceError, WorkspaceStateError
from server.http.access import error_response
from server.image_checks import MAX_DATASET_BYTES
from server.limits import MB
from server.names import checked_name, plain_filename_problem
from server.tools import Services

LORA_SUFFIX = ".safetensors"
# The body reaches the temporary file in writes of 4 MB, each in a worker thread: the event loop only
# gathers the network's chunks (about 64 KB each) and keeps answering other clients.
WRITE_BYTES = 4 * MB
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
log = logging.getLogger(__name__)


def file_routes(services: Services) -> list[Route]:
    async def download_lora(request: Request) -> Response:
        name = request.path_params["name"]
        if problem := plain_filename_problem(name + LORA_SUFFIX):
            return error_response(
                400,
                f"the LoRA name {name!r} is not allowed: its file name {problem}; use a name that "
                "list-exported-models shows",
            )
        path = services.loras.folder / f"{name}{LORA_SUFFIX}"
        if not await anyio.to_thread.run_sync(path.is_file):
            return error_response(
                404,
                f"there is no exported LoRA named {name!r}: list-exported-models lists them (export-model adds one)",
            )
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    async def upload_dataset_zip(request: Request) -> Response:
        name = request.path_params["name"]
        overwrite = request.query_params.get("overwrite", "").strip().lower()
        if overwrite not in _TRUE + _FALSE:
            return error_response(
                400, f"overwrite={overwrite!r} is not understood: give overwrite=true, or leave it out"
            )
        if request.headers.get("content-type", "").startswith("multipart/"):
            return error_response(
                400,
                "the zip must be the request's whole body, not a form field: e.g. curl --data-binary @dataset.zip "
                "-H 'Content-Type: application/zip' <url>",
            )
        try:
            checked_name("dataset", name)  # before the body: a name that cannot be taken wastes no upload
        except ServiceError as exc:
            return error_response(422, str(exc))
        try:
            return await _upload_zip(services, request, name, overwrite in _TRUE)
        except Exception as exc:  # a fault of the server's: the client gets the JSON API's shape, the log the cause
            log.exception("POST /datasets/%s failed", name)
            return error_response(
                500,
                f"the server failed while taking the zip ({type(exc).__name__}: {exc}); a new dataset was not "
                "created, an existing one keeps the files saved before the fault (list-datasets shows it). The "
                "server's log has the details: send the zip again, and report the error if it happens again",
            )

    return [
        Route("/loras/{name}" + LORA_SUFFIX, download_lora, methods=["GET", "HEAD"]),
        Route("/datasets/{name}", upload_dataset_zip, methods=["POST"]),
    ]


async def _upload_zip(services: Services, request: Request, name: str, overwrite: bool) -> Response:
    """Receive the zip into a temporary file and hand it to the dataset service; the response either way."""
    try:
        # Before the body: a dataset that cannot take the zip wastes no upload (checked again under its lock).
        await anyio.to_thread.run_sync(services.datasets.zip_target, name, overwrite)
    except WorkspaceStateError as exc:
        return error_response(409, str(exc))
    fd, body = await anyio.to_thread.run_sync(services.datasets.new_upload_file)
    try:
        with os.fdopen(fd, "wb") as file:
            refusal = await _receive(request, file)
        if refusal is not None:
            return refusal
        result = await anyio.to_thread.run_sync(services.datasets.upload_zip, name, body, overwrite)
    except NotAZip as exc:
        return error_response(400, str(exc))
    except WorkspaceStateError as exc:
        return error_response(409, str(exc))
    except ServiceError as exc:
        return error_response(422, str(exc))
    finally:
        with contextlib.suppress(OSError):
            body.unlink()
    return JSONResponse({"result": result.model_dump(mode="json")})


async def _receive(request: Request, file: BinaryIO) -> Response | None:
    """Write the request's body to `file`; an error response when it cannot be taken, else None."""
    too_big = error_response(
        413,
        f"the zip is over a dataset's size limit of {MAX_DATASET_BYTES / MB:.0f} MB (LORA_MCP_MAX_DATASET_MB on "
        "the server): split the images over several zips sent to the same dataset with overwrite=true",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_DATASET_BYTES:
        return too_big
    received = 0
    pending = bytearray()
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_DATASET_BYTES:
                return too_big
            pending += chunk
            if len(pending) >= WRITE_BYTES:
                await anyio.to_thread.run_sync(file.write, bytes(pending))
                pending.clear()
        if not received:
            return error_response(400, "the body is empty: send the zip file's bytes as the request's body")
        await anyio.to_thread.run_sync(file.write, bytes(pending))
    except ClientDisconnect:
        return error_response(400, "the client went away before sending the whole zip: send it again")
    except OSError as exc:
        return error_response(
            507, f"the server could not store the zip ({exc.strerror or exc}): free disk space, then send it again"
        )
    return None
