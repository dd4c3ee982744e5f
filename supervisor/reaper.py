"""Orphan reaping: shepherd as PID 1, or as a child subreaper when something else is PID 1.

Orphans of the model's tree are re-parented to us and must be waited for, or they stay zombies.
A global `waitpid(-1)` would also reap the model process that trio is waiting on, and trio would then
report exit code 0 for a crash; so the reaper lists our children, and reaps only zombies whose pid
trio does not own. While the model server is being spawned its pid is not known yet (trio runs
`Popen` in a thread, and a server that fails at once is a zombie before `spawn` returns): `owned()`
is None then, and nothing is reaped until the next sweep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable

import psutil
import trio

from supervisor.logs import get_logger

PR_SET_CHILD_SUBREAPER = 36
SWEEP_INTERVAL = 5.0  # seconds; SIGCHLD wakes the reaper sooner


def become_subreaper() -> bool:
    """Ask Linux to re-parent our orphaned descendants to us. True when it worked (or we are PID 1)."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def zombie_children() -> list[int]:
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return []
    zombies = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return zombies


class Reaper:
    """Reaps zombie children that are not trio's. `owned()` returns the pids trio is waiting on, or
    None while one of them may be unknown (a spawn under way)."""

    def __init__(self, owned: Callable[[], set[int] | None]) -> None:
        self._owned = owned
        self.reaped: list[int] = []
        self._log = get_logger("supervisor.reaper")

    def reap_once(self, zombies: list[int]) -> list[int]:
        owned = self._owned()  # read on the trio thread, after the snapshot: a fresh spawn is safe
        if owned is None:
            return []  # a spawn is under way: any zombie may be trio's own new child
        reaped = []
        for pid in zombies:
            if pid in owned:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                reaped.append(pid)
                self._log.info("reaper.reaped", pid=pid, exit_code=os.waitstatus_to_exitcode(status))
        self.reaped.extend(reaped)
        del self.reaped[:-1000]
        return reaped

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            while True:
                zombies = await trio.to_thread.run_sync(zombie_children)
                self.reap_once(zombies)
                with trio.move_on_after(SWEEP_INTERVAL):
                    await signals.__anext__()
