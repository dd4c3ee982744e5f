"""The `comfyui-json` backend (issue 10, mode 1) against an emulator of Vast's ComfyUI API wrapper
(tests/emulators/comfyui_wrapper.py), attached as a Vast template runs it: shepherd follows the
wrapper's log and proxies `/generate/sync`."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from supervisor.config import load_config
from tests.harness import ROOT, Shepherd, free_port, kill_tree, wait_until

EMULATOR = ROOT / "tests" / "emulators" / "comfyui_wrapper.py"


class Wrapper:
    def __init__(self, tmp_path: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = tmp_path / "api-wrapper.log"
        self.proc = subprocess.Popen([sys.executable, str(EMULATOR), "--port", str(self.port), "--log", str(self.log),
                                      *args])

    def jobs(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/jobs", timeout=5, trust_env=False).json()

    def close(self) -> None:
        kill_tree(self.proc.pid)


@pytest.fixture
def closing() -> Iterator[list]:
    things: list = []
    yield things
    for thing in things:
        thing.close()


def attach(closing: list, wrapper: Wrapper | None, tmp_path: Path, port: int | None = None) -> Shepherd:
    s = Shepherd(["--backend", "comfyui-json"], model_port=wrapper.port if wrapper else port,
                 env={"MODEL_LOG": str(tmp_path / "api-wrapper.log"), "BENCHMARK_CACHE": str(tmp_path / "b.json"),
                      "BENCHMARK_RUNS": "2", "PROBE_INTERVAL": "0.5"})
    closing.append(s)
    return s


def body(rid: str, **extra: object) -> dict:
    return {"input": {"request_id": rid, "workflow_json": {"3": {"class_type": "KSampler"}}, **extra}}


def test_vast_template_defaults() -> None:
    config = load_config(["--backend", "comfyui-json", "--unsecured"], {})
    assert config.attach and config.model_log == "/var/log/portal/api-wrapper.log"
    assert config.model_server_url == "http://127.0.0.1:18288"
    route = config.spec.route("/generate/sync")
    assert route is not None and not route.parallel and route.max_queue_time == 10.0 and route.timeout is None
    assert route.workload({"input": {}}) == 100.0 and not route.rerun_if_crashed


def test_ready_on_backends_ready_then_jobs_pass_through_one_at_a_time_in_order(
    closing: list, tmp_path: Path
) -> None:
    wrapper = Wrapper(tmp_path, "--job-seconds", "0.2")
    closing.append(wrapper)
    s = attach(closing, wrapper, tmp_path)
    s.wait_state("ready")
    status = s.status()
    assert status["capacity_source"] == "benchmark" and 200 <= status["max_perf"] <= 1000  # 100 per ~0.2 s job
    benchmark = wrapper.jobs()["ran"]
    assert benchmark and all(rid.startswith("shepherd-benchmark-") for rid in benchmark)  # Text2Image modifier
    answers: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=30, trust_env=False) as client:
            answers[i] = client.post("/generate/sync", json=body(f"job-{i}"))

    threads = []
    for i in range(5):
        thread = threading.Thread(target=send, args=(i,))
        thread.start()
        threads.append(thread)
        wait_until(lambda: s.status()["requests"]["received"] >= i + 1, 10, f"request {i} at shepherd")
    for thread in threads:
        thread.join(30)
    assert {i: a.status_code for i, a in answers.items()} == {i: 200 for i in range(5)}
    assert answers[3].json()["id"] == "job-3" and answers[3].json()["output"][0]["filename"] == "job-3_00001_.png"
    jobs = wrapper.jobs()
    assert jobs["ran"][len(benchmark):] == [f"job-{i}" for i in range(5)]  # FIFO, as they arrived
    assert jobs["most_at_once"] == 1
    queue = s.status()["model_queue"]
    assert queue["ok"] and queue["waiting"] == 0.0  # /queue-info read


def test_the_wrappers_status_is_passed_through(closing: list, tmp_path: Path) -> None:
    wrapper = Wrapper(tmp_path)
    closing.append(wrapper)
    s = attach(closing, wrapper, tmp_path)
    s.wait_state("ready")
    cancelled = s.http.post("/generate/sync", json=body("c", cancel=True))
    assert cancelled.status_code == 499 and cancelled.json()["status"] == "cancelled"


def test_backends_ready_timeout_is_an_error_not_a_load_line(closing: list, tmp_path: Path) -> None:
    port = free_port()
    s = attach(closing, None, tmp_path, port)  # first: what the log holds at start is history, never an error
    s.wait_event(lambda e: e.get("event") == "model_log.following")
    wrapper = Wrapper(tmp_path, "--fail", port=port)
    closing.append(wrapper)
    failed = s.wait_state("failed")
    assert "BACKENDS_READY_TIMEOUT" in failed["reason"]
    assert [e["to"] for e in s.find("state")].count("ready") == 0
