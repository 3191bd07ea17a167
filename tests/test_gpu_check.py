"""bench/gpu_check.py in its CPU mode, so the script a lent GPU machine runs cannot rot: every check is in
the report, the tiny runs that a CPU can do complete with finite losses, and the CUDA-only ones say why
they were skipped."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_its_tiny_parts_on_a_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(report_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "LORA_MCP_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    checks = report["checks"]
    assert set(checks) == {
        "tiny_fp32",
        "tiny_fp16",
        "tiny_bf16",
        "tiny_low_vram",
        "tiny_flux_8bit",
        "tiny_adamw8bit",
        "full_size_sd15_unet_512px",
    }
    for name in ("tiny_fp32", "tiny_fp16", "tiny_bf16", "tiny_low_vram"):
        check = checks[name]
        assert check["status"] == "ok", (name, check)
        assert len(check["losses"]) == 4 and all(math.isfinite(loss) for loss in check["losses"])
        assert check["lora_bytes"] > 0
    assert checks["full_size_sd15_unet_512px"] == {"status": "skipped", "reason": "CUDA only (860 M parameters)"}
    assert checks["tiny_adamw8bit"]["status"] == "skipped" and "bitsandbytes" in checks["tiny_adamw8bit"]["reason"]
    assert report["torch"] and report["python"]
