"""llama.cpp's llama-server (b11434, built by setup_servers.py) under `--backend llamacpp`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Shepherd, free_port
from tests.real import scenarios
from tests.real.conftest import need
from tests.real.layout import Layout

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

# 8192 tokens a slot: long enough that a generation is still running when the test kills the server.
SLOTS, CONTEXT = 2, 16384


def start(layout: Layout, tmp_path: Path, model: Path, *extra: str, env: dict[str, str] | None = None) -> Shepherd:
    server = need(layout.llama_server, "llama-server")
    port = free_port()
    return Shepherd(["--backend", "llamacpp", "--", str(server), "-m", str(model), "--host", "127.0.0.1",
                     "--port", str(port), *extra], model_port=port,
                    env={"BENCHMARK_CACHE": str(tmp_path / "benchmark.json"), "BENCHMARK_RUNS": "2",
                         "BENCHMARK_CONCURRENCY": "4", "PROBE_INTERVAL": "0.5", "HEALTH_INTERVAL": "1",
                         **(env or {})})


@pytest.fixture
def served(layout: Layout, tmp_path: Path, shepherds: list[Shepherd]) -> Iterator[Shepherd]:
    s = start(layout, tmp_path, need(layout.tiny_gguf, "the tiny GGUF model"),
              "-c", str(CONTEXT), "-np", str(SLOTS), "--metrics")
    shepherds.append(s)
    s.wait_state("ready", timeout=scenarios.READY_TIMEOUT)
    yield s


def test_llama_server_end_to_end(served: Shepherd) -> None:
    status = served.status()
    assert status["capacity_source"] == "benchmark" and status["max_perf"] > 0, status
    scenarios.serves_completion_stream_and_chat(served, None)
    scenarios.shows_the_model_queue(served, None, busy_tokens=2000)
    scenarios.kill_9_with_requests_in_flight_and_arriving(served, None, busy_tokens=6000)
    scenarios.sigterm_exits_0_and_leaves_nothing(served)


def test_the_benchmark_fits_a_small_context(layout: Layout, tmp_path: Path, shepherds: list[Shepherd]) -> None:
    """Issue 9: `-c 2048` with 8 slots is 256 tokens a request; the default payload (~850 + 500 tokens)
    got `500 Context size has been exceeded`. Fitted to /props and /tokenize, every request is served."""
    s = start(layout, tmp_path, need(layout.tiny_gguf, "the tiny GGUF model"), "-c", "2048", "-np", "8")
    shepherds.append(s)
    s.wait_state("ready", timeout=scenarios.READY_TIMEOUT)
    limits = s.find("benchmark.server_limits")[0]
    assert limits["context_tokens"] == 256 and limits["slots"] == 8 and limits["tokens_per_word"] > 1
    rounds = s.find("benchmark.round")
    assert rounds and all(r["failed"] == 0 for r in rounds), rounds
    status = s.status()
    assert status["capacity_source"] == "benchmark" and status["capacity_error"] is None
    assert status["model"]["restarts"] == 0


def test_a_broken_model_exits_1_within_seconds(layout: Layout, tmp_path: Path, shepherds: list[Shepherd]) -> None:
    s = start(layout, tmp_path, need(layout.broken_gguf, "the broken GGUF model"))
    shepherds.append(s)
    started = time.monotonic()
    assert s.wait_exit(60) == 1
    assert time.monotonic() - started < 30
    failed = s.wait_state("failed")
    assert "error loading model" in failed["reason"] or "failed to load model" in failed["reason"], failed
    assert s.find("model.started") and len(s.find("model.started")) == 1  # given up at once, not retried
