"""The request path for the backend's routes, as plain ASGI (the hot path skips Quart's machinery).

For each request: read the body within its size, time and memory limits (413 / 408 / 503, see
`proxy/body.py`) -> for a large signed body, check the signature of its leading `auth_data` before
parsing the rest (`proxy/auth_first.py`) -> parse the Vast envelope (422) -> check the signature (401)
-> admit it in the ledger -> wait for a slot (429 / 503) -> forward the payload -> relay the answer ->
finish the ledger entry -> one access event. A client that leaves cancels the upstream request at
once and is counted `Cancelled`. A request the model server never ran (refused, or reset before any
answer: it had just died) waits for its comeback and is sent again (`Admission.wait_comeback`; 503
when it is not back within `max_queue_time`); one it may have run is never sent twice (502).

Everything that can fail on the client's input fails before `ledger.admit`; everything after it runs
inside one `try/finally` that finishes the record, so no exception can leave a request counted as in
flight. Every answer has a JSON body, and error bodies name no internal address (the detail goes to
the access event, which only the operator sees).
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
from proxy.admission import Admission, Comeback, Rejected
from proxy.auth_first import AUTH_FIRST_ABOVE, auth_data_prefix
from proxy.body import BodyBudget, BodyTimeout, BodyTooLarge, BudgetFull, ClientGone, read_body
from proxy.envelope import AUTH_MAX_BYTES, Envelope, EnvelopeError, parse_envelope, workload_of
from proxy.forward import Forwarder, UpstreamError
from proxy.headers import upstream_request
from proxy.ledger import Ledger, RequestStatus
from proxy.replay import ReplayGuard
from proxy.signature import Verifier, signs_reqnum

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
CLOSE = [(b"connection", b"close")]
# What a client is told when the model server fails; the reason with its addresses is logged instead.
PUBLIC_UPSTREAM_ERRORS = {502: "model server error", 504: "model server timed out"}


@dataclass(frozen=True)
class ProxySettings:
    unsecured: bool
    max_body_bytes: int = 64 * 1024 * 1024
    body_timeout: float = 60.0  # seconds from the request head to the last byte of its body
    body_bytes_in_flight: int = 256 * 1024 * 1024
    max_workload: float = 100_000.0  # a route's own `max_workload` wins
    scheme: str = "http"  # what the client spoke to us (X-Forwarded-Proto)


async def send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    try:
        data = orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):  # never an empty answer, whatever went into `body`
        status, data = 500, b'{"error":"internal error in shepherd"}'
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])})
    await send({"type": "http.response.body", "body": data, "more_body": False})


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
        self.budget = BodyBudget(settings.body_bytes_in_flight)

    async def handle(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        if scope["method"] not in route.methods:
            allow = ", ".join(route.methods).encode()
            await send_json(send, 405, {"error": f"method {scope['method']} not allowed"}, [(b"allow", allow)])
            return self._log(route, 405, arrived)
        with self.budget.hold() as hold:
            try:
                body = await read_body(scope["headers"], receive, self.settings.max_body_bytes, hold,
                                       self.settings.body_timeout)
            except BodyTooLarge:
                await send_json(send, 413, {"error": f"body over {self.settings.max_body_bytes} bytes"}, CLOSE)
                return self._log(route, 413, arrived)
            except BodyTimeout:
                await send_json(send, 408, {"error": f"body not received within {self.settings.body_timeout:g}s"},
                                CLOSE)
                return self._log(route, 408, arrived)
            except BudgetFull:
                await send_json(send, 503, {"error": "too many request bytes in flight", "retry_after": 1},
                                [(b"retry-after", b"1"), *CLOSE])
                return self._log(route, 503, arrived, reason="body budget")
            except ClientGone:
                return self._log(route, 499, arrived)
            await self._handle_body(route, scope, receive, send, body, arrived)

    async def _handle_body(
        self, route: Route, scope: Scope, receive: Receive, send: Send, body: bytes | bytearray, arrived: float
    ) -> None:
        if self.verifier is not None and len(body) > AUTH_FIRST_ABOVE:
            refusal = await self._precheck(route, body)
            if refusal is not None:
                status, fields = refusal
                await send_json(send, status, fields)
                return self._log(route, status, arrived, checked="auth-first")  # the rest was never parsed
        try:
            envelope = parse_envelope(body, unsecured=self.settings.unsecured)
        except EnvelopeError as exc:
            await send_json(send, exc.status, exc.fields)
            return self._log(route, exc.status, arrived)
        auth = envelope.auth
        max_workload = route.max_workload or self.settings.max_workload
        workload = workload_of(route, envelope, max_workload, trust_cost=self.verifier is None)
        request_idx = auth.request_idx if auth else None
        reqnum = auth.reqnum if auth else None
        if self.verifier is not None and auth is not None:  # secured: parse_envelope required auth_data
            verdict = await self.verifier.verify(auth)
            if verdict.ok and signs_reqnum(verdict.fmt):  # the formats that sign reqnum sign cost too
                workload = workload_of(route, envelope, max_workload)
            refusal = verdict.reason if not verdict.ok else (
                self.replay.accept(auth.reqnum, verdict.signature_bytes, signs_reqnum(verdict.fmt))
                if self.replay is not None else None)
            if refusal is not None:
                self.ledger.refuse(route=route.path, workload=workload, now=time.time(), http_status=401,
                                   request_idx=request_idx, reqnum=reqnum)
                self.on_change()
                await send_json(send, 401, {"error": "invalid signature", "reason": refusal})
                return self._log(route, 401, arrived, workload=workload, request_idx=request_idx)
        await self._serve(route, scope, receive, send, envelope, workload, arrived)

    async def _precheck(self, route: Route, body: bytes | bytearray) -> tuple[int, dict[str, Any]] | None:
        """A large signed body: its leading `auth_data` must verify before the rest is parsed."""
        assert self.verifier is not None
        raw = auth_data_prefix(body, AUTH_MAX_BYTES)
        if raw is None:
            return 422, {"auth_data": f"must be the first key of a body over {AUTH_FIRST_ABOVE} bytes"}
        try:
            envelope = parse_envelope(b'{"auth_data":' + raw + b',"payload":{}}', unsecured=False)
        except EnvelopeError as exc:
            return exc.status, exc.fields
        assert envelope.auth is not None
        verdict = await self.verifier.verify(envelope.auth)
        if verdict.ok:
            # The whole body is checked again once parsed: with duplicate `auth_data` keys, the one
            # a JSON parser keeps (the last) is the one that must be valid.
            return None
        self.ledger.refuse(route=route.path, workload=0.0, now=time.time(), http_status=401,
                           request_idx=envelope.auth.request_idx, reqnum=envelope.auth.reqnum)
        self.on_change()
        return 401, {"error": "invalid signature", "reason": verdict.reason}

    async def _serve(
        self, route: Route, scope: Scope, receive: Receive, send: Send, envelope: Envelope, workload: float,
        arrived: float,
    ) -> None:
        auth = envelope.auth
        request_idx = auth.request_idx if auth else None
        record = self.ledger.admit(route=route.path, workload=workload, now=time.time(),
                                   request_idx=request_idx, reqnum=auth.reqnum if auth else None)
        status, sent, queue_s, upstream_s, detail = 499, 0, 0.0, 0.0, None
        try:
            self.on_change()
            async with self.admission.slot(route, record):
                queue_s = time.perf_counter() - arrived
                status, sent = await self._forward_watching(route, scope, receive, send, envelope.payload_bytes)
                upstream_s = time.perf_counter() - arrived - queue_s
            outcome = RequestStatus.CANCELLED if status == 499 else (
                RequestStatus.ERROR if status >= 500 else RequestStatus.SUCCESS)
            self.ledger.finish(record, outcome, time.time(), status)
        except Rejected as rejected:
            status = rejected.status
            await send_json(send, status, {"error": rejected.reason, "retry_after": rejected.retry_after},
                            [(b"retry-after", str(rejected.retry_after).encode())])
        except UpstreamError as exc:
            status, detail = exc.status, exc.reason
            self.ledger.finish(record, RequestStatus.ERROR, time.time(), status)
            await send_json(send, status, {"error": PUBLIC_UPSTREAM_ERRORS.get(status, "model server error")})
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
                      queue_ms=round(queue_s * 1000, 3), upstream_ms=round(upstream_s * 1000, 3),
                      **({"error": detail} if detail else {}))

    async def _forward_watching(
        self, route: Route, scope: Scope, receive: Receive, send: Send, payload: bytes | bytearray
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
            client = scope.get("client")
            query, headers = upstream_request(
                scope["headers"], scope.get("query_string", b""), client_host=client[0] if client else None,
                scheme=self.settings.scheme, strip_credentials=self.verifier is not None,
            )
            comeback_by: float | None = None  # trio time: how long it may wait for the server to come back
            unavailable: Comeback | None = None
            try:
                while True:
                    try:
                        result = await self.forwarder.forward(
                            scope["method"], route.target, query, headers, payload, route.timeout, relay,
                        )
                        break
                    except UpstreamError as exc:
                        # A request the server never ran (refused, or reset before any answer: it
                        # died, or is dying) waits for its restart, then goes again; one it may have
                        # run is never sent twice (a 502), unless the route says running it again
                        # has no effect but the answer and the client has had nothing of it yet.
                        # Either way only when the server really went down (NOT_DOWN: 502). The
                        # wait, over however many crashes, is bounded by one max_queue_time from
                        # the first failure.
                        if not (exc.unserved or (route.rerun_if_crashed and exc.broken)):
                            raise
                        if comeback_by is None:
                            comeback_by = trio.current_time() + route.max_queue_time
                        verdict = await self.admission.wait_comeback(comeback_by)
                        if verdict is Comeback.NOT_DOWN:
                            raise
                        if verdict is not Comeback.RETRY:
                            unavailable = verdict
                            break
            except UpstreamError as exc:
                # Raised out of the nursery it would arrive wrapped in an ExceptionGroup (trio's
                # strict groups) and miss the caller's `except UpstreamError`: a 502/504 became 500.
                upstream_error = exc
            nursery.cancel_scope.cancel()
        if upstream_error is not None:
            raise upstream_error
        if unavailable is not None:
            # Nothing was relayed: the client is told to come back, as while the worker loads.
            retry_after = self.admission.unavailable_retry_after
            error = "draining" if unavailable is Comeback.DRAINING else "model server restarting, not back in time"
            await send_json(send, 503, {"error": error, "retry_after": retry_after},
                            [(b"retry-after", str(retry_after).encode())])
            return 503, 0
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
