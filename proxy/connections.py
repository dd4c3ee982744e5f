"""What one client connection may hold on the public port: a slot, a deadline for its request head,
and HTTP/1.1 only.

hypercorn bounds a head's size but not its time, nor the number of connections: a client that opens
connections and sends nothing (or a head a byte at a time) kept each one until the 75 s keep-alive
timer, and 1,030 of them exhausted the file descriptors. Here, per connection:

- `ConnectionGate` hands out slots: at most `max_connections` in all and `max_per_ip` per client
  address. A connection past either is answered `503` with `Retry-After` and closed at once (a clear
  refusal, written without parsing the request; see `refuse`).
- `GuardedTCPServer` (hypercorn's connection handler) gives the client `header_timeout` seconds to
  deliver a whole request head: from accepting the connection (TLS handshake included), and again from
  the first byte of each later request on a kept-alive connection. An idle kept-alive connection is
  still hypercorn's `keep_alive_timeout`; a request whose head is in is the request handler's business
  (its body has `BODY_TIMEOUT`, see `proxy/handler.py`).
- Cleartext HTTP/2 (`Upgrade: h2c`, or the prior-knowledge preface) is not switched to unless
  `allow_h2c`: the upgrade header is ignored and the request is served as HTTP/1.1 (RFC 9110 §7.8
  lets a server ignore it); the preface is answered 505 and closed. HTTP/2 negotiated by TLS ALPN is
  unaffected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import inf
from typing import Any

import h11
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

MAX_REFUSING = 64  # refusals that may linger a full second at once
REFUSAL_TIMEOUT = 2.0  # seconds a refusal (or the TLS handshake before it) may take to write
LINGER, SHORT_LINGER = 1.0, 0.05  # seconds a refused connection's input is read before closing


def _answer(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + extra
            + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


TOO_MANY = _answer(b"503 Service Unavailable", b'{"error":"too many open connections"}', b"retry-after: 1\r\n")
HEAD_TIMEOUT = _answer(b"408 Request Timeout", b'{"error":"request head not received in time"}')
NO_H2C = _answer(b"505 HTTP Version Not Supported", b'{"error":"cleartext HTTP/2 is not served here"}')


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000
    max_per_ip: int = 256
    header_timeout: float = 10.0
    allow_h2c: bool = False


class ConnectionGate:
    """Counts open client connections, in all and per address. Pure bookkeeping: no I/O."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.refusing = 0
        self._per_ip: Counter[str] = Counter()

    def try_enter(self, address: str) -> bool:
        if self.open >= self.limits.max_connections or self._per_ip[address] >= self.limits.max_per_ip:
            self.refused += 1
            return False
        self.open += 1
        self._per_ip[address] += 1
        return True

    def leave(self, address: str) -> None:
        self.open -= 1
        left = self._per_ip[address] - 1
        if left > 0:
            self._per_ip[address] = left
        else:
            del self._per_ip[address]  # the counter never grows with addresses no longer connected


def peer_address(stream: Any) -> str:
    """The client's address, for a plain or TLS stream; "" when the socket has none any more."""
    transport = getattr(stream, "transport_stream", stream)
    try:
        peer = transport.socket.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


async def refuse(stream: Any, gate: ConnectionGate) -> None:
    """Tell a client past the cap why it is turned away, briefly, then close.

    The answer is followed by our FIN, and what the client already sent (its request head) is read
    and dropped for a moment before closing: closing with unread input would send a reset, which
    can destroy the answer before the client reads it (the reason for nginx's "lingering close").
    At most `MAX_REFUSING` refusals linger for a second; past that they linger for 50 ms."""
    linger = LINGER if gate.refusing < MAX_REFUSING else SHORT_LINGER
    gate.refusing += 1
    try:
        with trio.move_on_after(REFUSAL_TIMEOUT):
            if hasattr(stream, "do_handshake"):
                await stream.do_handshake()
            await stream.send_all(TOO_MANY)
            if hasattr(stream, "send_eof"):
                await stream.send_eof()
        with trio.move_on_after(linger):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        gate.refusing -= 1
        await trio.aclose_forcefully(stream)


async def _ignore_upgrade(_event: h11.Request) -> None:
    """Stands in for hypercorn's h2c / prior-knowledge switch when cleartext HTTP/2 is off."""


class GuardedTCPServer(TCPServer):
    """hypercorn's per-connection server with a deadline on request heads and without h2c."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # A fresh connection owes its first head (a TLS handshake included) within the timeout.
        self._head_deadline = trio.current_time() + limits.header_timeout
        self._busy = False  # a request head is in and its exchange is not over

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            # hypercorn says idle=False once a request head is parsed, idle=True once its exchange ended
            self._busy = not event.idle
            self._head_deadline = inf
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        # HTTP/1.1 to begin with (not HTTP/2 negotiated by ALPN): the only case where h2c could start.
        refuse_h2c = not self.limits.allow_h2c and isinstance(self.protocol.protocol, H11Protocol)
        if refuse_h2c:
            self.protocol.protocol._check_protocol = _ignore_upgrade  # type: ignore[method-assign]
        first = True
        while True:
            try:
                with trio.move_on_at(self._head_deadline) as scope:
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if scope.cancelled_caught:
                if not self._busy:
                    await self._send_and_close(HEAD_TIMEOUT)
                    return
                continue
            if first and refuse_h2c and data.startswith(b"PRI * HTTP/2.0"):
                await self._send_and_close(NO_H2C)
                return
            first = False
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
            if not self._busy and self._head_deadline == inf and isinstance(self.protocol.protocol, H11Protocol):
                # The first bytes of a new head on a kept-alive connection: the clock starts now. (Not
                # on HTTP/2, where an idle connection carries pings and window updates that start no
                # request; its idle time is the keep-alive timer's.)
                self._head_deadline = trio.current_time() + self.limits.header_timeout
        await self.protocol.handle(Closed())

    async def _send_and_close(self, answer: bytes) -> None:
        """Answer in HTTP/1.1 (only on an HTTP/1.1 connection: HTTP/2 by ALPN is just closed), then close."""
        if isinstance(self.protocol.protocol, H11Protocol):
            with trio.move_on_after(REFUSAL_TIMEOUT):
                try:
                    async with self.send_lock:
                        await self.stream.send_all(answer)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                    pass
        await self.idle_task.stop()  # hypercorn's keep-alive timer would hold the connection's task group
        await self.protocol.handle(Closed())
