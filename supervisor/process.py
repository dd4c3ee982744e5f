"""One run of the model server as a real child process: spawn, read its output, stop its whole tree.

The child starts in its own session (its own process group), so a signal to the group reaches the
server and the workers that stayed in it. Model servers also start workers in groups of their own
(TGI's shards, vLLM's EngineCore) that survive a kill of the group and keep the GPU memory, so the
tree is tracked with psutil while the server runs and everything still alive from it is killed
after the grace period, or at once when the main process is already gone.

Output: each pipe has a `PipeReader` that turns it into lines for a sink, and keeps the last few
stderr lines (`ModelProcess.stderr_tail`: often the only word on why a server died). Workers that
inherited the pipes can hold them open long after the server itself is gone, so the exit is never
made to wait for EOF: `PipeReader.read_available` takes what the pipe holds at the moment of the
exit (all the dead process wrote is there by then), and `run` goes on reading to EOF in the
background.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import trio

from supervisor.lines import LineSplitter
from supervisor.logs import get_logger

RunSync = Callable[..., Awaitable[Any]]
LineSink = Callable[[str, str], None]  # (stream name, line)

READ_CHUNK = 64 * 1024
# What `read_available` takes at most in one go: the largest pipe a process may make without
# privileges (/proc/sys/fs/pipe-max-size), so all the dead server wrote fits, and workers that
# keep writing into the pipe cannot hold the event loop for longer than that.
READ_AVAILABLE_MAX = 1024 * 1024
TRACK_INTERVAL = 1.0  # seconds between snapshots of the model's process tree
STDERR_TAIL_LINES = 5  # stderr lines kept for the exit reason
STDERR_TAIL_CHARS = 1024  # ... and at most this much of them, the latest kept


@dataclass
class ModelProcess:
    """The running server: trio's process plus every descendant seen so far (pid -> psutil.Process)."""

    process: trio.Process
    tracked: dict[int, psutil.Process] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))

    @property
    def pid(self) -> int:
        return self.process.pid

    def last_stderr(self, max_chars: int = STDERR_TAIL_CHARS, redact: Callable[[str], str] | None = None) -> str:
        """The last stderr lines, joined with " | ", at most `max_chars` (the latest text is kept:
        the end of a traceback says more than its start). "" when it printed nothing there.
        `redact` masks each line before the text is cut: a secret cut in two is no longer
        recognisable as one."""
        lines = self.stderr_tail if redact is None else [redact(line) for line in self.stderr_tail]
        text = " | ".join(lines)
        if len(text) > max_chars:
            text = "…" + text[len(text) - max_chars + 1:]
        return text


async def spawn(command: Sequence[str], env: Mapping[str, str] | None = None) -> ModelProcess:
    """Start the command in a new session with both output pipes; stdin is closed."""
    process = await trio.lowlevel.open_process(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(env) if env is not None else None,
    )
    model = ModelProcess(process)
    try:
        model.tracked[process.pid] = psutil.Process(process.pid)
    except psutil.Error:
        pass  # already gone; the exit code will tell
    return model


def pipe_readers(model: ModelProcess, sink: LineSink) -> tuple[PipeReader, PipeReader]:
    """The readers of a process started by `spawn`: its stdout and its stderr, into one sink."""
    process = model.process
    assert isinstance(process.stdout, trio.lowlevel.FdStream)
    assert isinstance(process.stderr, trio.lowlevel.FdStream)
    return PipeReader(process.stdout, "stdout", model, sink), PipeReader(process.stderr, "stderr", model, sink)


class PipeReader:
    """One output pipe of the model server, read line by line into `sink`.

    It reads the pipe's descriptor itself (trio's stream is non-blocking already) so that taking
    what is there now (`read_available`, synchronous) and waiting for more (`run`) share one line
    splitter: a line is never split between the two, nor delivered twice. Reading never waits on
    the sink's consumers, so a chatty child is never stalled by a full pipe."""

    def __init__(self, stream: trio.lowlevel.FdStream, name: str, model: ModelProcess, sink: LineSink) -> None:
        self.name = name
        self.eof = False
        self._stream = stream  # owns the descriptor: kept so that it stays open while we read it
        self._fd = stream.fileno()
        self._model = model
        self._sink = sink
        self._splitter = LineSplitter()

    async def run(self) -> None:
        """Read to EOF (a cancelled reader just stops: what was read is delivered)."""
        while not self.eof:
            chunk = self._read()
            if chunk is None:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            self._deliver(chunk)
            await trio.lowlevel.checkpoint()  # a flood must not starve the other tasks

    def read_available(self, limit: int = READ_AVAILABLE_MAX) -> None:
        """Deliver what the pipe holds right now, without waiting (up to `limit` bytes)."""
        taken = 0
        while not self.eof and taken < limit:
            chunk = self._read()
            if chunk is None:
                return
            self._deliver(chunk)
            taken += len(chunk)

    def _read(self) -> bytes | None:
        """A chunk, b"" at EOF, None when the pipe is empty but open."""
        try:
            return os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EBADF:  # closed under us: nothing more will come
                return b""
            raise

    def _deliver(self, chunk: bytes) -> None:
        if chunk:
            lines = self._splitter.feed(chunk)
        else:
            self.eof = True
            lines = self._splitter.flush()
        for line in lines:
            self._model.lines[self.name] += 1
            if self.name == "stderr":
                self._model.stderr_tail.append(line)
            self._sink(self.name, line)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _refresh(model: ModelProcess) -> None:
    for proc in _descendants(model.pid):
        model.tracked.setdefault(proc.pid, proc)


async def track(model: ModelProcess, run_sync: RunSync = trio.to_thread.run_sync) -> None:
    """Keep the tree snapshot current while the server runs (its workers appear during loading)."""
    while model.process.returncode is None:
        await run_sync(_refresh, model)
        await trio.sleep(TRACK_INTERVAL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_survivors(procs: list[psutil.Process], pgid: int) -> list[dict[str, Any]]:
    """SIGKILL the group and every tracked process still alive; wait until they are gone."""
    _signal_group(pgid, signal.SIGKILL)
    killed: list[dict[str, Any]] = []
    for proc in procs:
        if not _alive(proc):
            continue
        try:
            killed.append({"pid": proc.pid, "name": proc.name()})
            proc.kill()  # psutil checks the create time first, so a reused pid is never hit
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5.0)
    return killed


def _name(proc: psutil.Process | None) -> str:
    try:
        return proc.name() if proc else "?"
    except psutil.Error:
        return "?"


def _leftovers(procs: list[psutil.Process]) -> list[int]:
    return [p.pid for p in procs if _alive(p)]


@dataclass(frozen=True)
class StopResult:
    exit_code: int | None
    graceful: bool  # the main process exited within the grace period
    killed: list[dict[str, Any]]
    left: list[int]  # pids that survived even SIGKILL (should be empty; logged loudly if not)


async def stop_tree(
    model: ModelProcess,
    grace: float,
    run_sync: RunSync = trio.to_thread.run_sync,
    extra: Callable[[], list[psutil.Process]] = list,
) -> StopResult:
    """SIGTERM the process group, wait up to `grace` for the main process, then SIGKILL what is left
    of the tree (group, tracked descendants in other groups, and `extra()`: orphans adopted by us)."""
    log = get_logger("supervisor.process")
    process = model.process
    await run_sync(_refresh, model)
    graceful = True
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            graceful = False
            log.warning("stop.grace_expired", pid=process.pid, grace_s=grace)
    await run_sync(_refresh, model)
    candidates = [p for p in model.tracked.values() if p.pid != process.pid] + list(extra())
    if process.returncode is None:
        process.kill()  # through trio: psutil must never wait on (and so reap) trio's own child
    killed = await run_sync(_kill_survivors, candidates, process.pid)
    if not graceful:
        killed.insert(0, {"pid": process.pid, "name": _name(model.tracked.get(process.pid))})
    if process.returncode is None:
        with trio.move_on_after(5.0):
            await process.wait()
    left = await run_sync(_leftovers, candidates)
    if killed:
        log.warning("stop.killed", processes=killed)
    if left:
        log.error("stop.left_behind", pids=left)
    return StopResult(process.returncode, graceful, killed, left)
