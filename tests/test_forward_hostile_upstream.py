"""Issue 8, findings 11-14: a model server that answers oddly, early, or not at all, on real sockets.

The scripted servers are those of tests/test_upstream.py. Each test here failed before the fix:
- 13, the parser: a bare-LF head was waited on (600 s, or for good on a stream); `Transfer-Encoding:
  gzip, chunked` was relayed as a plain body; whitespace in a chunk-size line or before a field's
  colon was tolerated (h11 and llhttp refuse both).
- 11, no request twice: a request whose write failed after its head had gone out was written again
  on a fresh connection (with tests/test_upstream.py::test_server_closing_a_reused_connection_...).
- 12, an early answer: a 413 sent before the model server stopped reading the body became a 502
  (connection reset) or a 504 (write timeout).
- 14, streams: a stream route (`timeout=None`) waited for good on a silent model server.
"""

from __future__ import annotations

import gzip
import socket
import struct
import zlib
from typing import Any

import pytest
import trio

from proxy import upstream as upstream_module
from proxy.forward import Forwarder, ForwardLimits, ForwardResult, UpstreamError
from tests.test_upstream import (
    OK, Client, Peer, Script, Upstream, forward, pooled_connection_closed, serving, upstream,
)

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
TOO_LARGE = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: 24\r\n"
             b"Connection: close\r\n\r\n{\"error\":\"body too big\"}")


def answering(answer: bytes) -> Script:
    """Answer the first request with `answer`, then keep the connection open without a word."""
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await peer.request() or b"")
        await peer.send(answer)
        await peer.until_eof()
    return script


async def refused_at_once(fw: Forwarder, read_timeout: float | None = 30.0) -> UpstreamError:
    """The UpstreamError `forward` raises, well before any timeout; nothing relayed."""
    client = Client()
    with pytest.raises(UpstreamError) as caught, trio.fail_after(5):
        await fw.forward("POST", "/generate", b"", [], b"{}", read_timeout, client)
    assert client.messages == []
    return caught.value


async def head_only(peer: Peer) -> bytes:
    """Read a request's head and none of its body (a server about to refuse the body)."""
    while b"\r\n\r\n" not in peer.buf:
        if not await peer._more():
            break
    head, _, peer.buf = peer.buf.partition(b"\r\n\r\n")
    return head


def reset_on_close(peer: Peer) -> None:
    """Closing the connection then sends a reset, as a server closing with unread data does."""
    peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def small_receive_buffer(up: Upstream) -> None:
    """So that a large body cannot sit whole in the kernel's buffers: the write really waits."""
    up.listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


# -- finding 13: a well-kept parser


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\nok",  # only the blank line is bare
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nok",
], ids=["all bare", "bare blank line", "bare last LF"])
@pytest.mark.parametrize("read_timeout", [30.0, None], ids=["route timeout", "stream"])
async def test_bare_lf_head_is_502_at_once(nursery: trio.Nursery, answer: bytes, read_timeout: float | None) -> None:
    up, fw = await upstream(nursery, answering(answer))
    error = await refused_at_once(fw, read_timeout)
    assert error.status == 502 and not error.refused
    assert "malformed answer" in error.reason  # llhttp: "Missing expected CR ..." and the like
    await fw.aclose()


async def test_gzip_chunked_transfer_coding_is_relayed_as_a_content_coding(nursery: trio.Nursery) -> None:
    text = b'{"generated_text":"' + b"token " * 500 + b'"}'
    coded = gzip.compress(text)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(coded[i:i + 700]), coded[i:i + 700]) for i in range(0, len(coded), 700))
    up, fw = await upstream(nursery, serving(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        + chunks + b"0\r\n\r\n"))
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, len(coded), True)
        # the chunked framing is undone, the gzip coding is not: the client is told of it
        assert client.headers == {b"content-type": b"application/json", b"content-encoding": b"gzip"}
        assert gzip.decompress(client.body) == text
    assert up.accepts == 1  # read to its end, the connection was reused
    await fw.aclose()


async def test_transfer_codings_are_listed_after_the_content_coding(nursery: trio.Nursery) -> None:
    text = b"plain text " * 50
    coded = gzip.compress(zlib.compress(text))  # deflate as the content coding, then gzip in transit
    up, fw = await upstream(nursery, serving(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(coded), coded)))
    result, client = await forward(fw)
    assert result == ForwardResult(200, len(coded), True)
    assert client.headers == {b"content-encoding": b"deflate, gzip"}  # in the order applied
    assert zlib.decompress(gzip.decompress(client.body)) == text
    await fw.aclose()


async def test_gzip_transfer_coding_without_chunked_is_read_until_close(nursery: trio.Nursery) -> None:
    coded = gzip.compress(b"streamed until the end")

    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + coded)
        # returning closes the connection: the end of the body

    up, fw = await upstream(nursery, script)
    result, client = await forward(fw)
    assert result == ForwardResult(200, len(coded), True)
    assert client.headers == {b"content-encoding": b"gzip"}
    assert gzip.decompress(client.body) == b"streamed until the end"
    await fw.aclose()


class StartWatcher(Client):
    def __init__(self) -> None:
        super().__init__()
        self.started = trio.Event()

    async def __call__(self, message: Any) -> None:
        await super().__call__(message)
        self.started.set()


@pytest.mark.parametrize("size_line", [b"5 ", b"5\t", b" 5", b"5 ;a=b", b"5\t;a=b", b"\t5"])
async def test_whitespace_in_a_chunk_size_line_is_502(nursery: trio.Nursery, size_line: bytes) -> None:
    client = StartWatcher()

    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        await client.started.wait()  # a stream: its head is relayed before its body is read
        await peer.send(size_line + b"\r\nhello\r\n0\r\n\r\n")
        await peer.until_eof()

    up, fw = await upstream(nursery, script)
    with trio.fail_after(5):
        result = await fw.forward("POST", "/generate_stream", b"", [], b"{}", 30.0, client)
    assert result == ForwardResult(502, 0, False)
    assert client.start["status"] == 200 and client.bodies == []
    await fw.aclose()


async def test_whitespace_in_a_later_chunk_size_line_ends_the_stream(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, answering(CHUNKED_HEAD + b"5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n"))
    result, client = await forward(fw)
    assert result == ForwardResult(502, 5, False)
    assert client.bodies == [b"hello"]
    with trio.fail_after(5):
        await up.peers[0].eof.wait()  # closed, not pooled
    await fw.aclose()


@pytest.mark.parametrize("line", [b"Content-Type : application/json", b"X-A\t: 1", b"Content-Length : 2"])
async def test_whitespace_before_a_colon_is_502(nursery: trio.Nursery, line: bytes) -> None:
    up, fw = await upstream(nursery, answering(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\n\r\nok"))
    error = await refused_at_once(fw)
    assert error.status == 502 and "Invalid header" in error.reason
    await fw.aclose()


async def test_obs_fold_is_502(nursery: trio.Nursery) -> None:
    # RFC 9112 §5.2: a proxy may refuse a folded field with a 502 rather than unfold it.
    up, fw = await upstream(nursery, answering(b"HTTP/1.1 200 OK\r\nX-A: a\r\n  b\r\nContent-Length: 2\r\n\r\nok"))
    error = await refused_at_once(fw)
    assert error.status == 502 and not error.refused
    await fw.aclose()


# 64 KiB in a row without data, counted per read (of 64 KiB at most): 200 kB is past the bound.
@pytest.mark.parametrize("endless", [
    b"5;" + b"e" * 200_000,  # a chunk extension
    b"0\r\nX-Trailer: " + b"t" * 200_000,  # a trailer field
    b"0\r\n" + b"X-T: 1\r\n" * 25_000,  # a trailer section
], ids=["extension", "trailer field", "trailer section"])
async def test_framing_without_data_is_bounded(nursery: trio.Nursery, endless: bytes) -> None:
    up, fw = await upstream(nursery, answering(CHUNKED_HEAD + b"5\r\nhello\r\n" + endless))
    result, client = await forward(fw)
    assert result == ForwardResult(502, 5, False) and client.bodies == [b"hello"]
    await fw.aclose()


async def test_bytes_after_the_answer_leave_the_connection_unused(nursery: trio.Nursery) -> None:
    up, fw = await upstream(nursery, serving(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    for _ in range(2):
        result, client = await forward(fw)
        assert result == ForwardResult(200, 11, True) and client.body == b'{"ok":true}'
    assert up.accepts == 2  # the unasked answer would have answered the next request
    await fw.aclose()


# -- finding 11: a request written is never written again


async def test_request_whose_body_write_fails_after_its_head_is_not_sent_again(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        while head := await head_only(peer):
            up.requests.append(head)
            if len(up.requests) == 2:
                reset_on_close(peer)  # the model server dies with the request half read
                return
            await peer.send(OK)  # the first request, a GET, has no body

    up = await Upstream(script).start(nursery)
    small_receive_buffer(up)
    fw = Forwarder(f"http://127.0.0.1:{up.port}")
    await forward(fw, method="GET", body=b"")  # leaves a pooled connection
    with pytest.raises(UpstreamError) as caught:
        await forward(fw, body=b"x" * (8 * 1024 * 1024))  # head and body in two writes
    assert caught.value.status == 502 and not caught.value.refused
    assert len(up.requests) == 2 and up.accepts == 1  # not written to a second connection
    await fw.aclose()


async def test_request_that_provably_never_left_is_sent_on_a_fresh_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        while (request := await peer.request()) is not None:
            up.requests.append(request)
            await peer.send(OK)
            if peer.number == 1:
                reset_on_close(peer)  # the server drops its idle connection with a reset
                return

    up, fw = await upstream(nursery, script)
    await forward(fw, body=b'{"n":1}')
    await pooled_connection_closed(fw)
    monkeypatch.setattr(upstream_module.Connection, "is_stale", lambda self: False)  # the race, made certain
    result, _ = await forward(fw, body=b'{"n":2}')  # the write fails before a byte goes out
    assert result == ForwardResult(200, 11, True)
    assert [r.rpartition(b"\r\n\r\n")[2] for r in up.requests] == [b'{"n":1}', b'{"n":2}']
    assert up.accepts == 2
    await fw.aclose()


# -- finding 12: an answer sent before the body was read


async def test_early_413_then_a_reset_is_relayed(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await head_only(peer))
        await peer.send(TOO_LARGE)
        reset_on_close(peer)  # what a server closing with an unread body does

    up = await Upstream(script).start(nursery)
    small_receive_buffer(up)
    fw = Forwarder(f"http://127.0.0.1:{up.port}")
    result, client = await forward(fw, body=b"x" * (8 * 1024 * 1024))
    assert result == ForwardResult(413, 24, True)
    assert client.start["status"] == 413 and client.body == b'{"error":"body too big"}'
    assert len(up.requests) == 1 and up.accepts == 1
    await fw.aclose()


async def test_early_413_from_a_server_that_stops_reading_is_relayed(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await head_only(peer))
        await peer.send(TOO_LARGE)
        await trio.sleep_forever()  # neither reads nor closes: the write times out

    up = await Upstream(script).start(nursery)
    small_receive_buffer(up)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(write_timeout=0.3))
    result, client = await forward(fw, body=b"x" * (8 * 1024 * 1024))
    assert result == ForwardResult(413, 24, True) and client.start["status"] == 413
    assert fw._client.idle_count == 0  # the request was cut short: its connection is not reused
    await fw.aclose()


async def test_write_failure_without_an_answer_is_502(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        up.requests.append(await head_only(peer))
        reset_on_close(peer)

    up = await Upstream(script).start(nursery)
    small_receive_buffer(up)
    fw = Forwarder(f"http://127.0.0.1:{up.port}")
    with pytest.raises(UpstreamError) as caught, trio.fail_after(5):
        await forward(fw, body=b"x" * (8 * 1024 * 1024))
    assert caught.value.status == 502 and not caught.value.refused
    assert up.accepts == 1
    await fw.aclose()


# -- finding 14: streams have a head timeout and an idle timeout


async def test_stream_without_an_answer_is_504_after_the_stream_head_timeout(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.until_eof()

    up = await Upstream(script).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(stream_head_timeout=0.3))
    began = trio.current_time()
    error = await refused_at_once(fw, read_timeout=None)
    assert error.status == 504 and "no answer from the model server within 0.3s" in error.reason
    assert trio.current_time() - began >= 0.3
    with trio.fail_after(5):
        await up.peers[0].eof.wait()
    await fw.aclose()


async def test_stream_head_timeout_bounds_the_whole_head(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 10_000:  # a byte at a time, never done
            await peer.send(bytes([byte]))
            await trio.sleep(0.02)

    up = await Upstream(script).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(stream_head_timeout=0.3, stream_idle_timeout=60))
    error = await refused_at_once(fw, read_timeout=None)
    assert error.status == 504
    await fw.aclose()


async def test_silent_stream_ends_after_the_stream_idle_timeout(nursery: trio.Nursery) -> None:
    up = await Upstream(answering(CHUNKED_HEAD + b"5\r\nhello\r\n")).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(stream_idle_timeout=0.3))
    client = Client()
    with trio.fail_after(5):
        result = await fw.forward("POST", "/generate_stream", b"", [], b"{}", None, client)
    assert result == ForwardResult(504, 5, False)  # the answer had started: the stream ends early
    assert client.start["status"] == 200 and client.bodies == [b"hello"]
    with trio.fail_after(5):
        await up.peers[0].eof.wait()  # the model server sees the request abandoned
    await fw.aclose()


async def test_stream_idle_timeout_is_between_pieces_not_for_the_whole_stream(nursery: trio.Nursery) -> None:
    async def script(peer: Peer, up: Upstream) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        for _ in range(4):  # 2 s in all, 0.5 s apart: longer than the idle timeout, no gap as long
            await trio.sleep(0.5)
            await peer.send(b"5\r\nhello\r\n")
        await peer.send(b"0\r\n\r\n")
        await peer.until_eof()

    up = await Upstream(script).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(stream_head_timeout=1.5, stream_idle_timeout=1.5))
    client = Client()
    with trio.fail_after(10):
        result = await fw.forward("POST", "/generate_stream", b"", [], b"{}", None, client)
    assert result == ForwardResult(200, 20, True)
    await fw.aclose()


async def test_route_timeout_wins_over_the_stream_timeouts(nursery: trio.Nursery) -> None:
    up = await Upstream(answering(CHUNKED_HEAD + b"5\r\nhello\r\n")).start(nursery)
    fw = Forwarder(f"http://127.0.0.1:{up.port}", ForwardLimits(stream_head_timeout=60, stream_idle_timeout=60))
    result, client = await forward(fw, read_timeout=0.3)
    assert result == ForwardResult(504, 5, False)
    await fw.aclose()
