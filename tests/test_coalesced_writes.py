"""`CoalescedWrites` on a real loopback connection: the writes of one loop turn go out as one,
in order; a close writes what is pending first, an abort drops it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from app.grpc.fastpath.coalesced_writes import CoalescedWrites


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncio transports


Accepted = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[CoalescedWrites, asyncio.StreamReader]]:
    """A client transport, coalesced, and the server's reader of that connection."""
    accepted: asyncio.Queue[Accepted] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    assert isinstance(transport, asyncio.Transport)
    reader, writer = await asyncio.wait_for(accepted.get(), 5)
    try:
        yield CoalescedWrites(transport, loop), reader
    finally:
        transport.close()
        writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_the_writes_of_one_turn_go_out_as_one_in_order() -> None:
    async with connected() as (writes, reader):
        for part in (b"a", b"", b"bc", bytearray(b"d")):
            writes.write(part)
        writes.writelines([b"e", b"f"])
        assert writes.writes == 0  # nothing sent before the turn ends
        assert writes.get_write_buffer_size() == 6
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"abcdef"
        assert (writes.writes, writes.chunks) == (1, 5)
        writes.write(b"g")
        writes.close()  # what is pending goes first
        assert await asyncio.wait_for(reader.read(), 5) == b"g"
        assert writes.is_closing()


@pytest.mark.anyio
async def test_an_abort_drops_what_is_pending() -> None:
    async with connected() as (writes, reader):
        writes.write(b"lost")
        writes.abort()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert writes.writes == 0
