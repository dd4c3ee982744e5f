"""`GET /metrics`: shepherd's Prometheus exposition, on a registry of its own.

Per-request numbers (counts by route and status, latency and queue-time histograms) are recorded by
the request handler as requests end. Everything else is read when Prometheus scrapes, from a
`MetricsView` callable that returns plain values, so the metrics never hold state of their own
that could drift from `/status`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import metric_names as names

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class GpuView:
    device: str
    utilisation: float | None  # 0..1
    memory_used: int | None
    memory_total: int | None
    power_watts: float | None
    temperature_c: float | None
    sm_active: float | None


@dataclass(frozen=True)
class MetricsView:
    state: str
    states: Sequence[str]
    restarts: int
    running_work: float
    waiting_work: float
    capacity: float
    utilisation: float
    wait_seconds: float
    reporter_failures: int
    gpus: Sequence[GpuView] | None  # None: no GPU available
    host_cpu_percent: float | None = None
    host_memory_used: int | None = None
    model_cpu_percent: float | None = None
    model_rss: int | None = None
    # The model server's own queue (None: unknown, stale or not exposed; the series is then absent).
    model_waiting: float | None = None
    model_running: float | None = None
    model_kv_cache_usage: float | None = None
    model_queue_age_seconds: float | None = None
    stalled: bool = False
    extra: dict[str, float] = field(default_factory=dict)


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], float(value))
        yield family


class _ViewCollector(Collector):
    def __init__(self, view: Callable[[], MetricsView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        v = self._view()
        yield from _gauge(names.WORKLOAD_RUNNING, "Workload units at the model server.", v.running_work)
        yield from _gauge(names.WORKLOAD_WAITING, "Workload units admitted, not yet forwarded.", v.waiting_work)
        yield from _gauge(names.CAPACITY_UNITS_PER_SECOND, "Capacity used by the estimate (units/s).", v.capacity)
        yield from _gauge(names.ESTIMATE_UTILISATION, "Load estimate: 0 idle, 1 at capacity, >1 work waits.",
                          v.utilisation)
        yield from _gauge(names.ESTIMATE_WAIT_SECONDS, "Estimated wait for a new request.", v.wait_seconds)
        yield from _gauge(names.ESTIMATE_STALLED, "1 while requests are in flight and the GPU stays idle.",
                          1.0 if v.stalled else 0.0)
        state = GaugeMetricFamily(names.STATE, "Lifecycle state (1 for the current one).", labels=["state"])
        for name in v.states:
            state.add_metric([name], 1.0 if name == v.state else 0.0)
        yield state
        restarts = CounterMetricFamily(names.RESTARTS_TOTAL, "Model server restarts.")
        restarts.add_metric([], float(v.restarts))
        yield restarts
        failures = CounterMetricFamily(names.REPORTER_FAILURES_TOTAL, "Autoscaler reports that failed.")
        failures.add_metric([], float(v.reporter_failures))
        yield failures
        yield from _gauge(names.GPU_AVAILABLE, "1 when NVML sees at least one GPU.", 0.0 if not v.gpus else 1.0)
        if v.gpus:
            per_device = (
                (names.GPU_UTILISATION, "GPU duty cycle, 0..1.", lambda g: g.utilisation),
                (names.GPU_MEMORY_USED_BYTES, "GPU memory used.", lambda g: g.memory_used),
                (names.GPU_MEMORY_TOTAL_BYTES, "GPU memory total.", lambda g: g.memory_total),
                (names.GPU_POWER_WATTS, "GPU power draw.", lambda g: g.power_watts),
                (names.GPU_TEMPERATURE_CELSIUS, "GPU temperature.", lambda g: g.temperature_c),
                (names.GPU_SM_ACTIVE, "Share of SMs busy (GPM, Hopper and newer), 0..1.", lambda g: g.sm_active),
            )
            for name, doc, read in per_device:
                family = GaugeMetricFamily(name, doc, labels=["device"])
                for gpu in v.gpus:
                    value = read(gpu)
                    if value is not None:
                        family.add_metric([gpu.device], float(value))
                yield family
        yield from _gauge(names.HOST_CPU_PERCENT, "Host CPU use, percent.", v.host_cpu_percent)
        yield from _gauge(names.HOST_MEMORY_USED_BYTES, "Host memory used.", v.host_memory_used)
        yield from _gauge(names.MODEL_CPU_PERCENT, "Model server process tree CPU, percent.", v.model_cpu_percent)
        yield from _gauge(names.MODEL_RSS_BYTES, "Model server process tree resident memory.", v.model_rss)
        yield from _gauge(names.MODEL_REQUESTS_WAITING, "Requests waiting in the model server's own queue.",
                          v.model_waiting)
        yield from _gauge(names.MODEL_REQUESTS_RUNNING, "Requests in the model server's running batch.",
                          v.model_running)
        yield from _gauge(names.MODEL_KV_CACHE_USAGE, "The model server's KV cache usage, 0..1.",
                          v.model_kv_cache_usage)
        yield from _gauge(names.MODEL_QUEUE_AGE_SECONDS, "Age of the last read sample of the model server's queue.",
                          v.model_queue_age_seconds)


class Metrics:
    def __init__(self, view: Callable[[], MetricsView]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            names.REQUESTS_TOTAL.removesuffix("_total"), "Requests by route and status.", ["route", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            names.REQUEST_DURATION_SECONDS, "Time from arrival to the end of the answer.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._queue = Histogram(
            names.QUEUE_SECONDS, "Time from arrival until forwarded to the model server.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_ViewCollector(view))

    def observe(self, route: str, status: int, total_s: float, queue_s: float | None) -> None:
        self._requests.labels(route, str(status)).inc()
        self._duration.labels(route).observe(total_s)
        if queue_s is not None:
            self._queue.labels(route).observe(queue_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
