"""Tasks waiting for room, in line: by priority (highest first), then by arrival.

A slot that frees wakes one waiter, the first in line that can use it, not every waiter: with
hundreds of jobs waiting for a worker, waking all of them at each call's end cost each freed
slot hundreds of task switches and looks, for one winner. A change that may bring much room at
once (a new worker, a refreshed view) wakes them all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import anyio

K = TypeVar("K")


class _Place(Generic[K]):
    __slots__ = ("event", "what")

    def __init__(self, what: K) -> None:
        self.what = what
        self.event = anyio.Event()


class WaitingLine(Generic[K]):
    """Waiters by priority, each with what it waits for (`K`: what a slot must fit)."""

    def __init__(self) -> None:
        self._lines: dict[int, deque[_Place[K]]] = {}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    @contextmanager
    def place(self, priority: int, what: K, *, front: bool = False) -> Iterator[anyio.Event]:
        """Stand in line (at its front when `front`: one woken that found no room keeps its
        turn); the event is set when woken. Leaving the block leaves the line."""
        place = _Place(what)
        line = self._lines.setdefault(priority, deque())
        if front:
            line.appendleft(place)
        else:
            line.append(place)
        try:
            yield place.event
        finally:
            line.remove(place)
            if not line:
                del self._lines[priority]

    def wake_first(self, fits: Callable[[K], bool]) -> bool:
        """Wake the first waiter not woken yet whose `what` fits; True if there was one."""
        for priority in sorted(self._lines, reverse=True):
            for place in self._lines[priority]:
                if not place.event.is_set() and fits(place.what):
                    place.event.set()
                    return True
        return False

    def wake_all(self) -> None:
        """Wake every waiter."""
        for line in self._lines.values():
            for place in line:
                place.event.set()
