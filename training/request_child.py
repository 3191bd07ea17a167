"""One request answered in a short-lived child process, for a process that must not import torch,
diffusers or transformers: the MCP server, which lives as long as the client and would otherwise hold
their ~1 GB of memory (and a CUDA context) beside the training jobs.

The contract, both ends of which are here: `python -m <module>` reads the request as a JSON object on
stdin (the keyword arguments of the module's function) and writes its result as a JSON object on
stdout. A refusal, an error the request itself causes (a file that is not a LoRA, a model that is not
here), is `{"refusal": message}` and exit code 2, so the parent raises it with the same text as the
function would have; anything else is exit code 1 with the traceback on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

REFUSED = 2
# Popen's creationflags for a short-lived child: no console window on Windows, where the server (started by
# a chat app) has none to share and each child would open its own; 0 (nothing) elsewhere.
NO_CONSOLE_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)
_STDERR_LINES = 5  # of a crashed child's traceback, in the parent's error: the exception and its context
# A conversion, merge or checkpoint read takes seconds; a child silent for this long is stuck, and tool
# calls wait for it.
CHILD_TIMEOUT_S = 600.0


class RequestRefused(Exception):
    """The child refused the request; the message is the function's own."""


class RequestChildFailed(RuntimeError):
    """The child crashed (a bug or no memory, not the request): its exit code and last lines say why."""


def run_request(module: str, *, timeout_s: float = CHILD_TIMEOUT_S, **request: Any) -> dict:
    """Run `python -m <module>` on `request` and return its result (blocks until the child ends, at most
    `timeout_s`: the caller may be holding up others)."""
    # Library chatter (loading bars, optional-backend notices) is noise in a crashed child's stderr.
    env = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", module],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env={**env, **os.environ},
            timeout=timeout_s,
            creationflags=NO_CONSOLE_WINDOW,
        )
    except subprocess.TimeoutExpired:  # subprocess.run kills the child before raising
        raise RequestChildFailed(f"python -m {module} gave no answer within {timeout_s:g} s: stopped") from None
    tail = "\n".join(done.stderr.strip().splitlines()[-_STDERR_LINES:]) or "no output"
    try:
        reply = json.loads(done.stdout) if done.returncode in (0, REFUSED) else None
    except ValueError:  # something else wrote to stdout
        reply = None
    if done.returncode == REFUSED and isinstance(reply, dict) and "refusal" in reply:
        raise RequestRefused(reply["refusal"])
    if not isinstance(reply, dict):
        raise RequestChildFailed(f"python -m {module} failed (exit code {done.returncode}): {tail}")
    return reply


def serve_request(handle: Callable[..., dict], refusals: tuple[type[Exception], ...]) -> int:
    """The child's end: `handle(**request)` for the request on stdin, its result on stdout; an error of
    a `refusals` type is a refusal (exit code 2). Returns the exit code."""
    request = json.loads(sys.stdin.read())
    reply, sys.stdout = sys.stdout, sys.stderr  # a library's print() must not corrupt the reply
    try:
        result, code = handle(**request), 0
    except refusals as exc:
        result, code = {"refusal": str(exc)}, REFUSED
    json.dump(result, reply)
    reply.flush()
    return code
