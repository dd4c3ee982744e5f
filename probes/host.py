"""The host and the model server's process tree, read with psutil.

This module owns how CPU shares are measured between two samples: the host's from `/proc/stat`
totals kept by the probe (psutil's module-level `cpu_percent(None)` baseline would be shared with any
other caller in the process), and the tree's from `psutil.Process` objects kept between samples (a
fresh Process has no baseline, so its first `cpu_percent(None)` means nothing). All psutil work of one
sample runs in a single `run_sync` call, off the event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psutil
import trio

RunSync = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class TreeUsage:
    pids: int  # processes in the tree, the root included
    cpu_percent: float | None  # summed over the tree (100 = one core); None on the first sample
    rss_bytes: int


@dataclass(frozen=True)
class HostSnapshot:
    cpu_percent: float | None  # whole host, 0..100; None on the first sample
    memory_total: int
    memory_used: int  # total - available: what the page cache cannot give back
    disk_total: int | None  # the workspace volume; None if it cannot be read
    disk_used: int | None
    model_tree: TreeUsage | None  # None when no model server runs (or it just exited)


def cpu_busy_percent(before: Any, after: Any) -> float | None:
    """Busy share of all CPUs between two `psutil.cpu_times()` readings, as psutil computes it:
    idle and iowait are idle; guest time is already inside user time on Linux, so it is not added."""

    def totals(t: Any) -> tuple[float, float]:
        fields = t._asdict()
        total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
        idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
        return total, total - idle

    total_before, busy_before = totals(before)
    total_after, busy_after = totals(after)
    elapsed = total_after - total_before
    if elapsed <= 0.0:
        return None
    return min(max((busy_after - busy_before) / elapsed * 100.0, 0.0), 100.0)


class HostProbe:
    """CPU, memory, the workspace disk, and the model server tree rooted at `root_pid()`.

    `root_pid` is called in the worker thread; it must only read (e.g. an attribute holding the pid).
    """

    def __init__(
        self,
        workspace: str = "/",
        root_pid: Callable[[], int | None] = lambda: None,
        run_sync: RunSync = trio.to_thread.run_sync,
    ) -> None:
        self._workspace = workspace
        self._root_pid = root_pid
        self._run_sync = run_sync
        self._cpu_times: Any = None
        self._procs: dict[int, psutil.Process] = {}

    async def sample(self) -> HostSnapshot:
        result: HostSnapshot = await self._run_sync(self._sample_sync)
        return result

    def _sample_sync(self) -> HostSnapshot:
        times = psutil.cpu_times()
        cpu = cpu_busy_percent(self._cpu_times, times) if self._cpu_times is not None else None
        self._cpu_times = times
        memory = psutil.virtual_memory()
        disk_total: int | None = None
        disk_used: int | None = None
        try:
            disk = psutil.disk_usage(self._workspace)
            disk_total, disk_used = int(disk.total), int(disk.used)
        except OSError:
            pass  # the volume is not mounted (yet): report it as unknown, keep the rest
        return HostSnapshot(
            cpu_percent=cpu,
            memory_total=int(memory.total),
            memory_used=int(memory.total - memory.available),
            disk_total=disk_total,
            disk_used=disk_used,
            model_tree=self._tree(),
        )

    def _tree(self) -> TreeUsage | None:
        pid = self._root_pid()
        if pid is None:
            self._procs.clear()
            return None
        root = self._known(pid)
        if root is None:
            self._procs.clear()
            return None
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            self._procs.clear()
            return None

        kept: dict[int, psutil.Process] = {}
        cpu_total = 0.0
        measured = False
        rss = 0
        for fresh in members:
            proc = self._procs.get(fresh.pid)
            # psutil compares create times: a reused pid is a new process with no CPU baseline.
            had_baseline = proc is not None and proc == fresh
            if not had_baseline:
                proc = fresh
            assert proc is not None
            try:
                with proc.oneshot():
                    cpu = proc.cpu_percent(None)
                    rss += int(proc.memory_info().rss)
            except psutil.Error:
                continue  # exited between the listing and the reading, or not ours to read
            kept[proc.pid] = proc
            if had_baseline:
                cpu_total += cpu
                measured = True
        self._procs = kept
        if root.pid not in kept:
            return None
        return TreeUsage(pids=len(kept), cpu_percent=cpu_total if measured else None, rss_bytes=rss)

    def _known(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    return proc
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None
