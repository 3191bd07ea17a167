"""The web dashboard in headless Chromium: first render of a job page and live status changes (issue 16).

The workspace (fresh, temporary) holds 100 jobs, one of which has a 10,000-step metrics file:
1. One real job: an 8-image synthetic dataset in <workspace>/datasets/shapes (2 held out for validation) and a
   config of the built-in tiny SD 1.x model (64 px, batch 2, rank 4, --seed-steps steps, two test prompts plus
   the control prompt sampled every 10 steps), trained through POST /mcp/tool of a real `lora-mcp http`.
2. 99 more made the way the workspace records a finished job: the run directory copied to runs/<new job id>
   and a `completed` row added to the job table (training.jobs.store.JobStore, state.db), created a minute
   apart. The newest copy's metrics.jsonl is rewritten with --metric-steps step rows in the trainer's row
   format (training/trainer.py `_record_step`; the real run's rows give the `files` field), a validation row
   and a `lora_update` row every 250 steps (training/run_evidence.py; the real run's update row is the
   template), and its status.json says it ran that many steps. Then the server is restarted on the workspace.

Measured in headless Chromium (tests/browser.py's Debian chromium + chromedriver), logged in through the form:
- first render: --repeats loads of the 10,000-step job's page, from navigation start to the moment
  `#job[data-rendered="1"]` appears (performance.now() in the page, read by a MutationObserver that Chromium
  installs before the page's own scripts), with one more step row appended to the run's metrics before each
  load (the server then rebuilds the view's parts, as for every load of a running job's page) and unchanged (its
  cached parts); the jobs page's first row likewise. Bound: under 1 s.
- status change: a blocker job trains (so a started job waits queued), the jobs page is open in one browser and,
  in a second browser, the page of the job under test. Per repeat, each action after a random pause of up to a
  monitor tick (so that actions meet the tick at any phase): start-training of a small config through
  POST /mcp/tool (time to its new row on the jobs page), then stop-training of that queued job (a change the
  job table makes at once: time to its row's `data-state="stopped"` and to the job page's
  `#job[data-state="stopped"]`). Times run from just before the POST to the page's Date.now() when the
  observer saw it (one clock: the same machine). The server's job monitor looks every MONITOR_SECONDS (1 s)
  (server/app.py), so about 0.5 s of each figure is waiting for the tick. Bound: within 2 s.

    python bench/dashboard_bench.py [--repeats 10] [--models DIR] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from bench.http_load import Api, bench_workspace, stop_server, wait_for  # noqa: E402
from http_server import HttpServer, start_http_server  # noqa: E402

from server.app import MONITOR_SECONDS  # noqa: E402
from training.jobs.store import JobStore  # noqa: E402
from training.run_files import RunFiles  # noqa: E402
from training.workspace import atomic_write_text  # noqa: E402

BOUND_RENDER_MS = 1000.0
BOUND_CHANGE_MS = 2000.0
JOBS = 100
SEED_CONFIG, BLOCKER_CONFIG, PROBE_CONFIG = "bench-seed", "bench-blocker", "bench-probe"
TRIGGER = "xyz_shape"
EVIDENCE_EVERY = 250  # steps between validation / lora_update rows in the long metrics file
STEP_S = 0.07  # its step time: the tiny model's at 64 px on this machine (bench/step_time.py)
PAGE_WAIT_S = 60

# Installed by Chromium before any of the page's scripts (Page.addScriptToEvaluateOnNewDocument: the page's CSP
# does not apply to it). It notes when the first render is done and when `window.__bench.check()` (set by the
# bench before it causes a change) first returns something.
OBSERVER = """
window.__bench = {check: null, seen: null};
new MutationObserver(function () {
  var b = window.__bench;
  if (b.render === undefined && document.querySelector('#job[data-rendered="1"]')) b.render = performance.now();
  if (b.rows === undefined && document.querySelector('#jobs tr[data-job-id]')) b.rows = performance.now();
  if (b.check && b.seen === null) {
    var hit = b.check();
    if (hit) b.seen = {at: Date.now(), what: hit};
  }
}).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
"""


# --- the workspace ---------------------------------------------------------------------------------------------
def create_config(api: Api, dataset: Path, name: str, steps: int, **options) -> None:
    api.call(
        "create-training-config",
        {
            "name": name,
            "model_name": "builtin:tiny-sd15",
            "dataset_path": str(dataset),
            "trigger_word": TRIGGER,
            "resolution": 64,
            "batch_size": 2,
            "rank": 4,
            "steps": steps,
            **options,
        },
    )


def train_seed_job(api: Api, dataset: Path, steps: int) -> dict:
    """The one real job: trained to completion with samples, validation and a checkpoint; its final status."""
    prompts = [f"{TRIGGER} a red circle", f"{TRIGGER} a blue square"]
    create_config(
        api, dataset, SEED_CONFIG, steps, test_prompts=prompts, sample_every=10, sample_steps=2,
        validation_split=0.25, validation_every=10, save_every=steps,
    )
    job_id = api.call("start-training", {"config_name": SEED_CONFIG})["job_id"]
    final = wait_for(api, job_id, lambda s: s["state"] == "completed", 900, "the seed job's end")
    print(f"seed job {job_id} completed: {final['step']} steps", flush=True)
    return final


def clone_jobs(workspace: Path, seed: dict, count: int) -> list[str]:
    """`count` completed copies of the seed job, recorded as the job table records jobs; their ids, newest last."""
    store = JobStore(workspace / "state.db")
    record = store.get(seed["job_id"])
    source = Path(record.run_dir)
    start = record.created_at - 60 * (count + 1)  # older than the seed job, a minute apart
    duration = record.finished_at - record.started_at
    ids = []
    for index in range(count):
        created = start + 60 * index
        job_id = f"{SEED_CONFIG}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(created))}-{index:04x}"
        run_dir = workspace / "runs" / job_id
        shutil.copytree(source, run_dir)
        status = json.loads((run_dir / "status.json").read_text())
        status.update({k: v.replace(str(source), str(run_dir)) for k, v in status.items() if isinstance(v, str)})
        atomic_write_text(run_dir / "status.json", json.dumps(status))
        fields = {"created_at": created, "started_at": created + 1, "finished_at": created + 1 + duration}
        store.insert(record.model_copy(update={"job_id": job_id, "run_dir": str(run_dir), **fields}))
        ids.append(job_id)
    return ids


def step_row(step: int, steps: int, files: list[str]) -> dict:
    """A step row as training/trainer.py `_record_step` writes it: a loss falling with noise, a warm-up lr."""
    progress = min(1.0, step / steps)
    loss = 0.05 + 0.1 * (1 - progress) ** 2 + 0.04 * abs(((step * 7919) % 1000) / 1000 - 0.5)
    return {"step": step, "loss": loss, "lr": 1e-4 * min(1.0, step / 100), "grad_norm": 0.5 + 0.3 * (1 - progress),
            "step_time": STEP_S, "time": time.time() - (steps - step) * STEP_S, "files": files}


def write_long_metrics(run_dir: Path, steps: int) -> int:
    """Replace the run's metrics.jsonl with `steps` step rows (plus evidence rows) in the trainer's format; its
    status.json then reports that many steps. The file's size in bytes."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    files = next(row["files"] for row in rows if "kind" not in row)
    update = next(row for row in rows if row.get("kind") == "lora_update")
    lines = []
    for step in range(1, steps + 1):
        row = step_row(step, steps, files)
        loss, progress = row["loss"], step / steps
        lines.append(json.dumps(row, sort_keys=True))
        if step % EVIDENCE_EVERY == 0 or step == steps:
            validation = 0.07 + 0.08 * (1 - progress) ** 2
            lines.append(json.dumps({"kind": "validation", "step": step, "loss": validation, "images": 2,
                                     "train_loss": loss, "gap": validation - loss}, sort_keys=True))
            lines.append(json.dumps({**update, "step": step}, sort_keys=True))
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "metrics.jsonl", text)
    status = json.loads((run_dir / "status.json").read_text())
    status.update(step=steps, total_steps=steps)
    atomic_write_text(run_dir / "status.json", json.dumps(status))
    return len(text.encode())


def build_workspace(workspace: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """The bench's workspace (module docstring, step 1-2), with no server left running on it: the dataset and
    the id of the job with the long metrics file."""
    from training.data.synthetic import make_shape_dataset

    dataset = workspace / "datasets" / "shapes"  # inside the workspace: the server only reads folders it may use
    make_shape_dataset(dataset, 8, trigger_word=TRIGGER)
    server = start_http_server(workspace)
    try:
        seed = train_seed_job(Api(server), dataset, args.seed_steps)
    finally:
        stop_server(server)
    ids = clone_jobs(workspace, seed, args.jobs - 1)
    size = write_long_metrics(workspace / "runs" / ids[-1], args.metric_steps)
    print(f"{len(ids) + 1} jobs; {ids[-1]} has {args.metric_steps} steps of metrics ({size / 1e6:.1f} MB)", flush=True)
    return dataset, ids[-1]


# --- the browsers ----------------------------------------------------------------------------------------------
def open_browser(stack: ExitStack, server: HttpServer, profile: Path):
    """A headless Chromium with the observer installed, logged in through the form."""
    from browser import start_chrome
    from selenium.webdriver.common.by import By

    driver = start_chrome(profile)
    stack.callback(driver.quit)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": OBSERVER})
    driver.get(f"{server.url}/")
    form = wait_until(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "form#login"), "the login form")[0]
    form.find_element(By.CSS_SELECTOR, "input[name=token]").send_keys(server.token)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_until(driver, lambda: driver.execute_script("return window.__bench.rows"), "the jobs page after login")
    return driver


def wait_until(driver, condition, what: str, timeout: float = PAGE_WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    raise RuntimeError(f"no {what} within {timeout} s; console errors: {errors}")


def first_renders(driver, url: str, key: str, repeats: int, before=lambda: None) -> list[float]:
    """ms from navigation start to the observer's `key` mark, over `repeats` fresh loads of `url` (each after
    `before()`)."""
    times = []
    for _ in range(repeats):
        before()
        driver.get(url)
        times.append(wait_until(driver, lambda: driver.execute_script(f"return window.__bench.{key}"), key))
    return times


def arm(driver, check: str) -> None:
    """Watch for `check` (a JS expression: what the change shows, or a falsy value) from now on."""
    driver.execute_script(f"window.__bench.seen = null; window.__bench.check = function () {{ return {check}; }};")


def seen_after(driver, since_ms: float, what: str) -> float:
    """ms from `since_ms` (epoch) until the armed check was seen."""
    seen = wait_until(driver, lambda: driver.execute_script("return window.__bench.seen"), what)
    return seen["at"] - since_ms


def status_changes(api: Api, jobs_page, job_page, server: HttpServer, repeats: int) -> tuple[dict, dict]:
    """Per repeat: a queued job started (its new row on the jobs page), then stopped (its row and its page). The
    times (ms) to each page, and how long the POSTs themselves took (part of those times)."""
    out: dict[str, list[float]] = {"new row (jobs page)": [], "stopped (jobs page)": [], "stopped (job page)": []}
    calls: dict[str, list[float]] = {"start-training": [], "stop-training": []}
    # Each change waits for the monitor's next tick. The bench acts right after seeing the last change, that is
    # right after a tick, so without a random pause every change would meet the tick at the same phase.
    phase = random.Random(16)
    for _ in range(repeats):
        known = json.dumps(jobs_page.execute_script(
            "return [...document.querySelectorAll('#jobs tr[data-job-id]')].map((tr) => tr.dataset.jobId)"))
        arm(jobs_page, f"[...document.querySelectorAll('#jobs tr[data-job-id]')].map((tr) => tr.dataset.jobId)"
                       f".find((id) => !{known}.includes(id))")
        time.sleep(phase.uniform(0, MONITOR_SECONDS))
        sent = time.time() * 1000
        job_id = api.call("start-training", {"config_name": PROBE_CONFIG})["job_id"]
        calls["start-training"].append(time.time() * 1000 - sent)
        out["new row (jobs page)"].append(seen_after(jobs_page, sent, f"{job_id}'s row"))
        if api.call("get-training-status", {"job_id": job_id})["state"] != "queued":
            raise RuntimeError(f"{job_id} is not queued behind the blocker job: is the blocker still running?")
        job_page.get(f"{server.url}/dashboard/jobs/{job_id}")
        # rendered, and its event stream open (the page opens it after the first render): a change before that
        # would reach the page only with its next one
        wait_until(job_page, lambda: job_page.execute_script(
            "return window.__bench.render && document.querySelector('#live').dataset.state === 'live'"),
            f"{job_id}'s page, live")
        arm(jobs_page, f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"][data-state=\"stopped\"]')")
        arm(job_page, "document.querySelector('#job[data-state=\"stopped\"]')")
        time.sleep(phase.uniform(0, MONITOR_SECONDS))
        sent = time.time() * 1000
        api.call("stop-training", {"job_id": job_id})
        calls["stop-training"].append(time.time() * 1000 - sent)
        out["stopped (jobs page)"].append(seen_after(jobs_page, sent, f"{job_id}'s row stopped"))
        out["stopped (job page)"].append(seen_after(job_page, sent, f"{job_id}'s page stopped"))
    return out, calls


def measure(server: HttpServer, dataset: Path, long_job: str, scratch: Path, args: argparse.Namespace) -> dict:
    api = Api(server)
    with ExitStack() as stack:
        jobs_page = open_browser(stack, server, scratch / "profile-jobs")
        job_page = open_browser(stack, server, scratch / "profile-job")
        # The server rebuilds a job view's metrics and findings only when the run's files change (dashboard_views
        # PartsCache): a running job's page is rebuilt each time, as one more step row before each load does here.
        files = RunFiles(server.workspace / "runs" / long_job)
        more = iter(range(args.metric_steps + 1, args.metric_steps + args.repeats + 1))
        long_url = f"{server.url}/dashboard/jobs/{long_job}"
        renders = {
            f"job page, {args.metric_steps:,} steps, one more step before each load": first_renders(
                job_page, long_url, "render", args.repeats,
                lambda: files.append_metric(step_row(next(more), args.metric_steps, []))),
            f"job page, {args.metric_steps:,} steps, unchanged (cached parts)": first_renders(
                job_page, long_url, "render", args.repeats),
            f"jobs page, {args.jobs} jobs": first_renders(jobs_page, f"{server.url}/", "rows", args.repeats),
        }
        # the job page's last load above is the long job's: how many raw loss points its chart drew
        points = job_page.execute_script("return document.querySelector('#loss-chart').dataset.points")
        create_config(api, dataset, BLOCKER_CONFIG, 100_000, disable_sampling=True, save_every=100_000)
        create_config(api, dataset, PROBE_CONFIG, 20, disable_sampling=True)
        blocker = api.call("start-training", {"config_name": BLOCKER_CONFIG})["job_id"]
        try:
            wait_for(api, blocker, lambda s: s["state"] == "running", 300, "the blocker job running")
            changes, calls = status_changes(api, jobs_page, job_page, server, args.repeats)
        finally:
            api.call("stop-training", {"job_id": blocker})
    return {"renders": renders, "chart_points": int(points), "changes": changes, "calls": calls}


def report(results: dict) -> dict:
    print()
    print("| measurement | repeats | median (ms) | max (ms) | bound (ms) | met |")
    print("|---|---|---|---|---|---|")
    verdicts = {}
    for group, bound in (("renders", BOUND_RENDER_MS), ("changes", BOUND_CHANGE_MS)):
        for name, times in results[group].items():
            met = max(times) < bound
            verdicts[name] = met
            print(f"| {name} | {len(times)} | {statistics.median(times):.0f} | {max(times):.0f} | < {bound:.0f} | "
                  f"{'met' if met else 'NOT met'} |")
    print(f"\nloss chart of the long job: {results['chart_points']} raw points drawn")
    for tool, times in results["calls"].items():
        print(f"{tool} POST /mcp/tool (included above): median {statistics.median(times):.0f} ms, max {max(times):.0f}")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="page loads / status changes per measurement")
    parser.add_argument("--jobs", type=int, default=JOBS, help="jobs in the workspace (one trained, the rest copies)")
    parser.add_argument("--metric-steps", type=int, default=10_000, help="steps in the long metrics file")
    parser.add_argument("--seed-steps", type=int, default=30, help="steps of the one real training")
    parser.add_argument("--models", type=Path, help="an already built models folder to link into the workspace")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args()

    scratch, workspace = bench_workspace("bench-dashboard-", args.models)
    try:
        dataset, long_job = build_workspace(workspace, args)
        server = start_http_server(workspace)  # a fresh server: its monitor meets the 100 jobs at start-up
        try:
            results = measure(server, dataset, long_job, scratch, args)
        finally:
            stop_server(server)
    finally:
        if args.keep:
            print(f"workspace kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    verdicts = report(results)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), **results, "met": verdicts}, indent=2, default=str))


if __name__ == "__main__":
    main()
