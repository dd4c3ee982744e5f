"""Tests for supervisor.reaper: never reap a pid trio owns (nor anything while a spawn is under way); reap
(and log) the other zombie children."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest
from structlog.testing import capture_logs

from supervisor.reaper import Reaper, zombie_children


def start_exiting_child(code: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", f"exit {code}"])


def wait_for_zombie(pid: int, timeout: float = 5.0) -> None:
    """Poll until the child has exited but not been waited for (a condition, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.005)
    pytest.fail(f"child {pid} did not become a zombie within {timeout} s")


def test_owned_zombie_is_never_reaped() -> None:
    child = start_exiting_child(3)
    try:
        wait_for_zombie(child.pid)
        assert child.pid in zombie_children()
        reaper = Reaper(owned=lambda: {child.pid})
        assert reaper.reap_once([child.pid]) == []
        assert reaper.reaped == []
        # Still there for its real owner, with its real exit code (a stolen wait would give 0).
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        assert child.wait(timeout=5) == 3
    finally:
        child.poll()


def test_owned_is_read_at_reap_time() -> None:
    child = start_exiting_child(4)
    owned: set[int] = set()
    try:
        wait_for_zombie(child.pid)
        owned.add(child.pid)  # e.g. trio spawned it after the zombie snapshot was taken
        assert Reaper(owned=lambda: owned).reap_once([child.pid]) == []
        assert child.wait(timeout=5) == 4
    finally:
        child.poll()


def test_nothing_is_reaped_while_a_spawn_is_under_way() -> None:
    # Issue 9: a model server that fails at once is a zombie before trio's spawn returns its pid;
    # reaped then, trio read exit code 0 for it ("exited with code 0" for a crash).
    child = start_exiting_child(5)
    try:
        wait_for_zombie(child.pid)
        reaper = Reaper(owned=lambda: None)
        assert reaper.reap_once([child.pid]) == [] and reaper.reaped == []
        assert child.wait(timeout=5) == 5
    finally:
        child.poll()


def test_not_owned_zombie_is_reaped_and_logged() -> None:
    child = start_exiting_child(7)
    try:
        wait_for_zombie(child.pid)
        assert child.pid in zombie_children()
        with capture_logs() as logs:
            reaper = Reaper(owned=set)
            assert reaper.reap_once([child.pid]) == [child.pid]
        assert reaper.reaped == [child.pid]
        assert {"event": "reaper.reaped", "pid": child.pid, "exit_code": 7, "log_level": "info"} in logs
        assert child.pid not in zombie_children()
        assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).ppid() != os.getpid()
    finally:
        child.poll()  # ECHILD: subprocess settles it without waiting


def test_pid_that_is_not_our_child_is_skipped() -> None:
    with capture_logs() as logs:
        reaper = Reaper(owned=set)
        assert reaper.reap_once([1]) == []  # not our child: waitpid says ECHILD
    assert logs == []


def test_running_child_is_not_reaped() -> None:
    child = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE)
    try:
        assert Reaper(owned=set).reap_once([child.pid]) == []  # WNOHANG: still running, left alone
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(timeout=5)


def test_zombie_children_lists_only_zombies() -> None:
    running = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE)
    done = start_exiting_child(0)
    try:
        wait_for_zombie(done.pid)
        zombies = zombie_children()
        assert done.pid in zombies
        assert running.pid not in zombies
    finally:
        running.kill()
        running.wait(timeout=5)
        done.wait(timeout=5)
