"""End to end: /metrics and /status of a real shepherd in front of the real demo server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metric_names import EXPORTED_METRICS, GPU_AVAILABLE, MODEL_QUEUE_SERIES
from tests.harness import Shepherd, wait_until

# Series that need a GPU (absent here: gpu_available says 0 instead).
GPU_SERIES = {name for name in EXPORTED_METRICS if name.startswith("shepherd_gpu_") and name != GPU_AVAILABLE}
# Series of the model server's own queue: the demo server exposes none (tests/test_model_queue_export.py).
ABSENT_HERE = GPU_SERIES | set(MODEL_QUEUE_SERIES)


@pytest.fixture(scope="module")
def shepherd() -> Iterator[Shepherd]:
    s = Shepherd(["--backend", "demo"], env={"PROBE_INTERVAL": "0.2"})
    try:
        s.wait_state("ready")
        yield s
    finally:
        s.close()


def scrape(s: Shepherd) -> dict[str, list]:
    response = s.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def value(samples: list, name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


def test_every_exported_metric_is_served(shepherd: Shepherd) -> None:
    shepherd.http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).raise_for_status()
    # model tree CPU needs two host samples; wait until it is there rather than sleeping
    wait_until(lambda: "shepherd_model_cpu_percent" in scrape(shepherd), what="model CPU series")
    families = scrape(shepherd)
    served = {name if name in EXPORTED_METRICS else f"{name}_total" for name in families}
    assert set(EXPORTED_METRICS) - ABSENT_HERE <= served
    assert not ABSENT_HERE & served  # no GPU here: per-device series are absent, not zero
    assert value(families["shepherd_gpu_available"], "shepherd_gpu_available") == 0.0
    assert value(families["shepherd_state"], "shepherd_state", state="ready") == 1.0
    assert value(families["shepherd_state"], "shepherd_state", state="loading") == 0.0


def test_requests_are_counted_by_route_and_status(shepherd: Shepherd) -> None:
    before = scrape(shepherd)
    def count(families: dict, status: str) -> float:
        samples = [s for s in families.get("shepherd_requests", []) if s.name == "shepherd_requests_total"
                   and s.labels == {"route": "/generate", "status": status}]
        return samples[0].value if samples else 0.0

    for _ in range(3):
        shepherd.http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).raise_for_status()
    assert shepherd.http.post("/generate", content=b"{not json").status_code == 422
    after = scrape(shepherd)
    assert count(after, "200") - count(before, "200") == 3
    assert count(after, "422") - count(before, "422") == 1
    durations = [s for s in after["shepherd_request_duration_seconds"]
                 if s.name.endswith("_count") and s.labels == {"route": "/generate"}]
    assert durations[0].value >= 4


def test_status_carries_the_same_estimate_and_probes(shepherd: Shepherd) -> None:
    status = shepherd.status()
    assert set(status) >= {"estimate", "gpu", "host", "requests", "max_perf"}
    assert status["gpu"]["available"] is False and "no GPU" in status["gpu"]["reason"]
    assert status["host"]["memory_total"] > 0 and status["host"]["model_tree"]["pids"] >= 1
    # once the last request has left the estimate (next probe tick), both views say idle
    wait_until(lambda: shepherd.status()["estimate"]["utilisation"] == 0.0, what="idle estimate in /status")
    families = scrape(shepherd)
    assert value(families["shepherd_estimate_utilisation"], "shepherd_estimate_utilisation") == 0.0
    assert value(families["shepherd_workload_running"], "shepherd_workload_running") == 0.0


def test_relayed_answer_has_one_date_and_server_header(shepherd: Shepherd) -> None:
    # The demo server sends its own Date and Server; hypercorn writes both too.
    response = shepherd.http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert response.status_code == 200
    assert len(response.headers.get_list("date")) == 1
    assert response.headers.get_list("server") == ["hypercorn-h11"]
