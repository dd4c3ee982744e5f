"""A small keep-alive HTTP/1.1 client for one upstream origin (the model server), for trio.

It owns the pool and the sockets; the answers are parsed by llhttp (through `httptools`, as uvicorn
does), not by hand. httpcore + h11 cost too much on the proxy's hot path: their pool walks every
connection per request (a poll() per idle socket, and a quadratic keep-alive count:
encode/httpcore#1035), and h11's event machinery costs more than the little the proxy needs, which is:

- a pool: a LIFO stack of idle connections (bounded; the top one is the most recently used, so
  when it is past its idle expiry all below it are too). Nothing scans the pool per request: the
  popped connection is checked (its age, and one poll() of its own socket, with no wait: a server
  that closed it while idle has left an EOF there), and the oldest one is trimmed when a connection
  comes back. The idle expiry (4 s by default) is kept below common servers' keep-alive timeouts
  (uvicorn: 5 s), so the server rarely closes a connection just as a request goes out on it.
- a request: the head and a small body in one write.
- an answer, parsed by llhttp in strict mode: a bare LF, obs-fold, whitespace before a field's colon
  or in a chunk-size line, control bytes in a value, conflicting or repeated Content-Length, or
  Content-Length with Transfer-Encoding are refused at once (502), never waited on. The bounds are
  shepherd's own: the heads of one answer (1xx interim ones included) are 64 KiB at most, there are
  at most 16 interim answers, and after the head at most 64 KiB in a row (counted per read, so up to
  one read more) may arrive without body data (chunk extensions, trailers, which are dropped).
  Only 1xx-5xx statuses and HTTP/1.0 or 1.1 are accepted, and 101 (switching protocols) is
  refused. The body is handed out as soon as each piece arrives. Transfer codings other than chunked are not undone: they are named in `codings`
  for the relay to pass on as content codings (see `proxy.forward`); an unknown one is refused.

A connection goes back to the pool only when its answer was read to the end, both sides spoke
HTTP/1.1 keep-alive and nothing followed the answer; otherwise, and whenever the exchange is
abandoned (an error, a cancelled request), it is closed at once. A HEAD answer's connection is not
reused either: httptools cannot tell llhttp that the answer has no body, so parsing stops at the
end of its head and what may follow it is unknown.

A request is never sent twice unless it provably never left: only when writing it to a pooled
connection failed before a single byte was written (the server had reset the connection) is it
written again, once, to a fresh connection. A request written whole, or in part, is not repeated
(a POST to a model server is not idempotent: it could run twice). When a write fails, an answer the
server sent before it stopped reading (a 413, then a close) is read and returned as the answer.

Errors are `UpstreamFailure` subclasses; `proxy.forward` maps them to 502 / 504. A `Disconnected`
says whether the connection was reset before any byte of an answer (`reset`): a kernel resets a
connection closed with data unread in it, so the server never read the whole request (it died with
the request in its listen queue, say), unlike a server that read it and then closed (EOF).
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

import httptools
import trio

MAX_HEAD = 64 * 1024  # the answer's heads (interim ones included); also bytes in a row after it with no data
MAX_INTERIM = 16  # 1xx answers before the final one
RECEIVE_SIZE = 64 * 1024
SMALL_BODY = 64 * 1024  # a body up to this size is written with the head, in one send
# After a failed write: how long an answer the server may have sent is waited for. After a reset or
# a close it is already there (or never comes) and nothing waits; only a server that stopped reading
# but kept the connection open is waited on this long.
EARLY_ANSWER_WAIT = 1.0

# RFC 9110 §5.6.2 token (field names, methods); a field value must not hold NUL, CR or LF.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
# Bytes that may not appear raw in a request target (controls, space, DEL, non-ASCII).
_UNSAFE_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
# Transfer codings (IANA registry) that are also content codings: passed on, not decoded.
_PASSED_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})


class UpstreamFailure(Exception):
    """The exchange with the upstream failed."""


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

    def __init__(self, reason: str, unsent: bool = False, reset: bool = False) -> None:
        super().__init__(reason)
        self.unsent = unsent  # writing the request failed before a single byte of it was written
        # Reset (RST), not closed, and no byte of an answer came. A kernel resets a connection that
        # is closed with data still unread in it (a server that died with our request in its listen
        # queue or its socket): the server never read the whole request, so it never ran it. A
        # server that read it and then died closes the connection instead (EOF).
        self.reset = reset


class ProtocolFailure(UpstreamFailure):
    """The upstream's answer is not valid HTTP/1.x (or is too large a head)."""


def _lost(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}" + (f" ({cause})" if cause is not None and str(cause) else "")


def _is_reset(exc: BaseException) -> bool:
    """The connection was reset (ECONNRESET), here or in what the exception wraps (TLS)."""
    return any(isinstance(e, ConnectionResetError) for e in (exc, exc.__cause__, exc.__context__))


def _send_failed(exc: BaseException, unsent: bool) -> Disconnected:
    return Disconnected(f"sending the request failed ({_lost(exc)})", unsent=unsent, reset=_is_reset(exc))


class Connection:
    """A plain TCP connection: the stdlib socket (non-blocking), driven with `trio.lowlevel` waits.

    trio's `SocketStream` yields to the scheduler twice per operation, even one that completes at
    once, and wraps each in context managers. Here the socket is called first and waited on only
    when it would block (the wait is the cancellation point): a request's write nearly always
    completes at once, and a body's data is often there already."""

    __slots__ = ("sock", "idle_since", "drained")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle_since = 0.0
        # The last read took all the socket held (or a request has just gone): the next read
        # waits at once rather than first trying a read that would only fail.
        self.drained = True

    async def send_all(self, data: bytes, timeout: float) -> None:
        """Write all of `data`. A failure says `unsent` only when not one byte of it was written."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _send_failed(exc, unsent=True) from None
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
                    raise _send_failed(exc, unsent=sent == 0) from None
            return
        if scope.cancelled_caught:
            raise WriteTimeout(f"sending the request took over {timeout:g}s")

    async def receive(self, deadline: float) -> bytes:
        """Some bytes, or b"" at EOF. `deadline` is on trio's clock (math.inf: none); past it,
        ReadTimeout, which the caller words."""
        if not self.drained:
            data = self._recv_now()
            if data is not None:
                return data
        if deadline == math.inf:
            return await self._wait_and_receive()
        with trio.CancelScope(deadline=deadline):
            return await self._wait_and_receive()
        raise ReadTimeout

    def _recv_now(self) -> bytes | None:
        """What the socket holds right now; None when it would block."""
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise Disconnected(f"connection lost ({_lost(exc)})", reset=_is_reset(exc)) from None
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
            # The TLS layer does not say how much went out: the request may have been delivered.
            raise _send_failed(exc, unsent=False) from None
        if scope.cancelled_caught:
            raise WriteTimeout(f"sending the request took over {timeout:g}s")

    async def receive(self, deadline: float) -> bytes:
        try:
            with trio.CancelScope(deadline=deadline):
                return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Disconnected(f"connection lost ({_lost(exc)})", reset=_is_reset(exc)) from None
        raise ReadTimeout

    def is_stale(self) -> bool:
        try:
            return self.sock.is_readable()  # type: ignore[attr-defined]  # a trio socket here
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()  # a trio socket: it notifies waiters itself; no close_notify is sent


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp: the answer is over (HEAD), or bytes follow it."""


class Response:
    """One exchange on a checked-out connection: the final answer's head, then its body in pieces.

    It is the httptools protocol object: llhttp calls its `on_*` methods as it parses what is fed.
    `complete` turns True when the body has been parsed to its end and handed out whole."""

    __slots__ = ("status", "headers", "content_length", "codings", "keep_alive", "conn",
                 "idle_timeout", "_parser", "_head_only", "_head_done", "_head_bytes", "_interim",
                 "_until_close", "_ended", "_pieces", "_framing_bytes", "_fault")

    def __init__(self, conn: Connection, method: bytes, idle_timeout: float | None) -> None:
        self.conn = conn
        self.idle_timeout = idle_timeout  # between two receives of the body; None: no limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased, hop-by-hop fields included
        self.content_length: int | None = None  # the upstream's Content-Length, when it framed the body
        self.codings: list[bytes] = []  # transfer codings other than chunked, in the order applied
        self.keep_alive = False
        self._ended = False  # llhttp has parsed the whole answer
        # It holds this object's bound methods: a reference cycle, broken (`_end`) as soon as the
        # answer is parsed, so that an exchange leaves no garbage for the cyclic collector.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._head_only = method == b"HEAD"
        self._head_done = False  # the final (non-1xx) head is parsed
        self._head_bytes = 0  # fed before the final head was done
        self._interim = 0
        self._until_close = False  # the body ends when the server closes the connection
        self._pieces: list[bytes] = []  # body data parsed and not yet handed out
        self._framing_bytes = 0  # fed in a row after the head without body data coming of it
        self._fault: UpstreamFailure | None = None  # raised once the pieces before it are handed out

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        if self._ended:
            raise _Stop  # bytes after the answer: it is whole, but the connection is out of step
        self.headers = []  # after an interim answer, the final one's fields

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # after the head: trailer fields, which are dropped
            # llhttp leaves trailing whitespace in the value; h11 (hypercorn) would refuse to relay it
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # only parsing calls this
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            raise ProtocolFailure(f"status {status} out of range")
        if status == 101:
            raise ProtocolFailure("the model server switched protocols (101), which is not supported")
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise ProtocolFailure(f"HTTP/{version} is not supported")
        if status < 200:
            return  # 100 Continue, 102, 103: interim, llhttp reads it as a message with no body
        self.status = status
        self._head_done = True
        self.keep_alive = version == "1.1" and parser.should_keep_alive()
        self._frame()
        if self._head_only:
            self._end()
            self.keep_alive = False  # what follows the head cannot be told apart from a body
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self._head_done:
            self._end()
            return
        self._interim += 1
        if self._interim > MAX_INTERIM:
            raise ProtocolFailure(f"over {MAX_INTERIM} interim (1xx) responses")

    def _end(self) -> None:
        """The whole answer is parsed. Safe in a callback: the running feed holds the parser."""
        self._ended = True
        self._parser = None

    def drop_parser(self) -> None:
        """For an exchange given up before its end: break the parser's reference cycle."""
        self._parser = None

    def _frame(self) -> None:
        """What the body's framing means for the relay: its length, its transfer codings, and
        whether only the server's close ends it. llhttp has checked the framing fields already."""
        codings: list[bytes] = []
        length: bytes | None = None
        for name, value in self.headers:
            if name == b"transfer-encoding":
                codings += (c for c in (t.strip(b" \t").lower() for t in value.split(b",")) if c)
            elif name == b"content-length":
                length = value
        status = self.status
        no_body = self._head_only or status == 204 or status == 304
        if codings:
            chunked = codings[-1] == b"chunked"
            self.codings = codings[:-1] if chunked else codings
            for coding in self.codings:
                if coding not in _PASSED_CODINGS:
                    # chunked twice or not last, identity, or a coding a client could not be told of
                    raise ProtocolFailure(f"unsupported transfer coding {coding[:40]!r}")
            self._until_close = not chunked and not no_body
        elif length is not None:
            if status != 204 and status != 304:
                self.content_length = int(length)  # for HEAD: the length a GET would get (informative)
        else:
            self._until_close = not no_body

    # -- feeding llhttp

    def _feed(self, data: bytes) -> None:
        """Parse `data`: the callbacks fill in the head, the body pieces and `complete`."""
        parser = self._parser
        if parser is None:
            self.keep_alive = False  # bytes after the answer
            return
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolFailure):
                failure = cause
            elif self._ended:
                self.keep_alive = False  # bytes after the answer (or a HEAD's head done)
                return
            else:
                failure = ProtocolFailure(f"malformed answer from the model server ({exc})")
            if self._pieces and self._head_done:
                self._fault = failure  # the data before the fault is relayed first
                return
            raise failure from None

    def _feed_head(self, data: bytes) -> None:
        """Feed bytes while the final head is not done: it must be done within MAX_HEAD bytes."""
        budget = MAX_HEAD - self._head_bytes
        if len(data) <= budget:
            self._feed(data)
            if not self._head_done:
                self._head_bytes += len(data)
            return
        self._feed(data[:budget])
        if not self._head_done:
            raise ProtocolFailure(f"response head over {MAX_HEAD} bytes")
        self._feed(data[budget:])

    def _feed_body(self, data: bytes) -> None:
        """Feed body bytes: MAX_HEAD of them in a row that yield no data (an endless chunk
        extension or trailer section) end the exchange."""
        self._feed(data)
        if self._pieces or self._ended:
            self._framing_bytes = 0
            return
        self._framing_bytes += len(data)
        if self._framing_bytes > MAX_HEAD:
            raise ProtocolFailure(f"over {MAX_HEAD} bytes of chunk framing or trailers without data")

    # -- the head

    async def read_head(self, timeout: float | None) -> None:
        """Read up to the final answer's head; `timeout` bounds the whole of it."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        conn = self.conn
        while not self._head_done:
            try:
                data = await conn.receive(deadline)
            except ReadTimeout:
                raise ReadTimeout(f"no answer from the model server within {timeout:g}s") from None
            except Disconnected as exc:
                if self._head_bytes:
                    exc.reset = False  # an answer had begun: the server had read the request
                raise
            if not data:
                raise Disconnected("the model server closed the connection before answering")
            self._feed_head(data)

    # -- the body

    async def read_some(self) -> bytes:
        """The body bytes available next (waiting for some when none are); b"" once it is complete.
        After a call, `complete` says whether the body ended with it."""
        if self._pieces:
            return self._take()
        if self._fault is not None:
            raise self._fault
        if self._ended:
            return b""
        timeout = self.idle_timeout
        while True:
            try:
                data = await self.conn.receive(math.inf if timeout is None else trio.current_time() + timeout)
            except ReadTimeout:
                raise ReadTimeout(f"no data from the model server for {timeout:g}s") from None
            if not data:
                if self._until_close:
                    self._end()
                    return b""
                raise Disconnected("the model server closed the connection before the end of the body")
            self._feed_body(data)
            if self._pieces or self._ended:
                return self._take()
            if self._fault is not None:
                raise self._fault

    @property
    def complete(self) -> bool:
        return self._ended and not self._pieces

    def _take(self) -> bytes:
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        return data

    async def read_all(self) -> bytes:
        pieces = []
        while not self.complete:
            pieces.append(await self.read_some())
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


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
        idle_expiry: float = 4.0,
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

    async def request(self, head: bytes, body: bytes, method: bytes, head_timeout: float | None,
                      idle_timeout: float | None) -> Response:
        """Send one request (`head` ends with its blank line) and read the answer's head, which must
        come within `head_timeout`; the body's reads then wait `idle_timeout` at most each."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.connect_timeout) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise PoolTimeout(
                    f"all {self._slots.max_value} connections busy for {self.connect_timeout:g}s") from None
        return await self._request(head, body, method, head_timeout, idle_timeout)

    async def _request(self, head: bytes, body: bytes, method: bytes, head_timeout: float | None,
                       idle_timeout: float | None) -> Response:
        # holds a slot: released here on failure, by `release` otherwise
        conn: Connection | None = None
        try:
            conn = self._checkout()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            while True:
                try:
                    await self._send(conn, head, body)
                except (Disconnected, WriteTimeout) as failure:
                    unsent = isinstance(failure, Disconnected) and failure.unsent
                    if not unsent:  # else what may be there answers no request of ours (a 408)
                        early = await self._early_answer(conn, method, idle_timeout)
                        if early is not None:
                            return early
                    if not (reused and unsent):
                        raise
                    # Not one byte went out on a pooled connection the server had reset: the
                    # request provably never reached it, so once more on a fresh connection.
                    conn.close()
                    conn = None
                    reused = False
                    conn = await self._connect()
                    continue
                response = Response(conn, method, idle_timeout)
                await response.read_head(head_timeout)
                return response
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise

    async def _send(self, conn: Connection, head: bytes, body: bytes) -> None:
        if len(body) <= SMALL_BODY:
            await conn.send_all(head + body, self.write_timeout)
            return
        await conn.send_all(head, self.write_timeout)
        try:
            await conn.send_all(body, self.write_timeout)
        except Disconnected as exc:
            exc.unsent = False  # the head went out
            raise

    async def _early_answer(self, conn: Connection, method: bytes, idle_timeout: float | None) -> Response | None:
        """After a failed write: the answer the server sent before it stopped reading the request
        (a 413 for a body it will not take, then a close), or None when there is none."""
        response = Response(conn, method, idle_timeout)
        try:
            await response.read_head(EARLY_ANSWER_WAIT)
        except UpstreamFailure:
            return None
        response.keep_alive = False  # the request was cut short: the connection is out of step
        return response

    def release(self, response: Response) -> None:
        """End an exchange: the connection goes back to the pool if it can serve another request,
        else it is closed. Call exactly once per `request` that returned."""
        conn = response.conn
        self._slots.release()
        response.drop_parser()
        if not (response.complete and response.keep_alive) or self._closed:
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
