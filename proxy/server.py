"""Serving the app with hypercorn on trio: settings, TLS, and a graceful stop via `shutdown_trigger`.

Cancelling hypercorn's serve would skip its drain, so it is always stopped by its trigger. The
sockets are bound before serving (hypercorn's own `run` does the same) so a taken port is reported
as one clear error.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    graceful_timeout: float  # hypercorn's default is 3 s, which would cut long streams
    certfile: str | None = None
    keyfile: str | None = None
    keep_alive_timeout: float = 75.0  # above common load balancers' idle timeouts


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
) -> None:
    config = hypercorn_config(settings)
    # Bind here rather than inside hypercorn, so "port in use" is one clear error, not a nested group.
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise ServerStartError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    await worker_serve(
        wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
        config, sockets=sockets, shutdown_trigger=shutdown_trigger, task_status=task_status,
    )
