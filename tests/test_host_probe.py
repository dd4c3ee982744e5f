"""The host probe against the real machine and a real process tree (this test process and a child)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from probes.host import HostProbe, cpu_busy_percent


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


async def test_host_numbers_are_plausible(tmp_path: Any) -> None:
    probe = HostProbe(workspace=str(tmp_path))
    first = await probe.sample()
    assert first.cpu_percent is None  # no baseline yet: not a made-up 0
    assert 0 < first.memory_used <= first.memory_total
    assert first.disk_total is not None and first.disk_used is not None
    assert 0 < first.disk_used <= first.disk_total
    assert first.model_tree is None  # no model server
    _burn(0.05)
    second = await probe.sample()
    assert second.cpu_percent is not None and 0.0 <= second.cpu_percent <= 100.0


async def test_missing_workspace_is_unknown_not_an_error(tmp_path: Any) -> None:
    snapshot = await HostProbe(workspace=str(tmp_path / "not-mounted")).sample()
    assert (snapshot.disk_total, snapshot.disk_used) == (None, None)
    assert snapshot.memory_total > 0


async def test_tree_counts_children_and_measures_cpu_between_samples(sleeper: subprocess.Popen[bytes]) -> None:
    probe = HostProbe(root_pid=os.getpid)
    first = await probe.sample()
    assert first.model_tree is not None
    assert first.model_tree.pids >= 2  # this process and the sleeper
    assert first.model_tree.cpu_percent is None  # every process is new: no baseline
    own_rss = psutil.Process().memory_info().rss
    assert first.model_tree.rss_bytes > own_rss  # the child's memory is added

    _burn(0.3)  # this process is part of the tree: its CPU share must show
    second = await probe.sample()
    assert second.model_tree is not None
    assert second.model_tree.cpu_percent is not None
    assert second.model_tree.cpu_percent > 20.0


async def test_tree_of_the_child_alone_then_gone(sleeper: subprocess.Popen[bytes]) -> None:
    root: list[int | None] = [sleeper.pid]
    probe = HostProbe(root_pid=lambda: root[0])
    tree = (await probe.sample()).model_tree
    assert tree is not None and tree.pids == 1 and tree.rss_bytes > 0

    sleeper.kill()
    sleeper.wait()
    assert (await probe.sample()).model_tree is None  # the model server exited

    root[0] = None
    assert (await probe.sample()).model_tree is None


async def test_a_restarted_root_starts_without_a_cpu_baseline(sleeper: subprocess.Popen[bytes]) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        root = [sleeper.pid]
        probe = HostProbe(root_pid=lambda: root[0])
        await probe.sample()
        assert (await probe.sample()).model_tree.cpu_percent is not None  # type: ignore[union-attr]
        root[0] = other.pid
        assert (await probe.sample()).model_tree.cpu_percent is None  # type: ignore[union-attr]
    finally:
        other.kill()
        other.wait()


async def test_all_work_of_a_sample_runs_in_one_thread_hop() -> None:
    calls: list[str] = []

    async def run_sync(fn: Any, *args: Any) -> Any:
        calls.append(fn.__name__)
        return fn(*args)

    await HostProbe(root_pid=os.getpid, run_sync=run_sync).sample()
    assert calls == ["_sample_sync"]


def test_cpu_busy_percent_matches_psutils_definition() -> None:
    fields = psutil.cpu_times()._fields
    zero = dict.fromkeys(fields, 0.0)
    before = type(psutil.cpu_times())(**zero)
    after_values = dict(zero, user=30.0, system=10.0, idle=50.0)
    if "iowait" in fields:
        after_values["iowait"] = 10.0
    if "guest" in fields:
        after_values["guest"] = 5.0  # already counted in user: must not inflate the total
    after = type(psutil.cpu_times())(**after_values)
    expected = 40.0 if "iowait" in fields else 40.0 / 90.0 * 100.0
    assert cpu_busy_percent(before, after) == pytest.approx(expected)
    assert cpu_busy_percent(after, after) is None
