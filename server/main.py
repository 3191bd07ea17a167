"""`lora-mcp`: the MCP server over stdio or HTTP, its HTTP token, or a demo of it.

    lora-mcp [serve] [--workspace DIR]    serve MCP over stdio (what an MCP client starts)
    lora-mcp http [--host H] [--port P]   serve MCP Streamable HTTP at /mcp, the guide's JSON API at /mcp/tool
                                          and the file routes, behind a bearer token
    lora-mcp token [--rotate]             print the HTTP token (creating it when missing), or replace it
    lora-mcp demo [--workspace DIR]       drive the whole flow against a fresh server, printing each step

Only protocol goes to stdout while serving stdio; logs go to stderr and to <workspace>/logs/server.log
(rotated at 10 MB, three old ones kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

LOG_FILE_BYTES = 10 * 2**20


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        from server.demo import main as demo

        return demo(args.workspace, args.steps)
    if args.workspace:
        os.environ["LORA_MCP_HOME"] = str(args.workspace.expanduser().resolve())

    from training.workspace import workspace_dir

    workspace = workspace_dir()
    if args.command == "token":
        return show_token(workspace, rotate=args.rotate)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), log_file(workspace)],
    )
    if args.command == "http":
        return serve_http(workspace, args)
    from server.app import build_server

    build_server(workspace).run("stdio")
    return 0


def log_file(workspace: Path) -> logging.Handler:
    """<workspace>/logs/server.log, rotated at LOG_FILE_BYTES into server.log.1 .. .3, so a server that runs for
    months keeps at most 40 MB of log."""
    (workspace / "logs").mkdir(parents=True, exist_ok=True)
    return RotatingFileHandler(workspace / "logs" / "server.log", maxBytes=LOG_FILE_BYTES, backupCount=3,
                               encoding="utf-8")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-mcp", description="MCP server that trains LoRAs (stdio or HTTP).")
    p.add_argument("command", nargs="?", choices=["serve", "http", "token", "demo"], default="serve")
    p.add_argument(
        "--workspace",
        type=Path,
        help="workspace folder (default: $LORA_MCP_HOME, else the user data dir; for demo: a new temporary one)",
    )
    http = p.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    http.add_argument("--port", type=int, default=8190, help="port (default 8190, the guide's; 0: any free port)")
    http.add_argument("--no-auth", action="store_true", help="no token (loopback only; how the guide's samples run)")
    http.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address clients use to reach this server (repeatable); other Host/Origin headers get 421/403",
    )
    http.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM): serve https")
    http.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM) of --ssl-certfile")
    p.add_argument("--rotate", action="store_true", help="token only: replace the token with a new one")
    p.add_argument("--steps", type=int, default=60, help="demo only: training steps")
    return p


def serve_http(workspace: Path, args: argparse.Namespace) -> int:
    from server.http.access import Exposure, ExposureRefused
    from server.http.app import HttpOptions, serve

    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path is not None and not path.is_file():
            print(f"lora-mcp http: {flag} {path} is not a file", file=sys.stderr)
            return 2
    if args.ssl_keyfile and not args.ssl_certfile:
        print("lora-mcp http: --ssl-keyfile needs --ssl-certfile", file=sys.stderr)
        return 2
    exposure = Exposure(
        host=args.host,
        port=args.port,
        auth=not args.no_auth,
        allowed_hosts=tuple(args.allowed_host),
        tls=args.ssl_certfile is not None,
    )
    try:
        return serve(workspace, HttpOptions(exposure, args.ssl_certfile, args.ssl_keyfile))
    except ExposureRefused as exc:
        print(f"lora-mcp http: refused: {exc}", file=sys.stderr)
        return 2


def show_token(workspace: Path, *, rotate: bool) -> int:
    """Print the HTTP token on stdout (where it comes from on stderr), creating it when missing."""
    from server.http.access import TOKEN_ENV, ExposureRefused, existing_token, write_new_token

    try:
        found = existing_token(workspace)
    except ExposureRefused as exc:  # a token file others may read: --rotate replaces it with an owner-only one
        if not rotate:
            print(f"lora-mcp token: refused: {exc}", file=sys.stderr)
            return 2
        found = None
    if found and found[1] != str(workspace / "http-token") and rotate:
        print(f"lora-mcp token: the token comes from {TOKEN_ENV}; change it there", file=sys.stderr)
        return 2
    if rotate or found is None:
        workspace.mkdir(parents=True, exist_ok=True)
        token = write_new_token(workspace)
        print(f"lora-mcp token: new token written to {workspace / 'http-token'} (owner-only); running "
              "servers require it from their next request on", file=sys.stderr)
    else:
        token, where = found
        print(f"lora-mcp token: from {where}", file=sys.stderr)
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
