"""The forwarder's HTTP/1.1 client (proxy/upstream.py) against tiny scripted servers on real sockets.

Each test starts a trio server whose script answers with exact bytes, so framing, pooling and the
error mapping are checked byte for byte: Content-Length, chunked (piece by piece, extensions,
trailers, a byte at a time), until close, no body (HEAD, 204), interim 100, keep-alive reuse and
its limits (Connection: close, a stale pooled connection, a server closing with a request on it,
which is never sent again), 502 / 504 before the answer (and which of them prove the request never
ran: refused, or reset before any answer byte), a broken or silent stream after it,
cancellation, header injection. The parser's strictness is in tests/test_forward_parser.py, and
hostile or early answers and stream timeouts in tests/test_forward_hostile_upstream.py.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import pytest
import trio
import trio.testing
import trustme

from proxy import forward as forward_module
from proxy import upstream as upstream_module
from proxy.forward import Forwarder, ForwardLimits, ForwardResult, UpstreamError

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class Peer:
    """The server's side of one accepted connection."""

    def __init__(self, stream: trio.abc.Stream, number: int) -> None:
        self.stream = stream
        self.number = number  # 1 for the first connection accepted
        self.buf = b""
        self.eof = trio.Event()  # the client closed its side
        self.closed = trio.Event()  # the script is over: the server closed the connection

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof.set()
            return False
        self.buf += data
        return True

    async def request(self) -> bytes | None:
        """One whole request (head and Content-Length body), or None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not await self._more():
                return None
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            if not await self._more():
                return None
            _, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def until_eof(self) -> None:
        while await self._more():
            pass


Script = Callable[[Peer, "Upstream"], Awaitable[None]]


class Upstream:
    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.accepts = 0
        self.requests: list[bytes] = []
        self.peers: list[Peer] = []
        self.port = 0
        self.listeners: list[trio.SocketListener] = []

    async def start(self, nursery: trio.Nursery) -> Upstream:
        self._scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
            with self._scope:
                await trio.serve_tcp(self._handle, 0, host="127.0.0.1", task_status=task_status)

        self.listeners = await nursery.start(serve)
        self.port = self.listeners[0].socket.getsockname()[1]
        return self

    def stop(self) -> None:
        """Like a process that dies: the port is closed and so is every connection."""
        self._scope.cancel()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.accepts += 1
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        peer = Peer(stream, self.accepts)
        self.peers.append(peer)
        try:
            await self.script(peer, self)
        except trio.BrokenResourceError:
            pass
        finally:
            peer.closed.set()

    async def requests_answered(self, peer: Peer, answer: bytes) -> None:
        """Answer every request on the connection with `answer`."""
        while (request := await peer.request()) is not None:
            self.requests.append(request)
            await peer.send(answer)


def serving(answer: bytes) -> Script:
    async def script(peer: Peer, up: Upstream) -> None:
        await up.requests_answered(peer, answer)
    return script


class Client:
    """What the handler would be: records the ASGI messages `forward` sends."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.first_body = trio.Event()

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and message["body"]:
            self.first_body.set()

    @property
    def start(self) -> dict[str, Any]:
        assert self.messages[0]["type"] == "http.response.start"
        return self.messages[0]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.start["headers"])

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages[1:]]

    @property
    def body(self) -> bytes:
        assert [m.get("more_body", False) for m in self.messages[1:]][-1] is False
        assert all(m.get("more_body", False) for m in self.messages[1:-1])
        return b"".join(self.bodies)


async def forward(fw: Forwarder, method: str = "POST", path: str = "/generate", query: bytes = b"",
                  headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"{}",
                  read_timeout: float | None = 5.0) -> tuple[ForwardResult, Client]:
    client = Client()
    with trio.fail_after(5):
        result = await fw.forward(method, path, query, headers or [], body, read_timeout, client)
    return result, client


async def pooled_connection_closed(fw: Forwarder) -> None:
    """Until the server's close (FIN or reset) of the pooled connection has reached its socket."""
    with trio.fail_after(5):
        while not fw._client._idle[-1].is_stale():
            await trio.sleep(0.005)


async def upstream(nursery: trio.Nursery, script: Script) -> tuple[Upstream, Forwarder]:
    up = await Upstream(script).start(nursery)
    return up, Forwarder(f"http://127.0.0.1:{up.port}")


# -- framing


async def test_content_length_body_is_relayed_whole_with_its_length(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(OK))
    result, client = await forward(fw, query=b"a=1", headers=[
        (b"content-type", b"application/json"), (b"x-request-id", b"r1"),
        (b"connection", b"keep-alive"), (b"transfer-encoding", b"chunked"), (b"host", b"public.example"),
        (b"content-length", b"999"), (b"expect", b"100-continue"),
    ], body=b'{"inputs":"hi"}')
    assert result == ForwardResult(200, 11, True)
    assert client.start["status"] == 200
    assert client.headers == {b"content-type": b"application/json", b"content-length": b"11"}
    assert len(client.messages) == 2 and client.messages[1] == {
        "type": "http.response.body", "body": b'{"ok":true}', "more_body": False}
    [request] = up.requests
    head, _, body = request.partition(b"\r\n\r\n")
    assert body == b'{"inputs":"hi"}'
    assert head.split(b"\r\n") == [
        b"POST /generate?a=1 HTTP/1.1", b"host: 127.0.0.1:%d" % up.port,
        b"content-type: application/json", b"x-request-id: r1", b"content-length: 15",
    ]
    await fw.aclose()


async def test_base_url_path_prefix_and_default_port_host(nursery: trio.Nursery) -> None:
    up = await Upstream(serving(OK)).start(nursery)
    fw = Forwarder(f"http://localhost:{up.port}/v1/")
    await forward(fw, method="GET", path="/models", body=b"")
    assert up.requests[0].startswith(b"GET /v1/models HTTP/1.1\r\nhost: localhost:%d\r\n" % up.port)
    assert b"content-length: 0\r\n" in up.requests[0]
    await fw.aclose()


async def test_chunked_body_is_relayed_chunk_by_chunk_as_it_arrives(nursery: trio.Nursery) -> None:
    client = Client()

    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"d\r\ndata: first\n\n\r\n")
        await client.first_body.wait()  # buffered, the first chunk would never reach the client
        await peer.send(b"e\r\ndata: second\n\n\r\n")
        await peer.send(b"0\r\n\r\n")
        await up.requests_answered(peer, OK)

    up, fw = await upstream(nursery, script)
    with trio.fail_after(5):
        result = await fw.forward("POST", "/generate_stream", b"", [], b"{}", 5.0, client)
    assert result == ForwardResult(200, 27, True)
    assert client.headers == {b"content-type": b"text/event-stream"}  # no transfer-encoding, no length
    assert client.bodies[:2] == [b"data: first\n\n", b"data: second\n\n"]
    assert client.body == b"data: first\n\ndata: second\n\n"
    await forward(fw)
    assert up.accepts == 1  # read to its end, the chunked answer left the connection reusable
    await fw.aclose()


async def test_content_length_stream_is_not_buffered(nursery: trio.Nursery) -> None:
    client = Client()

    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: 16\r\n\r\n"
                        b"{\"a\":1}\n")
        await client.first_body.wait()
        await peer.send(b"{\"b\":2}\n")
        await peer.until_eof()

    up, fw = await upstream(nursery, script)
    with trio.fail_after(5):
        result = await fw.forward("POST", "/generate", b"", [], b"{}", 5.0, client)
    assert result == ForwardResult(200, 16, True)
    assert client.bodies == [b'{"a":1}\n', b'{"b":2}\n'] and b"content-length" not in client.headers
    await fw.aclose()


async def test_large_content_length_body_is_streamed(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward_module, "BUFFER_MAX", 10)
    client = Client()

    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789")
        await client.first_body.wait()
        await peer.send(b"abcdefghij")
        await up.requests_answered(peer, OK)

    up, fw = await upstream(nursery, script)
    with trio.fail_after(5):
        result = await fw.forward("POST", "/generate", b"", [], b"{}", 5.0, client)
    assert result == ForwardResult(200, 20, True)
    assert client.bodies == [b"0123456789", b"abcdefghij"] and client.body == b"0123456789abcdefghij"
    await forward(fw)
    assert up.accepts == 1
    await fw.aclose()


# No whitespace around a chunk size: llhttp refuses it, as h11 does before an extension
# (tests/test_forward_parser.py); "gzip, chunked" has its own test (tests/test_forward_hostile_upstream.py).
CHUNKED_WITH_EXTRAS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nX-Kept: yes\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b"7;quoted=\"a;b\"\r\n, world\r\n"
    b"A\r\n and more!\r\n"
    b"000\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
)


async def test_chunked_with_extensions_and_trailers(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(CHUNKED_WITH_EXTRAS))
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, 22, True)
        assert client.body == b"hello, world and more!"
        assert client.headers == {b"x-kept": b"yes"}  # Transfer-Encoding and Trailer are hop-by-hop
    assert up.accepts == 1  # the trailers were read: the connection was clean for the second request
    await fw.aclose()


async def test_answer_dribbled_one_byte_at_a_time(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        while await peer.request() is not None:
            for i in range(len(CHUNKED_WITH_EXTRAS)):
                await peer.send(CHUNKED_WITH_EXTRAS[i:i + 1])
                await trio.sleep(0)

    up, fw = await upstream(nursery, script)
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, 22, True)
        assert client.body == b"hello, world and more!"
    assert up.accepts == 1
    await fw.aclose()


async def test_body_until_close_is_relayed_and_the_connection_not_reused(nursery: trio.Nursery) -> None:
    client = Client()

    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        if peer.number == 1:
            await client.first_body.wait()
        await peer.send(b"second")
        # returning closes the connection: that is the end of the body

    up, fw = await upstream(nursery, script)
    with trio.fail_after(5):
        result = await fw.forward("GET", "/x", b"", [], b"", 5.0, client)
    assert result == ForwardResult(200, 12, True)
    assert client.bodies == [b"first ", b"second", b""] and client.body == b"first second"
    result, client = await forward(fw)
    assert result.complete and client.body == b"first second"
    assert up.accepts == 2
    await fw.aclose()


async def test_http_1_0_answer_is_read_and_not_reused(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, 2, True) and client.body == b"ok"
    assert up.accepts == 2
    await fw.aclose()


async def test_head_and_204_have_no_body(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        while (request := await peer.request()) is not None:
            if request.startswith(b"HEAD"):
                # the length of what a GET would get; no body follows
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n")
            else:
                await peer.send(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")

    up, fw = await upstream(nursery, script)
    result, client = await forward(fw, method="HEAD", body=b"")
    assert result == ForwardResult(200, 0, True)
    assert client.headers == {b"content-type": b"application/json", b"content-length": b"1234"}
    assert client.messages[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]
    result, client = await forward(fw, method="DELETE")
    assert result == ForwardResult(204, 0, True)
    assert client.headers == {b"x-a": b"1"} and client.body == b""
    result, client = await forward(fw, method="HEAD", body=b"")
    assert result.status == 200
    # No body was waited for. A HEAD answer's connection is closed (llhttp cannot be told that no
    # body follows, so what comes after the head is unknown); the 204's connection was reused.
    assert up.accepts == 2
    await fw.aclose()


async def test_interim_100_continue_is_skipped(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + OK))
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, 11, True) and client.body == b'{"ok":true}'
        assert b"link" not in client.headers
    assert up.accepts == 1
    await fw.aclose()


async def test_response_hop_by_hop_fields_are_removed(nursery: trio.Nursery) -> None:
    # (An obs-fold, which this test used to include, is now a 502: tests/test_forward_hostile_upstream.py.)
    up, fw = await upstream(nursery, serving(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n"
        b"X-End-To-End: 2\r\nX-Padded: \t a b \t \r\nContent-Length: 0\r\n\r\n"))
    result, client = await forward(fw)
    assert result == ForwardResult(200, 0, True)
    # whitespace around a value is not part of it (hypercorn would refuse to relay it)
    assert client.headers == {b"x-end-to-end": b"2", b"x-padded": b"a b", b"content-length": b"0"}
    await fw.aclose()


# -- the pool


async def test_keep_alive_connection_is_reused(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(OK))
    for _ in range(5):
        result, _ = await forward(fw)
        assert result.complete
    assert up.accepts == 1 and len(up.requests) == 5
    await fw.aclose()


async def test_concurrent_requests_use_their_own_connections_then_share_them(nursery: trio.Nursery) -> None:
    gate = trio.Event()

    async def script(peer: Peer, up: Upstream) -> None:
        while await peer.request() is not None:
            await gate.wait()
            await peer.send(OK)

    up, fw = await upstream(nursery, script)
    async with trio.open_nursery() as inner:
        for _ in range(4):
            inner.start_soon(forward, fw)
        with trio.fail_after(5):
            while up.accepts < 4:
                await trio.sleep(0.01)
        gate.set()
    assert fw._client.idle_count == 4
    async with trio.open_nursery() as inner:
        for _ in range(4):
            inner.start_soon(forward, fw)
    assert up.accepts == 4
    await fw.aclose()
    assert fw._client.idle_count == 0
    with trio.fail_after(5):
        for peer in up.peers:
            await peer.eof.wait()  # aclose closed the idle connections


async def test_connection_close_from_the_server_is_not_reused(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await peer.request() or b"")
        await peer.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await peer.until_eof()  # the client must close it: this server would keep it open

    up, fw = await upstream(nursery, script)
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, 2, True) and client.body == b"ok"
        assert b"connection" not in client.headers
    assert up.accepts == 2
    with trio.fail_after(5):
        await up.peers[0].eof.wait()
    await fw.aclose()


async def test_stale_pooled_connection_is_replaced_transparently(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await peer.request() or b"")
        await peer.send(OK)
        if peer.number == 1:
            return  # like a keep-alive timeout: the server closes the idle connection
        await up.requests_answered(peer, OK)

    up, fw = await upstream(nursery, script)
    await forward(fw)
    await pooled_connection_closed(fw)  # its EOF is there: the pool drops it without writing to it
    result, client = await forward(fw)
    assert result == ForwardResult(200, 11, True)
    assert up.accepts == 2 and len(up.requests) == 2
    await fw.aclose()


async def test_server_closing_a_reused_connection_as_the_request_arrives_is_502_not_retried(
    nursery: trio.Nursery,
) -> None:
    # This test used to expect a retry on a fresh connection: the server then ran the POST twice
    # (issue 8, finding 11). A request written whole is never sent again; the keep-alive race is
    # avoided instead by the idle expiry (below servers' keep-alive timeouts) and the stale check.
    async def script(peer: Peer, up: Upstream) -> None:
        while (request := await peer.request()) is not None:
            up.requests.append(request)
            if len(up.requests) == 2:
                return  # read the second request, then close without a word (a keep-alive race)
            await peer.send(OK)

    up, fw = await upstream(nursery, script)
    await forward(fw, body=b'{"n":1}')
    with pytest.raises(UpstreamError) as caught:
        await forward(fw, body=b'{"n":2}')
    assert caught.value.status == 502 and not caught.value.refused
    await forward(fw, body=b'{"n":3}')  # a fresh connection; the server has read all there was
    assert [r.rpartition(b"\r\n\r\n")[2] for r in up.requests] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert up.accepts == 2
    await fw.aclose()


async def test_fresh_connection_closed_without_an_answer_is_502_not_retried(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()  # and close

    up, fw = await upstream(nursery, script)
    with pytest.raises(UpstreamError) as caught:
        await forward(fw)
    assert caught.value.status == 502 and not caught.value.refused
    assert not caught.value.unserved  # it was read: the handler must not send it again (issue 9)
    assert caught.value.reason.startswith("model server unreachable")
    assert up.accepts == 1
    await fw.aclose()


async def test_server_dying_with_the_request_on_a_reused_connection_is_502_not_refused(nursery: trio.Nursery) -> None:
    # The request reached the server, so the handler must not take this for a refused connection
    # (it would wait for the restart and send it again). (There is no retry on a fresh connection
    # either: the request was written whole.)
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(OK)
        await peer.request()
        up.stop()
        await trio.sleep_forever()

    up, fw = await upstream(nursery, script)
    await forward(fw)
    with pytest.raises(UpstreamError) as caught:
        await forward(fw)
    assert caught.value.status == 502 and not caught.value.refused and not caught.value.unserved
    await fw.aclose()


async def test_pooled_connection_reset_before_the_write_then_refused_is_a_refusal(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server died between two requests (its reset not yet seen when the connection was taken
    # from the pool): writing fails, the port is refused, and the request never reached the server,
    # so it is a refusal, which the handler retries once the model server is back.
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(OK)
        peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        up.stop()  # closing with SO_LINGER 0 sends a reset
        await trio.sleep_forever()

    up, fw = await upstream(nursery, script)
    await forward(fw)
    await pooled_connection_closed(fw)
    monkeypatch.setattr(upstream_module.Connection, "is_stale", lambda self: False)  # the race, made certain
    with pytest.raises(UpstreamError) as caught:
        await forward(fw)
    assert caught.value.status == 502 and caught.value.refused
    await fw.aclose()


async def test_stale_connection_missed_by_the_check_is_502_not_retried(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This test used to expect a retry. The write to the closed connection succeeds (the kernel
    # takes the bytes), so nothing proves that the server did not get the request: it is not sent
    # again. The check that missed here is what prevents this (test_stale_pooled_connection_...).
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await peer.request() or b"")
        await peer.send(OK)
        if peer.number > 1:
            await up.requests_answered(peer, OK)

    up, fw = await upstream(nursery, script)
    await forward(fw)
    await pooled_connection_closed(fw)
    monkeypatch.setattr(upstream_module.Connection, "is_stale", lambda self: False)
    with pytest.raises(UpstreamError) as caught:
        await forward(fw)  # written to a closed connection: EOF (or a reset)
    assert caught.value.status == 502 and not caught.value.refused
    assert up.accepts == 1
    monkeypatch.undo()
    result, _ = await forward(fw)
    assert result == ForwardResult(200, 11, True) and up.accepts == 2
    await fw.aclose()


async def test_expired_idle_connections_are_closed_not_used(nursery: trio.Nursery) -> None:
    up = await Upstream(serving(OK)).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(keepalive_expiry=0.05))
    async with trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(forward, fw)
    assert up.accepts == 3 and fw._client.idle_count == 3
    await trio.sleep(0.1)
    await forward(fw)
    assert up.accepts == 4 and fw._client.idle_count == 1  # all three expired ones closed at once
    with trio.fail_after(5):
        for peer in up.peers[:3]:
            await peer.eof.wait()
    await fw.aclose()


async def test_idle_pool_is_bounded(nursery: trio.Nursery) -> None:
    up = await Upstream(serving(OK)).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(keepalive_connections=2))
    async with trio.open_nursery() as inner:
        for _ in range(5):
            inner.start_soon(forward, fw)
    assert up.accepts == 5 and fw._client.idle_count == 2
    await fw.aclose()


async def test_max_connections_queues_the_extra_request(nursery: trio.Nursery) -> None:
    gate = trio.Event()

    async def script(peer: Peer, up: Upstream) -> None:
        while await peer.request() is not None:
            await gate.wait()
            await peer.send(OK)

    up = await Upstream(script).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(max_connections=2, connect_timeout=5))
    results: list[ForwardResult] = []

    async def one() -> None:
        results.append((await forward(fw))[0])

    async with trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(one)
        await trio.sleep(0.2)
        assert up.accepts == 2 and results == []
        gate.set()
    assert [r.status for r in results] == [200, 200, 200] and up.accepts == 2
    await fw.aclose()


# -- errors before the answer


async def test_connect_refused_is_502_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fw = Forwarder(f"http://127.0.0.1:{port}")
    client = Client()
    with pytest.raises(UpstreamError) as caught:
        await fw.forward("POST", "/generate", b"", [], b"{}", 5.0, client)
    assert caught.value.status == 502 and caught.value.refused
    assert caught.value.reason.startswith("model server unreachable")
    assert client.messages == []
    await fw.aclose()


# -- which failures prove that the request never ran (issue 9: the handler holds those for the
# server's comeback and sends them again; any other is a 502)


def _established_to(port: int) -> bool:
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in psutil.Process().net_connections(kind="tcp"))


async def test_a_request_queued_at_a_server_that_dies_is_reset_and_unserved() -> None:
    # A server that dies with connections in its listen queue (or whose workers kept the listening
    # socket until they were killed): the kernel resets them, our request unread.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    fw = Forwarder(f"http://127.0.0.1:{port}")
    caught: list[UpstreamError] = []

    async def one() -> None:
        with pytest.raises(UpstreamError) as info:
            await forward(fw)
        caught.append(info.value)

    try:
        async with trio.open_nursery() as inner:
            inner.start_soon(one)
            with trio.fail_after(5):
                while not _established_to(port):
                    await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()  # written, and waiting for the head
            listener.close()
    finally:
        listener.close()
    [error] = caught
    assert error.status == 502 and error.reset and not error.refused and error.unserved
    await fw.aclose()


def _reset_on_close(peer: Peer) -> None:
    """Closing the connection will send a reset (RST) instead of a FIN."""
    peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",  # the head came: the body breaks
    b"HTTP/1.1 100 Continue\r\n\r\n",  # an interim answer is an answer byte too
    b"HTTP/1.1 200 O",  # part of a head
], ids=["body", "interim", "partial head"])
async def test_a_reset_after_an_answer_began_is_not_unserved(nursery: trio.Nursery, answer: bytes) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(answer)
        _reset_on_close(peer)

    up, fw = await upstream(nursery, script)
    with pytest.raises(UpstreamError) as caught:
        await forward(fw)
    assert caught.value.status == 502 and not caught.value.unserved
    await fw.aclose()


async def test_silent_server_is_504_after_the_read_timeout(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.until_eof()

    up, fw = await upstream(nursery, script)
    began = trio.current_time()
    with pytest.raises(UpstreamError) as caught:
        await forward(fw, read_timeout=0.2)
    assert caught.value.status == 504 and caught.value.reason.startswith("model server timed out")
    assert 0.2 <= trio.current_time() - began < 2
    with trio.fail_after(5):
        await up.peers[0].eof.wait()  # the timed-out connection was closed, not pooled
    await fw.aclose()


# The reasons after "malformed answer" are llhttp's.
@pytest.mark.parametrize(("answer", "why"), [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n", "over 65536 bytes"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000, "over 65536 bytes"),  # no end in sight
    (b"HTTP/1.1 100 Continue\r\nX-Big: " + b"x" * 40_000 + b"\r\n\r\n"  # the heads of one answer together
     b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 40_000 + b"\r\n\r\n", "over 65536 bytes"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + OK, "over 16 interim"),
    (b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", "Invalid status code"),
    (b"ICY 200 OK\r\n\r\n", "Expected HTTP/"),
    (b"HTTP/2 200\r\n\r\n", "Expected dot"),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", "HTTP/2.0 is not supported"),
    (b"HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n", "status 600 out of range"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "Invalid header token"),
    (b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\n\r\n", "Invalid header value char"),
    (b"HTTP/1.1 200 OK\r\nX-Spaces:" + b" " * 60_000 + b"x\x00\r\n\r\n", "Invalid header value char"),
    (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "Invalid header token"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "Duplicate Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "Transfer-Encoding can't be present with Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "unsupported transfer coding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "unsupported transfer coding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello", "unsupported transfer coding"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the end of the body"),
], ids=lambda v: v if isinstance(v, str) else None)
async def test_bad_answers_are_502_before_anything_is_relayed(nursery: trio.Nursery, answer: bytes, why: str) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(answer)

    up, fw = await upstream(nursery, script)
    client = Client()
    with pytest.raises(UpstreamError) as caught, trio.fail_after(5):
        await fw.forward("POST", "/generate", b"", [], b"{}", 5.0, client)
    assert caught.value.status == 502 and not caught.value.refused
    assert why in caught.value.reason
    assert client.messages == []
    await fw.aclose()


# -- errors after the answer started


async def test_stream_broken_midway_ends_early_with_502(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        # and close in the middle of the body

    up, fw = await upstream(nursery, script)
    result, client = await forward(fw)
    assert result == ForwardResult(502, 5, False)
    assert client.start["status"] == 200 and client.bodies == [b"hello"]
    await fw.aclose()


async def test_malformed_chunk_midway_ends_early_with_502(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        await peer.until_eof()

    up, fw = await upstream(nursery, script)
    result, client = await forward(fw)
    assert result == ForwardResult(502, 5, False)
    with trio.fail_after(5):
        await up.peers[0].eof.wait()
    await fw.aclose()


async def test_stream_silent_midway_ends_early_with_504(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await peer.until_eof()

    up, fw = await upstream(nursery, script)
    result, client = await forward(fw, read_timeout=0.2)
    assert result == ForwardResult(504, 5, False)
    with trio.fail_after(5):
        await up.peers[0].eof.wait()
    await fw.aclose()


async def test_cancelled_mid_stream_closes_the_connection(nursery: trio.Nursery) -> None:
    client = Client()

    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await peer.request() or b"")
        if peer.number == 1:
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await peer.until_eof()
            return
        await peer.send(OK)
        await up.requests_answered(peer, OK)

    up, fw = await upstream(nursery, script)
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            async def call() -> None:
                await fw.forward("POST", "/generate_stream", b"", [], b"{}", None, client)
                raise AssertionError("the stream cannot end")

            inner.start_soon(call)
            await client.first_body.wait()
            inner.cancel_scope.cancel()  # the client went away
    with trio.fail_after(5):
        await up.peers[0].eof.wait()  # the model server sees it at once
    assert fw._client.idle_count == 0
    result, _ = await forward(fw)
    assert result.complete and up.accepts == 2
    await fw.aclose()


async def test_relay_failure_closes_the_connection(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(OK))

    async def broken_send(message: Any) -> None:
        raise OSError("client socket gone")

    with pytest.raises(OSError):
        await fw.forward("POST", "/generate", b"", [], b"{}", 5.0, broken_send)
    # the answer had been read whole, so its connection was already back in the pool
    assert fw._client.idle_count == 1
    await fw.aclose()


# -- what is sent


async def test_header_and_target_injection_is_not_sent_raw(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(OK))
    result, _ = await forward(fw, query=b"a=1 HTTP/1.1\r\nX-Injected: q", headers=[
        (b"x-ok", b"1"),
        (b"x-evil", b"a\r\nX-Injected: v"),
        (b"x-evil-lf", b"a\nX-Injected: v"),
        (b"x-injected: n\r\nx-name", b"v"),
        (b"bad name", b"v"),
        (b"", b"v"),
        (b"x-nul", b"a\x00b"),
        (b"x-ok-2", b"2"),
    ])
    assert result.complete
    [request] = up.requests
    head = request.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    assert lines == [
        b"POST /generate?a=1%20HTTP/1.1%0D%0AX-Injected:%20q HTTP/1.1",
        b"host: 127.0.0.1:%d" % up.port, b"x-ok: 1", b"x-ok-2: 2", b"content-length: 2",
    ]
    assert b"\n" not in head.replace(b"\r\n", b"") and b"\r" not in head.replace(b"\r\n", b"")
    await fw.aclose()


async def test_large_body_is_sent_whole(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(OK))
    body = bytes(range(256)) * 4096  # 1 MiB: written after the head, not joined to it
    result, _ = await forward(fw, body=body)
    assert result.complete
    assert up.requests[0].endswith(b"content-length: 1048576\r\n\r\n" + body)
    await fw.aclose()


# -- HTTPS to the model server


@pytest.fixture(scope="module")
def certificates() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server's test CA)."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_https_upstream(nursery: trio.Nursery, certificates: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = certificates
    answers = [CHUNKED_WITH_EXTRAS, OK]

    async def script(peer: Peer, up: Upstream) -> None:
        while await peer.request() is not None:
            await peer.send(answers[len(up.requests) % 2])
            up.requests.append(b"")

    up = await Upstream(script, tls=server).start(nursery)
    fw = Forwarder(f"https://127.0.0.1:{up.port}")
    fw._client.tls = client  # the default context trusts the system's CAs, not this test's
    for _ in range(2):
        result, answer = await forward(fw)
        assert result == ForwardResult(200, 22, True) and answer.body == b"hello, world and more!"
        result, answer = await forward(fw)
        assert result == ForwardResult(200, 11, True) and answer.body == b'{"ok":true}'
    assert up.accepts == 1
    await fw.aclose()


async def test_https_upstream_with_an_untrusted_certificate_is_502(
    nursery: trio.Nursery, certificates: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    up = await Upstream(serving(OK), tls=certificates[0]).start(nursery)
    fw = Forwarder(f"https://127.0.0.1:{up.port}")  # verifies against the system's CAs
    with pytest.raises(UpstreamError) as caught:
        await forward(fw)
    assert caught.value.status == 502 and not caught.value.refused
    assert "TLS handshake" in caught.value.reason and "CERTIFICATE_VERIFY_FAILED" in caught.value.reason
    await fw.aclose()


async def test_https_stale_pooled_connection_is_replaced(
    nursery: trio.Nursery, certificates: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await peer.request() or b"")
        await peer.send(OK)
        if peer.number > 1:
            await up.requests_answered(peer, OK)

    up = await Upstream(script, tls=certificates[0]).start(nursery)
    fw = Forwarder(f"https://127.0.0.1:{up.port}")
    fw._client.tls = certificates[1]
    await forward(fw)
    await pooled_connection_closed(fw)
    result, _ = await forward(fw)
    assert result == ForwardResult(200, 11, True) and up.accepts == 2
    await fw.aclose()
