"""The root of the running program: runs the worker's pieces (built in `worker.py`) in one nursery.

Order of a run: open the signal receiver (kept open to the end), become a subreaper, start the
watchdog that kills the model tree should shepherd die unstopped (supervised mode, supervisor/guard.py),
bind the HTTP port (a port in use ends the start with exit 2 before any model is spawned), then run the
model lifecycle. Shutdown: `draining` (the proxy turns new work away and in-flight work finishes, up to
DRAIN_TIMEOUT; a second signal skips this), then the model tree is stopped (TERM, grace, KILL; a
third signal kills it at once), then the HTTP server is stopped through its shutdown trigger.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from proxy.connections import ConnectionLimits
from proxy.server import ServerSettings, ServerStartError, check_tls_files, run_server
from proxy.signature import KeySource, RemoteKeySource
from supervisor.config import Config
from supervisor.guard import OrphanGuard
from supervisor.lifecycle import Lifecycle
from supervisor.logs import get_logger
from supervisor.reaper import Reaper, become_subreaper
from supervisor.reporter import WorkerIdentity, send_error_report
from supervisor.states import State
from supervisor.tasks import keep_running, raise_fd_limit
from supervisor.tls_bootstrap import CertificateError, SignSettings, obtain_certificate
from supervisor.worker import VERSION, Worker, build_worker, secrets_redactor

EXIT_OK, EXIT_CONFIG = 0, 2  # 1 (gave up) is what Lifecycle.supervise returns
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HTTP_CLOSE_GRACE = 1.0  # seconds hypercorn gives connections after shepherd's own drain
REPORT_FLUSH_TIMEOUT = 5.0  # seconds the last reports may take before exit
FD_RESERVE = 256  # descriptors kept for the model's pipes, probes, the pool and the reporter


@dataclass
class Shutdown:
    """What the signals asked for so far."""

    requested: trio.Event = field(default_factory=trio.Event)
    skip_drain: trio.Event = field(default_factory=trio.Event)
    signal_name: str = ""
    count: int = 0


async def run(config: Config) -> int:
    log = get_logger("supervisor")
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS, signal.SIGHUP) as signals:
        if config.use_ssl:
            try:
                await _certificate(config)
                check_tls_files(config.ssl_cert, config.ssl_key)
            except CertificateError as exc:
                error = f"no TLS certificate: {exc}"
                log.error("config.error", setting="USE_SSL", error=error)
                async with httpx.AsyncClient(trust_env=False) as client:
                    await _report_start_failure(config, client, f"Worker Server failed to launch: {error}")
                return EXIT_CONFIG
            except (OSError, ValueError) as exc:
                error = f"cannot load TLS files {config.ssl_cert}, {config.ssl_key}: {exc}"
                log.error("config.error", setting="SSL_CERT/SSL_KEY", error=error)
                async with httpx.AsyncClient(trust_env=False) as client:
                    await _report_start_failure(config, client, f"Worker Server failed to launch: {error}")
                return EXIT_CONFIG
        # Attach mode leaves MODEL_LOG where it is (a server may already write to it): the tail tells
        # the lines it held at start from new ones (supervisor/tail.py).
        subreaper = become_subreaper()
        return await _run(config, signals, subreaper)


async def _run(config: Config, signals: Any, subreaper: bool) -> int:
    log = get_logger("supervisor")
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=4)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        try:
            worker = build_worker(config, client)
        except ValueError as exc:
            log.error("config.error", setting="PUBLIC_KEY_FILE", error=str(exc))
            return EXIT_CONFIG
        lifecycle, keys = worker.lifecycle, worker.keys
        if keys is not None:
            lifecycle.warmup = _with_key(keys, lifecycle.warmup)
        guard = None if config.attach else OrphanGuard()
        if guard is not None:
            await guard.start()
            lifecycle.guard = guard
        try:
            return await _serve(config, worker, client, signals, subreaper)
        finally:
            if guard is not None:
                with trio.CancelScope(shield=True):
                    await guard.aclose()


async def _serve(config: Config, worker: Worker, client: httpx.AsyncClient, signals: Any, subreaper: bool) -> int:
    log = get_logger("supervisor")
    lifecycle, keys = worker.lifecycle, worker.keys
    fd_soft, fd_hard = raise_fd_limit()
    limits = worker.gate.limits = connection_limits(config, fd_soft)
    log.info(
        "shepherd.start", version=VERSION, backend=config.backend,
        mode="attach" if config.attach else "supervised", port=config.worker_port,
        model_server_url=config.model_server_url, subreaper=subreaper,
        reporting="on" if config.reporting else "off (set REPORT_ADDR or CONTAINER_ID to report)",
        signed_url=signed_url(config), fd_limit=fd_soft, max_connections=limits.max_connections,
        admin=f"{config.metrics_host}:{config.metrics_port}" if config.metrics_port else "off",
    )
    if limits.max_connections < config.max_connections:
        log.warning("limits.connections_lowered", asked=config.max_connections, allowed=limits.max_connections,
                    why=f"the file descriptor limit is {fd_soft} (hard {fd_hard})")
    shutdown = Shutdown()
    http_stop = trio.Event()
    settings = ServerSettings(
        # shepherd drains in-flight requests itself (up to DRAIN_TIMEOUT) before it stops
        # hypercorn; what hypercorn still waits for then is idle keep-alive connections, which
        # it would otherwise hold open for the whole graceful_timeout.
        host=config.host, port=config.worker_port, graceful_timeout=HTTP_CLOSE_GRACE,
        certfile=config.ssl_cert if config.use_ssl else None, keyfile=config.ssl_key if config.use_ssl else None,
        limits=limits,
    )
    server_done = trio.Event()

    async def serve_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await run_server(worker.app, settings, http_stop.wait, task_status=task_status,
                             gate=worker.gate)
        finally:
            server_done.set()

    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(serve_http)
        except ServerStartError as exc:
            log.error("config.error", setting="WORKER_PORT", error=str(exc))
            await _report_start_failure(config, client, f"Worker Server failed to launch: {exc}")
            nursery.cancel_scope.cancel()
            return EXIT_CONFIG
        log.info("http.listening", binds=binds, routes=[r.path for r in config.spec.routes])
        if config.metrics_port:
            try:
                admin_binds = await nursery.start(_serve_admin, worker, config, http_stop)
            except ServerStartError as exc:
                log.error("config.error", setting="METRICS_PORT", error=str(exc))
                await _report_start_failure(config, client, f"Worker Server failed to launch: {exc}")
                http_stop.set()
                await server_done.wait()
                nursery.cancel_scope.cancel()
                return EXIT_CONFIG
            log.info("admin.listening", binds=admin_binds, routes=["/status", "/metrics", "/ready", "/health"])
        # Background work: an error in any of these is logged and retried, never the end of shepherd.
        if isinstance(keys, RemoteKeySource):
            nursery.start_soon(keep_running, "pubkey", keys.fetch_until_loaded)
        nursery.start_soon(_signal_loop, signals, shutdown, lifecycle)
        nursery.start_soon(keep_running, "load", worker.load.run)
        if lifecycle.log_file is not None:
            nursery.start_soon(keep_running, "logfile", lifecycle.log_file.run)
        if worker.reporter is not None:
            nursery.start_soon(keep_running, "reporter", worker.reporter.run)
        if subreaper:
            nursery.start_soon(keep_running, "reaper", Reaper(partial(_owned, worker)).run)
        exit_code = await _main(config, worker, shutdown)
        http_stop.set()
        await worker.forwarder.aclose()
        if worker.reporter is not None:
            # the last word (failed, stopped) and the last finished requests must reach the autoscaler
            await worker.reporter.flush(REPORT_FLUSH_TIMEOUT)
        await server_done.wait()  # hypercorn finishes its own graceful close first
        nursery.cancel_scope.cancel()  # then the signal loop, the probes and the reaper
    log.info("shepherd.exit", exit_code=exit_code, state=worker.machine.state.value)
    return exit_code


async def _certificate(config: Config) -> None:
    """With USE_SSL and no certificate files, obtain them as Vast's start script does. Raises
    CertificateError (exit 2, after the one error report)."""
    cert, key = Path(config.ssl_cert), Path(config.ssl_key)
    if await trio.to_thread.run_sync(lambda: cert.exists() and key.exists()):
        return
    if not config.container_id:
        raise CertificateError(f"{cert} or {key} is missing, and without CONTAINER_ID none can be signed "
                               "(give SSL_CERT and SSL_KEY, or set USE_SSL=false)")
    settings = SignSettings(config.sign_cert_url, config.container_id, first_delay_s=config.sign_cert_backoff)
    async with httpx.AsyncClient(trust_env=False) as client:
        await obtain_certificate(client, cert, key, settings)


def _owned(worker: Worker) -> set[int] | None:
    """Every pid trio waits on (model server, provisioning step, watchdog); None while one is spawning."""
    model, step = worker.lifecycle.owned(), worker.provisioner.owned()
    if model is None or step is None:
        return None
    guard = worker.lifecycle.guard.pid if worker.lifecycle.guard is not None else None
    return model | step | ({guard} if guard is not None else set())


def signed_url(config: Config) -> str:
    """What the start event says of the url check (SECURITY.md: which worker's signatures pass)."""
    if config.unsecured:
        return "none (unsecured)"
    return config.public_url or "any (SKIP_URL_CHECK)"


def connection_limits(config: Config, fd_soft: int) -> ConnectionLimits:
    """The connection cap, lowered when the descriptor limit could not hold it (each connection is
    one descriptor, and its upstream request another)."""
    allowed = max(1, (fd_soft - FD_RESERVE) // 2) if fd_soft > 0 else config.max_connections
    cap = min(config.max_connections, allowed)
    return ConnectionLimits(max_connections=cap, max_per_ip=min(config.max_connections_per_ip, cap),
                            header_timeout=config.header_timeout, allow_h2c=config.allow_h2c)


async def _serve_admin(
    worker: Worker, config: Config, stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin listener: /status and /metrics for operators and Prometheus, never the proxy routes."""
    settings = ServerSettings(host=config.metrics_host, port=config.metrics_port, graceful_timeout=HTTP_CLOSE_GRACE,
                              limits=ConnectionLimits(max_connections=64, max_per_ip=64,
                                                      header_timeout=config.header_timeout))
    await run_server(worker.admin_app, settings, stop.wait, task_status=task_status)


async def _report_start_failure(config: Config, client: httpx.AsyncClient, error: str) -> None:
    """One error report before exiting, so the autoscaler learns why this worker never came up."""
    if config.reporting:
        identity = WorkerIdentity.from_config(config, VERSION)
        await send_error_report(client, config.report_addr, identity, error,
                                redact=secrets_redactor(config).redact)


def _with_key(keys: KeySource, warmup: Callable[[], Any]) -> Callable[[], Any]:
    """Readiness also needs the autoscaler's public key: a worker that cannot check signatures
    would answer every request 401."""

    async def warm() -> None:
        if isinstance(keys, RemoteKeySource) and keys.current() is None:
            get_logger("supervisor").info("pubkey.waiting")
            await keys.wait_loaded()
        await warmup()

    return warm


async def _main(config: Config, worker: Worker, shutdown: Shutdown) -> int:
    lifecycle, machine = worker.lifecycle, worker.machine
    log = get_logger("supervisor")
    result: list[int] = []
    model_done = trio.Event()
    provisioning = trio.CancelScope()  # cancelled by a shutdown: a step is stopped like a server

    async def model_task() -> None:
        try:
            with provisioning:
                error = await worker.provisioner.run()
            if provisioning.cancelled_caught:
                result.append(EXIT_OK)
            elif error is not None:
                lifecycle.last_error = error
                machine.to(State.FAILED, error)
                result.append(1)
            else:
                result.append(await (lifecycle.attach() if config.attach else lifecycle.supervise()))
        finally:
            model_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(model_task)
        async with trio.open_nursery() as first:
            async def on(event: trio.Event) -> None:
                await event.wait()
                first.cancel_scope.cancel()

            first.start_soon(on, model_done)
            first.start_soon(on, shutdown.requested)
        if model_done.is_set() and not shutdown.requested.is_set():
            return result[0]  # gave up: state is `failed`
        provisioning.cancel()
        machine.try_to(State.DRAINING, f"{shutdown.signal_name} received")
        await _drain(worker, shutdown, config.drain_timeout)
        lifecycle.request_stop()
        await model_done.wait()
    machine.try_to(State.STOPPED, "shutdown complete")
    log.info("shutdown.done")
    return EXIT_OK


async def _drain(worker: Worker, shutdown: Shutdown, timeout: float) -> None:
    log = get_logger("supervisor")
    started = trio.current_time()
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            async def skip() -> None:
                await shutdown.skip_drain.wait()
                log.warning("drain.skipped", in_flight=worker.in_flight())
                nursery.cancel_scope.cancel()

            nursery.start_soon(skip)
            while worker.in_flight() > 0:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        log.warning("drain.timeout", timeout_s=timeout, in_flight=worker.in_flight())
    else:
        log.info("drain.done", took_s=round(trio.current_time() - started, 3))


async def _signal_loop(signals: Any, shutdown: Shutdown, lifecycle: Lifecycle) -> None:
    log = get_logger("supervisor.signals")
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("signal", signal=name, action="restart model server")
            lifecycle.request_restart("SIGHUP received")
            continue
        shutdown.count += 1
        if shutdown.count == 1:
            shutdown.signal_name = name
            log.info("signal", signal=name, action="graceful shutdown")
            shutdown.requested.set()
        elif shutdown.count == 2:
            log.warning("signal", signal=name, action="skip drain")
            shutdown.skip_drain.set()
        else:
            log.warning("signal", signal=name, action="kill model server now")
            model = lifecycle.model
            if model is not None and model.process.returncode is None:
                try:
                    os.killpg(model.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
