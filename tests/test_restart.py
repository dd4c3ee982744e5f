"""Tests for supervisor.restart: backoff sequence, jitter bounds, reset after a long ready stretch, give-up."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.restart import BackoffSettings, RestartPolicy


def policy(**overrides: float) -> RestartPolicy:
    base = {"jitter": 0.0, "max_failures": 0}
    base.update(overrides)
    return RestartPolicy(BackoffSettings(**base), random.Random(1234))  # type: ignore[arg-type]


def test_defaults_match_the_design() -> None:
    s = BackoffSettings()
    assert (s.initial, s.factor, s.maximum, s.jitter, s.reset_after, s.max_failures) == (1.0, 2.0, 60.0, 0.1, 600.0, 5)


def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    p = policy()
    delays = [p.on_failure(now=float(i)).delay for i in range(10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_jitter_stays_within_ten_percent_and_is_reproducible() -> None:
    a = policy(jitter=0.1)
    b = policy(jitter=0.1)
    bases = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]
    delays = [a.on_failure(float(i)).delay for i in range(len(bases))]
    assert delays == [b.on_failure(float(i)).delay for i in range(len(bases))]  # same seed, same delays
    for delay, base in zip(delays, bases):
        assert base * 0.9 <= delay <= min(60.0, base * 1.1)
    assert any(delay != base for delay, base in zip(delays, bases)), "jitter must actually vary the delay"


def test_jitter_spreads_a_fleet() -> None:
    delays = {RestartPolicy(BackoffSettings(), random.Random(seed)).delay(3) for seed in range(20)}
    assert len(delays) > 10
    assert all(3.6 <= d <= 4.4 for d in delays)


def test_failures_reset_after_ready_for_reset_after() -> None:
    p = policy()
    for i in range(3):
        p.on_failure(float(i))
    p.on_ready(now=100.0)
    decision = p.on_failure(now=700.0)  # ready for exactly 600 s
    assert decision.failures == 1 and decision.delay == 1.0


def test_failures_not_reset_after_a_short_ready_stretch() -> None:
    p = policy()
    for i in range(3):
        p.on_failure(float(i))
    p.on_ready(now=100.0)
    decision = p.on_failure(now=699.0)  # ready for 599 s only
    assert decision.failures == 4 and decision.delay == 8.0


def test_leaving_ready_ends_the_healthy_stretch() -> None:
    p = policy()
    for i in range(3):
        p.on_failure(float(i))
    p.on_ready(now=100.0)
    p.on_not_ready()  # unhealthy at some point: the stretch does not count any more
    decision = p.on_failure(now=10_000.0)
    assert decision.failures == 4


def test_a_failure_ends_the_ready_stretch() -> None:
    p = policy()
    p.on_ready(now=0.0)
    assert p.on_failure(now=10.0).failures == 1
    # No on_ready since: a later failure, however late, must not reset.
    assert p.on_failure(now=5_000.0).failures == 2


def test_give_up_after_max_failures_without_ready() -> None:
    p = policy(max_failures=5)
    decisions = [p.on_failure(float(i)) for i in range(5)]
    assert [d.give_up for d in decisions] == [False, False, False, False, True]
    assert all(d.delay > 0 for d in decisions[:4])
    assert decisions[-1].delay == 0.0
    assert decisions[-1].failures_since_ready == 5


def test_reaching_ready_resets_the_give_up_count() -> None:
    p = policy(max_failures=5)
    for i in range(4):
        assert not p.on_failure(float(i)).give_up
    p.on_ready(now=10.0)
    decisions = [p.on_failure(20.0 + i) for i in range(5)]
    assert [d.give_up for d in decisions] == [False, False, False, False, True]
    # The backoff counter is not reset by a short ready stretch, only the give-up count is.
    assert decisions[0].failures == 5 and decisions[0].failures_since_ready == 1


def test_max_failures_zero_never_gives_up() -> None:
    p = policy(max_failures=0, jitter=0.1)
    for i in range(1000):
        decision = p.on_failure(float(i))
        assert not decision.give_up
        assert 0.0 <= decision.delay <= 60.0
    assert decision.failures == decision.failures_since_ready == 1000


def test_very_long_crash_loop_does_not_overflow() -> None:
    # 2.0 ** n overflows a float past n = 1023: a server crash-looping for ~17 h at the 60 s cap must
    # still get its 60 s delay, not an OverflowError that kills the supervisor.
    p = policy(max_failures=0)
    assert p.delay(1025) == 60.0
    assert p.delay(10**6) == 60.0
    assert policy(initial=0.0).delay(10**6) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.0, 100.0),
    factor=st.floats(1.0, 10.0),
    maximum=st.floats(0.0, 1000.0),
    jitter=st.floats(0.0, 1.0),
    failures=st.integers(0, 5000),
    seed=st.integers(0, 2**32),
)
def test_delay_never_negative_nor_above_maximum(
    initial: float, factor: float, maximum: float, jitter: float, failures: int, seed: int
) -> None:
    p = RestartPolicy(BackoffSettings(initial=initial, factor=factor, maximum=maximum, jitter=jitter),
                      random.Random(seed))
    delay = p.delay(failures)
    assert 0.0 <= delay <= maximum


@settings(max_examples=50, deadline=None)
@given(
    events=st.lists(st.tuples(st.sampled_from(["fail", "ready", "not_ready"]), st.floats(0.0, 1000.0)),
                    max_size=60),
    max_failures=st.integers(0, 6),
)
def test_give_up_exactly_when_consecutive_failures_reach_the_limit(
    events: list[tuple[str, float]], max_failures: int
) -> None:
    p = RestartPolicy(BackoffSettings(max_failures=max_failures), random.Random(0))
    now = 0.0
    since_ready = 0
    for kind, step in events:
        now += step
        if kind == "ready":
            p.on_ready(now)
            since_ready = 0
        elif kind == "not_ready":
            p.on_not_ready()
        else:
            since_ready += 1
            decision = p.on_failure(now)
            assert decision.failures_since_ready == since_ready
            assert decision.give_up is (max_failures > 0 and since_ready >= max_failures)
            assert 0.0 <= decision.delay <= 60.0
            assert decision.failures >= 1
