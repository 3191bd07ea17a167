"""`lora-mcp`: the MCP server over stdio.

    lora-mcp [--workspace DIR]

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
    parser.add_argument(
        "--workspace", type=Path, help="workspace folder (default: $LORA_MCP_HOME, else the user data dir)"
    )
    args = parser.parse_args(argv)
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
