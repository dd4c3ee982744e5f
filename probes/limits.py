"""What the model server says about its own limits, asked once before a benchmark; never raising.

The benchmark's payloads must fit the server, or every request is an error that measures nothing
(llama-server with `-c 2048` answered `500 Context size has been exceeded` to an ~850 + 500-token
request). Each kind of server says it differently:

- `llamacpp`: `GET /props` -> `default_generation_settings.n_ctx` (the context of one slot),
  `total_slots` (`-np`), `model_alias`; `POST /tokenize {"content": ...}` -> `{"tokens": [...]}`.
- `openai` (vLLM, SGLang, any OpenAI server): `GET /v1/models` -> `data[0].id`, `data[0].max_model_len`
  (vLLM, SGLang); `POST /tokenize {"model", "prompt"}` -> `{"count": n}` (vLLM; others answer 404).
- `tgi`: `GET /info` -> `max_total_tokens`, `model_id`; `POST /tokenize {"inputs": ...}` -> a list.

The parsers are pure; `probe_limits` does the I/O with a short timeout per call and reads what it can:
a server that answers none of it gets the benchmark's default payload, as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from backends.spec import ServerLimits
from supervisor.logs import get_logger

KINDS = ("llamacpp", "openai", "tgi")
TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 1 << 20  # a props or models answer is a few KiB
# Environment variables that name the model to put in `model`, first set wins (Vast's OpenAI workers
# read MODEL_NAME; the others are what the servers' own images read).
MODEL_NAME_VARS = ("MODEL_NAME", "SERVED_MODEL_NAME", "OLLAMA_MODEL", "VLLM_MODEL", "SGLANG_MODEL")


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return int(value) if value >= 1 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() and len(value) <= 512 else None


def parse_llamacpp_props(data: Any) -> ServerLimits:
    if not isinstance(data, Mapping):
        return ServerLimits()
    settings = data.get("default_generation_settings")
    n_ctx = _positive_int(settings.get("n_ctx")) if isinstance(settings, Mapping) else None
    return ServerLimits(model=_text(data.get("model_alias")), context_tokens=n_ctx,
                        slots=_positive_int(data.get("total_slots")))


def parse_openai_models(data: Any) -> ServerLimits:
    models = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(models, Sequence) or not models or not isinstance(models[0], Mapping):
        return ServerLimits()
    first = models[0]
    return ServerLimits(model=_text(first.get("id")), context_tokens=_positive_int(first.get("max_model_len")))


def parse_tgi_info(data: Any) -> ServerLimits:
    if not isinstance(data, Mapping):
        return ServerLimits()
    return ServerLimits(model=_text(data.get("model_id")), context_tokens=_positive_int(data.get("max_total_tokens")))


def token_count(data: Any) -> int | None:
    """Tokens in a /tokenize answer: `{"count": n}`, `{"tokens": [...]}` or a bare list (TGI)."""
    if isinstance(data, Mapping):
        count = _positive_int(data.get("count"))
        if count is not None:
            return count
        data = data.get("tokens")
    return len(data) if isinstance(data, list) and data else None


def model_from_env(env: Mapping[str, str]) -> str | None:
    return next((env[v].strip() for v in MODEL_NAME_VARS if env.get(v, "").strip()), None)


async def _json(client: httpx.AsyncClient, method: str, url: str, body: Any = None) -> Any:
    try:
        response = await client.request(method, url, json=body, timeout=TIMEOUT_S)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or len(response.content) > MAX_ANSWER_BYTES:
        return None
    try:
        return response.json()
    except ValueError:
        return None


async def probe_limits(
    client: httpx.AsyncClient, base_url: str, kind: str | None, sample_text: str, env: Mapping[str, str]
) -> ServerLimits:
    """The server's limits, `model` from the environment first (the user's word), else the server's.

    `sample_text` is a prompt of the benchmark's own words: its token count over its word count is
    the `tokens_per_word` the payload is fitted with (a tiny tokenizer splits a word in several).
    """
    base = base_url.rstrip("/")
    found = ServerLimits()
    if kind == "llamacpp":
        found = parse_llamacpp_props(await _json(client, "GET", base + "/props"))
    elif kind == "openai":
        found = parse_openai_models(await _json(client, "GET", base + "/v1/models"))
    elif kind == "tgi":
        found = parse_tgi_info(await _json(client, "GET", base + "/info"))
    model = model_from_env(env) or found.model
    tokens_per_word = None
    words = len(sample_text.split())
    if kind is not None and words:
        body: dict[str, Any] = {
            "llamacpp": {"content": sample_text}, "tgi": {"inputs": sample_text},
        }.get(kind, {"prompt": sample_text, **({"model": model} if model else {})})
        tokens = token_count(await _json(client, "POST", base + "/tokenize", body))
        tokens_per_word = tokens / words if tokens else None
    limits = ServerLimits(model=model, context_tokens=found.context_tokens, tokens_per_word=tokens_per_word,
                          slots=found.slots)
    get_logger("supervisor.benchmark").info(
        "benchmark.server_limits", kind=kind, model=model, context_tokens=limits.context_tokens,
        tokens_per_word=round(tokens_per_word, 3) if tokens_per_word else None, slots=limits.slots,
    )
    return limits
