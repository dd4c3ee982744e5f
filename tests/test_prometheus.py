"""shepherd and a real Prometheus (Debian's `prometheus` 2.42 and its `promtool`; `.ci/run` installs them).

- `deploy/prometheusrule.yaml` passes `promtool check rules`, and promtool's rule tests make every alert
  fire for a bad pod and stay quiet for a healthy one.
- shepherd's `/metrics` passes `promtool check metrics`.
- A Prometheus scrapes a real shepherd for a minute, idle then under load, and the exact query of
  `deploy/scaledobject.yaml` is evaluated through its HTTP API: near 0 idle, rising under load, and
  the scraped estimate matches `/status`'s.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import Shepherd, free_port, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
LABELS = 'namespace="ns", pod="{pod}"'


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: apt-get install prometheus (.ci/run does)")
    return path


def rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain rules file, which promtool and Prometheus read."""
    rule = yaml.safe_load((DEPLOY / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def test_the_rules_pass_promtool(tmp_path: Path) -> None:
    result = subprocess.run([binary("promtool"), "check", "rules", str(rules_file(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def series(name: str, pod: str, values: str, **labels: str) -> dict[str, str]:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {"series": f'{name}{{{LABELS.format(pod=pod)}{extra}}}', "values": values}


def test_every_alert_fires_for_a_bad_pod_and_none_for_a_good_one(tmp_path: Path) -> None:
    rules = rules_file(tmp_path)
    inputs = [
        series("shepherd_state", "bad", "0 0 1x30", state="failed"), series("shepherd_state", "good", "0x32", state="failed"),
        series("shepherd_restarts_total", "bad", "0+1x30"), series("shepherd_restarts_total", "good", "0 1 1x30"),
        series("shepherd_estimate_stalled", "bad", "0 1x31"), series("shepherd_estimate_stalled", "good", "0x32"),
        series("shepherd_reporter_failures_total", "bad", "0+2x30"),
        series("shepherd_reporter_failures_total", "good", "0x32"),
        series("shepherd_estimate_utilisation", "bad", "1.5x32"), series("shepherd_estimate_utilisation", "good", "0.6x32"),
    ]
    bad = {"namespace": "ns", "pod": "bad"}
    expected = {
        "ShepherdWorkerFailed": [{"exp_labels": {**bad, "severity": "critical"}, "exp_annotations": {
            "summary": "shepherd on bad gave up on its model server",
            "description": "State `failed`: `kubectl logs` shows the reason (the last `state` event)."}}],
        "ShepherdCrashLooping": [{"exp_labels": {**bad, "severity": "warning"}, "exp_annotations": {
            "summary": "the model server on bad restarted 15 times in 15m"}}],
        "ShepherdStalled": [{"exp_labels": {**bad, "severity": "critical"}, "exp_annotations": {
            "summary": "requests on bad are in flight but its GPU does nothing"}}],
        "ShepherdReporterFailing": [{"exp_labels": {**bad, "severity": "warning"}, "exp_annotations": {
            "summary": "shepherd on bad cannot report to the autoscaler"}}],
        "ShepherdOverloaded": [{"exp_labels": {**bad, "severity": "warning"}, "exp_annotations": {
            "summary": "shepherd on bad has been over capacity for 10 minutes"}}],
    }
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                *({"eval_time": "30m", "alertname": name, "exp_alerts": alerts} for name, alerts in expected.items()),
                # before the `for:` has passed, nothing fires yet
                *({"eval_time": "1m", "alertname": name, "exp_alerts": []} for name in expected),
            ],
        }],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([binary("promtool"), "test", "rules", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.fixture
def shepherd() -> Iterator[Shepherd]:
    s = Shepherd(["--backend", "demo"], env={"PROBE_INTERVAL": "0.5", "DEMO_TOKEN_INTERVAL": "0.05"})
    try:
        s.wait_state("ready")
        yield s
    finally:
        s.close()


def test_shepherds_metrics_pass_promtool(shepherd: Shepherd) -> None:
    text = shepherd.http.get("/metrics").text
    result = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """A real Prometheus scraping one shepherd every second, labelled as the ServiceMonitor's pods are."""

    def __init__(self, tmp_path: Path, target_port: int, service: str) -> None:
        self.port = free_port()
        config = {
            # 2 s: on a loaded 2-core machine a 1 s scrape timeout loses samples under load.
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"},
            "scrape_configs": [{"job_name": "shepherd", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"],
                                                    "labels": {"service": service}}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10, trust_env=False)
        wait_until(self._ready, 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> float | None:
        data = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert data["status"] == "success", data
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_a_real_prometheus_evaluates_the_autoscaling_query(shepherd: Shepherd, tmp_path: Path) -> None:
    scaled = yaml.safe_load((DEPLOY / "scaledobject.yaml").read_text())
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]  # exactly what KEDA asks
    service = query.split('service="', 1)[1].split('"', 1)[0]
    prometheus = Prometheus(tmp_path, shepherd.port, service)
    done = threading.Event()
    threads: list[threading.Thread] = []
    try:
        # Idle: ~8 scrapes of a worker with nothing to do.
        wait_until(lambda: (prometheus.query('count_over_time(up{job="shepherd"}[1m])') or 0) >= 8, 60,
                   "8 scrapes")
        assert prometheus.query('up{job="shepherd"}') == 1.0
        idle = prometheus.query(query)
        assert idle is not None and idle < 0.05, idle

        def load() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{shepherd.port}", timeout=60, trust_env=False) as client:
                while not done.is_set():
                    client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 60}})

        # Well past the benchmarked capacity (8 requests of 32 tokens at once): utilisation goes over 1.
        threads.extend(threading.Thread(target=load, daemon=True) for _ in range(16))
        for thread in threads:
            thread.start()
        # Under load for ~45 s: the 1-minute average rises well above idle.
        started = time.monotonic()
        wait_until(lambda: (prometheus.query(query) or 0) > idle + 0.3, 90, "the query to rise under load")
        deadline = started + 45
        while time.monotonic() < deadline:
            time.sleep(0.5)  # the minute of scraping under load the issue asks for; nothing waits on it
        loaded = prometheus.query(query)
        assert loaded is not None and loaded > idle + 0.3, (idle, loaded)
        # What Prometheus scraped last is what /status says now (the load is steady; one scrape apart).
        pairs: list[tuple[float, float]] = []
        for _ in range(5):
            scraped = prometheus.query(f'shepherd_estimate_utilisation{{service="{service}"}}')
            status: Any = shepherd.status()["estimate"]["utilisation"]
            assert scraped is not None
            pairs.append((scraped, status))
            time.sleep(1.0)
        assert min(abs(a - b) for a, b in pairs) < 0.25, pairs
    finally:
        done.set()
        for thread in threads:
            thread.join(30)  # each ends after its request, before shepherd is stopped
        prometheus.close()
