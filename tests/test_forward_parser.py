"""The upstream answer parser (proxy/upstream.py, llhttp through httptools) against h11's verdict.

Hypothesis writes model-server answers, valid and not (status lines, field names and separators,
values, line endings, obs-fold, Content-Length and chunked framing, chunk-size lines, interim
answers), feeds each to shepherd's `Response` over a real socket pair, and compares the outcome with
h11's as a client. The two must agree, except where h11 is knowingly more lenient than llhttp's
strict mode; there shepherd must refuse (a 502), never accept or wait:

- a bare LF as a line ending, obs-fold, control bytes in a field value;
- whitespace between a chunk size and its CRLF;
- a Content-Length list ("5, 5"), a repeated Content-Length, Content-Length with Transfer-Encoding;
- a status of 600 or more, an HTTP version other than 1.0 / 1.1 (shepherd's own bounds).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h11
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream import Connection, Disconnected, ProtocolFailure, Response

# (status, fields with lowercased names, body), or None: refused
Verdict = tuple[int, list[tuple[bytes, bytes]], bytes] | None

TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = bytes(range(0x21, 0x7F))
CTL = bytes([*range(0x01, 0x09), *range(0x0E, 0x20), 0x7F])  # h11 takes these in values; llhttp does not
OBS_TEXT = bytes(range(0x80, 0x100))


@dataclass
class Answer:
    raw: bytes = b""
    lenient: set[str] = field(default_factory=set)  # what h11 accepts and shepherd must refuse


def _verdict_of_shepherd(raw: bytes) -> Verdict:
    async def main() -> Verdict:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            theirs.sendall(raw)
            theirs.shutdown(socket.SHUT_WR)
            response = Response(Connection(ours), b"GET", 5.0)
            with trio.fail_after(5):  # never a wait: every answer is whole, then EOF
                try:
                    await response.read_head(5.0)
                    body = await response.read_all()
                except (ProtocolFailure, Disconnected):
                    return None
            return response.status, response.headers, body

    return trio.run(main)


def _verdict_of_h11(raw: bytes) -> Verdict:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    try:
        event = conn.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = conn.next_event()
        if not isinstance(event, h11.Response):
            return None
        body = b""
        while not isinstance(data := conn.next_event(), h11.EndOfMessage):
            if not isinstance(data, h11.Data):
                return None
            body += data.data
    except h11.RemoteProtocolError:
        return None
    return event.status_code, list(event.headers), body


def _rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in `one_in` draws (shrinks to False)."""
    # Hypothesis favours small and boundary integers: the values that mean True are in the middle.
    return 2 * one_in <= draw(st.integers(0, 4 * one_in - 1)) < 2 * one_in + 4


def _eol(draw: st.DrawFn, answer: Answer) -> bytes:
    if not _rarely(draw, 40):
        return b"\r\n"
    answer.lenient.add("bare LF")
    return b"\n"


def _field_line(draw: st.DrawFn, answer: Answer) -> bytes:
    name = draw(st.binary(min_size=1, max_size=8).map(lambda b: bytes(TOKEN[x % len(TOKEN)] for x in b)))
    if _rarely(draw, 8):  # a byte no field name may hold (both refuse)
        name += draw(st.sampled_from([b" ", b"\t", b"(", b"@", b"\x00", b"\x80", b"{"]))
    separator = draw(st.sampled_from([b": ", b":", b":\t", b":  ", b" :", b"\t:", b" : "]))
    alphabet = VCHAR + b"  \t" + OBS_TEXT[:8]
    value = draw(st.binary(max_size=12).map(lambda b: bytes(alphabet[x % len(alphabet)] for x in b)))
    if _rarely(draw, 10):
        odd = draw(st.sampled_from([*CTL, 0x00, 0x0B, 0x0C, 0x0D]))  # \0 \v \f \r: both refuse
        if odd in CTL:
            answer.lenient.add("control byte in a value")
        value += bytes([odd]) + b"v"
    line = name + separator + value
    if _rarely(draw, 20):
        answer.lenient.add("obs-fold")
        line += _eol(draw, answer) + draw(st.sampled_from([b" ", b"\t"])) + b"folded"
    return line


def _chunk_line(draw: st.DrawFn, answer: Answer, size: int) -> bytes:
    digits = b"%x" % size
    line = b"0" * draw(st.integers(0, 2)) + (digits.upper() if draw(st.booleans()) else digits)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        line = b" " + line  # before the size: both refuse
    elif kind == 1:
        line += b" ;ext=1"  # between size and extension: both refuse
    elif kind == 2:
        answer.lenient.add("whitespace after a chunk size")
        line += draw(st.sampled_from([b" ", b"\t", b"  "]))
    elif kind in (3, 4):
        line += draw(st.sampled_from([b";a", b";a=b", b';q="x;y"', b";a=b;c=d"]))
    return line + _eol(draw, answer)


def _framing(draw: st.DrawFn, answer: Answer, body: bytes) -> tuple[list[bytes], bytes]:
    """The framing fields and the body as sent."""
    kind = draw(st.sampled_from(["length"] * 3 + ["short", "long", "list", "twice", "both"] + ["chunked"] * 3
                                + ["close"] * 2))
    length = b"%d" % len(body)
    if kind == "length":
        return [b"Content-Length: " + length], body
    if kind == "short":  # fewer bytes than announced, then EOF: both refuse
        return [b"Content-Length: %d" % (len(body) + 1)], body
    if kind == "long":  # more bytes than announced: the body is the announced part
        return [b"Content-Length: " + length], body + b"extra"
    if kind == "list":
        answer.lenient.add("Content-Length list")
        return [b"Content-Length: " + length + b", " + length], body
    if kind == "twice":
        answer.lenient.add("repeated Content-Length")
        return [b"Content-Length: " + length, b"Content-Length: " + length], body
    if kind == "close":
        return [], body
    sizes = draw(st.lists(st.integers(1, 6), max_size=4))
    chunks, at = [], 0
    for size in sizes:
        piece = (body * 6)[at:at + size] or b"x" * size
        at += size
        chunks.append(_chunk_line(draw, answer, size) + piece + b"\r\n")
    chunks.append(_chunk_line(draw, answer, 0))
    if draw(st.booleans()):
        chunks.append(b"X-Trailer: t" + _eol(draw, answer))
    chunks.append(_eol(draw, answer))
    fields = [b"Transfer-Encoding: chunked"]
    if kind == "both":
        answer.lenient.add("Content-Length with Transfer-Encoding")
        fields.append(b"Content-Length: " + length)
    return fields, b"".join(chunks)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    answer = Answer()
    parts: list[bytes] = []
    if _rarely(draw, 6):
        parts.append(draw(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n",
                                           b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"])))
    if _rarely(draw, 10):
        version = draw(st.sampled_from([b"2.0", b"1.2", b"0.9"]))
        answer.lenient.add("HTTP version")
    else:
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    status = draw(st.sampled_from([600, 799] if _rarely(draw, 10) else [200, 201, 204, 304, 404, 413, 500, 599]))
    if status >= 600:
        answer.lenient.add("status over 599")
    reason = draw(st.sampled_from([b" OK", b" Not Found", b"", b" ", b" x\ty", b" caf\xc3\xa9"]))
    eol = _eol(draw, answer)
    parts.append(b"HTTP/" + version + b" %d" % status + reason + eol)
    lines = [_field_line(draw, answer) for _ in range(draw(st.integers(0, 3)))]
    no_body = status in (204, 304)
    body = b"" if no_body else draw(st.binary(max_size=20))
    framed = Answer()
    framing, sent = _framing(draw, framed, body)
    # A 204 / 304 has no body whatever its fields say: what follows its head is never parsed.
    answer.lenient |= {f for f in framed.lenient if not no_body or "Content-Length" in f}
    lines[draw(st.integers(0, len(lines))):0] = framing
    for line in lines:
        parts.append(line + _eol(draw, answer))
    parts.append(_eol(draw, answer) + sent)
    answer.raw = b"".join(parts)
    return answer


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers())
def test_shepherd_agrees_with_h11_or_refuses_where_h11_is_lenient(answer: Answer) -> None:
    ours = _verdict_of_shepherd(answer.raw)
    if answer.lenient:
        assert ours is None, f"accepted despite {answer.lenient}: {answer.raw!r}"
    else:
        assert ours == _verdict_of_h11(answer.raw), answer.raw


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_parsed_or_refused_at_once(raw: bytes) -> None:
    # Garbage never hangs the parser nor escapes as another error than a refusal.
    verdict = _verdict_of_shepherd(b"HTTP/1.1 200 OK\r\n" + raw)
    if verdict is not None:
        assert 200 <= verdict[0] <= 599


def test_the_strict_cases_really_are_lenient_in_h11() -> None:
    # The exceptions above are h11's leniency, not shepherd's mistakes: h11 takes each of them.
    for raw in [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 600 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ]:
        assert _verdict_of_h11(raw) is not None, raw
        assert _verdict_of_shepherd(raw) is None, raw
