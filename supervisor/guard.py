"""Nothing outlives shepherd: a small watchdog process that kills the model tree if shepherd dies.

When shepherd is killed with SIGKILL (the OOM killer) it cannot stop the model server, whose tree then
runs on with the GPU memory. `PR_SET_PDEATHSIG` does not cover it here: the "parent" it watches is
the *thread* that forked the child, and trio forks from a worker thread that its thread cache ends
after 10 s idle, which would kill a healthy server. So shepherd starts this watchdog once, in a session
of its own, and writes `+PID` / `-PID` lines to its stdin as model servers start and stop. The
watchdog only reads: when stdin reaches EOF (shepherd is gone, however it died), it kills every tree
still registered (the root, its descendants, and whatever shares its session or process group, as
workers that left the tree do) with SIGKILL, and exits. A clean shepherd has forgotten every pid by
then, so its exit kills nothing.

`OrphanGuard` is shepherd's side (never raising: a guard that cannot start or dies is logged, and
shepherd runs on without it); `main` is the watchdog (`python -m supervisor.guard`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from supervisor.logs import get_logger


class OrphanGuard:
    def __init__(self) -> None:
        self._process: trio.Process | None = None
        self._fd: int | None = None
        self._log = get_logger("supervisor.guard")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        try:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "supervisor.guard"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                start_new_session=True,  # a signal to shepherd's group must not take the watchdog with it
            )
        except OSError as exc:
            self._log.warning("guard.unavailable", error=str(exc), why="a SIGKILL of shepherd would leave the model running")
            return
        assert isinstance(self._process.stdin, trio.lowlevel.FdStream)
        self._fd = self._process.stdin.fileno()

    def track(self, pid: int) -> None:
        self._send(f"+{pid}\n")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}\n")

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line.encode())  # a few bytes into a pipe the watchdog keeps empty
        except OSError as exc:  # it died (EPIPE) or stalls (EAGAIN): shepherd runs on without it
            self._log.warning("guard.lost", error=str(exc))
            self._fd = None

    async def aclose(self) -> None:
        """EOF to the watchdog; it kills what is still registered (nothing, after a clean stop) and exits."""
        if self._process is None:
            return
        if self._process.stdin is not None:
            await self._process.stdin.aclose()
        self._fd = None
        with trio.move_on_after(5):
            await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()


def _kill_tree(root: int) -> None:
    import psutil

    victims: set[int] = {root}
    try:
        victims.update(p.pid for p in psutil.Process(root).children(recursive=True))
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == root or os.getpgid(proc.pid) == root:
                victims.add(proc.pid)
        except OSError:
            continue
    victims.discard(os.getpid())
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for shepherd's terminal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends when shepherd does, not before
    tracked: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if line[:1] in (b"+", b"-") and line[1:].isdigit():
            (tracked.add if line[:1] == b"+" else tracked.discard)(int(line[1:]))
    for root in tracked:
        _kill_tree(root)


if __name__ == "__main__":
    main()
