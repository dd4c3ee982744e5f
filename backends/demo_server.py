"""The bundled demo model server: a stand-alone, standard-library-only stand-in for a GPU model server.

It owns nothing of shepherd and imports nothing from it. shepherd's `demo` backend launches it, and the
end-to-end tests launch it as a real child process, so it behaves like a real model server where it
matters to a supervisor:

* it prints a loading sequence and only then binds its port (like vLLM: connection refused while
  loading), binding BEFORE it prints the ready line `demo: model loaded, serving on http://HOST:PORT`;
* it serves `GET /health`, `POST /generate`, `POST /generate_stream` (SSE over chunked encoding, one
  chunk per token, flushed at once), `GET /stats` (request / disconnect counters, for tests);
* it notices clients that go away mid-generation, stops generating, and counts them;
* on SIGTERM/SIGINT it exits 0 at once, even with streams and keep-alive connections open;
* switches turn on the faults a supervisor must survive: crash, hang during load, ignore SIGTERM, a
  grandchild in its own session, an output flood, invalid UTF-8, an error line, a failing /health.

Every flag also reads an environment variable (the flag wins):

    --host              DEMO_HOST              127.0.0.1
    --port              DEMO_PORT              5001 (0 = any free port; the ready line names it)
    --load-delay        DEMO_LOAD_DELAY        1.0 s (spread over the 0% / 50% / 100% lines)
    --token-interval    DEMO_TOKEN_INTERVAL    0.005 s per generated token
    --crash-after       DEMO_CRASH_AFTER       off; seconds after start -> stderr line, exit 1
    --hang              DEMO_HANG              off; print the loading lines, then never get ready
    --ignore-sigterm    DEMO_IGNORE_SIGTERM    off; SIGTERM is ignored (SIGINT still stops it)
    --grandchild        DEMO_GRANDCHILD        off; spawn a sleeper in its own session, never reaped
    --flood N           DEMO_FLOOD             0; N lines `flood line i` after ready, then `flood done N`
    --invalid-utf8      DEMO_INVALID_UTF8      off; raw bytes b"bad bytes: \\xff\\xfe\\xfa end\\n" at start
    --error-line TEXT   DEMO_ERROR_LINE        off; TEXT on stderr after the ready line
    --health-fail-after DEMO_HEALTH_FAIL_AFTER off; seconds after ready, /health answers 503

Boolean variables accept 1/true/yes/on and 0/false/no/off. A malformed value exits 2 (argparse).

Run it as `python -m backends.demo_server` from the repository root or `python backends/demo_server.py`
from anywhere. Its HTTP/1.1 plumbing (body reading, chunked writes, disconnect watching, signal-safe
threads) lives in the sibling `backends/model_http.py`, shared with the TGI emulator of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

if __package__:  # python -m backends.demo_server, or imported as backends.demo_server
    from . import model_http
else:
    # Run by path, as shepherd runs it (`python /abs/path/backends/demo_server.py`) from any working
    # directory and without the repository on sys.path. Put this file's parent folder first so that
    # `backends` is this very copy's package, never another checkout's (PYTHONPATH, an install), and
    # so that it works under PYTHONSAFEPATH too, where the script's own folder is not on sys.path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from backends import model_http

READY_MARKER = "model loaded, serving on"
DEFAULT_MAX_NEW_TOKENS = 16
INVALID_UTF8_BYTES = b"bad bytes: \xff\xfe\xfa end\n"
# Bounds a real server has too (TGI: max_total_tokens): no request may hold a thread for hours.
MAX_NEW_TOKENS = 4096
MAX_SLEEP_S = 120.0
GRANDCHILD_CODE = "import time; [time.sleep(1) for _ in iter(int, 1)]"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

emit = model_http.emit
RequestError = model_http.RequestError


def emit_raw(data: bytes) -> None:
    """Write raw bytes (possibly invalid UTF-8) to stdout, keeping order with the text lines."""
    with model_http.output_lock:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


class Stats:
    """Counters for the generation routes, read by tests through GET /stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.disconnects = 0
        self.completed = 0

    def started(self) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1

    def finished(self, *, disconnected: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if disconnected:
                self.disconnects += 1
            else:
                self.completed += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "disconnects": self.disconnects,
                "completed": self.completed,
                "pid": os.getpid(),
            }


class DemoServer(model_http.ModelHTTPServer):
    """The HTTP server with the demo's settings and counters."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        token_interval: float,
        health_fail_after: float | None,
    ) -> None:
        self.token_interval = token_interval
        self.health_fail_after = health_fail_after
        self.ready_at = time.monotonic()
        self.stats = Stats()
        super().__init__(address, DemoHandler)


class DemoHandler(model_http.ModelHandler):
    """One HTTP/1.1 keep-alive connection; we print our own short line to stdout per request."""

    server_version = "demo-model-server/1.0"
    server: DemoServer

    # -- routing -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            fail_after = self.server.health_fail_after
            unhealthy = fail_after is not None and time.monotonic() - self.server.ready_at >= fail_after
            status = 503 if unhealthy else 200
            self.send_json(status, {"status": "unhealthy" if unhealthy else "ok"})
        elif path == "/stats":
            self.send_json(200, self.server.stats.snapshot())
        else:
            self.send_json(404, {"error": f"no route GET {path}"})
        emit(f"demo: GET {path} {self.status_sent}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "/generate": self._generate,
            "/generate_stream": self._generate_stream,
        }
        try:
            body = self.read_body()
            handler = handlers.get(path)
            if handler is None:
                raise RequestError(404, f"no route POST {path}")
            handler(self.parse_json_object(body))
        except RequestError as exc:
            if exc.close:
                self.close_connection = True
            self.send_json(exc.status, {"error": exc.message, "error_type": "validation"})
            emit(f"demo: POST {path} {exc.status} {exc.message}")

    # -- generation --------------------------------------------------------------------------

    def _generate(self, payload: dict[str, Any]) -> None:
        n, sleep_s = _parameters(payload)
        stats = self.server.stats
        stats.started()
        done = 0
        gone = self.sleep_unless_gone(sleep_s)
        while not gone and done < n:
            gone = self.sleep_unless_gone(self.server.token_interval)
            if not gone:
                done += 1
        if gone:
            self._client_left(done)
            return
        stats.finished(disconnected=False)
        text = " ".join(f"tok{i}" for i in range(n))
        self.send_json(200, {"generated_text": text, "tokens": n, "pid": os.getpid()})
        emit(f"demo: POST /generate 200 tokens={n}")

    def _generate_stream(self, payload: dict[str, Any]) -> None:
        n, sleep_s = _parameters(payload)
        stats = self.server.stats
        stats.started()
        sent = 0
        try:
            if self.sleep_unless_gone(sleep_s):
                raise ConnectionResetError("client left before the first token")
            self.start_event_stream()
            for i in range(n):
                if self.sleep_unless_gone(self.server.token_interval):
                    raise ConnectionResetError("client left")
                event = {"token": {"id": i, "text": f"tok{i}"}, "index": i}
                self.write_chunk(f"data: {json.dumps(event)}\n\n".encode())
                sent += 1
            self.write_chunk(b"data: [DONE]\n\n")
            self.end_chunks()
        except model_http.CLIENT_GONE:
            self._client_left(sent)
            return
        stats.finished(disconnected=False)
        emit(f"demo: POST /generate_stream 200 tokens={n}")

    def _client_left(self, tokens: int) -> None:
        # The socket is dead or half-closed: never reuse it.
        self.close_connection = True
        self.server.stats.finished(disconnected=True)
        emit(f"demo: client disconnected after {tokens} tokens")


def _parameters(payload: dict[str, Any]) -> tuple[int, float]:
    """Validate the payload; returns (max_new_tokens, sleep seconds before answering)."""
    inputs = payload.get("inputs", "")
    if not isinstance(inputs, str):
        raise RequestError(400, "`inputs` must be a string")
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "`parameters` must be an object")
    n = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if n is None:
        n = DEFAULT_MAX_NEW_TOKENS
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NEW_TOKENS:
        raise RequestError(400, f"`max_new_tokens` must be an integer from 0 to {MAX_NEW_TOKENS}")
    sleep_s = params.get("sleep", 0.0) or 0.0
    if isinstance(sleep_s, bool) or not isinstance(sleep_s, (int, float)) or not 0 <= sleep_s <= MAX_SLEEP_S:
        raise RequestError(400, f"`sleep` must be a number of seconds from 0 to {MAX_SLEEP_S}")
    return n, float(sleep_s)


# -- command line ----------------------------------------------------------------------------


def _env(name: str) -> str | None:
    raw = os.environ.get(name)
    return None if raw is None else raw.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo_server", description="shepherd's demo model server (standard library only)"
    )

    def env_float(name: str, default: float | None) -> float | None:
        raw = _env(name)
        if raw is None or raw == "" or raw.lower() == "off":
            return default
        try:
            return float(raw)
        except ValueError:
            parser.error(f"{name}={raw!r}: expected a number of seconds")
            raise AssertionError("unreachable: parser.error exits") from None

    def env_int(name: str, default: int) -> int:
        raw = _env(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            parser.error(f"{name}={raw!r}: expected an integer")
            raise AssertionError("unreachable: parser.error exits") from None

    def env_flag(name: str) -> bool:
        raw = _env(name)
        if raw is None or raw.lower() in _FALSE:
            return False
        if raw.lower() in _TRUE:
            return True
        parser.error(f"{name}={raw!r}: expected one of 1/true/yes/on or 0/false/no/off")
        raise AssertionError("unreachable: parser.error exits")

    parser.add_argument("--host", default=_env("DEMO_HOST") or "127.0.0.1")
    parser.add_argument("--port", type=int, default=env_int("DEMO_PORT", 5001))
    parser.add_argument("--load-delay", type=float, default=env_float("DEMO_LOAD_DELAY", 1.0))
    parser.add_argument("--token-interval", type=float, default=env_float("DEMO_TOKEN_INTERVAL", 0.005))
    parser.add_argument("--crash-after", type=float, default=env_float("DEMO_CRASH_AFTER", None))
    parser.add_argument("--hang", action="store_true", default=env_flag("DEMO_HANG"))
    parser.add_argument("--ignore-sigterm", action="store_true", default=env_flag("DEMO_IGNORE_SIGTERM"))
    parser.add_argument("--grandchild", action="store_true", default=env_flag("DEMO_GRANDCHILD"))
    parser.add_argument("--flood", type=int, default=env_int("DEMO_FLOOD", 0), metavar="N")
    parser.add_argument("--invalid-utf8", action="store_true", default=env_flag("DEMO_INVALID_UTF8"))
    parser.add_argument("--error-line", default=_env("DEMO_ERROR_LINE") or None, metavar="TEXT")
    parser.add_argument(
        "--health-fail-after", type=float, default=env_float("DEMO_HEALTH_FAIL_AFTER", None)
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected 0..65535")
    for name in ("load_delay", "token_interval", "crash_after", "health_fail_after"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} {value}: expected >= 0")
    if args.flood < 0:
        parser.error(f"--flood {args.flood}: expected >= 0")
    return args


def _on_stop_signal(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name
    model_http.exit_now(f"demo: received {name}, shutting down", 0)


def _crash(after: float) -> None:
    with model_http.output_lock:
        sys.stdout.flush()
        sys.stderr.write(f"demo: crashing on purpose after {after:g} s\n")
        sys.stderr.flush()
    os._exit(1)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    if args.grandchild:
        # Spawned before any SIG_IGN is set (an ignored signal survives exec). Its own session, as
        # TGI/vLLM shards are, so killing our process group misses it; it inherits our stdout and
        # stderr like real shards do, so a reader waiting for EOF also waits for it.
        grandchild = subprocess.Popen(
            [sys.executable, "-c", GRANDCHILD_CODE],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    signal.signal(signal.SIGINT, _on_stop_signal)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, _on_stop_signal)
    if args.crash_after is not None:
        model_http.start_daemon(threading.Timer(args.crash_after, _crash, args=(args.crash_after,)))

    emit(f"demo: starting (pid={os.getpid()})")
    if args.ignore_sigterm:
        emit("demo: ignoring SIGTERM")
    if args.grandchild:
        emit(f"demo: grandchild pid={grandchild.pid}")
    if args.invalid_utf8:
        emit_raw(INVALID_UTF8_BYTES)

    # Loading: the port stays closed (connection refused), as with vLLM.
    emit("demo: loading model weights 0%")
    time.sleep(args.load_delay / 2)
    emit("demo: loading model weights 50%")
    time.sleep(args.load_delay / 2)
    emit("demo: loading model weights 100%")

    if args.hang:
        # A load that never finishes: no ready line, no port. Signals still stop us.
        model_http.idle_forever()

    # Bind before the ready line, so a supervisor that sees the line can connect at once.
    try:
        server = DemoServer(
            (args.host, args.port),
            token_interval=args.token_interval,
            health_fail_after=args.health_fail_after,
        )
    except OSError as exc:
        # One clear line instead of a traceback, as a real server reports a taken port.
        emit(f"demo: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", err=True)
        os._exit(1)
    server.ready_at = time.monotonic()
    model_http.serve_in_background(server)
    emit(f"demo: {READY_MARKER} {_url(args.host, server.server_port)}")

    if args.error_line:
        emit(args.error_line, err=True)
    if args.flood:
        for i in range(args.flood):
            emit(f"flood line {i}")
        emit(f"flood done {args.flood}")

    # The main thread only waits: SIGTERM/SIGINT handlers run here and exit the process.
    model_http.idle_forever()


if __name__ == "__main__":
    main()
