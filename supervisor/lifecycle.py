"""Driving the model server through its lifecycle: start, load, warm, serve, restart or give up.

Two modes share the readiness logic:
- supervised: shepherd runs the command, restarts it by the restart policy, exits 1 when it gives up;
- attach: shepherd follows MODEL_LOG of a server someone else runs; errors make it `failed` until
  the server shows a new load line (or answers its health check again).

Each run of the server gets a `Run`: its own event channel and load flag, and its output is read
into that run only, so late output from a stopped server can never mark its successor loaded or
broken. The first event a run receives (exit, error line, load timeout, lasting ill health, SIGHUP,
shutdown) ends it, and the state says so at once (`restarting` or `failed`), before the old tree is
stopped: requests wait for the next `ready` instead of meeting a dead or dying server. The exit of
the server's process ends its run as soon as it happens: the lines it printed before it died (a
fatal line, the end of a traceback) are read first, and the pipes, which its workers may hold open
for long, are read to EOF in the background (up to PIPE_DRAIN_TIMEOUT after the tree is stopped).
An exit's reason quotes the last stderr lines (`ModelProcess.last_stderr`).

Readiness needs the load line when the backend has one, but a load line that never comes must not
leave a worker stuck without a word: once the health path answers 200 and the line has not been seen
within `load_line_grace`, the run goes on to warm-up with a warning that names the pattern.

`last_error` is public (`/status`) and often quotes a model line: it holds only redacted text (its
setter applies `redact`, by default the state machine's, so reasons and last_error are masked alike).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import trio

from probes.health import HealthProbe
from supervisor.guard import OrphanGuard
from supervisor.logfile import LogFile
from supervisor.logs import get_logger
from supervisor.process import ModelProcess, PipeReader, pipe_readers, spawn, stop_tree, track
from supervisor.restart import RestartPolicy
from supervisor.rules import Kind, LogRules
from supervisor.states import State, StateMachine
from supervisor.tail import follow, history_load_hint

HEALTH_FAILURES_FOR_UNHEALTHY = 3  # one slow answer from a busy server is not ill health
HEALTH_RETRY_MIN, HEALTH_RETRY_MAX = 0.1, 1.0  # probing a server that is still loading
PIPE_DRAIN_TIMEOUT = 2.0  # after the tree is stopped, its last output is still read (in the background)
LOAD_LINE_GRACE = 30.0  # default of LifecycleSettings.load_line_grace (LOAD_LINE_GRACE)
# A server that printed a fatal line exits by itself a moment later; the lines it prints in between
# often name the cause, and are quoted in the reason (`_with_cause`).
FATAL_CAUSE_WAIT = 2.0
# A health check that times out is not held against a server that answered a proxied request within
# this window: a long non-streaming generation sends nothing until it ends, but under load others end.
BUSY_WINDOW = 30.0

Warmup = Callable[[], Awaitable[None]]


class WarmupFailed(Exception):
    """The warm-up (benchmark) could not serve anything: restart, like an error line would."""


async def no_warmup() -> None:
    return None


@dataclass(frozen=True)
class Outcome:
    kind: str  # exited | error | fatal | load_timeout | unhealthy | hup | shutdown | spawn_failed
    reason: str


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
    # Seconds after the start to wait for the load line once the health path answers 200; then
    # go on without it, with a warning. 0: wait for the line as long as the load takes.
    load_line_grace: float = LOAD_LINE_GRACE


@dataclass(frozen=True)
class _Next:
    """What follows a supervised run: exit with `exit_code`, or (None) restart after `delay`."""

    exit_code: int | None
    delay: float = 0.0
    why: str = ""  # the reason of the next `starting`


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
        answering_since: Callable[[float], bool] | None = None,
    ) -> None:
        # None: the machine's, so that one redactor covers every reason and last_error alike.
        self._redact: Callable[[str], str] = redact if redact is not None else machine.redact
        self.settings = settings
        self.machine = machine
        self.policy = policy
        self.rules = rules
        self.health = health
        self.warmup = warmup
        # Has the model server sent bytes of an answer to a proxied request since trio time t? A
        # health check that times out while it does (within BUSY_WINDOW) is a busy server, not an ill one.
        self._answering_since = answering_since
        # Kills the model tree if shepherd dies without stopping it (supervisor/guard.py); set by run.py.
        self.guard: OrphanGuard | None = None
        # Supervised mode with MODEL_LOG: the server's lines are also copied there (supervisor/logfile.py).
        self.log_file: LogFile | None = None
        self.model: ModelProcess | None = None
        self.owned_pids: set[int] = set()
        self._spawning = False  # a process may exist whose pid is not in owned_pids yet
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

    def owned(self) -> set[int] | None:
        """The pids trio waits on, which the reaper must leave alone; None while a spawn is under
        way: the new server can exit (and be a zombie) before its pid is known here, and a reaper
        that took it would steal its exit code (trio then reads 0 for a crash)."""
        return None if self._spawning else set(self.owned_pids)

    # -- control from outside (signals, shutdown)

    def request_restart(self, reason: str) -> None:
        if not self.settings.command:
            self._log.warning("restart.ignored", reason=reason, why="attach mode: the server is not ours")
            return
        if self.machine.state is State.DRAINING:
            self._log.warning("restart.ignored", reason=reason, why="draining: requests in flight still need the server")
            return
        self._run.end(Outcome("hup", reason))

    def request_stop(self) -> None:
        self._stop.set()
        self._run.end(Outcome("shutdown", "shutdown requested"))

    # -- model output

    def on_history(self, lines: list[str]) -> None:
        """(attach mode) What MODEL_LOG held when shepherd started: never acted on as errors (they
        are the last boot's); a load line it ends on counts as the load line, a hint that the health
        check and the warm-up confirm."""
        hint = history_load_hint(lines, self.rules)
        if hint is not None:
            self._log.info("model.load_line_in_history", line=hint)
            self._run.load_seen.set()

    def on_line(self, stream: str, line: str) -> None:
        """A line of the current run's server (attach mode: a line of MODEL_LOG)."""
        model = self.model
        self._on_line(self._run, model.pid if model else None, stream, line)

    def _sink(self, run: Run, model: ModelProcess) -> Callable[[str, str], None]:
        """The line sink of one supervised run: its lines reach its own run only, however late."""
        pid = model.pid

        def sink(stream: str, line: str) -> None:
            self._on_line(run, pid, stream, line)

        return sink

    def _on_line(self, run: Run, pid: int | None, stream: str, line: str) -> None:
        self.lines_seen += 1
        self._model_log.info("model.log", stream=stream, line=line, pid=pid)
        if self.log_file is not None:
            self.log_file.write_line(stream, line)
        match = self.rules.match(line)
        if match is None:
            return
        if match.kind is Kind.LOADED:
            run.load_seen.set()
        elif match.kind is Kind.INFO:
            self._log.info("model.info", line=line, pattern=match.pattern)
        elif match.kind is Kind.ERROR:
            run.end(Outcome("error", f"error line: {line}"))
        elif match.kind is Kind.FATAL:
            run.end(Outcome("fatal", f"fatal line: {line}"))

    # -- supervised mode

    async def supervise(self) -> int:
        """Run the server until shutdown (returns 0) or giving up (returns 1)."""
        # The pipes of stopped servers are read to their end here, while the next run goes on.
        async with trio.open_nursery() as leftovers:
            while True:
                after = await self._supervised_run(leftovers)
                if after.exit_code is not None:
                    return after.exit_code
                if after.delay:
                    with trio.move_on_after(after.delay):
                        await self._stop.wait()
                if self._stop.is_set():
                    return 0
                self.machine.to(State.STARTING, after.why)

    def _after(self, outcome: Outcome) -> _Next:
        """Decide what follows a run's end, and say it at once: the state leaves `ready` the moment
        the run ends, before its tree is stopped (which can take STOP_TIMEOUT)."""
        if outcome.kind == "shutdown" or self._stop.is_set():
            return _Next(0)
        if self.machine.state is State.DRAINING:
            # shepherd is going away: a server that ends now is not restarted (nor a reason to fail)
            return _Next(0)
        self.policy.on_not_ready()
        if outcome.kind == "hup":
            self.restarts += 1
            self.machine.to(State.RESTARTING, outcome.reason)
            return _Next(None, why="restart requested")
        self.last_error = outcome.reason
        decision = self.policy.on_failure(trio.current_time())
        if outcome.kind in ("fatal", "spawn_failed") or decision.give_up:
            why = outcome.reason if outcome.kind in ("fatal", "spawn_failed") else (
                f"gave up after {decision.failures_since_ready} failures without reaching ready; last: {outcome.reason}"
            )
            self.machine.to(State.FAILED, why)
            return _Next(1)
        self.restarts += 1
        self.machine.to(State.RESTARTING, f"{outcome.reason}; restart in {decision.delay:.1f}s")
        return _Next(None, decision.delay, f"restart {self.restarts}")

    async def _supervised_run(self, leftovers: trio.Nursery) -> _Next:
        run = self._run = Run.new()
        if self._stop.is_set():
            return _Next(0)
        try:
            self._spawning = True
            try:
                model = await spawn(self.settings.command, self.settings.env)
            finally:
                self._spawning = False  # and its pid is owned before the next checkpoint
        except OSError as exc:
            reason = f"cannot start {self.settings.command[0]!r}: {exc.strerror or exc}"
            return self._after(Outcome("spawn_failed", reason))
        self.model = model
        self.owned_pids.add(model.pid)
        if self.guard is not None:
            self.guard.track(model.pid)
        self._log.info("model.started", pid=model.pid, command=list(self.settings.command))
        self.machine.to(State.LOADING, f"started pid {model.pid}")
        readers = pipe_readers(model, self._sink(run, model))
        pipes = trio.CancelScope()
        leftovers.start_soon(self._read_pipes, pipes, readers)
        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(self._wait_exit, model, run, readers)
                watch.start_soon(track, model)
                watch.start_soon(self._readiness, run, True)
                outcome = await run.receive.receive()
                watch.cancel_scope.cancel()
            if outcome.kind == "fatal":
                outcome = await self._with_cause(outcome, model, readers)
            after = self._after(outcome)
            with trio.CancelScope(shield=True):
                result = await stop_tree(model, self.settings.stop_timeout)
        finally:
            self.owned_pids.discard(model.pid)
            if self.guard is not None:
                self.guard.forget(model.pid)
            # Workers nobody knew of may still hold the pipes: read them for a while, not for good.
            pipes.deadline = min(pipes.deadline, trio.current_time() + PIPE_DRAIN_TIMEOUT)
        self._log.info(
            "model.stopped", pid=model.pid, exit_code=result.exit_code, graceful=result.graceful,
            outcome=outcome.kind, reason=outcome.reason, lines=dict(model.lines),
        )
        return after

    async def _with_cause(self, outcome: Outcome, model: ModelProcess, readers: tuple[PipeReader, ...]) -> Outcome:
        """The fatal line, and the stderr lines after it: vLLM 0.32 prints `ValidationError: 1 validation
        error for ModelConfig`, then `Value error, User-specified max_model_len (16384) is greater than the
        derived max_model_len ...`, then exits 1. Waits up to FATAL_CAUSE_WAIT for that exit."""
        with trio.move_on_after(FATAL_CAUSE_WAIT):
            await model.process.wait()
        for reader in readers:
            reader.read_available()
        line = outcome.reason.removeprefix("fatal line: ")
        tail = list(model.stderr_tail)
        after = tail[len(tail) - tail[::-1].index(line):] if line in tail else []
        if not after:
            return outcome
        return Outcome("fatal", f"{outcome.reason} | {' | '.join(self._redact(text) for text in after)}")

    @staticmethod
    async def _read_pipes(scope: trio.CancelScope, readers: tuple[PipeReader, ...]) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for reader in readers:
                    nursery.start_soon(reader.run)

    async def _wait_exit(self, model: ModelProcess, run: Run, readers: tuple[PipeReader, ...]) -> None:
        code = await model.process.wait()
        # Everything it wrote before it died is in the pipes by now (a write to a pipe is done
        # before the writer goes on to exit). Take it at once, without waiting for EOF, which its
        # workers can hold off for long: a fatal line printed just before the exit (TGI's
        # `Error: ShardCannotStart`) ends the run first, and the reason quotes its last stderr.
        for reader in readers:
            reader.read_available()
        reason = f"model server exited with code {code}"
        tail = model.last_stderr(redact=self._redact)
        run.end(Outcome("exited", f"{reason}; last stderr: {tail}" if tail else reason))

    # -- attach mode

    async def attach(self) -> int:
        assert self.settings.model_log is not None
        async with trio.open_nursery() as nursery:
            run = self._run = Run.new()  # before the follower starts: its history is this run's
            nursery.start_soon(partial(follow, self.settings.model_log, self.on_line, on_history=self.on_history))
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
            healthy = "health check passed"
            if self.rules.load:
                if await self._wait_load_line(run, started):
                    self._log.info("model.load_line_seen", after_s=round(trio.current_time() - started, 3))
                else:
                    healthy = f"health check passed; no load line within {self.settings.load_line_grace:g}s"
            await self._probe_until_healthy(run)
            if not self.machine.try_to(State.WARMING, healthy):
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

    async def _wait_load_line(self, run: Run, started: float) -> bool:
        """True once the load line is seen; False when, `load_line_grace` after `started`, the
        health path answers 200 while the line is still missing (then warn: readiness rests on
        HTTP, and a server that prints no such line, or another one, must not stay `loading`)."""
        grace = self.settings.load_line_grace
        if not grace:
            await run.load_seen.wait()
            return True
        async with trio.open_nursery() as nursery:

            async def line() -> None:
                await run.load_seen.wait()
                nursery.cancel_scope.cancel()

            async def healthy_without_it() -> None:
                await trio.sleep_until(started + grace)
                await self._probe_until_healthy(run)
                if not run.load_seen.is_set():
                    self._log.warning(
                        "model.load_line_missing", patterns=[p.source for p in self.rules.load], grace_s=grace,
                        why="the health path answers 200 but no line matched the load pattern: going on without it "
                            "(set MODEL_LOAD_LOG_MSG to what this server prints when it has loaded)",
                    )
                nursery.cancel_scope.cancel()

            nursery.start_soon(line)
            nursery.start_soon(healthy_without_it)
        return run.load_seen.is_set()

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
        busy_logged = False
        while True:
            await trio.sleep(self.settings.health_interval)
            asked = trio.current_time()
            result = await self.health.sample()
            now = trio.current_time()
            if result.ok:
                failures, unhealthy_since, busy_logged = 0, None, False
                if self.machine.state is State.UNHEALTHY:
                    self.machine.try_to(State.READY, "health check passes again")
                continue
            if (result.timed_out and self._answering_since is not None
                    and self._answering_since(asked - BUSY_WINDOW)):
                # Seen with vLLM on the CPU: under load its /health took 7 s (HEALTH_TIMEOUT is 5 s)
                # while it streamed tokens to every client. Three such checks made it `unhealthy` and
                # refused traffic it was serving. A server answering requests is alive; only one that
                # is silent on every front fails its checks.
                if not busy_logged:
                    self._log.info("health.slow_while_serving", error=result.error)
                    busy_logged = True
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
