"""Forwarding one request to the model server and relaying its answer, chunk by chunk.

httpcore is used directly (httpx sits on it): the proxy needs a pool, timeouts and a byte stream,
not httpx's request/response models, and skipping them is measurably cheaper per request.
Streams (SSE, NDJSON, chunked) are never buffered: each chunk is sent to the client as it arrives.

Error mapping, before the answer has started: refused / reset / bad protocol -> 502, timeout -> 504.
Once the answer has started its status is out, so a failure mid-stream ends the stream early.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpcore

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those we recompute.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"remote-addr",
    b"proxy-connection", b"expect",
})


@dataclass(frozen=True)
class ForwardLimits:
    """Pool sizing and timeouts, in the spirit of httpx's `Limits` and `Timeout`."""

    max_connections: int = 1024  # well above any model server's useful concurrency
    keepalive_connections: int = 256
    keepalive_expiry: float = 60.0
    connect_timeout: float = 5.0
    write_timeout: float = 30.0


class UpstreamError(Exception):
    def __init__(self, status: int, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.refused = refused  # no connection was made: the request never reached the model server


@dataclass
class ForwardResult:
    status: int
    bytes_sent: int
    complete: bool  # False: the stream broke after the answer had started


def request_headers(headers: Iterable[tuple[bytes, bytes]], body_length: int) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    out.append((b"content-length", str(body_length).encode()))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # content-length is kept out too: hypercorn frames the relayed body itself.
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


class Forwarder:
    def __init__(self, base_url: str, limits: ForwardLimits = ForwardLimits()) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            retries=0,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

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
        url = self.base_url + path + ("?" + query.decode("latin-1") if query else "")
        timeouts = {
            "connect": self.limits.connect_timeout,
            "read": read_timeout,
            "write": self.limits.write_timeout,
            "pool": self.limits.connect_timeout,
        }
        started = False
        sent = 0
        try:
            async with self._pool.stream(
                method, url, headers=request_headers(headers, len(body)), content=body,
                extensions={"timeout": timeouts},
            ) as response:
                await send({
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers(response.headers),
                })
                started = True
                async for chunk in response.aiter_stream():
                    if chunk:
                        sent += len(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return ForwardResult(response.status, sent, True)
        except httpcore.TimeoutException as exc:
            if not started:
                raise UpstreamError(504, f"model server timed out ({type(exc).__name__})") from None
            return ForwardResult(504, sent, False)
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            if not started:
                raise UpstreamError(502, f"model server unreachable ({type(exc).__name__}: {exc})",
                                    refused=isinstance(exc, httpcore.ConnectError)) from None
            return ForwardResult(502, sent, False)
