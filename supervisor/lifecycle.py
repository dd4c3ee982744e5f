"""Driving the model server through its lifecycle: start, load, warm, serve, restart or give up.

Two modes share the readiness logic:
- supervised: shepherd runs the command, restarts it by the restart policy, exits 1 when it gives up;
- attach: shepherd follows MODEL_LOG of a server someone else runs; errors make it `failed` until
  the server shows a new load line (or answers its health check again).

Each run of the server gets a `Run`: its own event channel and load flag, so late output from a
stopped server can never mark its successor loaded or broken. The first event a run receives
(exit, error line, load timeout, lasting ill health, SIGHUP, shutdown) ends it.

`last_error` is public (`/status`) and often quotes a model line: it holds only redacted text (its
setter applies `redact`, by default the state machine's, so reasons and last_error are masked alike).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import trio

from probes.health import HealthProbe
from supervisor.logs import get_logger
from supervisor.process import ModelProcess, pump, spawn, stop_tree, track
from supervisor.restart import RestartPolicy
from supervisor.rules import Kind, LogRules
from supervisor.states import State, StateMachine
from supervisor.tail import follow

HEALTH_FAILURES_FOR_UNHEALTHY = 3  # one slow answer from a busy server is not ill health
HEALTH_RETRY_MIN, HEALTH_RETRY_MAX = 0.1, 1.0  # probing a server that is still loading
PIPE_DRAIN_TIMEOUT = 2.0  # after the tree is dead, the last output still arrives

Warmup = Callable[[], Awaitable[None]]


class WarmupFailed(Exception):
    """The warm-up (benchmark) could not serve anything: restart, like an error line would."""


async def no_warmup() -> None:
    return None


@dataclass(frozen=True)
class Outcome:
    kind: str  # exited | error | fatal | load_timeout | unhealthy | hup | shutdown | spawn_failed
    reason: str

    @property
    def is_failure(self) -> bool:
        return self.kind not in ("hup", "shutdown")


@dataclass
class Run:
    events: trio.MemorySendChannel[Outcome]
    receive: trio.MemoryReceiveChannel[Outcome]
    load_seen: trio.Event = field(default_factory=trio.Event)
    healthy_seen: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def new(cls) -> Run:
        send, receive = trio.open_memory_channel[Outcome](math.inf)
        return cls(send, receive)

    def end(self, outcome: Outcome) -> None:
        self.events.send_nowait(outcome)


def _drain(receive: trio.MemoryReceiveChannel[Outcome]) -> None:
    while True:
        try:
            receive.receive_nowait()
        except trio.WouldBlock:
            return


@dataclass(frozen=True)
class LifecycleSettings:
    command: tuple[str, ...]
    model_log: str | None
    env: Mapping[str, str] | None
    stop_timeout: float
    load_timeout: float  # 0: none
    health_interval: float
    unhealthy_timeout: float  # 0: never restart for ill health


class Lifecycle:
    def __init__(
        self,
        settings: LifecycleSettings,
        machine: StateMachine,
        policy: RestartPolicy,
        rules: LogRules,
        health: HealthProbe,
        warmup: Warmup = no_warmup,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        # None: the machine's, so that one redactor covers every reason and last_error alike.
        self._redact: Callable[[str], str] = redact if redact is not None else machine.redact
        self.settings = settings
        self.machine = machine
        self.policy = policy
        self.rules = rules
        self.health = health
        self.warmup = warmup
        self.model: ModelProcess | None = None
        self.owned_pids: set[int] = set()
        self.restarts = 0
        self._last_error = ""
        self.lines_seen = 0
        self._run = Run.new()
        self._stop = trio.Event()
        self._log = get_logger("supervisor.lifecycle")
        self._model_log = get_logger("model")

    @property
    def last_error(self) -> str:
        """The reason the last run failed (redacted), "" once the server is ready again."""
        return self._last_error

    @last_error.setter
    def last_error(self, text: str) -> None:
        self._last_error = self._redact(text) if text else ""

    # -- control from outside (signals, shutdown)

    def request_restart(self, reason: str) -> None:
        if not self.settings.command:
            self._log.warning("restart.ignored", reason=reason, why="attach mode: the server is not ours")
            return
        self._run.end(Outcome("hup", reason))

    def request_stop(self) -> None:
        self._stop.set()
        self._run.end(Outcome("shutdown", "shutdown requested"))

    # -- model output

    def on_line(self, stream: str, line: str) -> None:
        self.lines_seen += 1
        model = self.model
        self._model_log.info("model.log", stream=stream, line=line, pid=model.pid if model else None)
        match = self.rules.match(line)
        if match is None:
            return
        if match.kind is Kind.LOADED:
            self._run.load_seen.set()
        elif match.kind is Kind.INFO:
            self._log.info("model.info", line=line, pattern=match.pattern)
        elif match.kind is Kind.ERROR:
            self._run.end(Outcome("error", f"error line: {line}"))
        elif match.kind is Kind.FATAL:
            self._run.end(Outcome("fatal", f"fatal line: {line}"))

    # -- supervised mode

    async def supervise(self) -> int:
        """Run the server until shutdown (returns 0) or giving up (returns 1)."""
        while True:
            outcome = await self._supervised_run()
            now = trio.current_time()
            if outcome.kind == "shutdown" or self._stop.is_set():
                return 0
            self.policy.on_not_ready()
            if outcome.kind == "hup":
                self.restarts += 1
                self.machine.to(State.RESTARTING, outcome.reason)
                self.machine.to(State.STARTING, "restart requested")
                continue
            self.last_error = outcome.reason
            decision = self.policy.on_failure(now)
            if outcome.kind in ("fatal", "spawn_failed") or decision.give_up:
                why = outcome.reason if outcome.kind in ("fatal", "spawn_failed") else (
                    f"gave up after {decision.failures_since_ready} failures without reaching ready; last: {outcome.reason}"
                )
                self.machine.to(State.FAILED, why)
                return 1
            self.restarts += 1
            self.machine.to(State.RESTARTING, f"{outcome.reason}; restart in {decision.delay:.1f}s")
            with trio.move_on_after(decision.delay):
                await self._stop.wait()
            if self._stop.is_set():
                return 0
            self.machine.to(State.STARTING, f"restart {self.restarts}")

    async def _supervised_run(self) -> Outcome:
        run = self._run = Run.new()
        if self._stop.is_set():
            return Outcome("shutdown", "shutdown requested")
        try:
            model = await spawn(self.settings.command, self.settings.env)
        except OSError as exc:
            return Outcome("spawn_failed", f"cannot start {self.settings.command[0]!r}: {exc.strerror or exc}")
        self.model = model
        self.owned_pids.add(model.pid)
        self._log.info("model.started", pid=model.pid, command=list(self.settings.command))
        self.machine.to(State.LOADING, f"started pid {model.pid}")
        process = model.process
        try:
            async with trio.open_nursery() as io:
                assert process.stdout is not None and process.stderr is not None
                pipes_closed = trio.Semaphore(0)

                async def read(stream: trio.abc.ReceiveStream, name: str) -> None:
                    try:
                        await pump(stream, name, model, self.on_line)
                    finally:
                        pipes_closed.release()

                io.start_soon(read, process.stdout, "stdout")
                io.start_soon(read, process.stderr, "stderr")
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._wait_exit, model, run, pipes_closed)
                    watch.start_soon(track, model)
                    watch.start_soon(self._readiness, run, True)
                    outcome = await run.receive.receive()
                    watch.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    result = await stop_tree(model, self.settings.stop_timeout)
                io.cancel_scope.deadline = trio.current_time() + PIPE_DRAIN_TIMEOUT
        finally:
            self.owned_pids.discard(model.pid)
        self._log.info(
            "model.stopped", pid=model.pid, exit_code=result.exit_code, graceful=result.graceful,
            outcome=outcome.kind, reason=outcome.reason, lines=dict(model.lines),
        )
        return outcome

    async def _wait_exit(self, model: ModelProcess, run: Run, pipes_closed: trio.Semaphore) -> None:
        code = await model.process.wait()
        # Its last lines (often the reason it died: TGI's `Error: ShardCannotStart`) may still be in
        # the pipes; read them first so a fatal line is not lost to a plain "exited".
        with trio.move_on_after(PIPE_DRAIN_TIMEOUT):
            for _ in range(2):
                await pipes_closed.acquire()
        run.end(Outcome("exited", f"model server exited with code {code}"))

    # -- attach mode

    async def attach(self) -> int:
        assert self.settings.model_log is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, self.settings.model_log, self.on_line)
            run = self._run = Run.new()
            self.machine.to(State.LOADING, f"following {self.settings.model_log}")
            while True:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._readiness, run, False)
                    outcome = await run.receive.receive()
                    watch.cancel_scope.cancel()
                if outcome.kind == "shutdown" or self._stop.is_set():
                    nursery.cancel_scope.cancel()
                    return 0
                self.last_error = outcome.reason
                self.machine.try_to(State.FAILED, outcome.reason)
                run = self._run = Run.new()  # a fresh load line (or health) brings it back
                recovered = await self._wait_recovery(run)
                if not recovered:
                    nursery.cancel_scope.cancel()
                    return 0
                _drain(run.receive)  # errors seen while failed belong to the old incident
                self.machine.to(State.LOADING, recovered)

    async def _wait_recovery(self, run: Run) -> str:
        async with trio.open_nursery() as nursery:
            result: list[str] = []

            async def on(event: trio.Event, why: str) -> None:
                await event.wait()
                result.append(why)
                nursery.cancel_scope.cancel()

            nursery.start_soon(on, self._stop, "")
            if self.rules.load:
                nursery.start_soon(on, run.load_seen, "load line seen again")
            else:
                nursery.start_soon(self._probe_until_healthy, run)
                nursery.start_soon(on, run.healthy_seen, "health check passes again")
        return "" if self._stop.is_set() else result[0]

    # -- readiness, shared

    async def _readiness(self, run: Run, supervised: bool) -> None:
        started = trio.current_time()
        timeout = self.settings.load_timeout or math.inf
        with trio.move_on_after(timeout):
            if self.rules.load:
                await run.load_seen.wait()
                self._log.info("model.load_line_seen", after_s=round(trio.current_time() - started, 3))
            await self._probe_until_healthy(run)
            if not self.machine.try_to(State.WARMING, "health check passed"):
                return  # draining: nothing more to announce
            try:
                await self.warmup()
            except WarmupFailed as exc:
                run.end(Outcome("error", f"warm-up failed: {exc}"))
                return
            if not self.machine.try_to(State.READY, f"ready after {trio.current_time() - started:.1f}s"):
                return
            self.last_error = ""
            self.policy.on_ready(trio.current_time())
        if self.machine.state is not State.READY:
            run.end(Outcome("load_timeout", f"not ready after {self.settings.load_timeout:g}s (LOAD_TIMEOUT)"))
            return
        await self._monitor(run, supervised)

    async def _probe_until_healthy(self, run: Run) -> None:
        delay = HEALTH_RETRY_MIN
        while True:
            result = await self.health.sample()
            if result.ok:
                run.healthy_seen.set()
                return
            await trio.sleep(delay)
            delay = min(delay * 2, HEALTH_RETRY_MAX)

    async def _monitor(self, run: Run, supervised: bool) -> None:
        failures = 0
        unhealthy_since: float | None = None
        while True:
            await trio.sleep(self.settings.health_interval)
            result = await self.health.sample()
            now = trio.current_time()
            if result.ok:
                failures, unhealthy_since = 0, None
                if self.machine.state is State.UNHEALTHY:
                    self.machine.try_to(State.READY, "health check passes again")
                continue
            failures += 1
            if failures >= HEALTH_FAILURES_FOR_UNHEALTHY and self.machine.state is State.READY:
                unhealthy_since = now
                self.policy.on_not_ready()
                self.machine.try_to(State.UNHEALTHY, f"{failures} health checks failed: {result.error}")
            limit = self.settings.unhealthy_timeout
            if supervised and unhealthy_since is not None and limit and now - unhealthy_since >= limit:
                run.end(Outcome("unhealthy", f"unhealthy for {limit:g}s: {result.error}"))
                return
