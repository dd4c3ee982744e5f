"""The lifecycle (issue 9): a model server's exit ends its run at once, without waiting for pipes its
workers hold open, while a fatal line printed just before the exit still wins; the exit's reason
quotes the last stderr lines (bounded, redacted); late output of a stopped server reaches its own run
only; and a load line that never comes does not hold a healthy server in `loading` for good.

Exits are tested on real processes. Their pipes are held open the way a model server's workers hold
them, by opening `/proc/PID/fd/2` for writing from the test: the test decides when EOF may come.
Readiness timing runs on a MockClock with fake health probes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

import supervisor.lifecycle as lifecycle_module
from probes.health import HealthResult
from supervisor.lifecycle import Lifecycle, LifecycleSettings, Run
from supervisor.process import STDERR_TAIL_CHARS, STDERR_TAIL_LINES
from supervisor.redact import REDACTED, Redactor
from supervisor.restart import BackoffSettings, RestartPolicy
from supervisor.rules import LogRules
from supervisor.states import State, StateMachine, Transition

SECRET = "sk-live-4f9a8b7c6d5e"
LOAD_LINE = "model loaded, serving"


class NeverHealthy:
    async def sample(self) -> HealthResult:
        return HealthResult(False, None, "connection refused")


class HealthyFrom:
    """Answers 200 from `at` on (trio's clock)."""

    def __init__(self, at: float) -> None:
        self.at = at

    async def sample(self) -> HealthResult:
        if trio.current_time() >= self.at:
            return HealthResult(True, 200, "")
        return HealthResult(False, None, "connection refused")


def make_lifecycle(
    machine: StateMachine, command: tuple[str, ...] = ("true",), *, health: object = None, max_failures: int = 5,
    load: tuple[str, ...] = (), load_line_grace: float = 30.0,
) -> Lifecycle:
    settings = LifecycleSettings(
        command=command, model_log=None, env=None, stop_timeout=5.0, load_timeout=0.0, health_interval=1.0,
        unhealthy_timeout=0.0, load_line_grace=load_line_grace,
    )
    policy = RestartPolicy(BackoffSettings(initial=0.01, maximum=0.01, jitter=0.0, max_failures=max_failures))
    rules = LogRules.build(load=load, error=("demo: model error",), fatal=("demo: fatal model error",))
    return Lifecycle(settings, machine, policy, rules, health or NeverHealthy())  # type: ignore[arg-type]


def recording(machine: StateMachine) -> list[Transition]:
    heard: list[Transition] = []
    machine.subscribe(heard.append)
    return heard


async def wait_for(predicate: Callable[[], object], what: str) -> None:
    """Poll a condition on trio's clock (real time here); the test's fail_after bounds it."""
    while not predicate():
        await trio.sleep(0.01)


async def model_pid(lifecycle: Lifecycle) -> int:
    """The pid of the first server, once it runs."""
    await wait_for(lambda: lifecycle.model is not None, "the server")
    assert lifecycle.model is not None
    return lifecycle.model.pid


@contextmanager
def held_stderr(pid: int) -> Iterator[int]:
    """A write end of the process's stderr pipe, held by the test: no EOF while it is open."""
    fd = os.open(f"/proc/{pid}/fd/2", os.O_WRONLY)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def endless_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipes of a stopped server are read as long as they stay open: the exit must not wait for them."""
    monkeypatch.setattr(lifecycle_module, "PIPE_DRAIN_TIMEOUT", 3600.0)


def child(tmp_path: Path, body: str) -> tuple[str, ...]:
    """A python child running `body`; `GO` is a file the test creates to let it go on."""
    prelude = f"import os, sys, time, pathlib\nGO = pathlib.Path({str(tmp_path / 'go')!r})\n"
    return (sys.executable, "-c", prelude + body)


WAIT_GO = "while not GO.exists(): time.sleep(0.01)\n"


# -- the exit


async def test_the_exit_ends_the_run_while_workers_still_hold_the_pipes(tmp_path: Path, endless_drain: None) -> None:
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    command = child(tmp_path, WAIT_GO + "sys.exit(3)\n")
    lifecycle = make_lifecycle(machine, command, max_failures=1)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def supervise() -> None:
                result.append(await lifecycle.supervise())

            nursery.start_soon(supervise)
            pid = await model_pid(lifecycle)
            with held_stderr(pid):
                (tmp_path / "go").touch()
                await wait_for(lambda: machine.state is State.FAILED, "failed")
                # the pipe is still open (the test holds it): the exit alone ended the run
                assert result == []
            # EOF now: the background reader ends, and with it supervise()
    assert result == [1]
    assert [t.to for t in heard] == [State.LOADING, State.FAILED]
    assert "model server exited with code 3" in heard[-1].reason


async def test_a_fatal_line_just_before_the_exit_wins_over_the_exit(tmp_path: Path, endless_drain: None) -> None:
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    command = child(tmp_path, WAIT_GO + "sys.stderr.write('demo: fatal model error: ShardCannotStart\\n')\nos._exit(1)\n")
    lifecycle = make_lifecycle(machine, command, max_failures=5)  # a plain exit would be a restart
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifecycle.supervise)
            pid = await model_pid(lifecycle)
            with held_stderr(pid):
                (tmp_path / "go").touch()
                await wait_for(lambda: machine.state is State.FAILED, "failed")
    assert [t.to for t in heard] == [State.LOADING, State.FAILED]  # no restart at all
    assert heard[-1].reason == "fatal line: demo: fatal model error: ShardCannotStart"


async def test_a_fatal_reason_quotes_the_cause_printed_after_the_line(tmp_path: Path) -> None:
    """vLLM 0.32: `ValidationError: 1 validation error for ModelConfig`, then the cause, then exit 1."""
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    body = ("sys.stderr.write('noise before\\n')\n"
            "sys.stderr.write('demo: fatal model error: 1 validation error for ModelConfig\\n')\n"
            "sys.stderr.write('  Value error, max_model_len is greater than the model allows\\n')\n"
            "sys.stderr.flush()\nos._exit(1)\n")
    lifecycle = make_lifecycle(machine, child(tmp_path, body), max_failures=5)
    with trio.fail_after(30):
        assert await lifecycle.supervise() == 1
    assert [t.to for t in heard] == [State.LOADING, State.FAILED]
    assert heard[-1].reason == (
        "fatal line: demo: fatal model error: 1 validation error for ModelConfig | "
        "  Value error, max_model_len is greater than the model allows"
    )


async def test_late_output_of_a_stopped_server_reaches_its_own_run_only(tmp_path: Path, endless_drain: None) -> None:
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    # The first run exits when told; the next one just runs (it never gets healthy here).
    body = (
        "first = not pathlib.Path(sys.argv[1]).exists()\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "if first:\n    " + WAIT_GO.strip() + "\n    sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    command = (*child(tmp_path, body), str(tmp_path / "ran"))
    lifecycle = make_lifecycle(machine, command)
    late = "demo: model error: printed by a worker of the stopped server"
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifecycle.supervise)
            first = await model_pid(lifecycle)
            with held_stderr(first) as fd:
                (tmp_path / "go").touch()
                await wait_for(lambda: lifecycle.model is not None and lifecycle.model.pid != first, "the next run")
                second = lifecycle.model.pid
                await wait_for(lambda: machine.state is State.LOADING, "the second run loading")
                os.write(fd, f"{late}\n".encode())
                await wait_for(lambda: any(e.get("line") == late for e in logs), "the late line read")
            # read (in the background, after its server was stopped), and given to the first run only
            [event] = [e for e in logs if e.get("line") == late]
            assert event["pid"] == first
            assert machine.state is State.LOADING and lifecycle.model is not None and lifecycle.model.pid == second
            lifecycle.request_stop()
    assert [t.to for t in heard] == [State.LOADING, State.RESTARTING, State.STARTING, State.LOADING]


async def test_no_pid_is_left_to_the_reaper_while_a_spawn_is_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine = StateMachine(trio.current_time)
    lifecycle = make_lifecycle(machine, child(tmp_path, "sys.exit(6)\n"), max_failures=1)
    seen: list[set[int] | None] = []
    real_spawn = lifecycle_module.spawn

    async def spawn(*args: object) -> object:
        seen.append(lifecycle.owned())
        model = await real_spawn(*args)  # type: ignore[arg-type]
        seen.append(lifecycle.owned())
        return model

    monkeypatch.setattr(lifecycle_module, "spawn", spawn)
    assert lifecycle.owned() == set()
    with trio.fail_after(30):
        assert await lifecycle.supervise() == 1
    assert seen == [None, None]  # during the spawn: the reaper takes nothing
    assert machine.reason.endswith("model server exited with code 6")
    assert lifecycle.owned() == set()


async def test_a_server_ending_while_shepherd_drains_is_not_restarted(tmp_path: Path) -> None:
    # The exit is announced as soon as it happens now, and `draining -> restarting` is no transition:
    # it ends supervision quietly (it raised TransitionError); a SIGHUP then is ignored.
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    lifecycle = make_lifecycle(machine, child(tmp_path, WAIT_GO + "sys.exit(9)\n"))
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def supervise() -> None:
                result.append(await lifecycle.supervise())

            nursery.start_soon(supervise)
            await model_pid(lifecycle)
            machine.to(State.DRAINING, "SIGTERM received")
            lifecycle.request_restart("SIGHUP received")
            (tmp_path / "go").touch()
    assert result == [0]
    assert [t.to for t in heard] == [State.LOADING, State.DRAINING]
    [stopped] = [e for e in logs if e["event"] == "model.stopped"]
    assert stopped["outcome"] == "exited" and stopped["exit_code"] == 9  # not stopped for the SIGHUP
    assert [e["why"] for e in logs if e["event"] == "restart.ignored"] == [
        "draining: requests in flight still need the server"]


# -- the exit's reason


async def test_the_exit_reason_quotes_the_last_stderr_lines_redacted(tmp_path: Path) -> None:
    machine = StateMachine(trio.current_time, redact=Redactor([SECRET]).redact)
    heard = recording(machine)
    lines = [f"stderr line {i}" for i in range(8)] + [f"ValueError: cannot open model (key {SECRET})"]
    body = "print('stdout is not quoted', flush=True)\n" + "".join(
        f"sys.stderr.write({line + chr(10)!r})\n" for line in lines) + "sys.exit(1)\n"
    lifecycle = make_lifecycle(machine, child(tmp_path, body), max_failures=1)
    with trio.fail_after(30):
        assert await lifecycle.supervise() == 1
    failed = heard[-1]
    assert failed.to is State.FAILED
    tail = " | ".join(lines[-STDERR_TAIL_LINES:])
    assert failed.reason == machine.redact(
        f"gave up after 1 failures without reaching ready; last: model server exited with code 1; last stderr: {tail}"
    )
    for text in (failed.reason, machine.reason, lifecycle.last_error):
        assert SECRET not in text and REDACTED in text
        assert "stderr line 3" not in text and "stdout" not in text
    assert lifecycle.last_error.startswith("model server exited with code 1; last stderr: stderr line 4 | ")


async def test_the_quoted_stderr_is_bounded_and_keeps_the_end(tmp_path: Path) -> None:
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    body = "".join(f"sys.stderr.write({(str(i) * 600) + chr(10)!r})\n" for i in range(5)) + "sys.exit(2)\n"
    lifecycle = make_lifecycle(machine, child(tmp_path, body), max_failures=1)
    with trio.fail_after(30):
        assert await lifecycle.supervise() == 1
    quoted = heard[-1].reason.split("; last stderr: ", 1)[1]
    assert len(quoted) == STDERR_TAIL_CHARS
    assert quoted.startswith("…") and quoted.endswith("4" * 600)


async def test_an_exit_with_nothing_on_stderr_says_only_the_code(tmp_path: Path) -> None:
    machine = StateMachine(trio.current_time)
    heard = recording(machine)
    lifecycle = make_lifecycle(machine, child(tmp_path, "print('bye', flush=True)\nsys.exit(4)\n"), max_failures=1)
    with trio.fail_after(30):
        assert await lifecycle.supervise() == 1
    assert heard[-1].reason.endswith("last: model server exited with code 4")


# -- a load line that never comes (MockClock; `_readiness` is the piece that decides)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def readiness(lifecycle: Lifecycle, until: float, line_at: float | None = None) -> list[Transition]:
    """Run the readiness of one run (in `loading`) until trio time `until`; print the load line at
    `line_at`. Returns the transitions."""
    heard = recording(lifecycle.machine)
    run = lifecycle._run = Run.new()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lifecycle._readiness, run, True)
        if line_at is not None:
            await trio.sleep_until(line_at)
            lifecycle.on_line("stdout", f"demo: {LOAD_LINE} on http://127.0.0.1:5001")
        await trio.sleep_until(until)
        nursery.cancel_scope.cancel()
    return heard


def loading() -> StateMachine:
    return StateMachine(trio.current_time, initial=State.LOADING)


async def test_a_healthy_server_without_its_load_line_goes_on_after_the_grace(clock: trio.testing.MockClock) -> None:
    lifecycle = make_lifecycle(loading(), health=HealthyFrom(2.0), load=(LOAD_LINE,), load_line_grace=10.0)
    with structlog.testing.capture_logs() as logs:
        heard = await readiness(lifecycle, until=100.0)
    assert [(t.to, t.at) for t in heard] == [(State.WARMING, 10.0), (State.READY, 10.0)]
    assert heard[0].reason == "health check passed; no load line within 10s"
    [warning] = [e for e in logs if e["event"] == "model.load_line_missing"]
    assert warning["log_level"] == "warning" and warning["patterns"] == [LOAD_LINE] and warning["grace_s"] == 10.0


async def test_the_load_line_within_the_grace_is_waited_for(clock: trio.testing.MockClock) -> None:
    lifecycle = make_lifecycle(loading(), health=HealthyFrom(2.0), load=(LOAD_LINE,), load_line_grace=10.0)
    with structlog.testing.capture_logs() as logs:
        heard = await readiness(lifecycle, until=100.0, line_at=3.0)
    assert [(t.to, t.at) for t in heard] == [(State.WARMING, 3.0), (State.READY, 3.0)]
    assert heard[0].reason == "health check passed"
    assert [e for e in logs if e["event"] == "model.load_line_missing"] == []


async def test_past_the_grace_health_still_decides(clock: trio.testing.MockClock) -> None:
    # Healthy only at 25 s: no line, and no going on before HTTP says so.
    lifecycle = make_lifecycle(loading(), health=HealthyFrom(25.0), load=(LOAD_LINE,), load_line_grace=10.0)
    heard = await readiness(lifecycle, until=100.0)
    assert heard[0].to is State.WARMING and 25.0 <= heard[0].at <= 26.0  # probes back off to 1 s


async def test_an_unhealthy_server_without_its_load_line_stays_loading(clock: trio.testing.MockClock) -> None:
    lifecycle = make_lifecycle(loading(), health=NeverHealthy(), load=(LOAD_LINE,), load_line_grace=10.0)
    assert await readiness(lifecycle, until=1000.0) == []
    assert lifecycle.machine.state is State.LOADING


async def test_a_grace_of_0_waits_for_the_load_line_for_good(clock: trio.testing.MockClock) -> None:
    lifecycle = make_lifecycle(loading(), health=HealthyFrom(0.0), load=(LOAD_LINE,), load_line_grace=0.0)
    assert await readiness(lifecycle, until=1000.0) == []
    heard = await readiness(lifecycle, until=1001.0, line_at=1000.5)
    assert [t.to for t in heard] == [State.WARMING, State.READY]


# -- a busy server's slow health check (MockClock)


class TimesOut:
    async def sample(self) -> HealthResult:
        await trio.sleep(5.0)  # HEALTH_TIMEOUT
        return HealthResult(False, None, "timed out", timed_out=True)


@pytest.mark.parametrize("answered_ago", [None, 1.0, lifecycle_module.BUSY_WINDOW + 10.0])
async def test_a_health_check_timing_out_while_the_server_answers_requests_is_not_ill_health(
    clock: trio.testing.MockClock, answered_ago: float | None
) -> None:
    """vLLM on the CPU took 7 s to answer /health under load while it served every client: busy, not
    ill. A server silent on every front (no answer to anyone within BUSY_WINDOW) is unhealthy after
    three timed-out checks, as before."""
    def answering_since(since: float) -> bool:
        return answered_ago is not None and trio.current_time() - answered_ago >= since

    machine = StateMachine(trio.current_time, initial=State.READY)
    heard = recording(machine)
    lifecycle = make_lifecycle(machine, health=TimesOut())
    lifecycle._answering_since = answering_since
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifecycle._monitor, Run.new(), True)
            await trio.sleep(100.0)
            nursery.cancel_scope.cancel()
    if answered_ago is not None and answered_ago < lifecycle_module.BUSY_WINDOW:
        assert heard == [] and machine.state is State.READY
        assert [e["event"] for e in logs].count("health.slow_while_serving") == 1  # once, not per check
    else:
        assert [t.to for t in heard] == [State.UNHEALTHY] and "3 health checks failed" in heard[0].reason
