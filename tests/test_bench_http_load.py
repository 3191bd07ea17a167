"""bench/http_load.py at toy size, so the HTTP load bench cannot rot: it starts a real `lora-mcp http`,
trains one run per condition with pollers calling over POST /mcp/tool, reads the server's RSS around a
burst of status calls, and writes every figure it reports. Only counts are checked, never times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_http_load_bench_runs_end_to_end(tmp_path, tiny_sd15):
    out = tmp_path / "http_load.json"
    # 80 steps: the window opens once status.json (rewritten every 2 s) shows step 1, ~2.3 s late at worst,
    # and still holds the 10 steps the bench needs at 33 ms a step or slower (~60 ms here).
    command = [
        *(sys.executable, str(REPO / "bench" / "http_load.py"), "--models", str(tiny_sd15.parent)),
        *("--runs", "1", "--steps", "80", "--warmup-steps", "0", "--pollers", "2", "--interval", "0.2"),
        *("--calls", "40", "--call-threads", "2", "--rss-warmup", "5", "--json", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert {condition: len(runs) for condition, runs in results["runs"].items()} == {"none": 1, "pollers": 1}
    for run in results["runs"]["none"] + results["runs"]["pollers"]:
        assert 10 <= run["steps"] <= 80 and run["step_s"] > 0
    assert results["poller_calls"] > 0
    assert results["rss"]["calls"] == 40 and results["rss"]["rss_before_mib"] > 0
    assert set(results["met"]) == {"poller_p95", "step_time", "rss"}
    assert "step time with pollers" in done.stdout and "RSS growth" in done.stdout
