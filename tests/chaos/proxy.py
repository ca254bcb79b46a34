"""A TCP proxy that breaks the network on demand: black hole, delay, reset.

It stands between a worker and whoever talks to it (the worker advertises the proxy's port), or
between a worker and Redis. It runs its own asyncio loop in a thread, as a test fixture may (the
application's rules on threads are for the application).

- `black_hole()`: nothing gets through either way until `heal()`; connections stay open, bytes
  wait (as TCP retransmits them) and go through once healed.
- `delay(seconds)`: every chunk is held that long before it goes on.
- `reset()`: every open connection is reset (RST) at once; new ones go through.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, faults on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.delay_seconds = 0.0
        self._open = asyncio.Event()  # cleared while black-holed (the proxy's loop's own)
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._serve, name="fault proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._open.set()
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            await self._open.wait()
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(OSError):
            dst.write_eof()

    def black_hole(self) -> None:
        self.black_holed = True

    def delay(self, seconds: float) -> None:
        self.delay_seconds = seconds

    def heal(self) -> None:
        self.delay_seconds = 0.0
        self._open = asyncio.Event()  # cleared while black-holed (the proxy's loop's own)

    def reset(self) -> None:
        """RST every open connection (SO_LINGER 0, then close)."""

        def rst() -> None:
            for pair in list(self._pairs):
                for w in pair:
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                    w.transport.abort()
            self._pairs.clear()
            done.set()

        done = threading.Event()
        self._loop.call_soon_threadsafe(rst)
        done.wait(5)

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                for w in pair:
                    w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)
        self._loop.close()
