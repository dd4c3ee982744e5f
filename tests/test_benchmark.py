"""The benchmark: throughput arithmetic, retry of "not ready" and its deadline on a mock clock
(httpx.MockTransport); a late-listening and an erroring real server; the statistic; the cache
(keys, stale entries, corrupt file, legacy `.has_benchmark`); model identity; measure_capacity."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio.testing

from backends import demo, tgi
from backends.spec import BackendSpec, Route, ServerLimits, field_workload
from supervisor.benchmark import (
    BenchmarkCache,
    BenchmarkError,
    BenchmarkSettings,
    benchmark_route,
    cache_key,
    measure_capacity,
    model_identity,
    prompt_text,
    robust_capacity,
    run_benchmark,
)
from tests.harness import free_port


def payload(rng: random.Random, _limits: ServerLimits) -> dict[str, Any]:
    return {"inputs": f"prompt {rng.randrange(1000)}", "parameters": {"max_new_tokens": 32}}


ROUTE = Route("/generate", workload=field_workload("parameters", "max_new_tokens"), benchmark=payload)
QUICK = BenchmarkSettings(runs=3, concurrency=4, warmup=True, deadline_s=600.0)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# The statistic


def test_median_of_served_rounds_not_max() -> None:
    assert robust_capacity([10.0, 100.0, 12.0]) == 12.0  # one lucky round does not set capacity
    assert robust_capacity([0.0, 10.0, 20.0]) == 15.0  # a failed round measures an error, not speed
    assert robust_capacity([0.0, 0.0]) == 0.0
    assert robust_capacity([]) == 0.0


def test_benchmark_route_picks_the_route_with_a_generator() -> None:
    assert benchmark_route(demo.SPEC) is not None and benchmark_route(demo.SPEC).path == "/generate"
    assert benchmark_route(tgi.SPEC) is not None
    assert benchmark_route(BackendSpec("bare", "no benchmark", "http://127.0.0.1:1", routes=(Route("/x"),))) is None


# ---------------------------------------------------------------------------------------------
# On a mock clock


class Model:
    """A scripted model server behind httpx.MockTransport: `answer(n)` gives the n-th request's status."""

    def __init__(self, answer: Callable[[int], Awaitable[int] | int], seconds: float = 2.0) -> None:
        self.answer = answer
        self.seconds = seconds
        self.requests: list[tuple[float, str, dict[str, Any]]] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        n = len(self.requests)
        self.requests.append((trio.current_time(), request.url.path, json.loads(request.content)))
        status = self.answer(n)
        if not isinstance(status, int):
            status = await status
        if status == 0:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        await trio.sleep(self.seconds)
        return httpx.Response(status, json={"generated_text": "ok"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_throughput_is_served_workload_over_wall_time(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 200)
    async with model.client() as client:
        result = await run_benchmark(client, "http://model:5001/", ROUTE, QUICK)
    # warm-up + 3 rounds of 4 requests of 32 units, each taking 2 s, all at once
    assert len(model.requests) == 1 + 12
    assert result.rounds == pytest.approx((64.0, 64.0, 64.0))
    assert result.max_perf == pytest.approx(64.0) and result.statistic == "median"
    assert {path for _t, path, _p in model.requests} == {"/generate"}
    assert "auth_data" not in model.requests[0][2]  # the raw payload goes to the model
    assert model.requests[1][2] != model.requests[2][2]  # generated, not one payload repeated


async def test_non_parallel_route_runs_one_at_a_time(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 200)
    route = Route("/prompt", parallel=False, benchmark=payload)  # no workload formula: 1 unit each
    async with model.client() as client:
        settings = BenchmarkSettings(runs=2, concurrency=8, warmup=False)
        result = await run_benchmark(client, "http://model", route, settings)
    assert len(model.requests) == 2
    assert result.max_perf == pytest.approx(0.5)


async def test_a_round_with_a_failed_request_measures_nothing(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 500 if n in (1, 5) else 200)  # one request of rounds 1 and 2 fails
    async with model.client() as client:
        settings = BenchmarkSettings(runs=3, concurrency=4, warmup=False)
        result = await run_benchmark(client, "http://model", ROUTE, settings)
    assert result.rounds == pytest.approx((0.0, 0.0, 64.0))
    assert result.max_perf == pytest.approx(64.0)  # from the one round served whole
    assert result.failed == 2 and not result.complete


async def test_every_round_partly_failing_is_an_answered_error(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 500 if n % 2 else 200)  # odd requests fail: each round serves half
    async with model.client() as client:
        with pytest.raises(BenchmarkError, match="6 of 12 requests failed, no round was served whole") as err:
            await run_benchmark(client, "http://model", ROUTE, BenchmarkSettings(runs=3, concurrency=4, warmup=False))
    assert err.value.answered


async def test_refused_then_ready_retries_with_backoff(clock: trio.testing.MockClock) -> None:
    up_at = 20.0
    model = Model(lambda n: 0 if trio.current_time() < up_at else 200)
    with structlog.testing.capture_logs() as logs:
        async with model.client() as client:
            result = await run_benchmark(client, "http://model", ROUTE, QUICK)
    tries = [t for t, _p, _b in model.requests if t < up_at]
    gaps = [round(b - a, 3) for a, b in zip(tries, tries[1:])]
    assert gaps == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]  # doubling from 0.2 s, capped at 5 s
    assert result.max_perf == pytest.approx(64.0)
    assert [e["event"] for e in logs].count("benchmark.waiting") == 1  # once per wait, not per try


async def test_503_round_is_redone_not_counted(clock: trio.testing.MockClock) -> None:
    # warm-up ok, then the server restarts its engine: round 1 answers 503 twice before serving
    model = Model(lambda n: 503 if 1 <= n <= 8 else 200)
    async with model.client() as client:
        result = await run_benchmark(client, "http://model", ROUTE, QUICK)
    assert len(result.rounds) == 3 and min(result.rounds) == pytest.approx(64.0)


async def test_never_ready_fails_at_the_deadline(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 0)
    async with model.client() as client:
        with pytest.raises(BenchmarkError, match="not ready after 60s.*Connection refused"):
            await run_benchmark(client, "http://model", ROUTE, BenchmarkSettings(deadline_s=60.0))
    assert 55.0 <= trio.current_time() <= 60.0


async def test_all_rounds_failing_is_an_error_not_zero(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 200 if n == 0 else 500)  # warm-up fine, then every request errors
    async with model.client() as client:
        with pytest.raises(BenchmarkError, match="12 of 12 requests failed.*last error: HTTP 500") as err:
            await run_benchmark(client, "http://model", ROUTE, QUICK)
    assert "HTTP 500" in err.value.reason and err.value.answered  # a live server said no


async def test_slow_answers_time_out_as_failures(clock: trio.testing.MockClock) -> None:
    model = Model(lambda n: 200, seconds=1000.0)
    settings = BenchmarkSettings(runs=2, concurrency=2, warmup=False, request_timeout_s=30.0)
    async with model.client() as client:
        with pytest.raises(BenchmarkError, match="timed out after 30s") as err:
            await run_benchmark(client, "http://model", ROUTE, settings)
    assert trio.current_time() == pytest.approx(60.0)
    assert not err.value.answered  # no answer: a restart may cure a hung server


# ---------------------------------------------------------------------------------------------
# Against real HTTP servers


class Stub:
    """A stdlib model server in a thread; it starts listening `listen_after` seconds from now."""

    def __init__(self, status: Callable[[int], int], listen_after: float = 0.0) -> None:
        self.port = free_port()
        self.status = status
        self.count = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(listen_after,), daemon=True)

    def _serve(self, listen_after: float) -> None:
        if self.stopped.wait(listen_after):
            return
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stub.lock:
                    n, stub.count = stub.count, stub.count + 1
                body = b'{"generated_text": "x"}'
                self.send_response(stub.status(n))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.ready.set()
        self.server.serve_forever(poll_interval=0.02)

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.thread.join(timeout=5)


async def test_late_listening_server_is_waited_for() -> None:
    settings = BenchmarkSettings(runs=2, concurrency=2, deadline_s=10.0)
    with Stub(lambda n: 200, listen_after=0.5) as stub:
        started = time.monotonic()
        async with httpx.AsyncClient() as client:
            result = await run_benchmark(client, f"http://127.0.0.1:{stub.port}", ROUTE, settings)
        assert time.monotonic() - started >= 0.5
    assert stub.count == 1 + 4 and len(result.rounds) == 2 and result.max_perf > 0


async def test_real_503s_then_success_and_all_500s() -> None:
    settings = BenchmarkSettings(runs=2, concurrency=2, deadline_s=10.0, retry_initial_s=0.05)
    with Stub(lambda n: 503 if n < 2 else 200) as stub:
        async with httpx.AsyncClient() as client:
            result = await run_benchmark(client, f"http://127.0.0.1:{stub.port}", ROUTE, settings)
    assert stub.count == 2 + 1 + 4 and result.max_perf > 0
    with Stub(lambda n: 500) as stub:
        async with httpx.AsyncClient() as client:
            with pytest.raises(BenchmarkError, match="4 of 4 requests failed.*last error: HTTP 500"):
                await run_benchmark(client, f"http://127.0.0.1:{stub.port}", ROUTE, settings)


# ---------------------------------------------------------------------------------------------
# Identity and keys


def test_model_identity_from_command_then_env() -> None:
    assert model_identity(("text-generation-launcher", "--model-id", "org/a", "--port", "5001"), {}) == "org/a"
    assert model_identity(("vllm", "serve", "org/b", "--port", "8000"), {"MODEL_NAME": "other"}) == "org/b"
    assert model_identity(("llama-server", "-m", "/models/c.gguf", "-ngl", "99"), {}) == "/models/c.gguf (ngl=99)"
    assert model_identity(("python", "-m", "sglang.launch_server", "--model-path=org/d"), {}) == "org/d"
    assert model_identity(("server",), {"MODEL_ID": "org/e", "MODEL_NAME": "x"}) == "org/e"
    assert model_identity((), {"VLLM_MODEL": "org/f"}) == "org/f"
    assert model_identity(("server",), {}) == "unknown"
    quantized = model_identity(("tgl", "--model-id", "org/a", "--quantize", "awq", "--num-shard", "2"), {})
    assert quantized == "org/a (quantize=awq, num-shard=2)"


def test_cache_key_is_readable_stable_and_exact() -> None:
    key = cache_key("tgi", "org/a", ["NVIDIA H100", "NVIDIA H100"], QUICK)
    assert key.startswith("tgi/org/a/2xNVIDIA_H100/r3c4-")
    assert key == cache_key("tgi", "org/a", ["NVIDIA H100", "NVIDIA H100"], QUICK)
    others = {
        cache_key("tgi", "org/b", ["NVIDIA H100", "NVIDIA H100"], QUICK),
        cache_key("tgi", "org/a", ["NVIDIA H100"], QUICK),
        cache_key("tgi", "org/a", ["NVIDIA H100", "NVIDIA H100"], BenchmarkSettings(runs=3, concurrency=4, seed=1)),
        cache_key("vllm", "org/a", ["NVIDIA H100", "NVIDIA H100"], QUICK),
        cache_key("tgi", "org a", ["NVIDIA H100", "NVIDIA H100"], QUICK),  # slugs alike, hash differs
    }
    assert key not in others and len(others) == 5
    assert cache_key("x", "m", ["B", "A"], QUICK) == cache_key("x", "m", ["A", "B"], QUICK)
    # the deadline and timeouts do not change what is measured
    assert key == cache_key("tgi", "org/a", ["NVIDIA H100"] * 2, BenchmarkSettings(runs=3, concurrency=4, deadline_s=5))
    assert "/nogpu/" in cache_key("demo", "m", [], QUICK)


# ---------------------------------------------------------------------------------------------
# The cache file


def test_cache_writes_reads_and_refuses_a_stale_key(tmp_path: Path) -> None:
    path = tmp_path / "state" / "benchmark.json"
    cache = BenchmarkCache(path)
    old = cache_key("tgi", "org/a", ["H100"], QUICK)
    new = cache_key("tgi", "org/b", ["H100"], QUICK)
    assert cache.get(old) is None
    assert cache.put(old, 123.5)
    assert cache.get(old) == 123.5 and BenchmarkCache(path).get(old) == 123.5  # survives a restart
    assert cache.get(new) is None  # a changed model does not reuse the old number
    data = json.loads(path.read_text())
    assert data[old]["max_perf"] == 123.5 and data[old]["at"].endswith("+00:00")
    assert cache.put(new, 50.0) and cache.get(old) == 123.5 and cache.get(new) == 50.0
    assert [p.name for p in path.parent.iterdir()] == ["benchmark.json"]  # no temporary left behind
    with pytest.raises(ValueError):
        cache.put(new, 0.0)


def test_corrupt_cache_is_logged_and_ignored(tmp_path: Path) -> None:
    path = tmp_path / "benchmark.json"
    path.write_text('{"tgi/x": {"max_perf": 12')
    cache = BenchmarkCache(path)
    with structlog.testing.capture_logs() as logs:
        assert cache.get("tgi/x") is None
    assert [e["event"] for e in logs] == ["benchmark.cache_corrupt"]
    assert cache.put("tgi/x", 7.0) and cache.get("tgi/x") == 7.0
    path.write_text('["not", "an", "object"]')
    assert cache.get("tgi/x") is None
    path.write_text('{"tgi/x": {"max_perf": "fast"}, "tgi/y": {"max_perf": -1}}')
    assert cache.get("tgi/x") is None and cache.get("tgi/y") is None


def test_unwritable_cache_reports_false(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = BenchmarkCache(blocker / "benchmark.json")  # parent is a file: cannot be created
    with structlog.testing.capture_logs() as logs:
        assert cache.put("k", 1.0) is False
    assert logs[-1]["event"] == "benchmark.cache_write_failed"


def test_legacy_has_benchmark_is_read_only_on_a_first_boot(tmp_path: Path) -> None:
    legacy = tmp_path / ".has_benchmark"
    legacy.write_text("100\n")
    cache = BenchmarkCache(tmp_path / "benchmark.json", legacy)
    assert cache.lookup("tgi/a") == (100.0, "legacy")  # no shepherd entries yet
    cache.put("tgi/a", 80.0)
    assert cache.lookup("tgi/a") == (80.0, "cache")
    assert cache.lookup("tgi/b") == (None, "")  # the legacy number names no model: not for a changed one
    legacy.write_text("not a number\n")
    assert BenchmarkCache(tmp_path / "other.json", legacy).get("k") is None
    legacy.write_text("")
    assert BenchmarkCache(tmp_path / "other.json", legacy).get("k") is None
    assert BenchmarkCache(tmp_path / "other.json", tmp_path / "missing").get("k") is None


# ---------------------------------------------------------------------------------------------
# measure_capacity


async def test_measure_capacity_benchmarks_once_then_uses_the_cache(clock: trio.testing.MockClock,
                                                                    tmp_path: Path) -> None:
    model = Model(lambda n: 200)
    cache = BenchmarkCache(tmp_path / "benchmark.json")
    key = cache_key("demo", "m", [], QUICK)
    async with model.client() as client:
        first = await measure_capacity(client, "http://model", ROUTE, QUICK, cache, key, run_sync=inline)
        count = len(model.requests)
        again = await measure_capacity(client, "http://model", ROUTE, QUICK, cache, key, run_sync=inline)
        fixed = await measure_capacity(client, "http://model", ROUTE, QUICK, cache, key, fixed_max_perf=9.0,
                                       run_sync=inline)
        other = await measure_capacity(client, "http://model", ROUTE, QUICK, cache,
                                       cache_key("demo", "m2", [], QUICK), run_sync=inline)
    assert (first.source, first.max_perf) == ("benchmark", pytest.approx(64.0))
    assert first.result is not None and len(first.result.rounds) == 3
    assert (again.source, again.max_perf, count) == ("cache", first.max_perf, 13)
    assert (fixed.source, fixed.max_perf) == ("configured", 9.0)
    assert other.source == "benchmark" and len(model.requests) == 26  # a changed model is measured again


async def test_measure_capacity_failure_leaves_the_cache_empty(clock: trio.testing.MockClock, tmp_path: Path) -> None:
    model = Model(lambda n: 500)
    cache = BenchmarkCache(tmp_path / "benchmark.json")
    async with model.client() as client:
        with pytest.raises(BenchmarkError):
            await measure_capacity(client, "http://model", ROUTE, QUICK, cache, "k", run_sync=inline)
    assert not (tmp_path / "benchmark.json").exists()


async def test_a_benchmark_with_failed_requests_is_used_but_not_cached(clock: trio.testing.MockClock,
                                                                      tmp_path: Path) -> None:
    model = Model(lambda n: 500 if n == 2 else 200)  # one request of round 1 fails
    cache = BenchmarkCache(tmp_path / "benchmark.json")
    async with model.client() as client:
        with structlog.testing.capture_logs() as logs:
            capacity = await measure_capacity(client, "http://model", ROUTE, QUICK, cache, "k", run_sync=inline)
    assert capacity.source == "benchmark" and capacity.max_perf == pytest.approx(64.0)
    assert cache.get("k") is None  # the next start measures again
    assert any(e["event"] == "benchmark.not_cached" and e["failed"] == 1 for e in logs)


async def test_the_probe_sees_the_prompt_and_its_limits_reach_every_payload(clock: trio.testing.MockClock) -> None:
    seen: list[ServerLimits] = []
    asked: list[str] = []

    def fitted(rng: random.Random, limits: ServerLimits) -> dict[str, Any]:
        seen.append(limits)
        return {"prompt": f"one two {rng.randrange(9)}", "max_tokens": limits.context_tokens or 0}

    async def probe(text: str) -> ServerLimits:
        asked.append(text)
        return ServerLimits(model="m", context_tokens=64)

    model = Model(lambda n: 200)
    route = Route("/v1/completions", workload=field_workload("max_tokens"), benchmark=fitted)
    async with model.client() as client:
        await measure_capacity(client, "http://model", route, QUICK, None, "k", probe=probe, run_sync=inline)
    assert len(asked) == 1 and asked[0].startswith("one two ")
    assert seen[0] == ServerLimits() and set(seen[1:]) == {ServerLimits(model="m", context_tokens=64)}
    assert {p["max_tokens"] for _t, _path, p in model.requests} == {64}


def test_prompt_text_of_each_payload_shape() -> None:
    assert prompt_text({"prompt": "a b"}) == "a b"
    assert prompt_text({"inputs": "c d", "parameters": {}}) == "c d"
    assert prompt_text({"messages": [{"role": "user", "content": "e"}, {"content": 3}, "x"]}) == "e"
    assert prompt_text({"other": 1}) == ""


def test_the_flags_that_change_capacity_change_the_identity() -> None:
    base = ("llama-server", "-m", "/m.gguf")
    assert model_identity((*base, "-c", "2048", "-np", "4"), {}) == "/m.gguf (c=2048, np=4)"
    assert model_identity((*base, "--parallel", "2"), {}) != model_identity((*base, "--parallel", "4"), {})
    vllm = ("python", "-m", "vllm.entrypoints.openai.api_server", "--model", "org/m")
    for flag in ("--max-num-seqs", "--max-model-len", "--tensor-parallel-size"):
        assert model_identity((*vllm, flag, "8"), {}) != model_identity((*vllm, flag, "16"), {})
