"""The orchestrator's core policies (anyio only): retry, retry budget, breaker, balancer."""

from __future__ import annotations

import random
from collections import Counter

import anyio
import pytest

from app.core.balancer import Candidate, PowerOfTwoChoices, RoundRobin, make_balancer
from app.core.breaker import BreakerConfig, BreakerState, CircuitBreaker
from app.core.retry import RetryBudget, RetryPolicy

pytestmark = pytest.mark.anyio


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # a call, so that mypy does not narrow a property across awaits


def test_backoff_ceiling_doubles_up_to_the_cap_and_jitter_is_full() -> None:
    policy = RetryPolicy(max_attempts=6, base_seconds=0.1, max_seconds=0.5)
    assert [policy.ceiling(n) for n in range(2, 7)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert policy.delay(4, rng=lambda: 0.0) == 0.0
    assert policy.delay(4, rng=lambda: 0.5) == pytest.approx(0.2)
    delays = [policy.delay(5) for _ in range(2000)]
    assert 0 <= min(delays) < 0.05
    assert 0.45 < max(delays) <= 0.5
    assert policy.can_retry(5)
    assert not policy.can_retry(6)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


async def test_retry_budget_caps_retries_over_a_sliding_window() -> None:
    budget = RetryBudget(ratio=0.1, window_seconds=0.2, min_retries=1, clock=anyio.current_time)
    for _ in range(20):
        budget.record_call()
    # 1 + 10 % of 20 calls = 3 retries in this window
    assert [budget.try_spend() for _ in range(5)] == [True, True, True, False, False]
    assert budget.refused == 2
    await anyio.sleep(0.25)  # the window slides past everything
    assert budget.try_spend()


async def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    cfg = BreakerConfig(failure_threshold=3, min_calls=100, open_seconds=0.1)
    breaker = CircuitBreaker(cfg, clock=anyio.current_time)
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.try_acquire()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.try_acquire()
    await anyio.sleep(0.15)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.try_acquire()  # the one probe
    assert not breaker.try_acquire()
    breaker.record_failure()  # the probe failed: open again
    assert state(breaker) is BreakerState.OPEN
    await anyio.sleep(0.15)
    assert breaker.try_acquire()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.statistics().opened_count == 2


async def test_breaker_opens_on_failure_rate() -> None:
    cfg = BreakerConfig(failure_threshold=100, failure_rate=0.5, min_calls=10, window_seconds=60)
    breaker = CircuitBreaker(cfg, clock=anyio.current_time)
    for i in range(9):  # alternate: never 100 in a row, but half fail
        breaker.record_failure() if i % 2 else breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED  # 9 calls: under min_calls
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN


async def test_half_open_probe_given_back_when_unused() -> None:
    breaker = CircuitBreaker(
        BreakerConfig(failure_threshold=1, open_seconds=0.05), clock=anyio.current_time
    )
    breaker.record_failure()
    await anyio.sleep(0.06)
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.try_acquire()


def _cands(*loads: tuple[str, int]) -> list[Candidate]:
    return [Candidate(address=a, active=n, queued=0, capacity=10) for a, n in loads]


def test_power_of_two_choices_prefers_the_less_loaded_and_never_the_worst_of_three() -> None:
    balancer = PowerOfTwoChoices(random.Random(7))
    candidates = _cands(("a", 0), ("b", 5), ("c", 9))
    picks = Counter(balancer.choose(candidates).address for _ in range(3000))  # type: ignore[union-attr]
    assert set(picks) == {"a", "b"}  # c loses every pair it is in
    assert picks["a"] > picks["b"]
    assert balancer.choose([]) is None
    assert balancer.choose(candidates[:1]) == candidates[0]


def test_inflight_calls_count_as_load() -> None:
    busy = Candidate(address="a", active=0, queued=0, capacity=4, inflight=4)
    idle = Candidate(address="b", active=1, queued=0, capacity=4)
    assert busy.load > idle.load


def test_round_robin_cycles_by_address() -> None:
    balancer = make_balancer("round_robin")
    assert isinstance(balancer, RoundRobin)
    candidates = _cands(("b", 0), ("a", 0), ("c", 0))
    assert [balancer.choose(candidates).address for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("fastest")
