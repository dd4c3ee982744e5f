"""What a model server says of its limits (probes/limits.py), and the benchmark payload fitted to it
(backends/openai.py). The answers are the real servers' shapes: llama-server b11434 `/props` and
`/tokenize`, vLLM 0.32.0 `/v1/models` and `/tokenize` (as captured from them), TGI's `/info`."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from backends.openai import MAX_TOKENS, PROMPT_WORDS, completion_payload, fitted_sizes
from backends.spec import ServerLimits
from probes.limits import (
    parse_llamacpp_props,
    parse_openai_models,
    parse_tgi_info,
    probe_limits,
    token_count,
)

LLAMA_PROPS = {"default_generation_settings": {"n_ctx": 1024, "temperature": 0.8}, "total_slots": 2,
               "model_alias": "/m/tiny-llama.gguf", "model_path": "/m/tiny-llama.gguf"}
VLLM_MODELS = {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 2048,
                                           "root": "/m/tiny-llama"}]}


def test_parsers_read_each_servers_shape() -> None:
    assert parse_llamacpp_props(LLAMA_PROPS) == ServerLimits(model="/m/tiny-llama.gguf", context_tokens=1024, slots=2)
    assert parse_openai_models(VLLM_MODELS) == ServerLimits(model="tiny", context_tokens=2048)
    assert parse_openai_models({"data": [{"id": "llama3"}]}) == ServerLimits(model="llama3")  # Ollama: no length
    assert parse_tgi_info({"model_id": "org/m", "max_total_tokens": 4096}) == ServerLimits("org/m", 4096)
    assert token_count({"count": 19, "max_model_len": 2048, "tokens": [1] * 19}) == 19  # vLLM
    assert token_count({"tokens": [358, 488, 506]}) == 3  # llama-server
    assert token_count([{"id": 1}, {"id": 2}]) == 2  # TGI


@pytest.mark.parametrize("junk", [None, [], "x", {"data": "x"}, {"data": [1]}, {"data": []},
                                  {"default_generation_settings": {"n_ctx": -5}, "total_slots": True},
                                  {"max_total_tokens": float("nan"), "model_id": "x" * 10_000}])
def test_parsers_take_nothing_from_junk(junk: object) -> None:
    for parse in (parse_llamacpp_props, parse_openai_models, parse_tgi_info):
        limits = parse(junk)
        assert limits.context_tokens is None and limits.slots is None
        assert limits.model is None or len(limits.model) <= 512
    assert token_count(junk) is None or isinstance(junk, list)


def test_unstated_limits_keep_vasts_payload() -> None:
    assert fitted_sizes(ServerLimits()) == (PROMPT_WORDS, MAX_TOKENS)
    payload = completion_payload(random.Random(0), ServerLimits())
    assert len(payload["prompt"].split()) == PROMPT_WORDS and payload["max_tokens"] == MAX_TOKENS
    assert "model" not in payload


@pytest.mark.parametrize("context", [16, 64, 256, 1024, 2048, 4096, 131072])
@pytest.mark.parametrize("per_word", [None, 1.3, 2.8, 6.0])
def test_a_fitted_payload_fits_the_context(context: int, per_word: float | None) -> None:
    limits = ServerLimits(model="m", context_tokens=context, tokens_per_word=per_word)
    words, max_tokens = fitted_sizes(limits)
    assert words >= 1 and max_tokens >= 1
    assert words * (per_word or 2.0) + max_tokens <= max(context, 16)
    payload = completion_payload(random.Random(1), limits)
    assert payload["model"] == "m" and len(payload["prompt"].split()) == words


async def test_probe_asks_llama_server_and_measures_tokens_per_word() -> None:
    asked: list[tuple[str, str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        asked.append((request.method, request.url.path, body))
        if request.url.path == "/props":
            return httpx.Response(200, json=LLAMA_PROPS)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": list(range(3 * len(body["content"].split())))})
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        limits = await probe_limits(client, "http://model", "llamacpp", "a b c d", {})
    assert limits == ServerLimits(model="/m/tiny-llama.gguf", context_tokens=1024, tokens_per_word=3.0, slots=2)
    assert asked == [("GET", "/props", None), ("POST", "/tokenize", {"content": "a b c d"})]


async def test_probe_prefers_the_model_named_by_the_environment_and_survives_a_dead_server() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=VLLM_MODELS)
        if request.url.path == "/tokenize":
            assert json.loads(request.content)["model"] == "served-name"
            return httpx.Response(200, json={"count": 6})
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        limits = await probe_limits(client, "http://model", "openai", "one two three", {"MODEL_NAME": "served-name"})
    assert (limits.model, limits.context_tokens, limits.tokens_per_word) == ("served-name", 2048, 2.0)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        assert await probe_limits(client, "http://model", "openai", "x", {}) == ServerLimits()
