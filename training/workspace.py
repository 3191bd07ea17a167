"""Where the trainer and the server keep their files, and how they write them.

One workspace directory holds everything: `models/` (the built-in model cache), `runs/`,
`datasets/`, ... It is `$LORA_MCP_HOME` when set, else the user data directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "lora-mcp"
# mkstemp/mkdtemp create private (0600/0700) entries; what we publish gets the usual modes.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def workspace_dir() -> Path:
    home = os.environ.get("LORA_MCP_HOME")
    path = Path(home).expanduser() if home else Path(platformdirs.user_data_dir(APP_NAME))
    return path.resolve()


def models_dir() -> Path:
    return workspace_dir() / "models"


def runs_dir() -> Path:
    return workspace_dir() / "runs"


def datasets_dir() -> Path:
    return workspace_dir() / "datasets"


def loras_dir() -> Path:
    return workspace_dir() / "loras"


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`.

    Writers (torch.save, safetensors, PIL, plain bytes) write the temporary file, which is
    fsynced and renamed onto `path` only when complete: same directory, same filesystem, so
    the rename is atomic and a reader (or a kill at any instant) never sees a torn file.
    On failure the temporary file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a .jsonl file written with append_line; none when it does not exist. A torn last
    line (a process killed during its write on a filesystem without atomic appends) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write(2) on an O_APPEND descriptor.

    A line of a few hundred bytes reaches the file whole or not at all even if the process
    is killed, so `metrics.jsonl` and `samples/index.jsonl` never hold a torn row.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
