"""Assembling one worker from its Config: every long-lived piece, built once, wired together.

`Worker` holds the pieces (state machine, lifecycle, ledger, admission, proxy, probes, reporter) and
answers the read-only questions asked of the whole: `status()` for `/status`, `metrics_view()` for
`/metrics`. `supervisor/run.py` decides when things start and stop; this module decides what exists.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from probes.gpu import default_gpu_probe
from probes.health import HealthProbe
from probes.host import HostProbe
from probes.limits import probe_limits
from probes.model_metrics import ModelMetricsProbe
from proxy.admission import Admission
from proxy.app import OPEN, Gateway, StatusAccess, create_app
from proxy.connections import ConnectionGate, ConnectionLimits
from proxy.forward import Forwarder, ForwardLimits
from proxy.handler import ProxySettings, RequestHandler
from proxy.ledger import Ledger
from proxy.metrics import GpuView, Metrics, MetricsView
from proxy.replay import ReplayGuard
from proxy.signature import KeySource, PemFileKeySource, RemoteKeySource, Verifier
from supervisor.benchmark import (
    BenchmarkCache,
    BenchmarkError,
    BenchmarkSettings,
    Capacity,
    benchmark_route,
    cache_key,
    measure_capacity,
    model_identity,
)
from supervisor.config import Config
from supervisor.lifecycle import Lifecycle, LifecycleSettings, WarmupFailed
from supervisor.load import LoadMonitor
from supervisor.logfile import LogFile
from supervisor.logs import get_logger
from supervisor.provision import Provisioner
from supervisor.reporter import Reporter, ReportState, WorkerIdentity
from supervisor.redact import Redactor, redact_value
from supervisor.restart import BackoffSettings, RestartPolicy
from supervisor.rules import LogRules
from supervisor.states import State, StateMachine, Transition

VERSION = "0.1.0"
# States in which the model server's queue is not the clients' (no server, or the warm-up benchmark's
# requests): the estimate ignores it until the next `ready`.
QUEUE_NOT_CLIENTS = frozenset({State.STARTING, State.PROVISIONING, State.LOADING, State.WARMING, State.RESTARTING})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


# Credentials of shepherd's own that the model server has no use for: a model server that logs its
# environment, or runs user code, must not be handed the key to this worker's reports.
PRIVATE_ENV = ("MASTER_TOKEN",)


def model_env(config: Config) -> dict[str, str]:
    env = {k: v for k, v in config.environ.items() if k not in PRIVATE_ENV}
    # Python servers block-buffer a piped stdout: their load line would reach us late.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def secrets_redactor(config: Config) -> Redactor:
    return Redactor.from_environ(config.environ, extra=(config.master_token,))


def key_source(config: Config, client: httpx.AsyncClient) -> KeySource | None:
    """None when unsecured; raises ValueError (a configuration error) for an unusable key file."""
    if config.unsecured:
        return None
    if config.public_key_file:
        return PemFileKeySource(config.public_key_file)
    return RemoteKeySource(config.report_addr, client)


@dataclass
class Worker:
    config: Config
    client: httpx.AsyncClient
    machine: StateMachine
    lifecycle: Lifecycle
    ledger: Ledger
    admission: Admission
    forwarder: Forwarder
    handler: RequestHandler
    load: LoadMonitor
    metrics: Metrics
    keys: KeySource | None
    app: Gateway
    admin_app: Any  # the Quart app of the admin listener (METRICS_PORT): status routes, open
    gate: ConnectionGate  # client connections of the public port (counted in /status)
    report_state: ReportState
    reporter: Reporter | None
    provisioner: Provisioner
    started_wall: float = field(default_factory=time.time)
    state_since_wall: float = field(default_factory=time.time)
    state_changed: trio.Event = field(default_factory=trio.Event)
    max_perf: float = 0.0  # measured capacity in workload units per second (benchmark, cache, MAX_PERF)
    capacity_source: str = "none"  # "unmeasured" when the server refused the benchmark (capacity_error says why)
    capacity_error: str | None = None

    def is_ready(self) -> bool:
        return self.machine.state is State.READY

    def in_flight(self) -> int:
        return self.ledger.in_flight

    def next_state_change(self) -> trio.Event:
        """The event the next transition sets. A caller takes it before it reads the state, so a
        transition in between is never missed (a request waiting for `ready` once slept through it,
        until its deadline)."""
        return self.state_changed

    def on_transition(self, t: Transition) -> None:
        self.state_since_wall = time.time()
        get_logger("supervisor").info("state", **{"from": t.from_.value, "to": t.to.value, "reason": t.reason})
        if t.to is State.DRAINING:
            self.admission.set_draining()
        if t.to is State.READY:
            self.load.accept_model_queue()
        elif t.to in QUEUE_NOT_CLIENTS:
            self.load.hold_model_queue()
        self.report_state.on_transition(t)
        if self.reporter is not None:
            self.reporter.poke()  # the autoscaler hears of every transition at once
        self.state_changed.set()
        self.state_changed = trio.Event()

    def poke(self) -> None:
        if self.reporter is not None:
            self.reporter.poke()

    async def warmup(self) -> None:
        """State `warming`: find the capacity (MAX_PERF, the cache, or a benchmark against the server)."""
        config, log = self.config, get_logger("supervisor.benchmark")
        route = benchmark_route(config.spec)
        fixed = config.max_perf if (config.skip_benchmark or route is None) and config.max_perf else None
        if route is None and fixed is None:
            log.warning("benchmark.unavailable", backend=config.backend,
                        why="the backend has no benchmark route; set MAX_PERF for 429s and max_perf")
            return
        assert route is not None or fixed is not None
        settings = BenchmarkSettings(
            runs=config.benchmark_runs,
            concurrency=config.benchmark_concurrency if route is None or route.parallel else 1,
        )
        gpu = self.load.gpu or await self.load.sample_gpu()
        key = cache_key(config.backend, model_identity(config.command, config.environ),
                        [d.name for d in gpu.devices], settings)
        cache = BenchmarkCache(Path(config.benchmark_cache), legacy_path=Path.cwd() / ".has_benchmark")
        probe = partial(probe_limits, self.client, config.model_server_url, config.spec.limits_kind,
                        env=config.environ)
        self.capacity_error = None
        try:
            capacity = await measure_capacity(
                self.client, config.model_server_url, route, settings, cache, key,  # type: ignore[arg-type]
                fixed_max_perf=fixed, probe=probe,
            )
        except BenchmarkError as exc:
            if not exc.answered:
                raise WarmupFailed(exc.reason) from exc
            # The server is up and answered: a restart would load the same configuration and fail the
            # same way (issue 9: four restarts of a llama-server whose context was too small). Serve
            # without a measured capacity, and say so.
            self.capacity_error = exc.reason
            capacity = Capacity(config.max_perf or 0.0, "unmeasured")
            log.warning("benchmark.unmeasured", error=exc.reason, max_perf=capacity.max_perf,
                        why="the model server answered the benchmark with errors; a restart cannot fix that. "
                            "Set MAX_PERF to report a capacity anyway.")
        self.max_perf, self.capacity_source = capacity.max_perf, capacity.source
        self.report_state.set_max_perf(capacity.max_perf)
        log.info("benchmark.capacity", max_perf=capacity.max_perf, source=capacity.source,
                 rounds=list(capacity.result.rounds) if capacity.result else None)

    def status(self) -> dict[str, Any]:
        # Masked as a whole too: a URL with credentials in it, an address holding a token.
        return redact_value(self.machine.redact, self._status())

    def _status(self) -> dict[str, Any]:
        lc, ledger = self.lifecycle, self.ledger
        model = lc.model
        counters = ledger.peek_counters()
        return {
            "state": self.machine.state.value,
            "since": iso(self.state_since_wall),
            "reason": self.machine.reason,
            "mode": "attach" if self.config.attach else "supervised",
            "provisioning": self.provisioner.status(),
            "backend": self.config.backend,
            "model": {
                "pid": model.pid if model and model.process.returncode is None else None,
                "restarts": lc.restarts,
                "last_error": lc.last_error,
                "log_lines": lc.lines_seen,
                "url": self.config.model_server_url,
                "loadtime_s": self.report_state.loadtime,
            },
            "requests": {
                "running": ledger.running,
                "waiting": ledger.waiting,
                "running_work": ledger.running_work,
                "waiting_work": ledger.waiting_work,
                "received": ledger.num_received,
                "served_work_total": ledger.served_total,
                "since_last_report": {
                    "new_load": counters.new_load, "rej_load": counters.rej_load, "cur_perf": counters.cur_perf,
                },
            },
            "connections": {
                "open": self.gate.open, "refused": self.gate.refused,
                "body_bytes_in_flight": self.handler.budget.used, "body_budget_refusals": self.handler.budget.refused,
            },
            "max_perf": self.max_perf,
            "capacity_source": self.capacity_source,
            "capacity_error": self.capacity_error,
            **self.load.status(),
            "reporter": self.reporter.stats().as_dict() if self.reporter is not None else None,
            "shepherd": {
                "version": VERSION,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_wall, 3),
                "python": platform.python_version(),
                "trio": trio.__version__,
            },
        }

    def metrics_view(self) -> MetricsView:
        load = self.load
        gpu, host, e = load.gpu, load.host, load.current
        queue = load.fresh_model_queue()
        gpus = None
        if gpu is not None and gpu.available and gpu.devices:
            gpus = [
                GpuView(str(d.index), d.util_gpu / 100.0 if d.util_gpu is not None else None, d.memory_used,
                        d.memory_total, d.power_watts, d.temperature_c, d.sm_active)
                for d in gpu.devices
            ]
        tree = host.model_tree if host is not None else None
        return MetricsView(
            state=self.machine.state.value,
            states=[s.value for s in State],
            restarts=self.lifecycle.restarts,
            running_work=self.ledger.running_work,
            waiting_work=self.ledger.waiting_work,
            capacity=e.capacity,
            utilisation=e.utilisation,
            wait_seconds=e.wait_seconds,
            stalled=e.stalled,
            reporter_failures=self.reporter.failures if self.reporter is not None else 0,
            gpus=gpus,
            host_cpu_percent=host.cpu_percent if host else None,
            host_memory_used=host.memory_used if host else None,
            model_cpu_percent=tree.cpu_percent if tree else None,
            model_rss=tree.rss_bytes if tree else None,
            # The model server's own queue: its numbers only while the sample is read and fresh (a
            # stale one is not exported as if current); its age whenever there is a read sample.
            model_waiting=queue.waiting if queue else None,
            model_running=queue.running if queue else None,
            model_kv_cache_usage=queue.kv_cache_usage if queue else None,
            model_queue_age_seconds=load.model_queue_age() if load.model_queue and load.model_queue.ok else None,
        )


def build_worker(config: Config, client: httpx.AsyncClient) -> Worker:
    """Raises ValueError for a configuration problem found only now (an unusable key file)."""
    keys = key_source(config, client)
    # Every string that leaves the process (state reasons in /status, /ready and the reports, the
    # last error) is masked by the same rule as the logs.
    redactor = secrets_redactor(config)
    machine = StateMachine(trio.current_time, redact=redactor.redact)
    lifecycle = Lifecycle(
        LifecycleSettings(
            command=config.command,
            model_log=config.model_log,
            env=model_env(config),
            stop_timeout=config.stop_timeout,
            load_timeout=config.load_timeout,
            health_interval=config.health_interval,
            unhealthy_timeout=config.unhealthy_timeout,
            load_line_grace=config.load_line_grace,
        ),
        machine,
        RestartPolicy(BackoffSettings(
            initial=config.restart_delay, maximum=config.restart_max_delay,
            reset_after=config.restart_reset_after, max_failures=config.max_failures,
        )),
        LogRules.build(config.load_patterns, config.error_patterns, config.fatal_patterns, config.info_patterns),
        HealthProbe(client, config.model_server_url + config.health_endpoint, config.health_timeout,
                    fallback=config.model_server_url + config.health_fallback if config.health_fallback else None),
        answering_since=lambda since: forwarder.last_answer_at >= since,
    )
    ledger = Ledger(keep_finished=config.reporting)
    holder: list[Worker] = []  # the callables below need the worker, which needs them first

    def tree_pids() -> set[int]:
        model = lifecycle.model
        return set(model.tracked) if model is not None else set()

    def root_pid() -> int | None:
        model = lifecycle.model
        return model.pid if model is not None and model.process.returncode is None else None

    spec = config.spec
    model_metrics = (
        ModelMetricsProbe(client, config.model_server_url, spec.metrics_kind, spec.metrics_path)
        if spec.metrics_path else None
    )
    workspace = config.workspace if os.path.isdir(config.workspace) else "/"
    load = LoadMonitor(
        ledger, default_gpu_probe(own_pids=tree_pids), HostProbe(workspace, root_pid), model_metrics,
        max_perf=lambda: holder[0].max_perf, interval=config.probe_interval,
        capacity_source=lambda: holder[0].capacity_source,
    )
    load.hold_model_queue()  # the machine starts in `starting`, without a transition to hear

    def server_gone() -> bool:
        """The supervised server's process has exited (its returncode polls for it): a refused
        connection then waits for the restart, even before the state says so."""
        model = lifecycle.model
        return model is not None and model.process.returncode is not None

    admission = Admission(ledger, load.capacity, lambda: holder[0].is_ready(),
                          lambda: holder[0].next_state_change(), hidden_work=load.hidden_work,
                          server_gone=server_gone)
    verifier = Verifier(keys, config.signature_format, config.public_url) if keys is not None else None
    forwarder = Forwarder(config.model_server_url, ForwardLimits(
        stream_head_timeout=config.stream_head_timeout, stream_idle_timeout=config.stream_idle_timeout))
    metrics = Metrics(lambda: holder[0].metrics_view())
    access = get_logger("proxy.access")
    handler = RequestHandler(
        ProxySettings(unsecured=config.unsecured, max_body_bytes=config.max_body_bytes,
                      body_timeout=config.body_timeout, body_bytes_in_flight=config.body_bytes_in_flight,
                      max_workload=config.max_workload, scheme="https" if config.use_ssl else "http"),
        forwarder, ledger, admission, verifier, on_change=lambda: holder[0].poke(),
        access_log=None if config.access_log == "off" else getattr(access, config.access_log),
        metrics=metrics,
        replay=ReplayGuard(config.replay_window) if config.replay_window and verifier is not None else None,
    )
    # Secured mode means a public port: status and metrics there need the master token (SECURITY.md).
    access = OPEN if config.unsecured else StatusAccess(open=False, token=config.master_token)
    app = Gateway(
        create_app(lambda: holder[0].status(), metrics.render, access),
        {r.path: r for r in spec.routes},
        handler,
    )
    admin_app = create_app(lambda: holder[0].status(), metrics.render, OPEN)
    gate = ConnectionGate(ConnectionLimits(
        max_connections=config.max_connections, max_per_ip=config.max_connections_per_ip,
        header_timeout=config.header_timeout, allow_h2c=config.allow_h2c,
    ))
    report_state = ReportState(machine.since)
    reporter = Reporter(
        client, config.report_addr, WorkerIdentity.from_config(config, VERSION), ledger,
        lambda: report_state.view(ledger, load.hidden_work()), redact=redactor.redact,
    ) if config.reporting else None
    worker = Worker(
        config, client, machine, lifecycle, ledger, admission, forwarder, handler, load, metrics, keys, app,
        admin_app, gate, report_state, reporter,
        Provisioner(config.before_cmds, Path(config.provisioning_marker) if config.provisioning_marker else None,
                    machine, env=model_env(config)),
    )
    if config.model_log and not config.attach:
        worker.lifecycle.log_file = worker.provisioner.log_file = LogFile(Path(config.model_log),
                                                                          config.model_log_max_bytes)
    holder.append(worker)
    machine.subscribe(worker.on_transition)
    lifecycle.warmup = worker.warmup
    return worker
