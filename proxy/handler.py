"""The request path for the backend's routes, as plain ASGI (the hot path skips Quart's machinery).

For each request: read the body (413 as soon as it passes the limit) -> parse the Vast envelope (422)
-> check the signature (401) -> admit it in the ledger -> wait for a slot (429 / 503) -> forward the
payload -> relay the answer -> finish the ledger entry -> one access event. A client that leaves
cancels the upstream request at once and is counted `Cancelled`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import trio
from structlog import get_logger

from backends.spec import Route
from proxy.admission import Admission, Rejected
from proxy.envelope import EnvelopeError, parse_envelope, workload_of
from proxy.forward import Forwarder, UpstreamError
from proxy.ledger import Ledger, RequestStatus
from proxy.replay import ReplayGuard
from proxy.signature import Verifier

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


@dataclass(frozen=True)
class ProxySettings:
    unsecured: bool
    max_body_bytes: int = 64 * 1024 * 1024


async def send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise BodyTooLarge  # refused before a byte of the body is read
            except ValueError:
                pass
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def upstream_credentials_removed(scope: Scope) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Vast's client sends its endpoint API key as `Authorization: Bearer` and `?api_key=`. Once
    shepherd has checked the signature, the key is not for the model server (vLLM started with its
    own --api-key would refuse it, and a key has no business in another process's logs)."""
    query = scope.get("query_string", b"")
    if query:
        query = b"&".join(p for p in query.split(b"&") if not p.startswith(b"api_key="))
    return query, [(k, v) for k, v in scope["headers"] if k != b"authorization"]


class RequestHandler:
    def __init__(
        self,
        settings: ProxySettings,
        forwarder: Forwarder,
        ledger: Ledger,
        admission: Admission,
        verifier: Verifier | None,
        on_change: Callable[[], None] = lambda: None,
        access_log: Callable[..., None] | None = None,
        metrics: Any = None,  # proxy.metrics.Metrics: per-request counts and histograms
        replay: ReplayGuard | None = None,
    ) -> None:
        self.settings = settings
        self.forwarder = forwarder
        self.ledger = ledger
        self.admission = admission
        self.verifier = verifier
        self.on_change = on_change  # pokes the reporter: arrivals and completions are news
        self.access_log = access_log
        self.metrics = metrics
        self.replay = replay
        self.errors = 0  # unexpected exceptions inside shepherd (answered 500)

    async def handle(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        if scope["method"] not in route.methods:
            allow = ", ".join(route.methods).encode()
            await send_json(send, 405, {"error": f"method {scope['method']} not allowed"}, [(b"allow", allow)])
            return self._log(route, 405, arrived)
        try:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
        except BodyTooLarge:
            await send_json(send, 413, {"error": f"body over {self.settings.max_body_bytes} bytes"},
                            [(b"connection", b"close")])
            return self._log(route, 413, arrived)
        except ClientGone:
            return self._log(route, 499, arrived)
        try:
            envelope = parse_envelope(body, unsecured=self.settings.unsecured)
        except EnvelopeError as exc:
            await send_json(send, exc.status, exc.fields)
            return self._log(route, exc.status, arrived)
        auth = envelope.auth
        workload = workload_of(route, envelope)
        request_idx = auth.request_idx if auth else None
        reqnum = auth.reqnum if auth else None
        if self.verifier is not None and auth is not None:  # secured: parse_envelope required auth_data
            verdict = await self.verifier.verify(auth)
            refusal = verdict.reason if not verdict.ok else (
                self.replay.accept(auth.reqnum, auth.signature) if self.replay is not None else None)
            if refusal is not None:
                self.ledger.refuse(route=route.path, workload=workload, now=time.time(), http_status=401,
                                   request_idx=request_idx, reqnum=reqnum)
                self.on_change()
                await send_json(send, 401, {"error": "invalid signature", "reason": refusal})
                return self._log(route, 401, arrived, workload=workload, request_idx=request_idx)

        record = self.ledger.admit(route=route.path, workload=workload, now=time.time(),
                                   request_idx=request_idx, reqnum=reqnum)
        self.on_change()
        # A bare (unsecured) payload is forwarded byte for byte: no re-serialisation on the hot path.
        payload = body if envelope.bare else orjson.dumps(envelope.payload)
        status, sent, queue_s, upstream_s = 499, 0, 0.0, 0.0
        try:
            async with self.admission.slot(route, record):
                queue_s = time.perf_counter() - arrived
                status, sent = await self._forward_watching(route, scope, receive, send, payload)
                upstream_s = time.perf_counter() - arrived - queue_s
            outcome = RequestStatus.CANCELLED if status == 499 else (
                RequestStatus.ERROR if status >= 500 else RequestStatus.SUCCESS)
            self.ledger.finish(record, outcome, time.time(), status)
        except Rejected as rejected:
            status = rejected.status
            await send_json(send, status, {"error": rejected.reason, "retry_after": rejected.retry_after},
                            [(b"retry-after", str(rejected.retry_after).encode())])
        except UpstreamError as exc:
            status = exc.status
            self.ledger.finish(record, RequestStatus.ERROR, time.time(), status)
            await send_json(send, status, {"error": exc.reason})
        except Exception:
            status = 500
            self.errors += 1
            self.ledger.finish(record, RequestStatus.ERROR, time.time(), status)
            get_logger("proxy").exception("proxy.internal_error", route=route.path)
            await send_json(send, 500, {"error": "internal error in shepherd"})
        finally:
            # A cancelled request (client gone, or shutdown) still leaves the ledger.
            self.ledger.finish(record, RequestStatus.CANCELLED, time.time(), 499)
            self.on_change()
            self._log(route, status, arrived, workload=workload, request_idx=request_idx, bytes=sent,
                      queue_ms=round(queue_s * 1000, 3), upstream_ms=round(upstream_s * 1000, 3))

    async def _forward_watching(
        self, route: Route, scope: Scope, receive: Receive, send: Send, payload: bytes
    ) -> tuple[int, int]:
        """Forward while watching for the client leaving; its departure cancels the upstream call.
        Returns status 499 when the client left before the answer was complete."""
        result = None
        finishing = False  # the last body message is on its way: a disconnect now is the normal end

        async def relay(message: MutableMapping[str, Any]) -> None:
            nonlocal finishing
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finishing = True
            await send(message)

        upstream_error: UpstreamError | None = None
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not finishing:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            query, headers = upstream_credentials_removed(scope) if self.verifier is not None else (
                scope.get("query_string", b""), list(scope["headers"]))
            try:
                try:
                    result = await self.forwarder.forward(
                        scope["method"], route.target, query, headers, payload, route.timeout, relay,
                    )
                except UpstreamError as exc:
                    if not (exc.refused and await self.admission.wait_comeback(route)):
                        raise
                    result = await self.forwarder.forward(
                        scope["method"], route.target, query, headers, payload, route.timeout, relay,
                    )
            except UpstreamError as exc:
                # Raised out of the nursery it would arrive wrapped in an ExceptionGroup (trio's
                # strict groups) and miss the caller's `except UpstreamError`: a 502/504 became 500.
                upstream_error = exc
            nursery.cancel_scope.cancel()
        if upstream_error is not None:
            raise upstream_error
        if result is None:
            return 499, 0
        return result.status, result.bytes_sent

    def _log(self, route: Route, status: int, arrived: float, **fields: Any) -> None:
        total = time.perf_counter() - arrived
        if self.metrics is not None:
            queue_ms = fields.get("queue_ms")
            self.metrics.observe(route.path, status, total, queue_ms / 1000 if queue_ms else None)
        if self.access_log is not None:
            self.access_log("access", route=route.path, status=status, ms=round(total * 1000, 3), **fields)
