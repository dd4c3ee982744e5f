"""Tests for supervisor.process with real, short-lived processes: output pumping (and taking what a dead
process left in a pipe that others still hold open), and stop_tree on a child that ignores SIGTERM and on
one that leaves a grandchild in another session."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import psutil
import trio

from supervisor.process import ModelProcess, PipeReader, spawn, stop_tree


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    """One line from the child's stdout (the child prints it when it is ready)."""
    data = b""
    with trio.fail_after(10):
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            assert chunk, f"child closed stdout early after {data!r}"
            data += chunk
    return data.decode().strip()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_spawn_and_pump_collect_both_streams() -> None:
    model = await spawn(["sh", "-c", 'echo a; echo b >&2; printf "no newline"'])
    got: list[tuple[str, str]] = []
    assert isinstance(model, ModelProcess) and model.pid == model.process.pid
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for name in ("stdout", "stderr"):
                reader = PipeReader(getattr(model.process, name), name, model, lambda s, line: got.append((s, line)))
                nursery.start_soon(reader.run)
        assert await model.process.wait() == 0
    assert [line for s, line in got if s == "stdout"] == ["a", "no newline"]
    assert [line for s, line in got if s == "stderr"] == ["b"]
    assert model.lines == {"stdout": 2, "stderr": 1}


async def test_read_available_takes_what_a_dead_process_wrote_without_waiting_for_eof(tmp_path: Path) -> None:
    go = tmp_path / "go"
    code = (f"import pathlib, sys, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            "sys.stderr.write('one\\ntwo\\nthree')\n")  # the last line unterminated
    model = await spawn([sys.executable, "-c", code])
    assert isinstance(model.process.stderr, trio.lowlevel.FdStream)
    got: list[str] = []
    reader = PipeReader(model.process.stderr, "stderr", model, lambda stream, line: got.append(line))
    # A worker holding the pipe: the test itself, through /proc. No EOF while it is open.
    held = os.open(f"/proc/{model.pid}/fd/2", os.O_WRONLY)
    try:
        go.touch()
        with trio.fail_after(10):
            await model.process.wait()
        reader.read_available()
        assert got == ["one", "two"] and not reader.eof  # an unterminated line waits for its end
        assert list(model.stderr_tail) == ["one", "two"]
    finally:
        os.close(held)
    with trio.fail_after(10):
        await reader.run()  # EOF now
    assert reader.eof and got == ["one", "two", "three"]
    assert model.lines["stderr"] == 3 and model.last_stderr() == "one | two | three"


async def test_spawn_puts_the_child_in_its_own_session() -> None:
    model = await spawn([sys.executable, "-c", "import os; print(os.getsid(0), os.getpgid(0), flush=True)"])
    try:
        sid, pgid = map(int, (await read_line(model.process.stdout)).split())
        assert sid == pgid == model.pid
        assert sid != os.getsid(0)
    finally:
        result = await stop_tree(model, grace=5)
    assert result.left == []


async def test_stop_tree_kills_a_child_that_ignores_sigterm() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(30)"
    )
    model = await spawn([sys.executable, "-c", code])
    try:
        assert await read_line(model.process.stdout) == "ready"  # the handler is in place
        with trio.fail_after(10):
            result = await stop_tree(model, grace=0.5)
        assert result.graceful is False
        assert model.pid in [k["pid"] for k in result.killed]
        assert result.left == []
        assert result.exit_code == -signal.SIGKILL
        assert model.process.returncode == -signal.SIGKILL
    finally:
        if model.process.returncode is None:
            model.process.kill()
            await model.process.wait()


async def test_stop_tree_graceful_exit_kills_nothing() -> None:
    model = await spawn([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"])
    assert await read_line(model.process.stdout) == "ready"
    with trio.fail_after(10):
        result = await stop_tree(model, grace=5)
    assert result.graceful is True
    assert result.exit_code == -signal.SIGTERM
    assert result.killed == [] and result.left == []


async def test_stop_tree_kills_grandchild_in_another_session() -> None:
    code = textwrap.dedent(
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(30)
        """
    )
    model = await spawn([sys.executable, "-c", code])
    grandchild = None
    try:
        grandchild = int(await read_line(model.process.stdout))
        assert os.getpgid(grandchild) != os.getpgid(model.pid)  # out of reach of a group signal
        with trio.fail_after(15):
            result = await stop_tree(model, grace=2)
        assert grandchild in [k["pid"] for k in result.killed]
        assert result.left == []
        assert gone(grandchild)
        assert model.process.returncode is not None
    finally:
        if grandchild is not None:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if model.process.returncode is None:
            model.process.kill()
            await model.process.wait()


async def test_stop_tree_after_the_process_already_exited() -> None:
    model = await spawn(["sh", "-c", "exit 5"])
    with trio.fail_after(10):
        assert await model.process.wait() == 5
        result = await stop_tree(model, grace=5)
    assert result.exit_code == 5 and result.graceful is True
    assert result.killed == [] and result.left == []
