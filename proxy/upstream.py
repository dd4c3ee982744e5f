"""A small keep-alive HTTP/1.1 client for one upstream origin (the model server), for trio.

It replaces httpcore + h11 on the proxy's hot path: their pool walks every connection per request
(a poll() per idle socket, and a quadratic keep-alive count: encode/httpcore#1035), and h11's event
machinery costs more than the little the proxy needs, which is:

- a pool: a LIFO stack of idle connections (bounded; the top one is the most recently used, so
  when it is past its idle expiry all below it are too). Nothing scans the pool per request: the
  popped connection is checked (its age, and one poll() of its own socket, with no wait: a server
  that closed it while idle has left an EOF there), and the oldest one is trimmed when a connection
  comes back.
- a request: the head and a small body in one write.
- a response: the head (64 KiB at most), 1xx interim answers skipped, then the body framed per
  RFC 9112 §6.3 (none for HEAD / 1xx / 204 / 304; chunked, decoded incrementally and handed out as
  soon as each piece arrives; Content-Length; or until the server closes), read in pieces.

A connection goes back to the pool only when its response was read to the end, both sides spoke
HTTP/1.1 keep-alive and nothing unexpected followed the response; otherwise, and whenever the
exchange is abandoned (an error, a cancelled request), it is closed at once.

A pooled connection the server closed just as the request went out (its keep-alive timer raced the
request: the write fails, or EOF / reset arrives before any byte of an answer) is retried once on a
fresh connection. If that fresh connection is then refused although the request had been written,
the server died with the request on it: that is reported as a broken connection, not as a refused
one (the request may have reached it, and a refused request is sent again after the restart).

Errors are `UpstreamFailure` subclasses; `proxy.forward` maps them to 502 / 504.
"""

from __future__ import annotations

import math
import re
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable

import trio

MAX_HEAD = 64 * 1024  # response head (status line + fields), and a chunk-size line or trailer section
MAX_INTERIM = 16  # 1xx answers before the final one
RECEIVE_SIZE = 64 * 1024
SMALL_BODY = 64 * 1024  # a body up to this size is written with the head, in one send

# RFC 9110 §5.6.2 token (field names, methods); a field value must not hold NUL, CR or LF.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
# Bytes that may not appear raw in a request target (controls, space, DEL, non-ASCII).
_UNSAFE_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\x00\r\n]*)?")
# A field value, once stripped of SP / HTAB at both ends, may not hold NUL nor other whitespace
# than SP / HTAB (h11's rule: hypercorn would refuse to relay anything else).
_BAD_FIELD_VALUE = re.compile(rb"[\x00\n\r\f\v]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")


class UpstreamFailure(Exception):
    """The exchange with the upstream failed. `before_response`: no byte of an answer had come."""

    before_response = False


class ConnectRefused(UpstreamFailure):
    """No connection could be made (refused, unreachable, name not found): the request never left."""


class ConnectTimeout(UpstreamFailure):
    pass


class PoolTimeout(UpstreamFailure):
    """Every one of `max_connections` was in use for the whole connect timeout."""


class ReadTimeout(UpstreamFailure):
    pass


class WriteTimeout(UpstreamFailure):
    pass


class Disconnected(UpstreamFailure):
    """The connection broke or closed (EOF, reset, TLS error) before the exchange was complete."""

    def __init__(self, reason: str, before_response: bool = False, unsent: bool = False) -> None:
        super().__init__(reason)
        self.before_response = before_response
        self.unsent = unsent  # writing the request failed: it never reached the server whole


class ProtocolFailure(UpstreamFailure):
    """The upstream's answer is not valid HTTP/1.x (or is too large a head)."""


def _lost(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}" + (f" ({cause})" if cause is not None and str(cause) else "")


def _send_failed(exc: BaseException) -> Disconnected:
    return Disconnected(f"sending the request failed ({_lost(exc)})", before_response=True, unsent=True)


class Connection:
    """A plain TCP connection: the stdlib socket (non-blocking), driven with `trio.lowlevel` waits.

    trio's `SocketStream` yields to the scheduler twice per operation, even one that completes at
    once, and wraps each in context managers. Here the socket is called first and waited on only
    when it would block (the wait is the cancellation point): a request's write nearly always
    completes at once, and a body's data is often there already."""

    __slots__ = ("sock", "buf", "idle_since", "drained")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()  # received and not yet consumed
        self.idle_since = 0.0
        # The last read took all the socket held (or a request has just gone): the next read
        # waits at once rather than first trying a read that would only fail.
        self.drained = True

    async def send_all(self, data: bytes, timeout: float) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _send_failed(exc) from None
        self.drained = True  # no answer can be there yet
        if sent == len(data):
            return
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope, memoryview(data) as view:
            while sent < len(view):
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _send_failed(exc) from None
            return
        if scope.cancelled_caught:
            raise WriteTimeout(f"sending the request took over {timeout:g}s")

    async def receive(self, timeout: float | None) -> bytes:
        """Some bytes, or b"" at EOF."""
        if not self.drained:
            data = self._recv_now()
            if data is not None:
                return data
        if timeout is None:
            return await self._wait_and_receive()
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            return await self._wait_and_receive()
        assert scope.cancelled_caught
        raise ReadTimeout(f"no data from the model server for {timeout:g}s")

    def _recv_now(self) -> bytes | None:
        """What the socket holds right now; None when it would block."""
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise Disconnected(f"connection lost ({_lost(exc)})") from None
        self.drained = len(data) < RECEIVE_SIZE
        return data

    async def _wait_and_receive(self) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            data = self._recv_now()
            if data is not None:
                return data

    def is_stale(self) -> bool:
        """For an idle connection: True when the server has closed it (EOF or a reset waiting) or
        sent something unasked. One poll() of this socket only, with no wait."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        """Close at once: synchronous, so it is safe in a cancelled task."""
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class TLSConnection(Connection):
    """HTTPS to the model server: the same interface on a `trio.SSLStream`."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__(stream.transport_stream.socket)  # type: ignore[arg-type]  # used for is_stale / close
        self.stream = stream

    async def send_all(self, data: bytes, timeout: float) -> None:
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                await self.stream.send_all(data)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _send_failed(exc) from None
        if scope.cancelled_caught:
            raise WriteTimeout(f"sending the request took over {timeout:g}s")

    async def receive(self, timeout: float | None) -> bytes:
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout if timeout is not None else math.inf) as scope:
                return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Disconnected(f"connection lost ({_lost(exc)})") from None
        assert scope.cancelled_caught
        raise ReadTimeout(f"no data from the model server for {timeout:g}s")

    def is_stale(self) -> bool:
        try:
            return self.sock.is_readable()  # type: ignore[attr-defined]  # a trio socket here
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()  # a trio socket: it notifies waiters itself; no close_notify is sent


class Response:
    """One exchange on a checked-out connection: the final answer's head, then its body in pieces.

    `complete` turns True when the body has been read to its end."""

    __slots__ = ("status", "headers", "content_length", "keep_alive", "complete", "conn", "timeout",
                 "_mode", "_left", "_state", "_trailer", "_fault")

    # body modes
    LENGTH, CHUNKED, UNTIL_CLOSE = 1, 2, 3
    # chunked decoding states
    _SIZE, _DATA, _DATA_END, _TRAILER, _BROKEN = 0, 1, 2, 3, 4

    def __init__(self, conn: Connection, timeout: float | None) -> None:
        self.conn = conn
        self.timeout = timeout
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased, hop-by-hop fields included
        self.content_length: int | None = None  # the upstream's Content-Length, when it framed the body
        self.keep_alive = False
        self.complete = False
        self._mode = 0
        self._left = 0
        self._state = self._SIZE
        self._trailer = 0
        self._fault: ProtocolFailure | None = None

    # -- the head

    async def read_head(self, method: bytes) -> None:
        conn = self.conn
        buf = conn.buf
        for _ in range(MAX_INTERIM + 1):
            searched = 0
            while (end := buf.find(b"\r\n\r\n", searched)) < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolFailure(f"response head over {MAX_HEAD} bytes")
                searched = max(len(buf) - 3, 0)
                try:
                    data = await conn.receive(self.timeout)
                except Disconnected as exc:
                    exc.before_response = not buf and self.status == 0  # reset before any answer
                    raise
                if not data:
                    raise Disconnected("the model server closed the connection before answering",
                                       before_response=not buf and self.status == 0)
                buf += data
            if end > MAX_HEAD:
                raise ProtocolFailure(f"response head over {MAX_HEAD} bytes")
            head = bytes(buf[:end])
            del buf[:end + 4]
            http11 = self._parse_head(head)
            if self.status >= 200:
                self._frame(method, http11)
                return
            if self.status == 101:
                raise ProtocolFailure("the model server switched protocols (101), which is not supported")
            # 100 Continue, 102, 103: interim, the final answer follows
        raise ProtocolFailure(f"over {MAX_INTERIM} interim (1xx) responses")

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise ProtocolFailure(f"malformed status line {lines[0][:100]!r}")
        self.status = int(match[2])
        headers: list[tuple[bytes, bytes]] = []
        for i in range(1, len(lines)):
            line = lines[i]
            if line[:1] in (b" ", b"\t"):
                # obs-fold (RFC 9112 §5.2): the line continues the previous value
                more = line.strip(b" \t")
                if not headers or _BAD_FIELD_VALUE.search(more) is not None:
                    raise ProtocolFailure(f"malformed header line {line[:100]!r}")
                name, value = headers[-1]
                headers[-1] = (name, value + b" " + more if value else more)
                continue
            name, colon, value = line.partition(b":")
            # whitespace before the colon is tolerated and removed (RFC 9112 §5.1, for a proxy)
            name = name.rstrip(b" \t")
            value = value.strip(b" \t")
            if not colon or _TOKEN.fullmatch(name) is None or _BAD_FIELD_VALUE.search(value) is not None:
                raise ProtocolFailure(f"malformed header line {line[:100]!r}")
            headers.append((name.lower(), value))
        self.headers = headers
        return match[1] == b"1"

    def _frame(self, method: bytes, http11: bool) -> None:
        """The body's framing (RFC 9112 §6.3) and whether the connection can be reused."""
        connection: list[bytes] = []
        codings: list[bytes] = []
        lengths: list[bytes] = []
        for name, value in self.headers:
            if name == b"connection":
                connection += (t.strip().lower() for t in value.split(b","))
            elif name == b"transfer-encoding":
                codings += (t.strip().lower() for t in value.split(b","))
            elif name == b"content-length":
                lengths += (t.strip() for t in value.split(b","))
        keep_alive = http11 and b"close" not in connection
        status = self.status
        if method == b"HEAD" or status in (204, 304):
            self._mode, self.complete = self.LENGTH, True
            if lengths and lengths[0].isdigit() and method == b"HEAD":
                self.content_length = int(lengths[0])  # the size a GET would get (informative)
        elif codings:
            if codings[-1] == b"chunked":
                self._mode = self.CHUNKED
            else:
                self._mode, keep_alive = self.UNTIL_CLOSE, False
            if lengths:
                keep_alive = False  # both framings: Transfer-Encoding wins, and the connection is suspect
        elif lengths:
            if not all(v.isdigit() and v.isascii() for v in lengths) or len(set(lengths)) > 1:
                raise ProtocolFailure(f"invalid Content-Length {b', '.join(lengths)[:100]!r}")
            self._mode = self.LENGTH
            self._left = self.content_length = int(lengths[0])
            self.complete = self._left == 0
        else:
            self._mode, keep_alive = self.UNTIL_CLOSE, False
        self.keep_alive = keep_alive

    # -- the body

    async def read_some(self) -> bytes:
        """The body bytes available next (waiting for some when none are); b"" once it is complete.
        After a call, `complete` says whether the body ended with it."""
        if self.complete:
            return b""
        conn = self.conn
        buf = conn.buf
        mode = self._mode
        if mode == self.LENGTH:
            left = self._left
            if buf:
                if len(buf) <= left:
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:left])
                    del buf[:left]
            else:
                data = await conn.receive(self.timeout)
                if not data:
                    raise Disconnected(f"the model server closed the connection {left} bytes before the end "
                                       "of the body")
                if len(data) > left:
                    buf += data[left:]  # more than announced: kept, so the connection is not reused
                    data = data[:left]
            self._left = left - len(data)
            self.complete = self._left == 0
            return data
        if mode == self.CHUNKED:
            pieces: list[bytes] = []
            while True:
                try:
                    self._dechunk(buf, pieces)
                except ProtocolFailure as exc:
                    if not pieces:
                        raise
                    self._state, self._fault = self._BROKEN, exc  # what came before the fault goes out first
                    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
                if pieces or self.complete:
                    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
                data = await conn.receive(self.timeout)
                if not data:
                    raise Disconnected("the model server closed the connection inside a chunked body")
                buf += data
        # until close
        if buf:
            data = bytes(buf)
            buf.clear()
            return data
        data = await conn.receive(self.timeout)
        if not data:
            self.complete = True
        return data

    async def read_all(self) -> bytes:
        pieces = []
        while not self.complete:
            pieces.append(await self.read_some())
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _dechunk(self, buf: bytearray, pieces: list[bytes]) -> None:
        """Decode what `buf` holds of a chunked body: chunk data goes to `pieces` (extensions are
        ignored, trailers read and dropped); stops when more bytes are needed or the body is over."""
        state = self._state
        while True:
            if state == self._DATA:
                if not buf:
                    break
                left = self._left
                if len(buf) <= left:
                    piece = bytes(buf)
                    buf.clear()
                else:
                    piece = bytes(buf[:left])
                    del buf[:left]
                pieces.append(piece)
                self._left = left = left - len(piece)
                if left:
                    break
                state = self._DATA_END
            elif state == self._DATA_END:
                if len(buf) < 2:
                    break
                if buf[0] != 13 or buf[1] != 10:
                    raise ProtocolFailure("chunk data not followed by CRLF")
                del buf[:2]
                state = self._SIZE
            elif state == self._SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEAD:
                        raise ProtocolFailure("chunk-size line too long")
                    break
                size_text = bytes(buf[:eol]).split(b";", 1)[0].strip(b" \t")
                del buf[:eol + 2]
                if _CHUNK_SIZE.fullmatch(size_text) is None:
                    raise ProtocolFailure(f"malformed chunk size {size_text[:40]!r}")
                self._left = int(size_text, 16)
                state = self._DATA if self._left else self._TRAILER
            elif state == self._BROKEN:
                raise self._fault or ProtocolFailure("malformed chunked body")
            else:  # trailer section: fields up to an empty line, dropped
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if self._trailer + len(buf) > MAX_HEAD:
                        raise ProtocolFailure("trailer section too large")
                    break
                del buf[:eol + 2]
                if eol == 0:
                    self.complete = True
                    break
                self._trailer += eol + 2
        self._state = state


class Http11Client:
    """Requests to one origin over pooled HTTP/1.1 connections. `request` returns the `Response` once
    its head is in; the caller reads the body and must then call `release` (in a `finally`)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        *,
        max_connections: int = 1024,
        max_idle: int = 256,
        idle_expiry: float = 60.0,
        connect_timeout: float = 5.0,
        write_timeout: float = 30.0,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self._slots = trio.Semaphore(max_connections)  # exchanges in flight, each on its own connection
        self._idle: deque[Connection] = deque()  # right end: the most recently used
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    async def request(self, head: bytes, body: bytes, method: bytes, read_timeout: float | None) -> Response:
        """Send one request (`head` ends with its blank line) and read the answer's head."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.connect_timeout) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise PoolTimeout(
                    f"all {self._slots.max_value} connections busy for {self.connect_timeout:g}s") from None
        return await self._request(head, body, method, read_timeout)

    async def _request(self, head: bytes, body: bytes, method: bytes, read_timeout: float | None) -> Response:
        # holds a slot: released here on failure, by `release` otherwise
        conn: Connection | None = None
        try:
            conn = self._checkout()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            message = head + body if len(body) <= SMALL_BODY else None
            while True:
                response = Response(conn, read_timeout)
                try:
                    if message is not None:
                        await conn.send_all(message, self.write_timeout)
                    else:
                        await conn.send_all(head, self.write_timeout)
                        await conn.send_all(body, self.write_timeout)
                    await response.read_head(method)
                    return response
                except Disconnected as exc:
                    if not (reused and exc.before_response):
                        raise
                    # A pooled connection closed by the server as the request went out: once more on
                    # a fresh one.
                    conn.close()
                    conn = None
                    reused = False
                    try:
                        conn = await self._connect()
                    except ConnectRefused as refused:
                        if exc.unsent:
                            raise  # the request never got through: a refusal like any other
                        # The request went out and the server is now down: it may have died of it,
                        # so this is no refusal (a refusal is retried after the restart).
                        raise Disconnected(f"the model server closed the connection with the request on it, "
                                           f"and now refuses new ones ({refused})") from None
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise

    def release(self, response: Response) -> None:
        """End an exchange: the connection goes back to the pool if it can serve another request,
        else it is closed. Call exactly once per `request` that returned."""
        conn = response.conn
        self._slots.release()
        if not (response.complete and response.keep_alive) or conn.buf or self._closed:
            conn.close()
            return
        idle = self._idle
        conn.idle_since = now = time.monotonic()
        idle.append(conn)
        if len(idle) > self.max_idle:
            idle.popleft().close()
        elif now - idle[0].idle_since > self.idle_expiry:
            idle.popleft().close()  # trims the oldest as connections come back: the pool is never scanned

    def _checkout(self) -> Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > self.idle_expiry:
                conn.close()
                while idle:  # LIFO: everything below is older still
                    idle.pop().close()
                return None
            if conn.is_stale():
                conn.close()  # closed by the server while idle, or garbage waiting: unusable
                continue
            return conn
        return None

    async def _connect(self) -> Connection:
        with trio.move_on_after(self.connect_timeout):
            try:
                tcp = await trio.open_tcp_stream(self.host, self.port)  # sets TCP_NODELAY
            except OSError as exc:
                raise ConnectRefused(f"cannot connect to {self.host}:{self.port} ({_lost(exc)})") from None
            if self.tls is None:
                trio_sock = tcp.socket
                family, kind, proto = trio_sock.family, trio_sock.type, trio_sock.proto
                sock = socket.socket(family, kind, proto, fileno=trio_sock.detach())
                sock.setblocking(False)
                return Connection(sock)
            stream = trio.SSLStream(tcp, self.tls, server_hostname=self.host, https_compatible=True)
            try:
                await stream.do_handshake()
            except BaseException as exc:
                tcp.socket.close()
                if isinstance(exc, trio.BrokenResourceError):
                    raise Disconnected(f"TLS handshake with {self.host}:{self.port} failed ({_lost(exc)})") from None
                raise
            return TLSConnection(stream)
        raise ConnectTimeout(f"connecting to {self.host}:{self.port} took over {self.connect_timeout:g}s")


def request_head(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    body_length: int,
) -> bytes:
    """`METHOD target HTTP/1.1`, Host, the fields not in `drop` (lowercase names), Content-Length and
    the blank line. A field whose name is not a token or whose value holds CR, LF or NUL is left out:
    nothing from the client can end a line of the request early."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        if name.lower() in drop:
            continue
        if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
            continue
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"content-length: %d\r\n\r\n" % body_length)
    return b"".join(parts)


def safe_target(target: bytes) -> bytes:
    """A request target with any byte that may not appear raw in one percent-encoded."""
    if _UNSAFE_TARGET.search(target) is None:
        return target
    return _UNSAFE_TARGET.sub(lambda m: b"%%%02X" % m[0][0], target)


def is_token(text: bytes) -> bool:
    return _TOKEN.fullmatch(text) is not None
