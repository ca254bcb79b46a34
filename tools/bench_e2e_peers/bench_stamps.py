"""The start stamp every benchmark job writes, and the reader that tails them.

Every system's no-op job calls `stamp(tag)` first: one line `<tag> <time.time()>` appended to the
file named by $BENCH_E2E_STAMPS with one O_APPEND write (atomic for a line this short, so the
processes and threads of one worker may share the file). The client tails the file to learn
when each job started (latency) and when all of a batch have run (throughput), the same way
for every system and without a Redis command. Stdlib only: it runs in every peer's venv.
"""

from __future__ import annotations

import os
import time

_fd: int | None = None


def stamp(tag: str) -> None:
    """Record that the job `tag` starts now."""
    global _fd
    now = time.time()
    if _fd is None:
        _fd = os.open(os.environ["BENCH_E2E_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{tag} {now:.6f}\n".encode())


class StampReader:
    """Tails a stamp file: `poll()` returns the (tag, start time) lines added since last time."""

    def __init__(self, path: str) -> None:
        # the worker may not have written yet: make the file so that it can be opened now
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        self._fd = os.open(path, os.O_RDONLY)
        self._rest = b""

    def poll(self) -> list[tuple[str, float]]:
        chunks = [self._rest]
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        out = []
        for line in data[:end].splitlines():
            tag, _, started = line.decode().partition(" ")
            out.append((tag, float(started)))
        return out

    def close(self) -> None:
        os.close(self._fd)
