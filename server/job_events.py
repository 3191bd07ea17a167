"""Job changes for the dashboard's event stream: the job monitor publishes, each open page reads its own copy.

The monitor (server/app.py) publishes a job's row when its fingerprint changes, in the same tick that notifies
MCP subscribers. Each reader (one per browser tab on GET /dashboard/events) gets its own bounded memory stream:
a tab that reads slowly loses its oldest events rather than holding up the monitor or the other tabs, and a row
carries the whole state of its job, so the newest one is all a late tab needs. Without readers (the stdio
server, or no tab open) publishing is never asked for: `listening` is false and the monitor builds no row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

# Events a reader may fall behind by before its oldest are dropped: a tick changes at most a few jobs, and a
# tab that is 64 changes behind is better served by the newest rows than by its backlog.
READER_BUFFER = 64


class JobEvents:
    """A broadcaster of events (name, JSON-ready data) to any number of readers; used from the event loop only."""

    def __init__(self) -> None:
        self._readers: dict[MemoryObjectSendStream, MemoryObjectReceiveStream] = {}

    @property
    def listening(self) -> bool:
        return bool(self._readers)

    def publish(self, event: str, data: Any) -> None:
        """Hand the event to every reader now, without waiting: a full reader drops its oldest event first."""
        for send, receive in list(self._readers.items()):
            try:
                send.send_nowait((event, data))
            except anyio.WouldBlock:
                receive.receive_nowait()  # the oldest: this reader has fallen READER_BUFFER events behind
                send.send_nowait((event, data))

    @contextmanager
    def reader(self) -> Iterator[MemoryObjectReceiveStream]:
        """A stream of (event, data) published from now on, until the `with` block ends."""
        send, receive = anyio.create_memory_object_stream[tuple[str, Any]](READER_BUFFER)
        self._readers[send] = receive
        try:
            yield receive
        finally:
            del self._readers[send]
            send.close()
            receive.close()
