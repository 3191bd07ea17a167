"""Atomic writes and the workspace location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.workspace import append_line, atomic_output, atomic_write_json, workspace_dir


def test_atomic_output_replaces_only_when_complete(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "running"})
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text('{"state": "compl')  # a writer dying half-way
        raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"running"' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temporary left behind


def test_atomic_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_append_line_writes_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for i in range(3):
        append_line(path, f'{{"step": {i}}}')
    assert path.read_text().splitlines() == ['{"step": 0}', '{"step": 1}', '{"step": 2}']


def test_workspace_follows_lora_mcp_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_MCP_HOME", str(tmp_path / "ws"))
    assert workspace_dir() == (tmp_path / "ws").resolve()
    monkeypatch.delenv("LORA_MCP_HOME")
    assert workspace_dir().name == "lora-mcp" and isinstance(workspace_dir(), Path)
