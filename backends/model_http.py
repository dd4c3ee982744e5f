"""The HTTP/1.1 plumbing shared by the stand-alone model-server programs (standard library only).

It owns what a small threaded model server needs to behave like a real one in front of a proxy and a
supervisor, and nothing of any model: the bundled demo server (`backends/demo_server.py`) and the TGI
emulator of the tests (`tests/emulators/tgi.py`) build their routes, payloads and logs on top of it.

* `ModelHTTPServer`: a ThreadingHTTPServer that binds without a name lookup, takes IPv6 hosts, keeps a
  deep accept backlog and never waits for its request threads;
* `ModelHandler`: a keep-alive handler with Nagle off and no access log that reads Content-Length or
  chunked request bodies under a size limit, parses a JSON object body, sends JSON or raw bodies with
  their length, streams chunked responses one write per chunk, and sleeps while watching its socket
  for a client that went away (`RequestError` is how a route answers with an error);
* the process side: whole-line output shared by many threads (`emit`), starting daemon threads with
  SIGTERM/SIGINT blocked so those signals always land on the main thread (`start_daemon`,
  `serve_in_background`), the main thread's idle wait, and leaving at once from a signal handler
  (`exit_now`).

Both programs run it from a fresh interpreter that must start fast, so it imports only the standard
library and nothing of shepherd.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn

MAX_BODY_BYTES = 16 * 1024 * 1024
# How often a waiting generation looks at its socket for a client that left: short enough that a
# disconnect is noticed promptly, long enough not to spin.
DISCONNECT_POLL_S = 0.05
# What writing to a client that went away raises (a timed-out socket counts as gone too).
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

# print() writes the text and the newline as two writes, so lines from request threads could
# interleave; one lock and one write per line keeps every line whole for a supervisor's reader.
# Hold it for any other write to stdout/stderr that must not cut into a line.
output_lock = threading.Lock()


def emit(line: str, *, err: bool = False) -> None:
    """Write one whole line and flush at once: a supervisor reads our pipe line by line."""
    stream = sys.stderr if err else sys.stdout
    with output_lock:
        stream.write(line + "\n")
        stream.flush()


def exit_now(message: str, code: int) -> NoReturn:
    """Say why (one or more lines) and leave at once; safe inside a signal handler.

    os.write bypasses the buffered stdout (a signal may land while another write holds it), and
    os._exit skips joining request threads and closing keep-alive sockets, which could hang.
    """
    try:
        os.write(1, (message + "\n").encode())
    except OSError:
        pass  # the reader is gone; exiting matters more than the goodbye line
    os._exit(code)


def start_daemon(thread: threading.Thread) -> None:
    """Start a daemon thread that never receives SIGTERM/SIGINT.

    The kernel may hand a process signal to any thread that does not block it. Python then only
    flags it for the main thread, which, asleep in a syscall, would not run the handler for an hour.
    A new thread inherits the signal mask of its creator (request threads inherit the serve
    thread's), so blocking the stop signals around start() keeps them all off every worker thread.
    """
    thread.daemon = True
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def serve_in_background(server: socketserver.BaseServer) -> None:
    """Serve on a daemon thread named `serve`; it and its request threads never take a stop signal."""
    start_daemon(threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="serve"))


def idle_forever() -> NoReturn:
    """The main thread's wait: it does nothing but run the SIGTERM/SIGINT handlers, which exit."""
    while True:
        time.sleep(3600)


class RequestError(Exception):
    """A request answered with an error status and a JSON body `{"error": message, ...}`.

    `close` ends the keep-alive connection after the answer (where the next request starts is lost).
    """

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class ModelHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with the settings a proxied model server needs."""

    daemon_threads = True  # request threads never delay exit
    # The default backlog of 5 drops SYNs under a burst of concurrent clients (1 s retransmits).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can take seconds
        # in a container without DNS; the name is never used, so skip it.
        socketserver.TCPServer.server_bind(self)  # bind only, no name lookup
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class ModelHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 keep-alive connection; every response carries its length or is chunked."""

    protocol_version = "HTTP/1.1"
    # Small SSE chunks must leave at once, not wait for the previous segment's ACK (Nagle plus the
    # peer's delayed ACK adds ~40 ms per token).
    disable_nagle_algorithm = True
    max_body_bytes = MAX_BODY_BYTES
    # json.dumps separators for JSON bodies: None is json's default (", ", ": ").
    json_separators: tuple[str, str] | None = None
    # How a request that cannot be read is answered, by fault: (status, message template). Templates
    # may name {raw} (the Content-Length header), {limit} (max_body_bytes) and {error} (the JSON
    # error). A program that mimics a real server words them as that server does. Faults of the body
    # framing (all but the last two) also close the connection.
    request_errors: dict[str, tuple[int, str]] = {
        "bad_length": (400, "bad Content-Length {raw!r}"),
        "negative_length": (400, "bad Content-Length {raw!r}"),
        "too_large": (413, "body over {limit} bytes"),
        "bad_chunk": (400, "bad chunk size"),
        "invalid_json": (400, "invalid JSON: {error}"),
        "not_object": (400, "body must be a JSON object"),
    }
    # The status of the last response started with send_body (for a program's own log line).
    status_sent: int = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Silence BaseHTTPRequestHandler's stderr access log; a program prints its own lines."""

    def request_error(self, fault: str, *, close: bool = False, **fields: Any) -> RequestError:
        status, template = self.request_errors[fault]
        return RequestError(status, template.format(limit=self.max_body_bytes, **fields), close=close)

    # -- reading -----------------------------------------------------------------------------

    def read_body(self) -> bytes:
        """Read a Content-Length or chunked request body (a streaming proxy may send either)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            raise self.request_error("bad_length", raw=raw, close=True) from None
        if length < 0:
            raise self.request_error("negative_length", raw=raw, close=True)
        if length > self.max_body_bytes:
            raise self.request_error("too_large", close=True)
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise self.request_error("bad_chunk", close=True) from None
            if size == 0:
                # Skip trailers up to the blank line that ends the body.
                while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > self.max_body_bytes:
                raise self.request_error("too_large", close=True)
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)  # the CRLF after the chunk data

    def parse_json_object(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.request_error("invalid_json", error=exc) from None
        if not isinstance(payload, dict):
            raise self.request_error("not_object")
        return payload

    # -- waiting -----------------------------------------------------------------------------

    def sleep_unless_gone(self, seconds: float) -> bool:
        """Sleep `seconds` while watching the socket; True as soon as the client has gone away.

        A readable socket that peeks as b"" is a closed peer. A readable socket with data (a
        pipelined next request) is not, so that case falls back to plain sleeping.
        """
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            step = min(remaining, DISCONNECT_POLL_S)
            try:
                readable, _, _ = select.select([self.connection], [], [], step)
                if readable:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                    time.sleep(step)
            except (OSError, ValueError):
                return True

    # -- writing -----------------------------------------------------------------------------

    def send_body(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """A whole response with its Content-Length (and `Connection: close` if the handler closes)."""
        self.status_sent = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=self.json_separators).encode()
        self.send_body(status, data, "application/json", headers)

    def start_event_stream(self, headers: dict[str, str] | None = None) -> None:
        """Send the head of a 200 server-sent-events response; the events follow as chunks."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        # One write per chunk (size line, data, CRLF) so each event leaves in its own segment.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunks(self) -> None:
        """The last chunk: the response ends and the connection can carry the next request."""
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
