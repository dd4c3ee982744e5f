"""The model-server queue probe: real vLLM/TGI exposition text and ComfyUI's /queue, over a mock
transport; errors come back as ok=False, never as exceptions; one timeout over a real socket."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from probes.model_metrics import ModelMetricsProbe, ModelQueue, parse_prometheus

MODEL = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'

# Shaped like vLLM 0.10 (V1 engine, two data-parallel engines): HELP/TYPE lines, engine and
# model_name labels, counters with _total/_created, histograms, and the process collector.
VLLM = f"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 12007.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{MODEL}}} 5.0
vllm:num_requests_running{{engine="1",{MODEL}}} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",{MODEL}}} 2.0
vllm:num_requests_waiting{{engine="1",{MODEL}}} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",{MODEL}}} 0.75
vllm:kv_cache_usage_perc{{engine="1",{MODEL}}} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",{MODEL}}} 48213.0
vllm:prompt_tokens_created{{engine="0",{MODEL}}} 1.7583e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.001",{MODEL}}} 0.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",{MODEL}}} 211.0
vllm:time_to_first_token_seconds_count{{engine="0",{MODEL}}} 211.0
vllm:time_to_first_token_seconds_sum{{engine="0",{MODEL}}} 9.87
"""

# vLLM before 0.9 (V0): one engine, the KV cache gauge under its old name.
VLLM_OLD = f"""# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{MODEL}}} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{MODEL}}} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{{MODEL}}} 0.125
"""

# TGI's router (the Rust metrics exporter): TYPE lines only, no labels on the gauges.
TGI = """# TYPE tgi_request_count counter
tgi_request_count 52
# TYPE tgi_queue_size gauge
tgi_queue_size 4
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 16
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 8192
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 3
tgi_request_duration_bucket{le="+Inf"} 52
tgi_request_duration_sum 211.5
tgi_request_duration_count 52
"""


def _probe(handler: httpx.MockTransport, kind: str = "prometheus", path: str = "/metrics") -> ModelMetricsProbe:
    client = httpx.AsyncClient(transport=handler)
    return ModelMetricsProbe(client, "http://model:8000/", kind=kind, path=path)


def _serving(body: str | bytes, status: int = 200, seen: list[str] | None = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(str(request.url))
        return httpx.Response(status, content=body)

    return httpx.MockTransport(handle)


async def test_vllm_sums_engines_and_averages_kv_cache() -> None:
    seen: list[str] = []
    queue = await _probe(_serving(VLLM, seen=seen)).sample()
    assert queue == ModelQueue(waiting=2.0, running=8.0, kv_cache_usage=0.5, ok=True, error="")
    assert seen == ["http://model:8000/metrics"]


async def test_old_vllm_kv_cache_name() -> None:
    queue = await _probe(_serving(VLLM_OLD)).sample()
    assert (queue.waiting, queue.running, queue.kv_cache_usage) == (0.0, 1.0, 0.125)


async def test_tgi_queue_and_batch() -> None:
    queue = await _probe(_serving(TGI)).sample()
    assert (queue.waiting, queue.running, queue.kv_cache_usage, queue.ok) == (4.0, 16.0, None, True)


def test_server_without_queue_metrics_reads_unknown_not_zero() -> None:
    queue = parse_prometheus("# TYPE http_requests_total counter\nhttp_requests_total 3\n")
    assert queue.ok and not queue.known
    assert (queue.waiting, queue.running, queue.kv_cache_usage) == (None, None, None)


def test_a_broken_family_we_do_not_read_is_ignored() -> None:
    text = VLLM + "some_other_metric{broken 12 12 12\n"
    assert parse_prometheus(text).waiting == 2.0


async def test_a_broken_family_we_read_is_an_error() -> None:
    queue = await _probe(_serving('vllm:num_requests_waiting{engine="0" 3\n')).sample()
    assert not queue.ok
    assert queue.error.startswith("unreadable prometheus answer")


async def test_http_error_status() -> None:
    queue = await _probe(_serving("oops", status=503)).sample()
    assert queue == ModelQueue(None, None, None, False, "http://model:8000/metrics answered 503")


async def test_connection_refused_does_not_raise() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("All connection attempts failed", request=request)

    queue = await _probe(httpx.MockTransport(refuse)).sample()
    assert not queue.ok
    assert queue.error == "ConnectError: All connection attempts failed"


async def test_comfyui_queue() -> None:
    body = {"queue_running": [[0, "abc", {}, {}, []]], "queue_pending": [[1, "d", {}, {}, []], [2, "e", {}, {}, []]]}
    seen: list[str] = []
    queue = await _probe(_serving(json.dumps(body), seen=seen), kind="comfyui", path="/queue").sample()
    assert queue == ModelQueue(waiting=2.0, running=1.0, kv_cache_usage=None, ok=True, error="")
    assert seen == ["http://model:8000/queue"]


@pytest.mark.parametrize("body", ["<html>not json</html>", '{"queue_running": 3}', "[]"])
async def test_comfyui_unreadable_answer(body: str) -> None:
    queue = await _probe(_serving(body), kind="comfyui", path="/queue").sample()
    assert not queue.ok
    assert "unreadable comfyui answer" in queue.error


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        ModelMetricsProbe(httpx.AsyncClient(), "http://model", kind="statsd")


async def test_timeout_over_a_real_socket() -> None:
    # A server that accepts and never answers: the probe gives up after its timeout and says so.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, silent, listeners)
        async with httpx.AsyncClient() as client:
            probe = ModelMetricsProbe(client, f"http://127.0.0.1:{port}", timeout=0.2)
            with trio.fail_after(5):
                queue = await probe.sample()
        nursery.cancel_scope.cancel()
    assert queue == ModelQueue(None, None, None, False, "timed out")
