"""Emulator of Hugging Face text-generation-inference (TGI) as run by `text-generation-launcher`.

It owns the TGI side of the end-to-end tests: a standard-library-only program (no shepherd import, fast
start) that prints the launcher's and the router's log lines as TGI v3.3.7 prints them (the last
release, huggingface/text-generation-inference@dfb3fbe7, 2025-12-18; see shared/reference/anchors.md
§3.1), in TGI's tracing JSON format with `--json-output` (tracing's text formats without it), and
serves TGI's real routes.

The launcher (launcher/src/main.rs, `tracing_subscriber::fmt().json()` at :2065, event fields nested
under `fields`, no file or line) prints its Args pretty-printed (`{:#?}`, :2079), `Using attention
flashinfer - Prefix caching true` (:2086), ``Default `max_batch_prefill_tokens` to 4096`` (:2150), `Using
default cuda graphs [1, 2, 4, 8, 16, 32]` (:2182), the download (`Starting check and download process for
MODEL` :1508, the download process's `Download file: ...`, `Successfully downloaded weights for MODEL`
:1550), the shard (`Starting shard` :1149, `Waiting for shard to be ready...` :1244 (once at once, then
every 10 s; real TGI waits 10 s before the first), `Server started at unix://...`, `Shard ready in 1.2s`
:1240), then `Starting Webserver` (:1842) and copies the router's lines verbatim (:2006). The router
(router/src/logging.rs:83, `.json().flatten_event(true)` with file and line) prints `Warming up model`
and `Setting max batch total tokens to N` (target `text_generation_router_v3`, backends/v3/src/lib.rs:125
and :137), then `Connected` (target `text_generation_router::server`, router/src/server.rs:2302), printed
BEFORE the port is bound (:2322), so a supervisor must still probe /health. TGI 2.0 printed `Connected`
from router/src/main.rs with the target `text_generation_router`; 2.1 and later print the module path,
which is why shepherd matches the line by its JSON fields.

Command line (the launcher's shape; other launcher flags are accepted and ignored):
    --port (3000)  --hostname (0.0.0.0)  --model-id (bigscience/bloom-560m)  --json-output

Test switches (environment):
    TGI_LOAD_DELAY      0.5 s    whole startup, split 20% download / 60% shard / 20% warm-up
    TGI_TOKEN_INTERVAL  0.005 s  per generated token
    TGI_LISTEN_DELAY    0.0 s    gap between `Connected` and the port listening (widen it to test that
                                 a supervisor waits for /health, not only for the log line)
    TGI_FAIL            DownloadError | ShardCannotStart | WebserverFailed: print that failure's real
                                 error lines, then `Error: NAME` on stderr, exit 1

Routes: GET /health (200, empty body), GET /info, GET /metrics (Prometheus text: tgi_queue_size,
tgi_batch_current_size = generations in flight, tgi_request_count, ...), POST /generate, POST
/generate_stream (SSE, `data:` without a space, one chunk per token, the last event carrying
`generated_text` and `details`), POST / (TGI's compat route, `"stream": true` picks streaming). Bad
input -> 422 `{"error": ..., "error_type": "validation"}`; malformed JSON -> 400 in the same shape.
`parameters.max_new_tokens` defaults to 20 when absent (real TGI's default is 100 in recent versions,
20 in older ones; 20 keeps tests fast). Tokens are `tok0`, ` tok1`, ... so the text is "tok0 tok1 ...".

SIGTERM/SIGINT: the launcher's shutdown lines (`Terminating webserver`, `Waiting for webserver to
gracefully shutdown`, the router's `signal received, starting graceful shutdown` (server.rs:2399),
`webserver terminated`, `Shutting down shards`, `Terminating shard`, ...), exit 0. A port that cannot be
bound: the router's `Failed to bind to ADDR: ERROR` (server.rs:2325), the launcher's `Webserver Crashed`
(main.rs:2342), `Error: WebserverFailed`, exit 1.

Its HTTP/1.1 plumbing (body reading, chunked writes, disconnect watching, signal-safe threads) is the
demo server's, from `backends/model_http.py` (standard library only, like this file).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, NoReturn

if not __package__:
    # Run by path (`python tests/emulators/tgi.py`): sys.path[0] is tests/emulators, so put this
    # checkout's root first, so that `backends` is this copy's package and not another checkout's.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from backends import model_http  # noqa: E402 (after the sys.path fix above)

LAUNCHER = "text_generation_launcher"
# tracing's target is the module path of the line that logs (the crate name, `-` as `_`, then modules).
ROUTER = "text_generation_router"
ROUTER_SERVER = "text_generation_router::server"  # router/src/server.rs
ROUTER_V3 = "text_generation_router_v3"  # backends/v3/src/lib.rs
SERVER_RS = "router/src/server.rs"
V3_LIB_RS = "backends/v3/src/lib.rs"
FAILURES = ("DownloadError", "ShardCannotStart", "WebserverFailed")
DEFAULT_MAX_NEW_TOKENS = 20
MAX_TOTAL_TOKENS = 4096
MAX_BATCH_TOTAL_TOKENS = 16000
# axum's prefix for a body that parses as JSON but not as the request type.
DESERIALIZE = "Failed to deserialize the JSON body into the target type"
# What v3.3.7's /info reports: its Cargo.toml still says 3.3.6-dev0 (router/src/server.rs:2140 reads
# CARGO_PKG_VERSION).
VERSION = "3.3.6-dev0"
WAITING_LOG_EVERY_S = 10.0
SHARD_SPAN: dict[str, Any] = {"rank": 0, "name": "shard-manager"}
DOWNLOAD_SPAN: dict[str, Any] = {"name": "download"}


def _compact(obj: Any) -> str:
    # TGI (serde_json) writes compact JSON; shepherd's load pattern depends on the exact spacing.
    return json.dumps(obj, separators=(",", ":"))


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rust_duration(seconds: float) -> str:
    """Rust's `{:?}` of a Duration: `1.203456789s`, `503.123456ms`."""
    if seconds >= 1:
        return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
    return f"{seconds * 1000:.6f}".rstrip("0").rstrip(".") + "ms"


class Log:
    """TGI's two log formats: the launcher's (fields nested) and the router's (flattened, with file)."""

    def __init__(self, json_output: bool) -> None:
        self.json_output = json_output

    def write(self, line: str) -> None:
        # One whole line per write: request threads and the main thread share stdout.
        model_http.emit(line)

    def launcher(self, level: str, message: str, span: dict[str, Any] | None = None) -> None:
        self.write(self.launcher_line(level, message, span))

    def launcher_line(self, level: str, message: str, span: dict[str, Any] | None = None) -> str:
        if self.json_output:
            record: dict[str, Any] = {
                "timestamp": _timestamp(),
                "level": level,
                "fields": {"message": message},
                "target": LAUNCHER,
            }
            if span is not None:
                record["span"] = span
                record["spans"] = [span]
            return _compact(record)
        prefix = f"{_timestamp()} {level:>5} "
        if span is not None:
            fields = " ".join(f"{k}={v}" for k, v in span.items() if k != "name")
            return f"{prefix}{span['name']}: {LAUNCHER}: {message}" + (f" {fields}" if fields else "")
        return f"{prefix}{LAUNCHER}: {message}"

    def router(
        self,
        level: str,
        message: str,
        *,
        target: str = ROUTER_SERVER,
        filename: str = SERVER_RS,
        line_number: int = 1000,
        span: dict[str, Any] | None = None,
    ) -> None:
        self.write(self.router_line(level, message, target, filename, line_number, span))

    def router_line(
        self,
        level: str,
        message: str,
        target: str = ROUTER_SERVER,
        filename: str = SERVER_RS,
        line_number: int = 1000,
        span: dict[str, Any] | None = None,
    ) -> str:
        if self.json_output:
            # The router's subscriber flattens event fields to the top level (flatten_event(true)).
            record: dict[str, Any] = {
                "timestamp": _timestamp(),
                "level": level,
                "message": message,
                "target": target,
                "filename": filename,
                "line_number": line_number,
            }
            if span is not None:
                record["span"] = span
                record["spans"] = [span]
            return _compact(record)
        return f"{_timestamp()} {level:>5} {target}: {filename}:{line_number}: {message}"


class Metrics:
    """The router's counters and gauges that shepherd scrapes."""

    BUCKETS = (1, 10, 100, 1000)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.request_count = 0
        self.request_success = 0
        self.failure_validation = 0
        self.in_flight = 0
        self.in_flight_max_tokens = 0
        self.generated: list[int] = []

    def validation_failed(self) -> None:
        with self.lock:
            self.request_count += 1
            self.failure_validation += 1

    def started(self, max_new_tokens: int) -> None:
        with self.lock:
            self.request_count += 1
            self.in_flight += 1
            self.in_flight_max_tokens += max_new_tokens

    def finished(self, max_new_tokens: int, generated: int, *, ok: bool) -> None:
        with self.lock:
            self.in_flight -= 1
            self.in_flight_max_tokens -= max_new_tokens
            if ok:
                self.request_success += 1
                self.generated.append(generated)

    def render(self) -> str:
        with self.lock:
            lines = [
                "# TYPE tgi_request_count counter",
                f"tgi_request_count {self.request_count}",
                "# TYPE tgi_request_success counter",
                f"tgi_request_success {self.request_success}",
                "# TYPE tgi_request_failure counter",
                f'tgi_request_failure{{err="validation"}} {self.failure_validation}',
                "# TYPE tgi_queue_size gauge",
                # No batching queue here: every admitted request runs at once (it sits in the batch).
                "tgi_queue_size 0",
                "# TYPE tgi_batch_current_size gauge",
                f"tgi_batch_current_size {self.in_flight}",
                "# TYPE tgi_batch_current_max_tokens gauge",
                f"tgi_batch_current_max_tokens {self.in_flight_max_tokens}",
                "# TYPE tgi_request_generated_tokens histogram",
            ]
            for bound in self.BUCKETS:
                count = sum(1 for g in self.generated if g <= bound)
                lines.append(f'tgi_request_generated_tokens_bucket{{le="{bound}"}} {count}')
            lines.append(f'tgi_request_generated_tokens_bucket{{le="+Inf"}} {len(self.generated)}')
            lines.append(f"tgi_request_generated_tokens_sum {sum(self.generated)}")
            lines.append(f"tgi_request_generated_tokens_count {len(self.generated)}")
        return "\n".join(lines) + "\n"


ValidationError = model_http.RequestError


class TgiServer(model_http.ModelHTTPServer):
    def __init__(self, address: tuple[str, int], *, model_id: str, token_interval: float, log: Log) -> None:
        self.model_id = model_id
        self.token_interval = token_interval
        self.log = log
        self.metrics = Metrics()
        super().__init__(address, TgiHandler)


class TgiHandler(model_http.ModelHandler):
    """TGI's routes on a keep-alive connection (like hyper); TGI has no access log either."""

    server_version = "text-generation-router"
    server: TgiServer
    json_separators = (",", ":")  # serde_json's compact JSON
    # axum's wording: every body over the limit (or of negative length) is "length limit exceeded".
    request_errors = {
        **model_http.ModelHandler.request_errors,
        "negative_length": (413, "length limit exceeded"),
        "too_large": (413, "length limit exceeded"),
        "bad_chunk": (400, "Failed to buffer the request body"),
        "invalid_json": (400, "Failed to parse the request body as JSON: {error}"),
        "not_object": (422, f"{DESERIALIZE}: expected a map"),
    }

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_body(200, b"", "application/json")
        elif path == "/info":
            self.send_json(200, self._info())
        elif path == "/metrics":
            self.send_body(200, self.server.metrics.render().encode(), "text/plain; charset=utf-8")
        else:
            self.send_body(404, b"", "text/plain")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self.read_body()
            if path not in ("/", "/generate", "/generate_stream"):
                self.send_body(404, b"", "text/plain")
                return
            payload = self.parse_json_object(body)
            stream = path == "/generate_stream" or (path == "/" and payload.get("stream") is True)
            inputs, n, details, full_text = self._validate(payload)
        except ValidationError as exc:
            if exc.close:
                self.close_connection = True
            self.server.metrics.validation_failed()
            # router/src/infer/mod.rs:126 @v3.3.7 logs a validation failure.
            self.server.log.router(
                "ERROR", exc.message, target=f"{ROUTER}::infer", filename="router/src/infer/mod.rs", line_number=126
            )
            self.send_json(exc.status, {"error": exc.message, "error_type": "validation"})
            return
        if stream:
            self._generate_stream(inputs, n)
        else:
            self._generate(inputs, n, details, full_text)

    # -- generation --------------------------------------------------------------------------

    def _generate(self, inputs: str, n: int, details: bool, full_text: bool) -> None:
        metrics = self.server.metrics
        start = time.monotonic()
        metrics.started(n)
        for done in range(n):
            if self.sleep_unless_gone(self.server.token_interval):
                self.close_connection = True
                metrics.finished(n, done, ok=False)
                return
        metrics.finished(n, n, ok=True)
        total = time.monotonic() - start
        text = "".join(_token_text(i) for i in range(n))
        body: dict[str, Any] = {"generated_text": (inputs + text) if full_text else text}
        if details:
            body["details"] = {
                "finish_reason": "length",
                "generated_tokens": n,
                "seed": None,
                "prefill": [],
                "tokens": [_token(i) for i in range(n)],
            }
        headers = {
            "x-compute-type": "gpu+optimized",
            "x-total-time": str(int(total * 1000)),
            "x-validation-time": "0",
            "x-queue-time": "0",
            "x-inference-time": str(int(total * 1000)),
            "x-time-per-token": str(int(total * 1000 / max(n, 1))),
            "x-prompt-tokens": str(len(inputs.split())),
            "x-generated-tokens": str(n),
        }
        self.send_json(200, body, headers)
        self._log_success("generate", total, n)

    def _generate_stream(self, inputs: str, n: int) -> None:
        metrics = self.server.metrics
        start = time.monotonic()
        metrics.started(n)
        sent = 0
        try:
            self.start_event_stream({"x-compute-type": "gpu+optimized"})
            for i in range(n):
                if self.sleep_unless_gone(self.server.token_interval):
                    raise ConnectionResetError("client left")
                last = i == n - 1
                event = {
                    "index": i + 1,
                    "token": _token(i),
                    "generated_text": "".join(_token_text(j) for j in range(n)) if last else None,
                    "details": (
                        {"finish_reason": "length", "generated_tokens": n, "seed": None} if last else None
                    ),
                }
                # TGI's axum SSE writes `data:` with no space before the JSON.
                self.write_chunk(f"data:{_compact(event)}\n\n".encode())
                sent += 1
            self.end_chunks()
        except model_http.CLIENT_GONE:
            self.close_connection = True
            metrics.finished(n, sent, ok=False)
            return
        metrics.finished(n, n, ok=True)
        self._log_success("generate_stream", time.monotonic() - start, n)

    def _log_success(self, route: str, total: float, n: int) -> None:
        span = {
            "inference_time": _rust_duration(total),
            "queue_time": _rust_duration(0.00002),
            "seed": "None",
            "time_per_token": _rust_duration(total / max(n, 1)),
            "total_time": _rust_duration(total),
            "validation_time": _rust_duration(0.00005),
            "name": route,
        }
        # router/src/server.rs:432 (generate) and :637 (generate_stream) @v3.3.7.
        self.server.log.router("INFO", "Success", line_number=637 if route.endswith("stream") else 432, span=span)

    # -- validation --------------------------------------------------------------------------

    def _validate(self, payload: dict[str, Any]) -> tuple[str, int, bool, bool]:
        if "inputs" not in payload:
            raise ValidationError(422, f"{DESERIALIZE}: missing field `inputs`")
        inputs = payload["inputs"]
        if not isinstance(inputs, str):
            raise ValidationError(
                422, f"{DESERIALIZE}: inputs: invalid type, expected a string"
            )
        if not inputs:
            raise ValidationError(422, "Input validation error: `inputs` cannot be empty")
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValidationError(422, f"{DESERIALIZE}: parameters: expected a map")
        n = params.get("max_new_tokens")
        if n is None:
            n = DEFAULT_MAX_NEW_TOKENS
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValidationError(
                422,
                f"{DESERIALIZE}: parameters.max_new_tokens: invalid value, expected u32",
            )
        if n == 0:
            raise ValidationError(
                422, "Input validation error: `max_new_tokens` must be strictly greater than 0"
            )
        prompt_tokens = len(inputs.split())
        if prompt_tokens + n > MAX_TOTAL_TOKENS:
            raise ValidationError(
                422,
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL_TOKENS}. "
                f"Given: {prompt_tokens} `inputs` tokens and {n} `max_new_tokens`",
            )
        return inputs, n, bool(params.get("details")), bool(params.get("return_full_text"))

    def _info(self) -> dict[str, Any]:
        return {
            "model_id": self.server.model_id,
            "model_sha": None,
            "model_dtype": "torch.float16",
            "model_device_type": "cuda",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128,
            "max_best_of": 2,
            "max_stop_sequences": 4,
            "max_input_tokens": MAX_TOTAL_TOKENS - 1,
            "max_total_tokens": MAX_TOTAL_TOKENS,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }


def _token_text(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


def _token(i: int) -> dict[str, Any]:
    return {"id": 1000 + i, "text": _token_text(i), "logprob": -0.1, "special": False}


# -- the launcher --------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        sys.stderr.write(f"{name}={raw!r}: expected a non-negative number of seconds\n")
        sys.exit(2)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="text-generation-launcher", description="TGI emulator for tests")
    parser.add_argument("--model-id", default="bigscience/bloom-560m")
    parser.add_argument("--hostname", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--json-output", action="store_true")
    # The real launcher has dozens of flags (--num-shard, --max-input-length, ...); accept them.
    args, _unknown = parser.parse_known_args(argv)
    return args


def _args_debug(args: argparse.Namespace) -> str:
    """The launcher's first line: its Args struct as Rust's `{:#?}` prints it (abridged: v3.3.7 has ~60
    fields), one field a line, in one log message."""
    fields = [
        f'model_id: "{args.model_id}"', "revision: None", "validation_workers: 2", "sharded: None",
        "num_shard: None", "quantize: None", "speculate: None", "dtype: None", "kv_cache_dtype: None",
        "trust_remote_code: false", "max_concurrent_requests: 128", "max_best_of: 2", "max_stop_sequences: 4",
        "max_top_n_tokens: 5", "max_input_tokens: None", "max_input_length: None", "max_total_tokens: None",
        "waiting_served_ratio: 0.3", "max_batch_prefill_tokens: None", "max_batch_total_tokens: None",
        "max_waiting_tokens: 20", "max_batch_size: None", "cuda_graphs: None", f'hostname: "{args.hostname}"',
        f"port: {args.port}", "prometheus_port: 9000", 'shard_uds_path: "/tmp/text-generation-server"',
        'master_addr: "localhost"', "master_port: 29500", 'huggingface_hub_cache: Some(\n        "/data",\n    )',
        "weights_cache_override: None", "disable_custom_kernels: false", "cuda_memory_fraction: 1.0",
        "rope_scaling: None", "rope_factor: None", f"json_output: {str(args.json_output).lower()}",
        "otlp_endpoint: None", 'otlp_service_name: "text-generation-inference.router"', "cors_allow_origin: []",
        "api_key: None", "watermark_gamma: None", "watermark_delta: None", "ngrok: false",
        "ngrok_authtoken: None", "ngrok_edge: None", "tokenizer_config_path: None",
        "disable_grammar_support: false", "env: false", "max_client_batch_size: 4", "lora_adapters: None",
        "usage_stats: On", "payload_limit: 2000000", "enable_prefill_logprobs: false",
        "graceful_termination_timeout: 90",
    ]
    return "Args {\n" + "".join(f"    {f},\n" for f in fields) + "}"


# The phase decides which shutdown lines a signal prints (no webserver before it was started).
_webserver_started = False
_log: Log | None = None


def _shutdown_lines(log: Log) -> list[str]:
    lines: list[str] = []
    if _webserver_started:
        lines += [
            log.launcher_line("INFO", "Terminating webserver"),
            log.launcher_line("INFO", "Waiting for webserver to gracefully shutdown"),
            log.router_line("INFO", "signal received, starting graceful shutdown", line_number=2399),
            log.launcher_line("INFO", "webserver terminated"),
        ]
    lines += [
        log.launcher_line("INFO", "Shutting down shards"),
        log.launcher_line("INFO", "Terminating shard", SHARD_SPAN),
        log.launcher_line("INFO", "Waiting for shard to gracefully shutdown", SHARD_SPAN),
        log.launcher_line("INFO", "shard terminated", SHARD_SPAN),
    ]
    return lines


def _on_stop_signal(_signum: int, _frame: object) -> None:
    assert _log is not None
    model_http.exit_now("\n".join(_shutdown_lines(_log)), 0)


def _fail(log: Log, name: str, lines: list[str]) -> NoReturn:
    for line in lines:
        log.write(line)
    sys.stderr.write(f"Error: {name}\n")
    sys.stderr.flush()
    os._exit(1)


def _webserver_failed(log: Log, address: str, reason: str) -> NoReturn:
    _fail(log, "WebserverFailed", [
        log.router_line("ERROR", f"Failed to bind to {address}: {reason}", line_number=2325),
        log.launcher_line("ERROR", "Webserver Crashed"),
        log.launcher_line("INFO", "Shutting down shards"),
        log.launcher_line("INFO", "Terminating shard", SHARD_SPAN),
        log.launcher_line("INFO", "Waiting for shard to gracefully shutdown", SHARD_SPAN),
        log.launcher_line("INFO", "shard terminated", SHARD_SPAN),
    ])


def main(argv: list[str] | None = None) -> None:
    global _log, _webserver_started
    args = parse_args(argv)
    load_delay = _env_float("TGI_LOAD_DELAY", 0.5)
    token_interval = _env_float("TGI_TOKEN_INTERVAL", 0.005)
    listen_delay = _env_float("TGI_LISTEN_DELAY", 0.0)
    fail = os.environ.get("TGI_FAIL", "").strip()
    if fail and fail not in FAILURES:
        sys.stderr.write(f"TGI_FAIL={fail!r}: expected one of {', '.join(FAILURES)}\n")
        sys.exit(2)

    log = Log(args.json_output)
    _log = log
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    model = args.model_id

    log.launcher("INFO", _args_debug(args))
    log.launcher("INFO", "Using attention flashinfer - Prefix caching true")
    log.launcher("INFO", "Default `max_batch_prefill_tokens` to 4096")
    log.launcher("INFO", "Using default cuda graphs [1, 2, 4, 8, 16, 32]")
    log.launcher("INFO", f"Starting check and download process for {model}", DOWNLOAD_SPAN)
    log.launcher("INFO", "Download file: model.safetensors", DOWNLOAD_SPAN)
    time.sleep(load_delay * 0.2)
    if fail == "DownloadError":
        _fail(log, fail, [
            log.launcher_line(
                "ERROR",
                "Download encountered an error: \nTraceback (most recent call last):\n"
                '  File "/opt/conda/bin/text-generation-server", line 8, in <module>\n'
                "    sys.exit(app())\n"
                "huggingface_hub.utils._errors.RepositoryNotFoundError: 401 Client Error. "
                f"Repository Not Found for url: https://huggingface.co/api/models/{model}.\n",
                DOWNLOAD_SPAN,
            ),
        ])
    cached = f"/data/models--{model.replace('/', '--')}/model.safetensors"
    log.launcher("INFO", f"Downloaded {cached} in 0:00:01.", DOWNLOAD_SPAN)
    log.launcher("INFO", f"Successfully downloaded weights for {model}", DOWNLOAD_SPAN)

    shard_start = time.monotonic()
    log.launcher("INFO", "Starting shard", SHARD_SPAN)
    log.launcher("INFO", "Waiting for shard to be ready...", SHARD_SPAN)
    if fail == "ShardCannotStart":
        time.sleep(load_delay * 0.2)
        _fail(log, fail, [
            log.launcher_line(
                "ERROR",
                "Shard complete standard error output:\n\nTraceback (most recent call last):\n"
                '  File "/opt/conda/lib/python3.10/site-packages/text_generation_server/server.py", '
                "line 201, in serve_inner\n    model = get_model(\n"
                "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1024.00 MiB. "
                "GPU 0 has a total capacity of 23.68 GiB of which 312.00 MiB is free.",
                SHARD_SPAN,
            ),
            log.launcher_line("ERROR", "Shard 0 failed to start"),
            log.launcher_line("INFO", "Shutting down shards"),
        ])
    # Real TGI repeats this line every 10 s while a shard loads, with no timeout of its own.
    shard_ready_at = shard_start + load_delay * 0.6
    next_waiting_log = shard_start + WAITING_LOG_EVERY_S
    while (now := time.monotonic()) < shard_ready_at:
        if now >= next_waiting_log:
            log.launcher("INFO", "Waiting for shard to be ready...", SHARD_SPAN)
            next_waiting_log += WAITING_LOG_EVERY_S
        time.sleep(min(shard_ready_at, next_waiting_log) - now)
    log.launcher("INFO", "Server started at unix:///tmp/text-generation-server-0", SHARD_SPAN)
    log.launcher("INFO", f"Shard ready in {_rust_duration(time.monotonic() - shard_start)}", SHARD_SPAN)

    log.launcher("INFO", "Starting Webserver")
    _webserver_started = True
    address = f"{args.hostname}:{args.port}"
    if fail == "WebserverFailed":
        _webserver_failed(log, address, "Address already in use (os error 98)")
    log.router("INFO", "Warming up model", target=ROUTER_V3, filename=V3_LIB_RS, line_number=125)
    time.sleep(load_delay * 0.2)
    log.router(
        "INFO",
        f"Setting max batch total tokens to {MAX_BATCH_TOTAL_TOKENS}",
        target=ROUTER_V3,
        filename=V3_LIB_RS,
        line_number=137,
    )
    # Real TGI logs Connected after building its routes and BEFORE it binds the port.
    log.router("INFO", "Connected", line_number=2302)
    time.sleep(listen_delay)
    try:
        server = TgiServer((args.hostname, args.port), model_id=model, token_interval=token_interval, log=log)
    except OSError as exc:
        # A port that cannot be bound ends the real launcher the same way.
        _webserver_failed(log, address, f"{exc.strerror or exc} (os error {exc.errno})")
    # The serve thread and its request threads never take SIGTERM/SIGINT: they land on the main thread.
    model_http.serve_in_background(server)

    # The main thread only waits: the signal handlers run here and exit the process.
    model_http.idle_forever()


if __name__ == "__main__":
    main()
