"""Tests for supervisor.tail: FileFollower (created later, appended, rotated, truncated), set_aside_stale_log,
and the async follow() loop with a virtual clock."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from supervisor.tail import FileFollower, follow, set_aside_stale_log


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def read_all(follower: FileFollower) -> tuple[bytes, bool]:
    """Read until nothing new is left; `restarted` is True when any read said so."""
    out, restarted = b"", False
    while True:
        data, again = follower.read()
        restarted = restarted or again
        if not data:
            return out, restarted
        out += data


# ---------------------------------------------------------------------------------------------
# FileFollower


def test_file_created_later(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower = FileFollower(str(path))
    assert follower.read() == (b"", False)
    assert follower.read() == (b"", False)
    path.write_bytes(b"first\n")
    assert follower.read() == (b"first\n", True)
    follower.close()


def test_appended_lines_read_once(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"a\n")
    follower = FileFollower(str(path))
    assert follower.read() == (b"a\n", True)
    assert follower.read() == (b"", False)
    append(path, b"b\nc")
    assert follower.read() == (b"b\nc", False)
    append(path, b"\n")
    assert follower.read() == (b"\n", False)
    assert follower.read() == (b"", False)
    assert follower.rotations == 0 and follower.truncations == 0
    follower.close()


def test_rotation_by_rename_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"1\n")
    follower = FileFollower(str(path))
    assert follower.read() == (b"1\n", True)
    append(path, b"2\n")  # written before the rotation, not read yet
    os.rename(path, tmp_path / "model.log.1")
    append(tmp_path / "model.log.1", b"3\n")  # the writer still had the old file open
    path.write_bytes(b"new 1\n")
    # The old handle's remaining bytes come first, then the new file from its start.
    assert follower.read() == (b"2\n3\n", False)
    assert follower.read() == (b"new 1\n", True)
    assert follower.rotations == 1
    append(path, b"new 2\n")
    assert follower.read() == (b"new 2\n", False)
    assert follower.rotations == 1
    follower.close()


def test_renamed_away_before_the_new_file_exists(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"old\n")
    follower = FileFollower(str(path))
    assert follower.read() == (b"old\n", True)
    os.rename(path, tmp_path / "model.log.1")
    assert follower.read() == (b"", False)  # keeps the old handle while there is no new file
    assert follower.rotations == 0
    path.write_bytes(b"fresh\n")
    assert read_all(follower) == (b"fresh\n", True)
    assert follower.rotations == 1
    follower.close()


def test_truncation_in_place_reads_new_content_from_start(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"aaaaaaaa\nbbbbbbbb\n")
    follower = FileFollower(str(path))
    read_all(follower)
    with open(path, "r+b") as f:  # copytruncate: same inode, shorter content
        f.truncate(0)
    append(path, b"c\n")
    assert follower.read() == (b"c\n", True)
    assert follower.truncations == 1 and follower.rotations == 0
    append(path, b"d\n")
    assert follower.read() == (b"d\n", False)
    follower.close()


def test_truncated_to_empty_then_written(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"old line\n")
    follower = FileFollower(str(path))
    read_all(follower)
    with open(path, "r+b") as f:
        f.truncate(0)
    assert follower.read() == (b"", True)
    assert follower.truncations == 1
    append(path, b"after\n")
    assert follower.read() == (b"after\n", False)
    assert follower.truncations == 1
    follower.close()


def test_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"x\n")
    follower = FileFollower(str(path))
    follower.read()
    follower.close()
    follower.close()


def test_set_aside_stale_log(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"model loaded, serving on (last boot)\n")
    (tmp_path / "model.log.old").write_bytes(b"older\n")
    assert set_aside_stale_log(str(path)) is True
    assert not path.exists()
    assert (tmp_path / "model.log.old").read_bytes() == b"model loaded, serving on (last boot)\n"


def test_set_aside_stale_log_without_file(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    assert set_aside_stale_log(str(path)) is False
    assert not (tmp_path / "model.log.old").exists()


# ---------------------------------------------------------------------------------------------
# follow(): the async loop (virtual clock, file calls run inline)


async def inline_run_sync(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll in virtual time (autojump_clock); fails if the condition never comes."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_follow_collects_lines_and_joins_a_partial_line(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    got: list[tuple[str, str]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, str(path), lambda s, line: got.append((s, line)), inline_run_sync, 0.25)
        await trio.sleep(1.0)  # the file does not exist yet: nothing, no error
        assert got == []
        path.write_bytes(b"loading weights\nhello wor")
        await wait_until(lambda: len(got) >= 1)
        await trio.sleep(1.0)
        assert got == [("log", "loading weights")]  # the partial line is held back
        append(path, b"ld\nnext\n")
        await wait_until(lambda: len(got) >= 3)
        assert got == [("log", "loading weights"), ("log", "hello world"), ("log", "next")]
        nursery.cancel_scope.cancel()


async def test_follow_across_rotation_and_truncation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"one\n")
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, str(path), lambda s, line: got.append(line), inline_run_sync, 0.25)
        await wait_until(lambda: got == ["one"])
        append(path, b"two\nold partial")
        os.rename(path, tmp_path / "model.log.1")
        path.write_bytes(b"three\n")
        await wait_until(lambda: "three" in got)
        with open(path, "r+b") as f:
            f.truncate(0)
        await trio.sleep(1.0)
        append(path, b"four\n")
        await wait_until(lambda: "four" in got)
        nursery.cancel_scope.cancel()
    assert got[:2] == ["one", "two"]
    assert got[-2:] == ["three", "four"]
    # A partial line of the old file is never glued to the first line of the new one.
    assert all(line in ("one", "two", "three", "four", "old partial") for line in got), got


async def test_follow_with_real_threads(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"alpha\nbeta\n")
    got: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, str(path), lambda s, line: got.append(line), trio.to_thread.run_sync, 0.01)
            while len(got) < 2:
                await trio.sleep(0.01)
            append(path, b"gamma\n")
            while len(got) < 3:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert got == ["alpha", "beta", "gamma"]
