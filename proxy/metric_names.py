"""The names of every Prometheus metric shepherd exports on `GET /metrics`.

This module owns the names only, so that the /metrics implementation, the deploy manifests
(`deploy/*.yaml`, checked by tests/test_deploy.py) and dashboards agree on one list. Names are the
family names: a counter is exposed with a `_total` sample (the name already ends in `_total` here), a
histogram with `_bucket`, `_sum` and `_count` samples.
"""

from __future__ import annotations

from typing import Final

# Counters (exposed as written: they end in _total).
REQUESTS_TOTAL: Final = "shepherd_requests_total"  # labels: route, status
RESTARTS_TOTAL: Final = "shepherd_restarts_total"
REPORTER_FAILURES_TOTAL: Final = "shepherd_reporter_failures_total"

# Histograms (exposed as <name>_bucket, <name>_sum, <name>_count).
REQUEST_DURATION_SECONDS: Final = "shepherd_request_duration_seconds"  # label: route
QUEUE_SECONDS: Final = "shepherd_queue_seconds"  # label: route

# Gauges: the ledger, the capacity and the estimate.
WORKLOAD_RUNNING: Final = "shepherd_workload_running"
WORKLOAD_WAITING: Final = "shepherd_workload_waiting"
CAPACITY_UNITS_PER_SECOND: Final = "shepherd_capacity_units_per_second"
ESTIMATE_UTILISATION: Final = "shepherd_estimate_utilisation"
ESTIMATE_WAIT_SECONDS: Final = "shepherd_estimate_wait_seconds"
# 1 while requests are in flight and the GPU has been idle for the estimate's whole window (a hung server).
ESTIMATE_STALLED: Final = "shepherd_estimate_stalled"
STATE: Final = "shepherd_state"  # label: state; 1 for the current state, 0 for the others

# Gauges: the GPUs (label: device, the index) and the host.
GPU_AVAILABLE: Final = "shepherd_gpu_available"
GPU_UTILISATION: Final = "shepherd_gpu_utilisation"
GPU_MEMORY_USED_BYTES: Final = "shepherd_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL_BYTES: Final = "shepherd_gpu_memory_total_bytes"
GPU_POWER_WATTS: Final = "shepherd_gpu_power_watts"
GPU_TEMPERATURE_CELSIUS: Final = "shepherd_gpu_temperature_celsius"
GPU_SM_ACTIVE: Final = "shepherd_gpu_sm_active"
HOST_CPU_PERCENT: Final = "shepherd_host_cpu_percent"
HOST_MEMORY_USED_BYTES: Final = "shepherd_host_memory_used_bytes"
MODEL_CPU_PERCENT: Final = "shepherd_model_cpu_percent"
MODEL_RSS_BYTES: Final = "shepherd_model_rss_bytes"

# Gauges: the model server's own queue, read from its metrics (absent when its backend exposes none,
# or while the sample is unknown or stale: an absent series is not an idle server).
MODEL_REQUESTS_WAITING: Final = "shepherd_model_requests_waiting"
MODEL_REQUESTS_RUNNING: Final = "shepherd_model_requests_running"
MODEL_KV_CACHE_USAGE: Final = "shepherd_model_kv_cache_usage"
MODEL_QUEUE_AGE_SECONDS: Final = "shepherd_model_queue_age_seconds"
MODEL_QUEUE_SERIES: Final = (MODEL_REQUESTS_WAITING, MODEL_REQUESTS_RUNNING, MODEL_KV_CACHE_USAGE,
                             MODEL_QUEUE_AGE_SECONDS)

COUNTERS: Final = (REQUESTS_TOTAL, RESTARTS_TOTAL, REPORTER_FAILURES_TOTAL)
HISTOGRAMS: Final = (REQUEST_DURATION_SECONDS, QUEUE_SECONDS)

EXPORTED_METRICS: Final[tuple[str, ...]] = (
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    QUEUE_SECONDS,
    WORKLOAD_RUNNING,
    WORKLOAD_WAITING,
    CAPACITY_UNITS_PER_SECOND,
    ESTIMATE_UTILISATION,
    ESTIMATE_WAIT_SECONDS,
    ESTIMATE_STALLED,
    STATE,
    RESTARTS_TOTAL,
    GPU_AVAILABLE,
    GPU_UTILISATION,
    GPU_MEMORY_USED_BYTES,
    GPU_MEMORY_TOTAL_BYTES,
    GPU_POWER_WATTS,
    GPU_TEMPERATURE_CELSIUS,
    GPU_SM_ACTIVE,
    HOST_CPU_PERCENT,
    HOST_MEMORY_USED_BYTES,
    MODEL_CPU_PERCENT,
    MODEL_RSS_BYTES,
    *MODEL_QUEUE_SERIES,
    REPORTER_FAILURES_TOTAL,
)


def exposed_sample_names() -> frozenset[str]:
    """Every sample name a scrape of /metrics can contain (what a PromQL query may select)."""
    names = set(EXPORTED_METRICS)
    for histogram in HISTOGRAMS:
        names.update(f"{histogram}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    # prometheus_client also exposes a `_created` sample for counters and histograms.
    for family in COUNTERS:
        names.add(family.removesuffix("_total") + "_created")
    for histogram in HISTOGRAMS:
        names.add(f"{histogram}_created")
    return frozenset(names)
