"""Choosing a worker: small strategy objects over a list of candidates.

Pure (no I/O, randomness injected). `PowerOfTwoChoices` samples two random candidates and takes
the less loaded, so that many orchestrators with the same stale view of the fleet do not all
pile onto the one worker that looks emptiest; `RoundRobin` is the simple alternative.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

import msgspec


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """A worker that may take a job, with the load it reported plus our own calls in flight."""

    address: str
    active: int
    queued: int
    capacity: int
    inflight: int = 0

    @property
    def load(self) -> float:
        """Work per unit of capacity: (running + waiting + ours on the way) / capacity."""
        return (self.active + self.queued + self.inflight) / max(1, self.capacity)


class LoadBalancer(Protocol):
    """Picks a worker for a job; `name` is the `orchestrator.balancer` value that selects it."""

    name: str

    def choose(self, candidates: Sequence[Candidate]) -> Candidate | None:
        """One of `candidates`, or None when there are none."""
        ...


class PowerOfTwoChoices:
    """Least loaded of two candidates picked at random (ties go to the first pick)."""

    name = "p2c"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate | None:
        """The less loaded of two distinct random candidates (the only one; None for none)."""
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return b if b.load < a.load else a


class RoundRobin:
    """Each candidate in turn, by address order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Candidate]) -> Candidate | None:
        """The next candidate in address order; None when there are none.

        The turn is a count of calls, not an address: when the candidates change it may skip or
        repeat one.
        """
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda c: c.address)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return chosen


def make_balancer(name: str, rng: random.Random | None = None) -> LoadBalancer:
    """The balancer named `name` (`p2c` or `round_robin`); ValueError for any other."""
    if name == "p2c":
        return PowerOfTwoChoices(rng)
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown balancer {name!r} (p2c or round_robin)")
