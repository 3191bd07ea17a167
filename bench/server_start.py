"""Cold start of the MCP server, against a hello-world MCPServer with one trivial tool.

For each run a fresh process is spawned through the SDK's own `stdio_client`, the client does
`initialize` and `tools/list`, and the wall time is taken inside the client: the timer starts
before `stdio_client` is entered (so it includes spawn, interpreter start, imports, server
construction and the handshake) and stops when `list_tools` returns. The two servers alternate
(ours, hello, ours, hello, ...) after one discarded warm-up pair that fills the page cache.

    (a) ours  : python -m server.main --workspace <fresh temp dir>
    (b) hello : a one-tool MCPServer script written to a temp file, run with the same python

    python bench/server_start.py [--runs 10] [--warmup 1] [--no-breakdown]

Besides median and p90 per server and the ratio of medians (bound from the issue: ours at most
1.2x hello), it prints which heavy modules (torch, diffusers, transformers, peft) `import
server.app, server.main` pulls in, the import-only wall time of each server's modules, and the
modules our server imports that the hello-world does not, by self import time (-X importtime).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft")
BOUND = 1.2

HELLO = '''"""Hello-world MCP server (written by bench/server_start.py)."""
from mcp.server import MCPServer

server = MCPServer("hello")


@server.tool(name="hello", description="Say hello.")
def hello(name: str) -> str:
    return f"hello {name}"


if __name__ == "__main__":
    server.run("stdio")
'''

OUR_IMPORTS = "import server.app, server.main"
HELLO_IMPORTS = "from mcp.server import MCPServer"


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), linearly interpolated like numpy's default."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def time_start(params: StdioServerParameters, errlog) -> tuple[float, float, int]:
    """Seconds from spawn to `initialize` answered and to `tools/list` answered; tool count."""
    start = time.perf_counter()
    async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        initialized = time.perf_counter() - start
        tools = await session.list_tools()
        listed = time.perf_counter() - start
    return initialized, listed, len(tools.tools)


def heavy_modules() -> list[str]:
    code = f"import sys; {OUR_IMPORTS}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def in_process(code: str, runs: int) -> float:
    """Median seconds that `code` takes inside a fresh `python -c` (interpreter start and exit excluded)."""
    probe = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def importtime(code: str) -> dict[str, tuple[int, int]]:
    """module -> (self us, cumulative us) from one `python -X importtime -c code`."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stderr
    table = {}
    for line in err.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            table[match.group(4)] = (int(match.group(1)), int(match.group(2)))
    return table


def breakdown(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as workspace:
        build = f"from pathlib import Path; from server.app import build_server; build_server(Path({workspace!r}))"
        steps = [
            ("import mcp.server (the hello-world's imports)", HELLO_IMPORTS),
            ("import server.app, server.main", OUR_IMPORTS),
            ("import server.app + build_server(fresh workspace)", f"{OUR_IMPORTS}; {build}"),
        ]
        print(f"\ninside a fresh process, interpreter start and exit excluded (median of {runs}):")
        for label, code in steps:
            print(f"  {in_process(code, runs) * 1000:7.1f} ms  {label}")
    ours, hello = importtime(OUR_IMPORTS), importtime(HELLO_IMPORTS)
    extra = {name: times for name, times in ours.items() if name not in hello}
    total = sum(self_us for self_us, _ in extra.values())
    print(f"modules imported by our server and not by the hello-world: {len(extra)}, {total / 1000:.1f} ms self time")
    packages: dict[str, int] = {}
    for name, (self_us, _) in extra.items():
        packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0) + self_us
    print("  by top-level package (sum of self import times):")
    for name, self_us in sorted(packages.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {self_us / 1000:7.1f} ms  {name}")
    print("  single modules, by self import time:")
    for name, (self_us, _) in sorted(extra.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"    {self_us / 1000:7.1f} ms  {name}")
    shared = sorted(hello.items(), key=lambda kv: -kv[1][0])[:5]
    print("  for scale, the hello-world's own heaviest modules (self import time, shared by both servers):")
    for name, (self_us, _) in shared:
        print(f"    {self_us / 1000:7.1f} ms  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per server (alternating)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up pairs")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the import-time breakdown")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-start-"))
    hello_script = scratch / "hello_server.py"
    hello_script.write_text(HELLO, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    errlog = open(scratch / "servers.err", "w")  # noqa: SIM115 - kept open for every run
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "hello": []}
    tool_counts: dict[str, int] = {}

    def params(variant: str, index: int) -> StdioServerParameters:
        if variant == "hello":
            return StdioServerParameters(command=sys.executable, args=[str(hello_script)], cwd=str(scratch), env=env)
        workspace = scratch / f"ws-{index}"  # fresh, not created: the server makes it
        return StdioServerParameters(
            command=sys.executable,
            args=["-m", "server.main", "--workspace", str(workspace)],
            cwd=str(REPO),
            env=env,
        )

    async def measure() -> None:
        index = 0
        for run in range(-args.warmup, args.runs):
            for variant in ("ours", "hello"):
                index += 1
                initialized, listed, count = await time_start(params(variant, index), errlog)
                tool_counts[variant] = count
                label = "warm-up" if run < 0 else f"run {run + 1:2d}"
                print(
                    f"{label} {variant:5s}: initialize {initialized * 1000:7.1f} ms, "
                    f"tools/list {listed * 1000:7.1f} ms ({count} tools)",
                    flush=True,
                )
                if run >= 0:
                    results[variant].append((initialized, listed))

    try:
        anyio.run(measure)
    finally:
        errlog.close()

    print()
    medians = {}
    for variant in ("ours", "hello"):
        listed = [row[1] * 1000 for row in results[variant]]
        initialized = [row[0] * 1000 for row in results[variant]]
        medians[variant] = statistics.median(listed)
        print(
            f"{variant:5s} ({tool_counts[variant]:2d} tools): spawn -> tools/list median {medians[variant]:7.1f} ms, "
            f"p90 {percentile(listed, 90):7.1f} ms, min {min(listed):7.1f}, max {max(listed):7.1f} "
            f"(spawn -> initialize median {statistics.median(initialized):7.1f} ms)"
        )
    ratio = medians["ours"] / medians["hello"]
    verdict = "met" if ratio <= BOUND else "NOT met"
    print(f"ratio of medians ours/hello: {ratio:.3f}x (bound {BOUND}x: {verdict})")
    heavy = heavy_modules()
    print(f"heavy modules imported by '{OUR_IMPORTS}': {heavy if heavy else 'none'} (checked {', '.join(HEAVY)})")
    if not args.no_breakdown:
        breakdown(max(3, args.runs // 2))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
