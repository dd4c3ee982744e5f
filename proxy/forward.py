"""Forwarding one request to the model server and relaying its answer as ASGI messages.

The upstream side is `proxy.upstream`, a small keep-alive HTTP/1.1 client made for this one hop
(httpcore's pool and h11 cost more CPU per request than the rest of the proxy together), whose
answers llhttp parses. Streams (SSE, NDJSON, chunked) are never buffered: each piece is sent to the
client as it arrives. A plain answer with a Content-Length (JSON, mostly) is read whole and relayed
as one message with its length, which saves hypercorn a chunked encoding and a terminator write.

Transfer codings: chunked framing is undone (hypercorn frames the relayed body its own way). Any
other transfer coding the model server applied (gzip, deflate, compress: it should not, since
shepherd sends no TE field) is not decoded: the bytes are relayed as they are and the codings are
appended to Content-Encoding, in the order applied, so the client undoes them as it would undo a
content coding. Decoding them here would mean decompressing an unbounded body in the proxy.

Timeouts: a route's `timeout` bounds the wait for the answer's head and each wait for body data.
A route without one (streams: `timeout=None`) gets `ForwardLimits.stream_head_timeout` for the head
and `stream_idle_timeout` between two pieces of the body, so a silent model server cannot hold a
request for good.

Error mapping, before the answer has started: refused / reset / bad protocol -> 502, timeout -> 504
(an answer the model server sent before it stopped reading the request, a 413, is relayed as it is).
Once the answer has started its status is out, so a failure mid-stream ends the stream early.
`UpstreamError.unserved` marks the failures after which the request provably never ran (refused, or
reset before any answer byte): the handler may hold such a request for the server's comeback.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from proxy.headers import HOP_BY_HOP
from proxy.upstream import (
    ConnectRefused,
    ConnectTimeout,
    Disconnected,
    Http11Client,
    PoolTimeout,
    ReadTimeout,
    UpstreamFailure,
    WriteTimeout,
    is_token,
    request_head,
    safe_target,
)

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Hop-by-hop fields (one list for both directions: proxy/headers.py), plus those this module writes
# itself (Host, Content-Length) or that belong to the client's own exchange (Expect, Remote-Addr).
_NOT_SENT = HOP_BY_HOP | {b"host", b"content-length", b"remote-addr", b"expect"}

# The answer's own `date` and `server` are dropped: hypercorn writes both, and a client must not get two.
_NOT_RELAYED = _NOT_SENT | {b"date", b"server"}

# An answer with a Content-Length up to this size, and not a stream, is relayed in one message.
BUFFER_MAX = 8 * 1024 * 1024
_STREAM_TYPES = (b"text/event-stream", b"ndjson", b"jsonl", b"json-seq")


@dataclass(frozen=True)
class ForwardLimits:
    """Pool sizing and timeouts, in the spirit of httpx's `Limits` and `Timeout`."""

    max_connections: int = 1024  # well above any model server's useful concurrency
    keepalive_connections: int = 256
    # Below common servers' keep-alive timeouts (uvicorn: 5 s), so that shepherd, not the server,
    # closes an idle connection: a request is then rarely written to one the server is closing,
    # and such a request is never sent again (see proxy.upstream).
    keepalive_expiry: float = 4.0
    connect_timeout: float = 5.0
    write_timeout: float = 30.0
    # Routes with no timeout (streams). The head: as long as a non-streaming route waits by default
    # (Route.timeout), because OpenAI-style routes without a timeout also carry non-streaming answers,
    # whose head comes only once the whole generation is done, after any wait in the server's queue.
    stream_head_timeout: float = 600.0
    # Between two pieces of a stream's body: tokens come in well under a second, but some servers send
    # the head at once and the first token only after the request has waited in their own queue.
    stream_idle_timeout: float = 300.0


class UpstreamError(Exception):
    def __init__(self, status: int, reason: str, refused: bool = False, reset: bool = False,
                 broken: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.refused = refused  # no connection was made: the request never reached the model server
        # The connection was reset before any byte of an answer (or the request could not be
        # written at all): the server never read the whole request (see upstream.Disconnected).
        self.reset = reset
        # The connection broke or closed (not a timeout, not a malformed answer) before anything of
        # the answer was relayed: the server may have run the request, the client has had nothing.
        self.broken = broken or reset

    @property
    def unserved(self) -> bool:
        """The request provably never ran on the model server: sending it again cannot run it twice."""
        return self.refused or self.reset


@dataclass
class ForwardResult:
    status: int
    bytes_sent: int
    complete: bool  # False: the stream broke after the answer had started


_TIMEOUTS = (ConnectTimeout, PoolTimeout, ReadTimeout, WriteTimeout)


def _upstream_error(exc: UpstreamFailure, answered: bool = False) -> UpstreamError:
    """`answered`: the answer's head had come (a reset after it is no sign of an unread request)."""
    if isinstance(exc, _TIMEOUTS):
        return UpstreamError(504, f"model server timed out ({type(exc).__name__}: {exc})")
    reset = not answered and isinstance(exc, Disconnected) and (exc.reset or exc.unsent)
    return UpstreamError(502, f"model server unreachable ({type(exc).__name__}: {exc})",
                         refused=isinstance(exc, ConnectRefused), reset=reset, broken=isinstance(exc, Disconnected))


def _relayed_headers(headers: list[tuple[bytes, bytes]], codings: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The answer's fields less hop-by-hop ones, and those its Connection field names (RFC 9110
    §7.6.1). Content-Length is left out too: it is set again when the body is relayed whole.
    Transfer codings other than chunked (`codings`) are carried over into Content-Encoding."""
    named: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            named = (named or set()) | {t.strip().lower() for t in value.split(b",")}
    if named is None:
        out = [(k, v) for k, v in headers if k not in _NOT_RELAYED]
    else:
        out = [(k, v) for k, v in headers if k not in _NOT_RELAYED and k not in named]
    return _with_codings(out, codings) if codings else out


def _with_codings(headers: list[tuple[bytes, bytes]], codings: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The relayed body still carries the transfer codings the model server applied (after any
    content coding): one Content-Encoding lists them all, in the order applied (RFC 9110 §8.4)."""
    applied = [v for k, v in headers if k == b"content-encoding" and v]
    out = [(k, v) for k, v in headers if k != b"content-encoding"]
    out.append((b"content-encoding", b", ".join(applied + codings)))
    return out


class Forwarder:
    def __init__(self, base_url: str, limits: ForwardLimits = ForwardLimits()) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        host = url.hostname
        name = host if host.isascii() else host.encode("idna").decode("ascii")
        host_field = f"[{name}]" if ":" in name else name
        if url.port is not None:
            host_field += f":{port}"
        self._host = host_field.encode("ascii")
        self._prefix = url.path.encode("utf-8")
        self._targets: dict[str, bytes] = {}
        self._methods: dict[str, bytes] = {}
        # Trio time of the last byte of an answer from the model server (a head, or body data): the
        # lifecycle asks it whether a server slow to answer its health check is busy or silent.
        self.last_answer_at = -math.inf
        self._client = Http11Client(
            host, port, ssl.create_default_context() if tls else None,
            max_connections=limits.max_connections,
            max_idle=limits.keepalive_connections,
            idle_expiry=limits.keepalive_expiry,
            connect_timeout=limits.connect_timeout,
            write_timeout=limits.write_timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _method(self, method: str) -> bytes:
        encoded = self._methods.get(method)
        if encoded is None:
            encoded = method.encode("latin-1", "replace")
            if not is_token(encoded):
                raise UpstreamError(502, f"cannot forward the method {method!r}")
            if len(self._methods) < 64:
                self._methods[method] = encoded
        return encoded

    def _target(self, path: str, query: bytes) -> bytes:
        target = self._targets.get(path)
        if target is None:
            target = safe_target(self._prefix + path.encode("utf-8"))
            if len(self._targets) < 256:  # route targets: a handful
                self._targets[path] = target
        return target + b"?" + safe_target(query) if query else target

    async def forward(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        read_timeout: float | None,
        send: Send,
    ) -> ForwardResult:
        """Send one request and relay the answer through `send`. `read_timeout` bounds the wait for
        the answer's head and each wait for body data; None (a stream) means the limits' stream
        timeouts. Raises UpstreamError before the answer has started."""
        verb = self._method(method)
        head = request_head(verb, self._target(path, query), self._host, headers, _NOT_SENT, len(body))
        client = self._client
        if read_timeout is None:
            head_timeout, idle_timeout = self.limits.stream_head_timeout, self.limits.stream_idle_timeout
        else:
            head_timeout = idle_timeout = read_timeout
        try:
            response = await client.request(head, body, verb, head_timeout, idle_timeout)
        except UpstreamFailure as exc:
            raise _upstream_error(exc) from None
        self.last_answer_at = trio.current_time()
        released = False
        started = False
        sent = 0
        status = response.status
        try:
            out = _relayed_headers(response.headers, response.codings)
            length = response.content_length
            if response.complete:  # no body (HEAD, 204, 304, Content-Length: 0)
                released = True
                client.release(response)
                if length is not None:  # HEAD: the length a GET would have
                    out.append((b"content-length", b"%d" % length))
                await send({"type": "http.response.start", "status": status, "headers": out})
                started = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return ForwardResult(status, 0, True)
            if length is not None and length <= BUFFER_MAX and not _is_stream(response.headers):
                data = await response.read_all()
                released = True
                client.release(response)
                out.append((b"content-length", b"%d" % len(data)))
                await send({"type": "http.response.start", "status": status, "headers": out})
                started = True
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return ForwardResult(status, len(data), True)
            await send({"type": "http.response.start", "status": status, "headers": out})
            started = True
            while True:
                data = await response.read_some()
                self.last_answer_at = trio.current_time()
                sent += len(data)
                if response.complete:
                    released = True
                    client.release(response)
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    return ForwardResult(status, sent, True)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
        except UpstreamFailure as exc:
            error = _upstream_error(exc, answered=True)
            if not started:
                raise error from None
            return ForwardResult(error.status, sent, False)
        finally:
            if not released:
                client.release(response)  # incomplete: the connection is closed, never pooled


def _is_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            value = value.lower()
            return any(kind in value for kind in _STREAM_TYPES)
    return False
