"""The workload estimate: one honest number for how loaded this worker is, from one snapshot.

This module owns the formula (pure, no I/O, no clock) and the small pure meters that prepare its
inputs over time (`Ewma`, `DutyCycleSmoother`, `ThroughputMeter`; each takes `now` as an argument).

The queue leads; the GPU corrects. GPU utilisation is a duty cycle that reads high under any load, and
the memory of preallocating servers never falls (DESIGN.md, anchors §4.2), so neither is used as the
load itself. The work the proxy knows about is the base; the model server's own queue and the GPU only
add work the proxy cannot see, and flag a GPU that sits idle while requests are in flight.

Units: work in workload units (the backend's formula, Vast's `workload`), capacity in units/s.

    C    capacity      = max_perf                                   if online_perf is unknown
                       = online_perf                                if max_perf is unknown (0)
                       = (max_perf + clamp(online_perf, max_perf/2, 2*max_perf)) / 2   otherwise
                       unknown (both missing): Estimate.capacity = 0 and 1 unit/s is assumed below
    tau  service time  = service_time (s a request spends in service at capacity), default 1 s
    w    work/request  = mean_request_work, else running_work / in_flight, else 1
    O    our occupancy = in_flight * w      (running_work when mean_request_work is unknown)
    hidden work H      = max(model_hidden, gpu_hidden)
         model_hidden  = max(0, model_waiting + model_running - in_flight) * w
                         requests the model server holds beyond those the proxy forwarded
         gpu_hidden    = max(0, gpu_util - proxy_busy - 0.05) * C * tau
                         GPU busy time not explained by our own requests (both smoothed, same window)
    S    saturation    = max(min(1, (O + H) / (C*tau)), min(1, model_waiting), kv_cache_usage)
    B    backlog       = waiting_work + max(O + H - C*tau, model_waiting * w)
    utilisation        = S + B / (C * queue_horizon)          queue_horizon default 10 s
    wait_seconds       = (waiting_work + running_work + H) / C     Vast's wait_time, plus hidden work
    stalled            = in_flight > 0 and gpu_util < 0.05 and proxy_busy >= 0.9

So utilisation is 0 when idle, reaches 1 when the work in service fills the server (C*tau units are in
service at capacity), and grows above 1 by one for every `queue_horizon` seconds of work waiting. A
model server reporting waiting requests is saturated (S = 1): vLLM and TGI only queue when the batch
is full. `wait_seconds` keeps Vast's meaning (all outstanding work ahead of a new request, divided by
capacity), so the proxy's 429 decision and the reporter's `cur_load` (Estimate.pending_work) agree.

Every input is sanitised first: None, NaN and negative numbers count as absent or zero, infinities are
capped, fractions are clamped to 0..1, and outputs are capped at `OUTPUT_CAP`; the result is never NaN,
negative or infinite, and it is continuous and non-decreasing in every load input (running, waiting,
model queue, KV usage, GPU utilisation).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# Inputs above this are treated as this: keeps every product and quotient finite.
INPUT_CAP = 1e15
OUTPUT_CAP = 1e12
# Smallest capacity (units/s) and service time (s) divided by: the outputs stay finite.
CAPACITY_FLOOR = 1e-6
SERVICE_TIME_FLOOR = 1e-3


@dataclass(frozen=True)
class LoadSnapshot:
    """What the estimator sees at one instant. Optional inputs are None when unknown."""

    running_work: float  # units at the model server, forwarded by the proxy (Ledger.running_work)
    waiting_work: float  # units admitted by the proxy, not yet forwarded (Ledger.waiting_work)
    max_perf: float  # benchmark capacity in units/s; 0 when not measured
    online_perf: float | None  # units/s served while the queue was non-empty (ThroughputMeter)
    model_waiting: float | None  # requests waiting in the model server's own queue
    model_running: float | None  # requests in the model server's running batch
    kv_cache_usage: float | None  # 0..1, the model server's batch memory occupancy
    gpu_util: float | None  # 0..1 duty cycle smoothed over a window (DutyCycleSmoother); None: no GPU
    gpu_memory_frac: float | None  # 0..1; informational: preallocating servers keep it high at any load
    in_flight: int  # requests forwarded to the model server and not done (Ledger.running)
    # Fraction of the same window during which at least one request was in flight (DutyCycleSmoother
    # fed with in_flight > 0). Explains GPU busy time as ours; None: taken from in_flight right now.
    proxy_busy: float | None = None
    service_time: float | None = None  # seconds one request spends in service at capacity
    mean_request_work: float | None = None  # recent mean units per request
    # Where max_perf came from ("benchmark", "cache", "configured", ...): the estimate names it when
    # max_perf alone is the capacity, so /status tells one source, not two.
    max_perf_source: str = "benchmark"


@dataclass(frozen=True)
class Estimate:
    utilisation: float  # 0 idle, 1 at capacity, above 1 when work waits
    wait_seconds: float  # estimated wait for a new request
    capacity: float  # effective capacity in units/s; 0 when unknown (1 unit/s was assumed)
    stalled: bool  # requests in flight while the GPU stays idle: log it
    hidden_work: float  # units at the model server or GPU that did not pass the proxy
    pending_work: float  # all outstanding units: waiting + running + hidden
    capacity_source: str  # "blended", "online", "unknown", or max_perf's own source ("benchmark", "configured"...)


@dataclass(frozen=True)
class EstimateParams:
    queue_horizon_s: float = 10.0  # waiting work worth this many seconds adds 1 (Vast target_queue_time)
    default_service_time_s: float = 1.0  # Vast's convention: max_perf units outstanding = 100 %
    gpu_noise: float = 0.05  # GPU busy beyond ours by less than this is not hidden work
    stall_gpu_max: float = 0.05  # smoothed GPU utilisation below this with work in flight: stalled
    stall_busy_min: float = 0.9  # ... and we had work in flight for at least this share of the window


DEFAULT_PARAMS = EstimateParams()


def _amount(x: float | None) -> float:
    """A non-negative finite amount: None, NaN and negatives are 0; infinities are capped."""
    if x is None or not x > 0.0:  # `not >` also catches NaN
        return 0.0
    return min(float(x), INPUT_CAP)


def _known(x: float | None) -> float | None:
    """Like `_amount`, but None and NaN stay unknown."""
    if x is None or math.isnan(x):
        return None
    return _amount(x)


def _fraction(x: float | None) -> float | None:
    if x is None or math.isnan(x):
        return None
    return min(max(float(x), 0.0), 1.0)


def _capacity(max_perf: float, online: float | None, max_perf_source: str = "benchmark") -> tuple[float, str]:
    if online is not None and online <= 0.0:
        online = None  # a meter that saw nothing served has not measured anything
    if max_perf > 0.0 and online is not None:
        # A measurement taken during a stall or contention must not erase the benchmark outright,
        # and one outlier must not double it: clamp, then average.
        refined = min(max(online, max_perf / 2.0), max_perf * 2.0)
        return (max_perf + refined) / 2.0, "blended"
    if max_perf > 0.0:
        return max_perf, max_perf_source
    if online is not None:
        return online, "online"
    return 0.0, "unknown"


def estimate(s: LoadSnapshot, params: EstimateParams = DEFAULT_PARAMS) -> Estimate:
    """Utilisation, wait and capacity from one snapshot; the formula is in the module docstring."""
    running = _amount(s.running_work)
    waiting = _amount(s.waiting_work)
    in_flight = max(int(s.in_flight), 0)
    model_waiting = _known(s.model_waiting)
    model_running = _known(s.model_running)
    kv = _fraction(s.kv_cache_usage) or 0.0
    gpu = _fraction(s.gpu_util)
    busy = _fraction(s.proxy_busy)
    if busy is None:
        busy = 1.0 if in_flight > 0 else 0.0

    capacity, source = _capacity(_amount(s.max_perf), _known(s.online_perf), s.max_perf_source)
    # Unknown capacity: 1 unit/s, i.e. a unit is a second of work (Vast's default cost of 1 per request).
    cap = max(capacity if capacity > 0.0 else 1.0, CAPACITY_FLOOR)
    service_time = _known(s.service_time)
    tau = max(params.default_service_time_s if service_time is None else service_time, SERVICE_TIME_FLOOR)
    in_service_capacity = cap * tau  # units the server holds in service when at capacity

    # Occupancy counts requests, not their units: the requests still in the server are the big ones
    # (a request stays in proportion to its size), so summing their units overstates occupancy by
    # E[w^2]/E[w]^2 (2 for exponential sizes); requests x mean work is unbiased (Little's law).
    mean_work = _known(s.mean_request_work)
    if mean_work is not None:
        per_request, ours = mean_work, in_flight * mean_work
    else:
        per_request, ours = (running / in_flight if in_flight > 0 else 1.0), running

    model_total = (model_waiting or 0.0) + (model_running or 0.0)
    model_hidden = max(0.0, model_total - in_flight) * per_request
    gpu_hidden = 0.0
    if gpu is not None:
        gpu_hidden = max(0.0, gpu - busy - params.gpu_noise) * in_service_capacity
    hidden = max(model_hidden, gpu_hidden)

    occupied = ours + hidden
    saturation = max(min(1.0, occupied / in_service_capacity), min(1.0, model_waiting or 0.0), kv)
    backlog = waiting + max(occupied - in_service_capacity, (model_waiting or 0.0) * per_request)
    horizon = max(params.queue_horizon_s, SERVICE_TIME_FLOOR)
    utilisation = saturation + backlog / (cap * horizon)

    pending = waiting + running + hidden
    stalled = in_flight > 0 and gpu is not None and gpu < params.stall_gpu_max and busy >= params.stall_busy_min

    return Estimate(
        utilisation=min(utilisation, OUTPUT_CAP),
        wait_seconds=min(pending / cap, OUTPUT_CAP),
        capacity=capacity,
        stalled=stalled,
        hidden_work=min(hidden, OUTPUT_CAP),
        pending_work=min(pending, OUTPUT_CAP),
        capacity_source=source,
    )


class Ewma:
    """Exponentially weighted mean over irregular samples: a sample `dt` after the last weighs
    1 - exp(-dt / time_constant), so the result does not depend on how often it is sampled."""

    def __init__(self, time_constant_s: float) -> None:
        if not time_constant_s > 0.0:
            raise ValueError("time_constant_s must be > 0")
        self._tau = time_constant_s
        self._value: float | None = None
        self._t: float | None = None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, now: float, value: float) -> float:
        if math.isnan(value):
            return self._value if self._value is not None else 0.0
        if self._value is None or self._t is None:
            self._value, self._t = value, now
            return value
        dt = max(now - self._t, 0.0)
        alpha = 1.0 - math.exp(-dt / self._tau)
        self._value += alpha * (value - self._value)
        self._t = now
        return self._value


class DutyCycleSmoother:
    """Time-weighted mean of a 0..1 signal over the last `window_s` seconds.

    Each sample (t, v) says "the signal was v since the previous sample", which is how NVML reports
    utilisation (busy share of its last sample period) and how `in_flight > 0` is sampled. The first
    sample only anchors the timeline; `value` is None until a second one arrives.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0.0:
            raise ValueError("window_s must be > 0")
        self._window = window_s
        self._segments: deque[tuple[float, float, float]] = deque()  # (start, end, value)
        self._last_t: float | None = None

    def update(self, now: float, value: float | None) -> float | None:
        if value is None or math.isnan(value):
            # A gap (no reading): nothing is known about that interval, so it is not averaged in.
            self._last_t = now
            return self.value_at(now)
        v = min(max(float(value), 0.0), 1.0)
        if self._last_t is not None and now > self._last_t:
            self._segments.append((self._last_t, now, v))
        self._last_t = now if self._last_t is None else max(self._last_t, now)
        return self.value_at(now)

    def value_at(self, now: float) -> float | None:
        start = now - self._window
        while self._segments and self._segments[0][1] <= start:
            self._segments.popleft()
        total = weighted = 0.0
        for a, b, v in self._segments:
            span = min(b, now) - max(a, start)
            if span > 0.0:
                total += span
                weighted += span * v
        return weighted / total if total > 0.0 else None


class ThroughputMeter:
    """Served work per second, counted only while the queue was non-empty.

    While requests wait, the server runs as fast as it can, so what it serves then measures its
    capacity; served work at light load only measures demand and is ignored. The meter keeps
    exponentially decaying sums of served units and backlogged seconds (decay by backlogged time,
    time constant `time_constant_s`), and answers None until `min_busy_s` of backlogged time is seen.

    Call `set_backlogged(now, flag)` whenever the queue becomes empty or non-empty, and
    `served(now, units)` when a request completes.
    """

    def __init__(self, time_constant_s: float = 120.0, min_busy_s: float = 5.0) -> None:
        if not time_constant_s > 0.0:
            raise ValueError("time_constant_s must be > 0")
        self._tau = time_constant_s
        self._min_busy = min_busy_s
        self._units = 0.0
        self._seconds = 0.0
        self._seen = 0.0  # total backlogged seconds, undecayed, for the warm-up threshold
        self._backlogged_since: float | None = None

    def set_backlogged(self, now: float, backlogged: bool) -> None:
        if backlogged and self._backlogged_since is None:
            self._backlogged_since = now
        elif not backlogged and self._backlogged_since is not None:
            self._advance(now)
            self._backlogged_since = None

    def served(self, now: float, units: float) -> None:
        if self._backlogged_since is None or not units > 0.0 or math.isinf(units):
            return
        self._advance(now)
        self._units += units

    def rate(self, now: float) -> float | None:
        """Units/s over backlogged time, or None before `min_busy_s` of it."""
        if self._backlogged_since is not None:
            self._advance(now)
        if self._seen < self._min_busy or self._seconds <= 0.0:
            return None
        return self._units / self._seconds

    def _advance(self, now: float) -> None:
        assert self._backlogged_since is not None
        dt = now - self._backlogged_since
        if dt <= 0.0:
            return
        decay = math.exp(-dt / self._tau)
        # Decaying both sums by the same factor keeps units/seconds an exponentially weighted rate.
        self._units *= decay
        self._seconds = self._seconds * decay + self._tau * (1.0 - decay)
        self._seen += dt
        self._backlogged_since = now
