"""Each backend's log grammar against the lines its real server prints.

Every line below is the real server's, from the source named beside it in backends/tgi.py and
backends/openai.py (TGI v3.3.7 and v2.0.4, vLLM v0.32.0 and v0.8.5, SGLang v0.5.23, llama.cpp b11434,
Ollama v0.32.15): the ready line classifies as loaded, a model that cannot load as fatal, an engine
that dies at run time as error (restart), and lines that one failed request prints as nothing at all.
One end-to-end test shows what fatal means: exit 1 at once, the line as the reason, no restart.
"""

from __future__ import annotations

import sys

import pytest

from backends.registry import BACKENDS
from backends.spec import BackendSpec
from supervisor.rules import Kind, LogRules
from tests.harness import ROOT, Shepherd, free_port


def rules_of(spec: BackendSpec) -> LogRules:
    return LogRules.build(spec.load_patterns, spec.error_patterns, spec.fatal_patterns, spec.info_patterns)


# (backend, line, expected kind or None). Kept in one table so that a new backend or release adds rows.
CASES: list[tuple[str, str, Kind | None]] = [
    # -- TGI
    ("tgi", '{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","message":"Connected",'
            '"target":"text_generation_router::server","filename":"router/src/server.rs","line_number":2302}',
     Kind.LOADED),  # v3.3.7 (and every release since 2.1)
    ("tgi", '{"timestamp":"2024-05-01T10:00:00.000000Z","level":"INFO","message":"Connected",'
            '"target":"text_generation_router","filename":"router/src/main.rs","line_number":355}',
     Kind.LOADED),  # v2.0.4
    ("tgi", "2025-12-18T16:58:43.123456Z  INFO text_generation_router::server: router/src/server.rs:2302: Connected",
     Kind.LOADED),  # without --json-output
    ("tgi", '{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","fields":{"message":"Connected"},'
            '"target":"text_generation_launcher"}', None),  # another component's "Connected"
    ("tgi", '{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","message":"Success",'
            '"target":"text_generation_router::server","filename":"router/src/server.rs","line_number":432}', None),
    ("tgi", "Error: ShardCannotStart", Kind.FATAL),
    ("tgi", "Error: DownloadError", Kind.FATAL),
    ("tgi", 'Error: ArgumentValidation("`max_input_tokens`(4096) must be < `max_total_tokens`(4096)")', Kind.FATAL),
    ("tgi", "Error: WebserverCannotStart", Kind.FATAL),
    ("tgi", '{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","fields":{"message":"Download file: '
            'model.safetensors"},"target":"text_generation_launcher","span":{"name":"download"}}', Kind.INFO),
    # -- vLLM 0.32 (V1 engine; lines as `(PROCESS pid=N) LEVEL MM-DD HH:MM:SS [file:line] message`)
    ("vllm", "(APIServer pid=1) INFO:     Application startup complete.", Kind.LOADED),
    ("vllm", "(EngineCore pid=812) ERROR 12-18 16:58:43 [core.py:1510] EngineCore failed to start.", Kind.FATAL),
    ("vllm", "RuntimeError: Engine core initialization failed. See root cause above. "
             "Failed core proc(s): {'EngineCore': 1}", Kind.FATAL),
    ("vllm", "RuntimeError: Engine process failed to start. See stack trace for the root cause.", Kind.FATAL),  # V0
    ("vllm", "ValueError: Invalid repository ID or local directory specified: '/models/nope'.", Kind.FATAL),
    ("vllm", "ValueError: Model architectures ['FooForCausalLM'] are not supported for now. "
             "Supported architectures: dict_keys(['LlamaForCausalLM'])", Kind.FATAL),
    ("vllm", "(EngineCore pid=812) ERROR 12-18 16:58:43 [core.py:1512] EngineCore encountered a fatal error.",
     Kind.ERROR),
    ("vllm", "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
             "See stack trace (above) for the root cause.", Kind.ERROR),
    ("vllm", "(APIServer pid=1) ERROR 12-18 16:58:43 [async_llm.py:906] AsyncLLM output_handler failed.", Kind.ERROR),
    ("vllm", "vllm.engine.async_llm_engine.AsyncEngineDeadError: Background loop has errored already.",
     Kind.ERROR),  # V0
    ("vllm", "vllm.engine.multiprocessing.MQEngineDeadError: Engine loop is not running. Inspect the stacktrace "
             "to find the original error: RuntimeError('CUDA error: an illegal memory access was encountered').",
     Kind.ERROR),  # V0
    # One failed request: vLLM logs it (often with a traceback) and keeps serving.
    ("vllm", "(APIServer pid=1) ERROR 12-18 16:58:43 [serving.py:929] Error in chat completion stream generator.",
     None),
    ("vllm", "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig", Kind.FATAL),
    ("vllm", "pydantic_core._pydantic_core.ValidationError: 2 validation errors for CacheConfig", Kind.FATAL),
    ("vllm", "pydantic_core._pydantic_core.ValidationError: 1 validation error for ChatCompletionRequest", None),
    ("vllm", "Traceback (most recent call last):", None),
    ("vllm", "ValueError: This model's maximum context length is 2048 tokens. However, you requested 4096 tokens "
             "(2048 in the messages, 2048 in the completion). Please reduce the length of the messages or completion.",
     None),
    ("vllm", "vllm.v1.engine.exceptions.EngineGenerateError", None),
    ("vllm", "(APIServer pid=1) INFO 12-18 16:58:43 [async_llm.py:795] Request cmpl-1 failed (bad request): "
             "max_tokens must be at least 1.", None),
    # -- SGLang 0.5.23 (`[YYYY-MM-DD HH:MM:SS] message`)
    ("sglang", "[2026-08-01 10:00:00] The server is fired up and ready to roll!", Kind.LOADED),
    ("sglang", "[2026-08-01 10:00:00] Received sigquit from a child process. It usually means the child failed.",
     Kind.FATAL),
    ("sglang", "RuntimeError: Rank 0 scheduler died during initialization (exit code: -9). If exit code is -9 "
               "(SIGKILL), a common cause is the OS OOM killer. Run `dmesg -T | grep -i oom` to check.", Kind.FATAL),
    ("sglang", "RuntimeError: Initialization failed. Please see the error messages above.", Kind.FATAL),
    ("sglang", "[2026-08-01 10:00:00] Initialization failed. warmup error: Traceback (most recent call last):",
     Kind.FATAL),
    ("sglang", "[2026-08-01 10:00:00] SIGQUIT received. signum=None, frame=None. It usually means one child failed.",
     Kind.ERROR),
    # Printed both while loading and while serving: the server's own line after it decides.
    ("sglang", "[2026-08-01 10:00:00 TP0] Scheduler hit an exception: Traceback (most recent call last):", None),
    # -- llama.cpp b11434 (stderr; `srv  %12.*s: ` prefixes)
    ("llamacpp", "srv  llama_server: model loaded", Kind.LOADED),
    ("llamacpp", "main: model loaded", Kind.LOADED),  # builds before llama_server()
    ("llamacpp", "I srv  llama_server: model loaded", Kind.LOADED),  # --log-prefix
    ("llamacpp", "srv    load_model: loading model '/models/tiny.gguf'", None),
    ("llamacpp", "error: no CLIP model loaded", None),
    ("llamacpp", "llama_model_load: error loading model: llama_model_loader: failed to load model from "
                 "/models/broken.gguf", Kind.FATAL),
    ("llamacpp", "llama_model_load_from_file_impl: failed to load model", Kind.FATAL),
    ("llamacpp", "srv    load_model: failed to load model, '/models/broken.gguf'", Kind.FATAL),
    ("llamacpp", "srv  llama_server: exiting due to model loading error", Kind.FATAL),
    ("llamacpp", "main: exiting due to model loading error", Kind.FATAL),  # older builds
    ("llamacpp", "0.00.812.345 E srv  llama_server: exiting due to model loading error", Kind.FATAL),  # timestamps
    # Router mode: a child's line forwarded as `[ PORT] ...`; the router keeps serving other models.
    ("llamacpp", "[ 8081] srv  llama_server: exiting due to model loading error", None),
    ("llamacpp", "[55123] llama_model_load: error loading model: unknown model architecture: 'glm9'", None),
    # -- Ollama 0.32.15 (slog's text format)
    ("ollama", 'time=2026-08-19T15:40:16.123-07:00 level=INFO source=routes.go:2008 '
               'msg="Listening on 127.0.0.1:11434 (version 0.32.15)"', Kind.LOADED),
    ("ollama", 'time=2026-08-19T15:40:17.123-07:00 level=ERROR source=sched.go:734 msg="error loading llama server" '
               'error="llama-server process has terminated: exit status 1: error loading model"', Kind.FATAL),
    # Its runner's own lines, copied to Ollama's stderr: Ollama's line above is the one that counts.
    ("ollama", "srv  llama_server: exiting due to model loading error", None),
    ("ollama", "Error: pull model manifest: file does not exist", Kind.ERROR),
]


@pytest.mark.parametrize(("backend", "line", "kind"), CASES, ids=[f"{b}-{i}" for i, (b, _l, _k) in enumerate(CASES)])
def test_backend_classifies_its_real_lines(backend: str, line: str, kind: Kind | None) -> None:
    match = rules_of(BACKENDS[backend]).match(line)
    assert (match.kind if match else None) is kind, (backend, line, match)


@pytest.mark.parametrize("backend", ["tgi", "vllm", "sglang", "llamacpp", "ollama"])
def test_every_real_backend_has_a_load_line_and_a_model_loading_fatal_line(backend: str) -> None:
    # Issue 9, item 4: a model that cannot load is never retried. Pinned per backend so that a backend
    # added later does not come without its fatal lines.
    kinds = {kind for b, _line, kind in CASES if b == backend}
    assert {Kind.LOADED, Kind.FATAL} <= kinds
    assert BACKENDS[backend].fatal_patterns


def test_old_vllm_pattern_is_gone() -> None:
    # `RuntimeError: Engine` matched nothing a dying 0.32 engine prints, and it made the engine's failed
    # start ("RuntimeError: Engine core initialization failed") a restart instead of fatal.
    assert "RuntimeError: Engine" not in BACKENDS["vllm"].error_patterns
    assert "RuntimeError: Engine" not in BACKENDS["sglang"].error_patterns


# -- end to end


def test_tgi_3_becomes_ready_on_its_json_connected_line(shepherds: list[Shepherd]) -> None:
    # Issue 9, item 2: TGI 2.1+ logs `"target":"text_generation_router::server"`, which the old substring
    # never matched, so shepherd waited in `loading` for good. The emulator prints v3.3.7's lines.
    model_port = free_port()
    command = [sys.executable, str(ROOT / "tests" / "emulators" / "tgi.py"), "--hostname", "127.0.0.1",
               "--port", str(model_port), "--json-output"]
    s = Shepherd(["--backend", "tgi", "--", *command], env={"TGI_LOAD_DELAY": "0.2"}, model_port=model_port)
    shepherds.append(s)
    s.wait_state("ready")
    connected = [e["line"] for e in s.find("model.log") if '"message":"Connected"' in e["line"]]
    assert len(connected) == 1 and '"target":"text_generation_router::server"' in connected[0]
    # Ready because the load line was seen, not because a fallback gave up waiting for it.
    [warming] = [e for e in s.find("state") if e["to"] == "warming"]
    assert warming["reason"] == "health check passed"


# A model loading error ends shepherd at once.


# llama-server b11434's stderr for a file that is not a GGUF (ggml/src/gguf.cpp:482, src/llama.cpp:375 and
# :433, common/common.cpp:1404, tools/server/server-context.cpp:1214, tools/server/server.cpp:491).
BROKEN_MODEL_LINES: tuple[str, ...] = (
    "srv    load_model: loading model '/models/broken.gguf'",
    "gguf_init_from_file_impl: invalid magic characters: 'nope', expected 'GGUF'",
    "llama_model_load: error loading model: llama_model_loader: failed to load model from /models/broken.gguf",
    "llama_model_load_from_file_impl: failed to load model",
    "cmn  common_init_: failed to load model '/models/broken.gguf'",
    "srv    load_model: failed to load model, '/models/broken.gguf'",
    "srv  llama_server: exiting due to model loading error",
)


def fake_llama_server(lines: tuple[str, ...]) -> list[str]:
    """A model command that prints `lines` on stderr, as llama-server does, and exits 1."""
    script = "import sys\nfor line in sys.argv[1:]:\n    print(line, file=sys.stderr, flush=True)\nsys.exit(1)\n"
    return [sys.executable, "-c", script, *lines]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        # The report: the last line alone (as a log tail shows it).
        ((BROKEN_MODEL_LINES[-1],), BROKEN_MODEL_LINES[-1]),
        # The whole sequence: the first fatal line, the one naming the cause, is the reason.
        (BROKEN_MODEL_LINES, BROKEN_MODEL_LINES[2]),
    ],
    ids=["exit-line", "whole-sequence"],
)
def test_llamacpp_model_loading_error_exits_1_at_once(
    shepherds: list[Shepherd], lines: tuple[str, ...], reason: str
) -> None:
    s = Shepherd(["--backend", "llamacpp", "--", *fake_llama_server(lines)],
                 env={"RESTART_DELAY": "0.05", "RESTART_MAX_DELAY": "0.2"})
    shepherds.append(s)
    assert s.wait_exit() == 1
    states = s.find("state")
    assert states[-1]["to"] == "failed"
    assert reason in states[-1]["reason"]
    assert s.find("shepherd.exit")[0]["exit_code"] == 1
    # Given up on the first run: a restart cannot fix a model file.
    assert "restarting" not in [e["to"] for e in states]
    assert len(s.find("model.started")) == 1
