"""`lora-mcp`: the MCP server over stdio, or a demo of it.

    lora-mcp [--workspace DIR]            serve MCP over stdio (what an MCP client starts)
    lora-mcp demo [--workspace DIR]       drive the whole flow against a fresh server, printing each step

Only protocol goes to stdout; logs go to stderr and to <workspace>/logs/server.log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-mcp", description="MCP server that trains LoRAs (stdio).")
    parser.add_argument("command", nargs="?", choices=["serve", "demo"], default="serve")
    parser.add_argument(
        "--workspace",
        type=Path,
        help="workspace folder (default: $LORA_MCP_HOME, else the user data dir; for demo: a new temporary one)",
    )
    parser.add_argument("--steps", type=int, default=60, help="demo only: training steps")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from server.demo import main as demo

        return demo(args.workspace, args.steps)
    if args.workspace:
        os.environ["LORA_MCP_HOME"] = str(args.workspace.expanduser().resolve())

    from training.workspace import workspace_dir

    workspace = workspace_dir()
    (workspace / "logs").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(workspace / "logs" / "server.log")],
    )
    from server.app import build_server

    build_server(workspace).run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
