"""The one "log once, back off" helper, on a clock moved by hand."""

from __future__ import annotations

import logging

import pytest

from app.core.clock import ManualClock
from app.core.outage import Outage, OutageState

log = logging.getLogger("app.test.outage")


def test_an_outage_is_logged_once_backs_off_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.test.outage")
    clock = ManualClock()
    outage = Outage("Redis", log=log, clock=clock, min_delay=1, max_delay=5, meanwhile="serving")
    assert outage.state is OutageState.UNKNOWN
    assert outage.due()
    assert not outage.succeeded()  # a first success ends nothing
    delays = [outage.failed(ConnectionError("refused")) for _ in range(5)]
    assert delays == [1, 2, 4, 5, 5]
    assert outage.statistics().state is OutageState.DOWN
    assert not outage.due()
    clock.advance(4.9)
    assert not outage.due()
    clock.advance(0.1)
    assert outage.due()
    assert outage.succeeded(detail="re-registered")
    assert outage.failed(OSError("gone")) == 1  # a new outage starts from the bottom again
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Redis unreachable (ConnectionError: refused); serving; retrying with backoff up to 5s",
        "Redis reachable again after 5 failed attempt(s) over 5.0s: re-registered",
        "Redis unreachable (OSError: gone); serving; retrying with backoff up to 5s",
    ]
    stats = outage.statistics()
    assert (stats.state, stats.failures, stats.outages) == (OutageState.DOWN, 6, 2)


def test_bad_delays_are_refused() -> None:
    with pytest.raises(ValueError, match="min_delay"):
        Outage("x", log=log, clock=ManualClock(), min_delay=0)
    with pytest.raises(ValueError, match="min_delay"):
        Outage("x", log=log, clock=ManualClock(), min_delay=6, max_delay=5)
