"""The workload estimate: properties (hypothesis) and the named cases of the formula."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.estimate import (
    DEFAULT_PARAMS,
    DutyCycleSmoother,
    Ewma,
    LoadSnapshot,
    ThroughputMeter,
    estimate,
)

IDLE = LoadSnapshot(
    running_work=0.0,
    waiting_work=0.0,
    max_perf=100.0,
    online_perf=None,
    model_waiting=None,
    model_running=None,
    kv_cache_usage=None,
    gpu_util=None,
    gpu_memory_frac=None,
    in_flight=0,
)

# Anything a caller might pass, including garbage: the estimate must still be a number.
any_float = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1.0, math.inf, math.nan]),
)
sane_amount = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
maybe_amount = st.one_of(st.none(), sane_amount)
maybe_fraction = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0))


@st.composite
def snapshots(draw: st.DrawFn, floats: st.SearchStrategy[float | None] = any_float) -> LoadSnapshot:
    def num(strategy: st.SearchStrategy[float | None]) -> float:
        value = draw(strategy)
        return 0.0 if value is None else value

    return LoadSnapshot(
        running_work=num(floats),
        waiting_work=num(floats),
        max_perf=num(floats),
        online_perf=draw(floats),
        model_waiting=draw(floats),
        model_running=draw(floats),
        kv_cache_usage=draw(floats),
        gpu_util=draw(floats),
        gpu_memory_frac=draw(floats),
        in_flight=draw(st.integers(min_value=-5, max_value=10_000)),
        proxy_busy=draw(floats),
        service_time=draw(floats),
        mean_request_work=draw(floats),
    )


sane_snapshots = snapshots(
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
).map(
    lambda s: replace(
        s,
        kv_cache_usage=None if s.kv_cache_usage is None else min(s.kv_cache_usage, 1.0),
        gpu_util=None if s.gpu_util is None else min(s.gpu_util, 1.0),
        proxy_busy=None if s.proxy_busy is None else min(s.proxy_busy, 1.0),
        in_flight=max(s.in_flight, 0),
    )
)


def _finite_non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0.0


@given(snapshots())
def test_never_nan_negative_or_infinite(s: LoadSnapshot) -> None:
    e = estimate(s)
    for value in (e.utilisation, e.wait_seconds, e.capacity, e.hidden_work, e.pending_work):
        assert _finite_non_negative(value), e
    assert isinstance(e.stalled, bool)


@given(
    max_perf=st.one_of(st.just(0.0), sane_amount),
    online=maybe_amount,
    gpu=st.one_of(st.none(), st.floats(min_value=0.0, max_value=DEFAULT_PARAMS.gpu_noise)),
    memory=maybe_fraction,
    service_time=maybe_amount,
)
def test_zero_when_idle(
    max_perf: float, online: float | None, gpu: float | None, memory: float | None, service_time: float | None
) -> None:
    idle = replace(
        IDLE,
        max_perf=max_perf,
        online_perf=online,
        gpu_util=gpu,  # an idle GPU reads a few percent of noise at most
        gpu_memory_frac=memory,  # preallocated memory is not load
        model_waiting=0.0,
        model_running=0.0,
        kv_cache_usage=0.0,
        service_time=service_time,
    )
    e = estimate(idle)
    assert e.utilisation == 0.0
    assert e.wait_seconds == 0.0
    assert e.hidden_work == 0.0
    assert not e.stalled


@given(sane_snapshots, sane_amount, sane_amount)
def test_monotone_in_waiting_work(s: LoadSnapshot, a: float, b: float) -> None:
    low, high = sorted((a, b))
    e_low = estimate(replace(s, waiting_work=low))
    e_high = estimate(replace(s, waiting_work=high))
    assert e_high.utilisation >= e_low.utilisation
    assert e_high.wait_seconds >= e_low.wait_seconds


@given(sane_snapshots, sane_amount, sane_amount)
def test_monotone_in_model_queue(s: LoadSnapshot, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert estimate(replace(s, model_waiting=high)).utilisation >= estimate(replace(s, model_waiting=low)).utilisation


@given(sane_snapshots, st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_monotone_in_gpu_utilisation(s: LoadSnapshot, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert estimate(replace(s, gpu_util=high)).utilisation >= estimate(replace(s, gpu_util=low)).utilisation


@given(sane_snapshots, st.floats(0.0, 1e6), st.floats(0.0, 1.0))
def test_continuous_in_waiting_work(s: LoadSnapshot, work: float, delta: float) -> None:
    # Lipschitz: each unit of waiting work adds exactly 1 / (C * horizon) at most, so a small change
    # in the queue moves the estimate by a small amount, never a jump.
    e = estimate(replace(s, waiting_work=work))
    cap = e.capacity if e.capacity > 0 else 1.0
    slope = 1.0 / (max(cap, 1e-6) * DEFAULT_PARAMS.queue_horizon_s)
    moved = estimate(replace(s, waiting_work=work + delta)).utilisation - e.utilisation
    rounding = 1e-12 * max(1.0, e.utilisation)
    assert -rounding <= moved <= slope * delta * (1 + 1e-9) + rounding


@given(sane_snapshots, st.floats(0.0, 1.0), st.floats(-0.01, 0.01))
def test_continuous_in_gpu_utilisation(s: LoadSnapshot, gpu: float, delta: float) -> None:
    other = min(max(gpu + delta, 0.0), 1.0)
    u1 = estimate(replace(s, gpu_util=gpu)).utilisation
    u2 = estimate(replace(s, gpu_util=other)).utilisation
    rounding = 1e-12 * max(1.0, u1)
    # d(u)/d(gpu) <= 1 + tau / horizon, whatever the capacity (the hidden share is in capacity units).
    tau = s.service_time if s.service_time else DEFAULT_PARAMS.default_service_time_s
    bound = 1.0 + max(tau, 1e-3) / DEFAULT_PARAMS.queue_horizon_s
    assert abs(u2 - u1) <= bound * abs(other - gpu) * (1 + 1e-9) + rounding


def test_saturates_at_capacity_and_grows_with_waiting_work() -> None:
    base = replace(IDLE, max_perf=100.0, service_time=2.0)  # 200 units fill the server
    half = estimate(replace(base, running_work=100.0, in_flight=2))
    full = estimate(replace(base, running_work=200.0, in_flight=4))
    queued = estimate(replace(base, running_work=200.0, in_flight=4, waiting_work=500.0))
    assert half.utilisation == pytest.approx(0.5)
    assert full.utilisation == pytest.approx(1.0)
    # 500 units wait: 5 s of capacity, half the 10 s horizon.
    assert queued.utilisation == pytest.approx(1.5)
    assert queued.wait_seconds == pytest.approx(7.0)  # Vast's wait_time: all 700 units / 100 units/s


def test_work_beyond_what_the_server_holds_counts_as_waiting() -> None:
    # Forwarded at once (a parallel route) but four times what fits: the excess waits in the model.
    s = replace(IDLE, max_perf=100.0, service_time=1.0, running_work=400.0, in_flight=8)
    assert estimate(s).utilisation == pytest.approx(1.0 + 300.0 / (100.0 * 10.0))


def test_model_queue_means_saturated() -> None:
    s = replace(IDLE, running_work=10.0, in_flight=1, model_waiting=1.0, model_running=0.0, service_time=1.0)
    assert estimate(s).utilisation >= 1.0


def test_occupancy_counts_requests_when_the_mean_work_is_known() -> None:
    # Two long requests still running are the heavy ones; with the recent mean of 50 units, the
    # server is half full (2 of 4 slots), not full.
    s = replace(IDLE, max_perf=100.0, service_time=2.0, running_work=200.0, in_flight=2, mean_request_work=50.0)
    e = estimate(s)
    assert e.utilisation == pytest.approx(0.5)
    assert e.wait_seconds == pytest.approx(2.0)  # the wait still counts every unit


def test_hidden_work_from_the_model_servers_own_queue() -> None:
    # The proxy forwarded 2 requests; the model holds 6: 4 came another way.
    s = replace(
        IDLE, running_work=20.0, in_flight=2, model_running=4.0, model_waiting=2.0, mean_request_work=10.0
    )
    e = estimate(s)
    assert e.hidden_work == pytest.approx(40.0)
    assert e.pending_work == pytest.approx(60.0)
    assert e.utilisation > estimate(replace(s, model_running=2.0, model_waiting=0.0)).utilisation


def test_busy_gpu_with_empty_queue_is_hidden_work() -> None:
    s = replace(IDLE, max_perf=100.0, service_time=1.0, gpu_util=0.85, proxy_busy=0.0)
    e = estimate(s)
    assert e.hidden_work == pytest.approx(80.0)  # (0.85 - 0.05) of the 100 units in service at capacity
    assert e.utilisation == pytest.approx(0.8)
    assert not e.stalled


def test_busy_gpu_explained_by_our_requests_is_not_hidden() -> None:
    # A duty cycle reads ~1 whenever anything runs; our requests were in flight the whole window.
    s = replace(IDLE, running_work=10.0, in_flight=1, gpu_util=1.0, proxy_busy=1.0)
    assert estimate(s).hidden_work == 0.0


def test_idle_gpu_with_requests_in_flight_is_a_stall() -> None:
    s = replace(IDLE, running_work=10.0, in_flight=1, gpu_util=0.0, proxy_busy=1.0)
    assert estimate(s).stalled


@pytest.mark.parametrize(
    "change",
    [
        {"proxy_busy": 0.2},  # the request just arrived: the GPU window still shows the idle past
        {"gpu_util": None},  # no GPU: nothing to judge by
        {"gpu_util": 0.5},  # the GPU works
        {"in_flight": 0, "running_work": 0.0},  # nothing in flight
    ],
)
def test_not_a_stall(change: dict[str, object]) -> None:
    s = replace(IDLE, running_work=10.0, in_flight=1, gpu_util=0.0, proxy_busy=1.0)
    assert not estimate(replace(s, **change)).stalled  # type: ignore[arg-type]


def test_capacity_sources() -> None:
    assert estimate(replace(IDLE, max_perf=100.0)).capacity_source == "benchmark"
    blended = estimate(replace(IDLE, max_perf=100.0, online_perf=120.0))
    assert (blended.capacity, blended.capacity_source) == (110.0, "blended")
    # A stalled measurement cannot erase the benchmark, nor an outlier double it.
    assert estimate(replace(IDLE, max_perf=100.0, online_perf=1.0)).capacity == 75.0
    assert estimate(replace(IDLE, max_perf=100.0, online_perf=1e9)).capacity == 150.0
    assert estimate(replace(IDLE, max_perf=0.0, online_perf=40.0)).capacity == 40.0


def test_unknown_capacity_reports_zero_and_assumes_a_unit_per_second() -> None:
    e = estimate(replace(IDLE, max_perf=0.0, online_perf=None, running_work=3.0, in_flight=1))
    assert (e.capacity, e.capacity_source) == (0.0, "unknown")
    assert e.wait_seconds == pytest.approx(3.0)
    assert math.isfinite(e.utilisation)


def test_ewma_is_independent_of_the_sampling_rate() -> None:
    coarse, fine = Ewma(5.0), Ewma(5.0)
    coarse.update(0.0, 0.0)
    fine.update(0.0, 0.0)
    coarse.update(10.0, 1.0)
    for i in range(1, 101):
        fine.update(i * 0.1, 1.0)
    assert coarse.value == pytest.approx(1 - math.exp(-2.0))
    assert fine.value == pytest.approx(coarse.value)


def test_duty_cycle_smoother_averages_over_its_window() -> None:
    smoother = DutyCycleSmoother(window_s=10.0)
    assert smoother.update(0.0, 0.0) is None  # one reading anchors the timeline only
    for t in range(1, 11):
        smoother.update(float(t), 1.0 if t > 5 else 0.0)
    assert smoother.value_at(10.0) == pytest.approx(0.5)
    for t in range(11, 16):
        smoother.update(float(t), 1.0)
    assert smoother.value_at(15.0) == pytest.approx(1.0)  # the idle half left the window
    # A gap without readings is not averaged in as idle or busy.
    smoother.update(100.0, None)
    assert smoother.value_at(100.0) is None
    smoother.update(101.0, 0.25)
    assert smoother.value_at(101.0) == pytest.approx(0.25)


def test_throughput_meter_counts_only_backlogged_time() -> None:
    meter = ThroughputMeter(time_constant_s=1e9, min_busy_s=5.0)
    meter.served(0.0, 1000.0)  # light load: says nothing about capacity
    meter.set_backlogged(10.0, True)
    for t in range(11, 21):
        meter.served(float(t), 50.0)
    assert meter.rate(20.0) == pytest.approx(50.0)
    meter.set_backlogged(20.0, False)
    meter.served(25.0, 1000.0)  # ignored again
    assert meter.rate(100.0) == pytest.approx(50.0)  # idle time does not dilute it


def test_throughput_meter_waits_for_enough_backlogged_time() -> None:
    meter = ThroughputMeter(min_busy_s=5.0)
    meter.set_backlogged(0.0, True)
    meter.served(1.0, 10.0)
    assert meter.rate(2.0) is None
    assert meter.rate(6.0) == pytest.approx(10.0 / 6.0, rel=0.05)


def test_throughput_meter_forgets_old_capacity() -> None:
    meter = ThroughputMeter(time_constant_s=10.0, min_busy_s=1.0)
    meter.set_backlogged(0.0, True)
    for t in range(1, 101):
        meter.served(float(t), 100.0 if t <= 50 else 20.0)
    rate = meter.rate(100.0)
    # 100 units/s are e^-5 old; counting whole requests at their end adds a few percent.
    assert rate is not None and rate == pytest.approx(20.0, rel=0.1)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.floats(0.0, 100.0), st.one_of(st.none(), st.floats(-1.0, 2.0))), max_size=30))
def test_duty_cycle_smoother_stays_within_bounds(samples: list[tuple[float, float | None]]) -> None:
    smoother = DutyCycleSmoother(window_s=5.0)
    for t, v in sorted(samples, key=lambda x: x[0]):
        value = smoother.update(t, v)
        assert value is None or 0.0 <= value <= 1.0


def test_closed_loop_simulation_beats_gpu_utilisation_and_sees_a_stall() -> None:
    # A short run of bench/estimate_sim.py: a regression guard on the formula as a whole.
    from bench.estimate_sim import WARMUP, Scenario, after, constant, mae, simulate

    steady = simulate(Scenario("50%", constant(0.5)), seed=7)
    truth = after(steady, steady.truth, WARMUP)
    assert mae(after(steady, steady.smooth, WARMUP), truth) < mae(after(steady, steady.gpu, WARMUP), truth)
    assert not any(steady.stalled)

    stall = simulate(Scenario("stall", constant(0.5), stall=(150.0, 210.0)), seed=7)
    flagged = [t for t, stalled in zip(stall.t, stall.stalled, strict=True) if stalled]
    assert flagged and 150.0 <= flagged[0] <= 165.0
