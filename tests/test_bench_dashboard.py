"""bench/dashboard_bench.py's workspace at toy size, so the dashboard bench cannot rot: one real training through
a real `lora-mcp http`, copies recorded in the job table, one long metrics file. The browser half of the bench
is what tests/test_dashboard_browser.py tests; no time is measured or checked here."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("dashboard_bench", REPO / "bench" / "dashboard_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_bench_workspace_has_its_jobs_and_long_metrics(tmp_path, tiny_sd15):
    from server.app import open_services
    from server.dashboard_views import DashboardViews

    bench = load_bench()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    _, long_job = bench.build_workspace(workspace, Namespace(seed_steps=4, jobs=5, metric_steps=1200))

    views = DashboardViews(open_services(workspace))
    rows = views.jobs().jobs
    assert len(rows) == 5 and len({row.job_id for row in rows}) == 5
    assert {row.state for row in rows} == {"completed"}
    assert sum(row.job_id == long_job for row in rows) == 1
    for row in rows:  # each copy is a job of its own, in its own run directory, with the seed run's samples
        view = views.job(row.job_id)
        assert Path(view.status.run_dir).name == row.job_id
        samples = Path(view.status.run_dir) / "samples"
        assert view.samples and all((samples / cell.filename).is_file() for cell in view.samples)
    long = views.job(long_job)
    assert long.metrics.total_points == 1200 and long.row.step == long.row.total_steps == 1200
    assert long.metrics.validation_steps[-1] == 1200 and len(long.metrics.validation_steps) == 1200 // 250 + 1
