"""A request that meets a dead model server waits for its comeback (issue 9), through the real
handler, forwarder and admission, against real sockets; the lifecycle is a readiness flag the test
flips, as the supervisor would.

Refused, or reset before any answer (the server died with the request unread): held, then sent
again once the server is `ready` and answered 200, one request reaching the server. Read by the
server before it died: 502, never sent twice, unless the route is text generation (`rerun_if_crashed`). Not back within `max_queue_time`: 503 with
Retry-After; draining: 503. Every wait is bounded (`fail_after`); nothing sleeps to pass.
"""

from __future__ import annotations

import functools
import json
import socket
from typing import Any

import pytest
import trio
import trio.testing

from backends.spec import Route
from proxy.admission import Admission
from proxy.forward import Forwarder
from proxy.handler import ProxySettings, RequestHandler
from proxy.ledger import Ledger
from tests.test_admission import Readiness

ANSWER = b'{"generated_text":"ok"}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
BODY = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 3}}).encode()


class ModelServer:
    """A model server on a fixed port that can die and come back; it counts the requests it read."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests = 0
        self._scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        self._scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            assert self._scope is not None
            with self._scope:
                await trio.serve_tcp(self._handle, self.port, host="127.0.0.1", task_status=task_status)

        await nursery.start(serve)

    def kill(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < len(BODY):
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        self.requests += 1
        await stream.send_all(OK)


class World:
    def __init__(self, port: int, route: Route) -> None:
        self.route = route
        self.readiness = Readiness()
        self.ledger = Ledger()
        self.admission = Admission(self.ledger, lambda: 0.0, self.readiness.is_ready, self.readiness.changed,
                                   server_gone=lambda: self.readiness.gone)
        self.forwarder = Forwarder(f"http://127.0.0.1:{port}")
        self.access: list[dict[str, Any]] = []
        self.handler = RequestHandler(ProxySettings(unsecured=True), self.forwarder, self.ledger, self.admission,
                                      None, access_log=lambda event, **fields: self.access.append(fields))
        self.sent: list[dict[str, Any]] = []

    async def request(self) -> None:
        messages = [{"type": "http.request", "body": BODY, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        scope = {"type": "http", "method": "POST", "path": self.route.path, "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        await self.handler.handle(self.route, scope, receive, send)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def outcome(self) -> list[int]:
        """The access events' statuses, once the ledger holds nothing in flight."""
        assert self.ledger.in_flight == 0
        return [a["status"] for a in self.access]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


GENERATE = Route("/generate", max_queue_time=30.0)


async def test_a_refused_request_waits_for_the_restart_and_is_served(nursery: trio.Nursery) -> None:
    port = closed_port()  # the server has just died: refused
    world = World(port, GENERATE)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(world.request)
            await trio.testing.wait_all_tasks_blocked()  # refused, and waiting for the comeback
            assert world.sent == []
            world.readiness.set(False)  # the supervisor noticed: restarting, loading...
            server = ModelServer(port)
            await server.start(nursery)
            world.readiness.set(True)
    assert world.status == 200 and world.body == ANSWER
    assert server.requests == 1
    assert world.outcome() == [200]
    server.kill()
    await world.forwarder.aclose()


async def test_a_request_reset_unread_by_a_dying_server_is_served_after_the_restart(nursery: trio.Nursery) -> None:
    # The old server's listening socket is still open (its workers hold it) but nobody accepts:
    # the request waits in the queue until the supervisor kills them, and is reset unread.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    world = World(port, GENERATE)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(world.request)
                await trio.testing.wait_all_tasks_blocked()  # connected and written, no answer
                world.readiness.gone = True
                world.readiness.set(False)  # the exit flips the state at once...
                listener.close()  # ...then the old tree is killed: the queued connection is reset
                await trio.testing.wait_all_tasks_blocked()
                assert world.sent == []  # held, not answered 502
                server = ModelServer(port)
                await server.start(nursery)
                world.readiness.gone = False
                world.readiness.set(True)
    finally:
        listener.close()
    assert world.status == 200 and world.body == ANSWER
    assert server.requests == 1
    server.kill()
    await world.forwarder.aclose()


@pytest.mark.parametrize("rerun", [False, True], ids=["acts", "generation"])
async def test_a_request_the_server_read_before_dying_is_502_unless_the_route_may_rerun_it(
    nursery: trio.Nursery, rerun: bool
) -> None:
    """A route whose requests may act on the world: 502, never sent twice. A text-generation route
    (`rerun_if_crashed`), nothing of whose answer was sent: run again by the new server."""
    route = Route("/generate", max_queue_time=30.0, rerun_if_crashed=rerun)
    port = closed_port()
    read = trio.Event()

    async def dies_after_reading(stream: trio.SocketStream) -> None:
        data = b""
        while len(data.partition(b"\r\n\r\n")[2]) < len(BODY):
            data += await stream.receive_some(65536)
        read.set()  # and the process dies: the connection is closed (EOF), the request was read

    old = trio.CancelScope()

    async def serve_old(task_status: trio.TaskStatus[Any]) -> None:
        with old:
            await trio.serve_tcp(dies_after_reading, port, host="127.0.0.1", task_status=task_status)

    await nursery.start(serve_old)
    world = World(port, route)
    server = ModelServer(port)
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(world.request)
            await read.wait()
            old.cancel()
            world.readiness.set(False)
            await trio.testing.wait_all_tasks_blocked()  # the EOF has been met (502, or waiting)
            await server.start(nursery)
            world.readiness.set(True)
    if rerun:
        assert (world.status, world.body, server.requests) == (200, ANSWER, 1)
        assert world.outcome() == [200]
    else:
        assert world.status == 502
        assert server.requests == 0  # not sent again to the new server
        assert world.outcome() == [502]
    server.kill()
    await world.forwarder.aclose()


async def test_a_server_not_back_within_max_queue_time_is_503_with_retry_after() -> None:
    world = World(closed_port(), Route("/generate", max_queue_time=0.3))
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(world.request)
            await trio.testing.wait_all_tasks_blocked()
            world.readiness.set(False)  # down, and it stays down
    assert world.status == 503
    assert dict(world.sent[0]["headers"])[b"retry-after"] == b"5"
    assert json.loads(world.body) == {"error": "model server restarting, not back in time", "retry_after": 5}
    assert world.outcome() == [503]
    await world.forwarder.aclose()


@pytest.mark.parametrize("gone", [False, True], ids=["state changed", "process gone"])
async def test_draining_during_the_wait_is_503(gone: bool) -> None:
    world = World(closed_port(), GENERATE)
    world.readiness.gone = gone
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(world.request)
            await trio.testing.wait_all_tasks_blocked()
            if not gone:
                world.readiness.set(False)
                await trio.testing.wait_all_tasks_blocked()
            world.admission.set_draining()
    assert world.status == 503 and json.loads(world.body)["error"] == "draining"
    await world.forwarder.aclose()


async def test_a_server_that_refuses_but_never_goes_down_is_502() -> None:
    # attach mode: the server is someone else's, nothing says it is coming back
    world = World(closed_port(), GENERATE)
    with trio.fail_after(10):
        await world.request()
    assert world.status == 502
    assert world.outcome() == [502]
    await world.forwarder.aclose()


async def test_a_client_leaving_during_the_wait_is_cancelled() -> None:
    world = World(closed_port(), GENERATE)
    left = trio.Event()
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": BODY, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        world.sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(functools.partial(world.handler.handle, GENERATE, scope, receive, send))
            await trio.testing.wait_all_tasks_blocked()
            world.readiness.set(False)
            await trio.testing.wait_all_tasks_blocked()
            left.set()
    assert world.sent == []
    assert world.outcome() == [499]
    await world.forwarder.aclose()
