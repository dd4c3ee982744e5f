"""Serving the app with hypercorn on trio: settings, TLS, the connection guards, and a graceful stop.

`serve` is hypercorn's `worker_serve` (lifespan, listeners, shutdown trigger, graceful close) with one
change: each accepted connection first takes a slot from the `ConnectionGate` and is then run by
`GuardedTCPServer` (see `proxy/connections.py`) instead of hypercorn's plain `TCPServer`. Cancelling
the serve would skip its drain, so it is always stopped by its trigger. The sockets are bound before
serving so a taken port is reported as one clear error. hypercorn is pinned to the minor versions
whose `TCPServer` this was written against (pyproject.toml).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from proxy.connections import ConnectionGate, ConnectionLimits, GuardedTCPServer, peer_address, refuse


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    graceful_timeout: float  # hypercorn's default is 3 s, which would cut long streams
    certfile: str | None = None
    keyfile: str | None = None
    keep_alive_timeout: float = 75.0  # above common load balancers' idle timeouts
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)


class ServerStartError(RuntimeError):
    pass


def hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.graceful_timeout
    config.keep_alive_timeout = settings.keep_alive_timeout
    # hypercorn closes a client connection after 1000 requests by default; a load balancer or SDK
    # with a keep-alive pool would then pay a reconnect (and a TLS handshake) every 1000 requests.
    config.keep_alive_max_requests = 1_000_000_000
    config.accesslog = None  # shepherd writes its own access events
    # A logger instance (not "-") so hypercorn's lines go through shepherd's JSON pipeline.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.backlog = 2048
    config.ssl_handshake_timeout = settings.limits.header_timeout  # hypercorn's default is 60 s
    if settings.certfile:
        config.certfile, config.keyfile = settings.certfile, settings.keyfile
    return config


def check_tls_files(certfile: str, keyfile: str) -> None:
    """Load the pair once at start so an unreadable file is a clear configuration error."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)


async def run_server(
    app: object,
    settings: ServerSettings,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    gate: ConnectionGate | None = None,
) -> None:
    config = hypercorn_config(settings)
    # Bind here rather than inside hypercorn, so "port in use" is one clear error, not a nested group.
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise ServerStartError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    await serve(
        wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
        config, sockets, shutdown_trigger, gate or ConnectionGate(settings.limits), task_status=task_status,
    )


async def serve(
    app: Any,
    config: HypercornConfig,
    sockets: Sockets,
    shutdown_trigger: Callable[[], Awaitable[None]],
    gate: ConnectionGate,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    limits = gate.limits

    async def connection(stream: Any) -> None:
        address = peer_address(stream)
        if not gate.try_enter(address):
            await refuse(stream, gate)
            return
        try:
            server = GuardedTCPServer(app, config, context, ConnectionState(lifespan_state.copy()), stream,
                                      limits=limits)
            await server.run()
        except Exception:
            # One connection's failure must never reach serve_listeners: it would end the server.
            logging.getLogger("hypercorn.error").exception("connection.error")
        finally:
            gate.leave(address)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            ssl_context = config.create_ssl_context()
            listeners: list[Any] = []
            binds = []
            for sock in sockets.secure_sockets:
                listeners.append(trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                                                  ssl_context, https_compatible=True))
                binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
            for sock in sockets.insecure_sockets:
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(partial(trio.serve_listeners, connection, listeners,
                                               handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
