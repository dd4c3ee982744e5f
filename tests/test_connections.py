"""The public port's connection guards, on a real hypercorn server and raw sockets (proxy/connections.py).

Each test fails on a server without the guards: there, a silent or dripping client holds its
connection for the 75 s keep-alive timer, any number of connections is accepted, and an h2c upgrade
or an HTTP/2 preface switches the connection to HTTP/2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import ssl
from pathlib import Path

import httpx
import trio
import trustme

from proxy.connections import ConnectionGate, ConnectionLimits
from proxy.server import ServerSettings, run_server
from tests.harness import free_port

DEADLINE = 10.0  # generous: a loaded 2-core machine; every wait below ends on a condition


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/slow-stream":
        # an answer that outlasts the head timeout: it must not be cut by it
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(4):
            await trio.sleep(0.3)
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = f"{scope['http_version']} {scope['method']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(
    limits: ConnectionLimits, certfile: str | None = None, keyfile: str | None = None
) -> AsyncIterator[tuple[int, ConnectionGate]]:
    port = free_port()
    gate = ConnectionGate(limits)
    stop = trio.Event()
    settings = ServerSettings("127.0.0.1", port, graceful_timeout=0.5, limits=limits, certfile=certfile,
                              keyfile=keyfile)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_server(app, settings, stop.wait, task_status=task_status,
                                                           gate=gate))
        try:
            yield port, gate
        finally:
            stop.set()


async def connect(port: int, source: str | None = None) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(DEADLINE):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def request(stream: trio.SocketStream, path: str = "/", extra: bytes = b"") -> bytes:
    await stream.send_all(b"GET " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + extra + b"\r\n")
    data = b""
    with trio.fail_after(DEADLINE):
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
            data += await stream.receive_some(65536)
    return data


async def test_a_silent_connection_is_closed_after_the_header_timeout() -> None:
    async with serving(ConnectionLimits(header_timeout=0.5)) as (port, gate):
        stream = await connect(port)
        started = trio.current_time()
        answer = await read_until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert trio.current_time() - started < 5.0  # not hypercorn's 75 s keep-alive timer
        with trio.fail_after(DEADLINE):
            while gate.open:
                await trio.sleep(0.01)


async def test_a_dripped_head_is_cut_off_but_a_whole_one_is_served() -> None:
    async with serving(ConnectionLimits(header_timeout=0.6)) as (port, _):
        dripper = await connect(port)
        await dripper.send_all(b"GET / HTTP/1.1\r\n")
        with trio.fail_after(DEADLINE):
            for _ in range(20):  # a byte every 0.1 s: never a whole head in 0.6 s
                try:
                    await dripper.send_all(b"x")
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.1)
        assert (await read_until_closed(dripper)).startswith(b"HTTP/1.1 408 ")
        assert (await request(await connect(port))).startswith(b"HTTP/1.1 200 ")


async def test_kept_alive_connections_and_long_answers_outlive_the_header_timeout() -> None:
    async with serving(ConnectionLimits(header_timeout=0.5)) as (port, _):
        stream = await connect(port)
        assert (await request(stream, "/first")).startswith(b"HTTP/1.1 200 ")
        await trio.sleep(0.8)  # idle between requests is the keep-alive timer's business, not this one
        assert b"/second" in await request(stream, "/second")
        stream2 = await connect(port)
        await stream2.send_all(b"GET /slow-stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = await read_until_closed(stream2)  # 1.2 s of answer, more than the 0.5 s head timeout
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"tick") == 4


async def test_connections_past_the_cap_are_refused_with_503_and_slots_come_back() -> None:
    async with serving(ConnectionLimits(max_connections=3, max_per_ip=3, header_timeout=5.0)) as (port, gate):
        held = [await connect(port) for _ in range(3)]
        with trio.fail_after(DEADLINE):
            while gate.open < 3:
                await trio.sleep(0.01)
        extra = await connect(port)
        answer = await read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
        assert gate.refused == 1 and gate.open == 3
        await held[0].aclose()
        with trio.fail_after(DEADLINE):
            while gate.open > 2:
                await trio.sleep(0.01)
        assert (await request(await connect(port))).startswith(b"HTTP/1.1 200 ")


async def test_one_address_cannot_take_every_slot() -> None:
    async with serving(ConnectionLimits(max_connections=10, max_per_ip=2, header_timeout=5.0)) as (port, gate):
        mine = [await connect(port) for _ in range(2)]
        with trio.fail_after(DEADLINE):
            while gate.open < 2:
                await trio.sleep(0.01)
        assert (await read_until_closed(await connect(port))).startswith(b"HTTP/1.1 503 ")
        # a client from another address (of the loopback network) still gets in
        assert (await request(await connect(port, source="127.0.0.2"))).startswith(b"HTTP/1.1 200 ")
        for stream in mine:
            await stream.aclose()


async def test_h2c_upgrade_is_ignored_and_served_as_http11() -> None:
    async with serving(ConnectionLimits()) as (port, _):
        stream = await connect(port)
        answer = await request(stream, "/up", b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                                             b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and b"101" not in answer.split(b"\r\n")[0]
        assert answer.endswith(b"1.1 GET /up")


async def test_http2_prior_knowledge_is_refused() -> None:
    async with serving(ConnectionLimits()) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = await read_until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 505 ")


async def test_h2c_can_be_turned_on() -> None:
    async with serving(ConnectionLimits(allow_h2c=True)) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
                              b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        data = b""
        with trio.fail_after(DEADLINE):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 101 ")


def test_the_gate_forgets_addresses_that_left() -> None:
    gate = ConnectionGate(ConnectionLimits(max_connections=2, max_per_ip=1))
    assert gate.try_enter("a") and not gate.try_enter("a") and gate.try_enter("b")
    assert not gate.try_enter("c")  # the total cap
    gate.leave("a")
    gate.leave("b")
    assert gate.open == 0 and not gate._per_ip and gate.refused == 2


async def test_tls_a_silent_client_is_closed_and_http2_answers_outlive_the_head_timeout(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    async with serving(ConnectionLimits(header_timeout=0.5), str(certfile), str(keyfile)) as (port, gate):
        silent = await connect(port)  # never starts its TLS handshake
        with trio.fail_after(DEADLINE):
            assert await silent.receive_some(100) == b""  # closed by the server
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with httpx.AsyncClient(http2=True, verify=context, timeout=DEADLINE) as client:
            answer = await client.get(f"https://127.0.0.1:{port}/slow-stream")
            assert answer.http_version == "HTTP/2" and answer.text.count("tick") == 4  # 1.2 s > 0.5 s
            await trio.sleep(0.8)  # idle HTTP/2 connection: not a head that is late
            again = await client.get(f"https://127.0.0.1:{port}/after")
            assert again.http_version == "HTTP/2" and again.text.endswith("GET /after")
