"""A fake Vast autoscaler for tests: a real HTTP server in a background thread.

It owns an RSA key made at construction and serves what the Vast system serves to a worker and to
a client:

- `GET /pubkey/`: the public key as PEM;
- `POST /worker_status/`, `POST /delete_requests/`: recorded (parsed JSON, arrival time, the status
  answered), answered according to `mode`: "ok" (200), "error500" (500), "slow" (wait
  `slow_seconds`, then 200), "down" (close the connection without an answer);
- `POST /route/`: like `https://run.vast.ai/route/`: `{"endpoint", "url", "cost", "reqnum",
  "signature", "__request_id", "request_idx"}`, the signature over the current (url-only) message;
  without a `worker_url` it answers like a system with no ready worker (no `url`). `mode` does not
  apply to it: tests of the reporter's faults should not break the client's routing.

`sign_auth` builds `auth_data` signed in any of the three message formats Vast has used, for tests
of the proxy's signature check. The messages are built here independently of `proxy/signature.py`,
so a mistake there cannot cancel out in the tests.

A thread (rather than a trio task) serves both sync end-to-end tests and trio tests. Trio tests
wait with `await fake.wait_for_report_async(...)`, which keeps the event loop running.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import trio

from tests import signing

STATUS = "/worker_status/"
DELETE = "/delete_requests/"
MODES = ("ok", "down", "error500", "slow")


@dataclass(frozen=True)
class Received:
    path: str
    body: Any  # the parsed JSON body (None when it was not JSON)
    at: float  # time.monotonic() on arrival
    answered: int | None  # the status sent back; None when the connection was dropped ("down")
    delayed: float = 0.0  # seconds the answer was held back ("slow")

    @property
    def accepted(self) -> bool:
        """The worker saw this one succeed (answered 2xx at once)."""
        return self.answered is not None and 200 <= self.answered < 300 and self.delayed == 0.0


class FakeAutoscaler:
    def __init__(self, worker_url: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.private_key = signing.new_key()
        self.public_pem: bytes = signing.public_pem(self.private_key)
        self.worker_url = worker_url
        self.mode = "ok"
        self.slow_seconds = 30.0
        self.received: list[Received] = []
        self.route_calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0  # most report requests open at once
        self._cond = threading.Condition()
        self._release = threading.Event()  # set at stop: slow handlers answer at once
        self._reqnum = itertools.count(1)
        self._request_idx = itertools.count(1)
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False  # type: ignore[attr-defined]
        # A short poll interval: stop() waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-autoscaler", daemon=True
        )

    # -- running -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeAutoscaler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeAutoscaler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_mode(self, mode: str, slow_seconds: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._cond:
            self.mode = mode
            if slow_seconds is not None:
                self.slow_seconds = slow_seconds

    # -- what was received -------------------------------------------------------------------------

    def all(self, path: str = STATUS) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.path == path]

    def reports(self, path: str = STATUS) -> list[dict[str, Any]]:
        """Bodies the worker saw accepted, in arrival order."""
        return [r.body for r in self.all(path) if r.accepted]

    def wait_for_report(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True, timeout: float = 5.0,
        path: str = STATUS, after: float = -1.0,
    ) -> Received:
        """The first accepted body on `path` that arrived after `after` (monotonic) and matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.received:
                    if r.path == path and r.accepted and r.at > after and predicate(r.body):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [r.body for r in self.received if r.path == path][-3:]
                    raise AssertionError(f"no matching {path} within {timeout}s; last seen: {seen}")
                self._cond.wait(left)

    async def wait_for_report_async(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True, timeout: float = 5.0,
        path: str = STATUS, after: float = -1.0,
    ) -> Received:
        return await trio.to_thread.run_sync(
            lambda: self.wait_for_report(predicate, timeout, path, after), abandon_on_cancel=True
        )

    # -- signing -----------------------------------------------------------------------------------

    def sign(self, message: bytes) -> str:
        return signing.sign(self.private_key, message)

    def sign_auth(self, url: str, fmt: str = "url", **fields: Any) -> dict[str, Any]:
        """`auth_data` as a client gets it from `/route/`, signed in `fmt` ("url", "sorted", "legacy")."""
        reqnum = next(self._reqnum)
        auth: dict[str, Any] = {
            "cost": 100.0, "endpoint": "test-endpoint", "reqnum": reqnum, "request_idx": reqnum,
            "url": url, "__request_id": uuid.uuid4().hex,
        }
        auth.update(fields)
        auth["signature"] = self.sign(signing.message(fmt, auth))
        return auth

    def _route(self, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = body.get("endpoint", "")
        if not self.worker_url:
            return {"endpoint": endpoint, "status": {"ready": 0, "loading": 1}}
        request_idx = body.get("request_idx") or next(self._request_idx)
        return {
            "endpoint": endpoint,
            "url": self.worker_url,
            "cost": body.get("cost", 100),
            "reqnum": next(self._reqnum),
            "signature": self.sign(signing.message("url", {"url": self.worker_url})),
            "__request_id": uuid.uuid4().hex,
            "request_idx": request_idx,
        }

    # -- the HTTP side -----------------------------------------------------------------------------

    def _record(self, received: Received) -> None:
        with self._cond:
            self.received.append(received)
            self._cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if urlsplit(self.path).path == "/pubkey/":
                    self._send(200, fake.public_pem, "text/plain")
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                # Vast's client also sends the key as `?api_key=`: match on the path alone.
                path = urlsplit(self.path).path
                if path == "/route/":
                    fake.route_calls.append(body if isinstance(body, dict) else {})
                    self._send(200, json.dumps(fake._route(body if isinstance(body, dict) else {})).encode())
                    return
                if path not in (STATUS, DELETE):
                    self._send(404, b'{"error": "not found"}')
                    return
                with fake._cond:
                    mode, slow = fake.mode, fake.slow_seconds
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(path, mode, slow, body, arrived)
                finally:
                    with fake._cond:
                        fake.in_flight -= 1

            def _answer(self, path: str, mode: str, slow: float, body: Any, arrived: float) -> None:
                if mode == "down":
                    fake._record(Received(path, body, arrived, None))
                    self.close_connection = True  # no answer at all: the client sees a dropped connection
                    return
                if mode == "error500":
                    fake._record(Received(path, body, arrived, 500))
                    self._send(500, b'{"error": "internal error"}')
                    return
                delayed = 0.0
                if mode == "slow":
                    fake._release.wait(slow)
                    delayed = time.monotonic() - arrived
                fake._record(Received(path, body, arrived, 200, delayed))
                try:
                    self._send(200, b'{"ok": true}')
                except OSError:
                    pass  # the client gave up waiting (slow mode)

        return Handler
