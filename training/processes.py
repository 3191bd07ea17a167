"""Child processes the same way on Linux, macOS and Windows: started detached, recognised, stopped.

psutil answers the portable questions (does this pid still run our module, since when; its process
tree). What differs between platforms is only how a child is detached from the server and whether a
signal can ask it to stop: those two are the named branches below, and the only platform branches of
the server and the trainer (tests/test_portability.py keeps it that way). A graceful stop needs no signal anywhere:
the server writes the run directory's `stop-request` file, which every child checks after each step;
the signal is the fast path where one exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import suppress

import psutil

WINDOWS = sys.platform == "win32"
# psutil's create time on Linux is the boot time plus the process's start in clock ticks, and the boot
# time is re-read from the wall clock, whole seconds, at every read: an NTP step moves it by a second or
# more. A minute of slack still tells a reused pid, which would have to be taken by the same module
# within that minute; a live trainer must never read as dead (a resume would start a second one).
CREATE_TIME_SLACK_S = 60.0


def detached_options() -> dict:
    """Popen options that give a child its own process group: it survives the server (and a Ctrl-C in
    the server's console), and its group can be signalled as a whole."""
    if WINDOWS:  # no console window either: a server started by Claude Desktop has none to share
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}  # own session and process group


def interrupt_group(pid: int) -> None:
    """The fast path of a graceful stop: SIGTERM to the child's process group (it finishes its step
    and saves). Nothing on Windows, where no signal reaches a detached child (CTRL_BREAK needs a shared
    console): the stop-request file alone stops it there."""
    if WINDOWS:
        return
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)  # the child leads its own group (detached_options)


def create_time(pid: int) -> float | None:
    """When process `pid` started (unix time), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def runs_module(pid: int, module: str, created_at: float | None = None) -> bool:
    """Whether `pid` is a live (not zombie) process running `python -m <module>`, started at `created_at`
    when that was recorded: pids are reused (after a reboot, or by a busy machine), and a reused pid
    may even run Python."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        command = process.cmdline()
        started = process.create_time()
    except psutil.Error:  # gone, or another user's (AccessDenied): not a child this server's user started
        return False
    if created_at is not None and abs(started - created_at) >= CREATE_TIME_SLACK_S:
        return False
    return module in command


def kill_tree(pid: int) -> None:
    """Kill `pid` and every process it started (data loader workers), children first so none is left
    orphaned; the last step of a stop whose graceful part timed out."""
    try:
        parent = psutil.Process(pid)
        processes = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for process in processes:
        with suppress(psutil.Error):
            process.kill()

