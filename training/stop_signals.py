"""SIGINT and SIGTERM as a trainer reads them: the first asks for a stop with a checkpoint, a second
interrupts at once.

The server writes the stop-request file and sends SIGTERM right after it, so a trainer that already read
the file must take that signal as the same first stop, not as a second one.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("training")


@contextmanager
def stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM calls `request_stop` (finish the step, save, end 'stopped'),
    a second raises KeyboardInterrupt. Off the main thread Python cannot take signals: nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def on_signal(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        request_stop()
        log.info("%s received: stopping after this step", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
