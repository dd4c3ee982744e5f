"""The Kubernetes manifests in deploy/: they parse, wire the probes and ports shepherd serves, give
shutdown enough time, and query only metrics shepherd exports."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.metric_names import COUNTERS, EXPORTED_METRICS, HISTOGRAMS, exposed_sample_names

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC = re.compile(r"\bshepherd_[a-z0-9_]+\b")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_every_file_parses_into_known_kinds() -> None:
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == ["Deployment", "PrometheusRule", "ScaledObject", "Service", "ServiceMonitor"]
    for name, doc in _documents():
        assert doc.get("apiVersion"), name
        assert doc.get("metadata", {}).get("name"), name


def test_shepherd_is_the_entrypoint() -> None:
    container = _container()
    command = container["command"]
    assert command[0] == "shepherd"  # the console script the example Dockerfiles install
    assert "--backend" in command
    assert command[-1] == "--"  # the model server command follows in args
    assert container["args"][0] == "vllm"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["UNSECURED"] == "true"
    assert env["WORKER_PORT"] == "3000"
    assert container["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]


def test_probes_use_ready_and_health() -> None:
    container = _container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_grace_period_covers_drain_and_stop() -> None:
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: float(e["value"]) for e in _container()["env"] if e["name"].endswith("_TIMEOUT")}
    assert grace > 60
    assert grace > env["DRAIN_TIMEOUT"] + env["STOP_TIMEOUT"]


def test_service_monitor_scrapes_the_http_port() -> None:
    monitor = _one("ServiceMonitor")
    service = _one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert service["spec"]["ports"][0]["name"] == "http"


def test_scaled_object_scales_the_deployment_on_the_estimate() -> None:
    scaled = _one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "shepherd_estimate_utilisation" in METRIC.findall(trigger["metadata"]["query"])
    assert 0.0 < float(trigger["metadata"]["threshold"]) <= 1.0


def test_every_queried_metric_is_exported() -> None:
    exposed = exposed_sample_names()
    referenced = {m for _, doc in _documents() for s in _strings(doc) for m in METRIC.findall(s)}
    assert referenced, "the manifests query no shepherd metric at all"
    assert referenced <= exposed, sorted(referenced - exposed)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("shepherd_request_duration_seconds_bucket", True),
        ("shepherd_queue_seconds_count", True),
        ("shepherd_requests_total", True),
        ("shepherd_requests", False),  # a counter is only exposed with its _total sample
        ("shepherd_estimate_utilisation_bucket", False),  # not a histogram
        ("shepherd_made_up", False),
    ],
)
def test_exposed_sample_names_know_the_suffixes(name: str, ok: bool) -> None:
    assert (name in exposed_sample_names()) is ok


def test_metric_name_lists_are_consistent() -> None:
    assert len(set(EXPORTED_METRICS)) == len(EXPORTED_METRICS)
    assert set(COUNTERS) | set(HISTOGRAMS) <= set(EXPORTED_METRICS)
    assert all(name.endswith("_total") for name in COUNTERS)
    assert all(re.fullmatch(r"shepherd_[a-z0-9_]+", name) for name in EXPORTED_METRICS)


def test_core_kinds_are_valid_against_the_kubernetes_schemas() -> None:
    """Parsing is not validation: kubernetes-validate checks each core object against the OpenAPI
    schema of Kubernetes 1.35 (strict: an unknown field is an error). The custom resources
    (ServiceMonitor, PrometheusRule, ScaledObject) have no schema offline; promtool checks the rules
    (tests/test_prometheus.py) and the tests above check the fields shepherd relies on."""
    import kubernetes_validate
    core = [(name, doc) for name, doc in _documents() if doc["apiVersion"] in ("v1", "apps/v1")]
    assert {doc["kind"] for _, doc in core} >= {"Deployment", "Service"}
    for name, doc in core:
        kubernetes_validate.validate(doc, "1.35", strict=True)  # raises ValidationError, naming the field
    broken = {**core[0][1], "spec": {**core[0][1]["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.35", strict=True)
