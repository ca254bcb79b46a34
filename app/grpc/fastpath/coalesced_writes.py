"""One socket write per event-loop turn for a grpclib client connection.

grpclib's client writes to its transport at every step of a call: the HEADERS frame, then the
DATA frame, then each window update and ping ack, each one `send()` of its own. On the machines
we measured (a small VM) a loopback `send()` that wakes the peer costs 50-100 µs of CPU, a
third of the orchestrator's time per job. `CoalescedWrites` stands between grpclib's
connection and its transport: the bytes written during one turn of the event loop go out
together at the start of the next (asyncio's `call_soon`), so a call's headers and message,
and the calls started in the same turn, share one write. Nothing is reordered and nothing waits
longer than the turn; closing the connection writes what is pending first.

Flow control is unchanged: the real transport still pauses and resumes the protocol by its own
buffer, which sees every byte one turn later at most.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescedWrites(asyncio.Transport):
    """`transport` with the writes of one loop turn joined into one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self.writes = 0  # to the real transport
        self.chunks = 0  # handed to this one

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` for the write at the end of this loop turn."""
        if not data:
            return
        self.chunks += 1
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        """`write` each of them."""
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if not self._pending:
            return  # written by a close, or dropped by an abort, meanwhile
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self.writes += 1
            self._transport.write(data)

    def close(self) -> None:
        """Write what is pending, then close."""
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is pending, and abort."""
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        """The wrapped transport's."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The wrapped transport's."""
        return self._transport.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        """The wrapped transport's."""
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        """Write what is pending, then the EOF."""
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        """The real transport's buffer and what is pending."""
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The wrapped transport's."""
        self._transport.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        """The wrapped transport's."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """The wrapped transport's."""
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        """The wrapped transport's."""
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """The wrapped transport's."""
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The wrapped transport's."""
        return self._transport.get_protocol()
