"""The orchestrator's core policies: retry, retry budget, breaker, balancer, in virtual time."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.core.balancer import Candidate, PowerOfTwoChoices, RoundRobin, make_balancer
from app.core.breaker import BreakerConfig, BreakerState, CircuitBreaker
from app.core.clock import ManualClock
from app.core.retry import RetryBudget, RetryPolicy


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


def test_retry_budget_caps_retries_over_a_sliding_window() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.1, window_seconds=10, min_retries=1, clock=clock)
    for _ in range(20):
        budget.record_call()
    # 1 + 10 % of 20 calls = 3 retries in this window
    assert [budget.try_spend() for _ in range(5)] == [True, True, True, False, False]
    assert budget.refused == 2
    clock.advance(9.9)  # still inside the window
    assert not budget.try_spend()
    clock.advance(0.2)  # the window slides past everything: only the floor is left
    assert [budget.try_spend() for _ in range(2)] == [True, False]


def test_retry_budget_forgets_calls_past_its_window_without_retries() -> None:
    # a healthy fleet: one first attempt per job and never a retry (the orchestrator kept every
    # job's call time for good, ~35 bytes a job)
    clock = ManualClock()
    budget = RetryBudget(ratio=0.2, window_seconds=10, clock=clock)
    for _ in range(100_000):
        budget.record_call()
        clock.advance(0.01)  # 100 jobs a second
    assert budget.held <= 1_001  # the window's 10 s of calls, not every call ever recorded
    # the window's calls still pay for retries: 3 + 20 % of 1,000
    assert sum(budget.try_spend() for _ in range(300)) == 203


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = ManualClock()
    cfg = BreakerConfig(failure_threshold=3, min_calls=100, open_seconds=5)
    breaker = CircuitBreaker(cfg, clock=clock)
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.try_acquire()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.try_acquire()
    clock.advance(4.9)
    assert state(breaker) is BreakerState.OPEN
    clock.advance(0.1)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.try_acquire()  # the one probe
    assert not breaker.try_acquire()
    breaker.record_failure()  # the probe failed: open again
    assert state(breaker) is BreakerState.OPEN
    clock.advance(5)
    assert breaker.try_acquire()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.statistics().opened_count == 2


def test_breaker_opens_on_failure_rate() -> None:
    cfg = BreakerConfig(failure_threshold=100, failure_rate=0.5, min_calls=10, window_seconds=60)
    breaker = CircuitBreaker(cfg, clock=ManualClock())
    for i in range(9):  # alternate: never 100 in a row, but half fail
        breaker.record_failure() if i % 2 else breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED  # 9 calls: under min_calls
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN


def test_failures_older_than_the_window_no_longer_count() -> None:
    clock = ManualClock()
    cfg = BreakerConfig(failure_threshold=100, failure_rate=0.5, min_calls=4, window_seconds=30)
    breaker = CircuitBreaker(cfg, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    clock.advance(31)  # those three slide out of the window
    breaker.record_failure()
    for _ in range(3):
        breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED  # 1 failure in 4 calls
    assert breaker.statistics().window_calls == 4


def test_half_open_probe_given_back_when_unused() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, open_seconds=5), clock=clock)
    breaker.record_failure()
    clock.advance(5)
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


def test_a_late_success_does_not_cut_the_open_period_short() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, open_seconds=5), clock=clock)
    assert breaker.try_acquire()  # a call let through while CLOSED ...
    breaker.record_failure()  # ... another one fails and opens it
    breaker.record_success()  # the first one's success arrives late
    assert state(breaker) is BreakerState.OPEN
    clock.advance(5)
    assert breaker.try_acquire()  # the probe, after the full open period
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
