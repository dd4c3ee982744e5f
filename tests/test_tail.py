"""Tests for supervisor.tail: FileFollower on real files (history at start, created later, appended,
renamed away and recreated, written after the rename, truncated, rewritten), history_load_hint, and the
async follow() loop with a virtual clock."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from supervisor.rules import LogRules
from supervisor.tail import READ_CHUNK, ROTATED_IDLE, FileFollower, follow, history_load_hint


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:  # same inode, no content
        f.truncate(0)


def started(path: Path, **kwargs: Any) -> tuple[FileFollower, list[str]]:
    follower = FileFollower(str(path), **kwargs)
    return follower, follower.start()


# ---------------------------------------------------------------------------------------------
# History: what the file held when shepherd started


def test_lines_present_at_start_are_history_not_new_output(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"demo: model loaded, serving on http://stale\nRuntimeError: Engine core died\n")
    follower, history = started(path)
    assert history == ["demo: model loaded, serving on http://stale", "RuntimeError: Engine core died"]
    assert follower.history_size == path.stat().st_size
    assert follower.poll(0.0) == []
    append(path, b"demo: loading model weights\n")
    assert follower.poll(0.1) == ["demo: loading model weights"]
    assert path.exists() and not (tmp_path / "model.log.old").exists()  # never moved
    follower.close()


def test_file_missing_at_start_everything_is_new(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, history = started(path)
    assert history == [] and follower.history_size is None
    assert follower.poll(0.0) == []
    assert follower.poll(0.25) == []
    path.write_bytes(b"first\nsecond\n")
    assert follower.poll(0.5) == ["first", "second"]
    assert follower.rotations == 0 and follower.truncations == 0
    follower.close()


def test_a_line_being_written_at_start_is_new(tmp_path: Path) -> None:
    # A block-buffered server (python with stdout to a file) writes 8 KiB at a time, lines cut anywhere.
    path = tmp_path / "model.log"
    path.write_bytes(b"old line\ndemo: model loa")
    follower, history = started(path)
    assert history == ["old line"]
    assert follower.poll(0.0) == []
    append(path, b"ded, serving on http://x\n")
    assert follower.poll(0.25) == ["demo: model loaded, serving on http://x"]
    follower.close()


def test_history_is_read_from_its_end_within_a_bound(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"".join(b"old line %03d\n" % i for i in range(100)))  # 13 bytes a line
    follower, history = started(path, history_bytes=40)
    # The window's first line is cut (its start lies outside): only whole lines come back.
    assert history == ["old line 097", "old line 098", "old line 099"]
    assert follower.history_size == 1300
    append(path, b"new\n")
    assert follower.poll(0.0) == ["new"]
    follower.close()


def test_an_unfinished_history_line_is_dropped_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"old\nRuntimeError: Engine core di")  # the last boot died mid-line
    follower, history = started(path)
    assert history == ["old"]
    truncate(path)
    append(path, b"fresh\n")
    assert follower.poll(0.0) == ["fresh"]  # the half line of the last boot is not new output
    assert follower.truncations == 1
    follower.close()


# ---------------------------------------------------------------------------------------------
# Appends, renames, truncation


def test_appended_lines_are_read_once(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, _ = started(path)
    path.write_bytes(b"a\n")
    assert follower.poll(0.0) == ["a"]
    assert follower.poll(0.1) == []
    append(path, b"b\nc")
    assert follower.poll(0.2) == ["b"]  # "c" is held until its line ends
    append(path, b"\n")
    assert follower.poll(0.3) == ["c"]
    assert follower.poll(0.4) == []
    assert follower.rotations == 0 and follower.truncations == 0
    follower.close()


def test_renamed_to_old_and_recreated_like_vasts_base_image(tmp_path: Path) -> None:
    # Vast's base image renames /var/log/portal/<name>.log to .old whenever its program starts.
    path = tmp_path / "model.log"
    path.write_bytes(b"boot 1: history\n")
    follower, history = started(path)
    assert history == ["boot 1: history"]
    append(path, b"boot 1: last words\n")  # written after the start, before the rename: new, not lost
    os.rename(path, tmp_path / "model.log.old")
    path.write_bytes(b"boot 2: starting\n")
    assert follower.poll(0.0) == ["boot 1: last words", "boot 2: starting"]
    assert follower.rotations == 1
    append(path, b"boot 2: model loaded\n")
    assert follower.poll(0.25) == ["boot 2: model loaded"]
    assert follower.rotations == 1
    follower.close()


def test_a_writer_that_keeps_writing_to_the_renamed_file_until_it_reopens(tmp_path: Path) -> None:
    # logrotate's `create`: the file is renamed and an empty one created; the server writes to its old
    # descriptor until it is told (SIGHUP) to reopen the path. None of its lines may be lost.
    path = tmp_path / "model.log"
    follower, _ = started(path)
    writer = open(path, "ab", buffering=0)  # noqa: SIM115 - held across the rotation, like a server's
    try:
        writer.write(b"one\n")
        assert follower.poll(0.0) == ["one"]
        os.rename(path, tmp_path / "model.log.1")
        path.write_bytes(b"")
        assert follower.poll(1.0) == []  # the follower has moved to the new, empty file
        assert follower.rotations == 1 and follower.open_files == 2
        writer.write(b"two, still to the old file\nthree, half")
        assert follower.poll(2.0) == ["two, still to the old file"]
        writer.write(b" a line\n")
        writer.close()
        writer = open(path, "ab", buffering=0)  # noqa: SIM115 - the server reopens the path
        writer.write(b"four, to the new file\n")
        assert follower.poll(3.0) == ["three, half a line", "four, to the new file"]
    finally:
        writer.close()
    # The old file is let go once it has been quiet for ROTATED_IDLE, not before.
    assert follower.poll(3.0 + ROTATED_IDLE - 0.01) == []
    assert follower.open_files == 2 and follower.released == 0
    assert follower.poll(3.0 + ROTATED_IDLE) == []
    assert follower.open_files == 1 and follower.released == 1
    append(path, b"five\n")
    assert follower.poll(10.0) == ["five"]
    follower.close()


def test_renamed_away_before_the_new_file_exists(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, _ = started(path)
    path.write_bytes(b"old\n")
    assert follower.poll(0.0) == ["old"]
    os.rename(path, tmp_path / "model.log.1")
    append(tmp_path / "model.log.1", b"still writing to it\n")
    assert follower.poll(0.25) == ["still writing to it"]  # the open file is kept while the path is empty
    assert follower.rotations == 0
    path.write_bytes(b"fresh\n")
    assert follower.poll(0.5) == ["fresh"]
    assert follower.rotations == 1
    follower.close()


def test_many_quick_rotations_keep_a_bounded_set_of_files(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, _ = started(path)
    for i in range(10):
        path.write_bytes(b"file %d\n" % i)
        assert follower.poll(float(i)) == [f"file {i}"]
        os.rename(path, tmp_path / f"model.log.{i}")
    assert follower.open_files <= 5  # MAX_ROTATED renamed-away files and no current one
    follower.close()
    assert follower.open_files == 0


def test_copytruncate_reads_the_new_content_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, _ = started(path)
    path.write_bytes(b"aaaaaaaa\nbbbbbbbb\n")
    assert follower.poll(0.0) == ["aaaaaaaa", "bbbbbbbb"]
    shutil.copyfile(path, tmp_path / "model.log.1")  # logrotate copytruncate: copy, then truncate in place
    truncate(path)
    append(path, b"c\n")
    assert follower.poll(0.25) == ["c"]
    assert follower.truncations == 1 and follower.rotations == 0
    append(path, b"d\n")
    assert follower.poll(0.5) == ["d"]
    follower.close()


def test_rewritten_and_grown_past_the_read_position_between_two_polls(tmp_path: Path) -> None:
    # A restarted server opening the log with `>` truncates it; by the next poll it may already have
    # written more than had been read, so the size alone does not show it.
    path = tmp_path / "model.log"
    follower, _ = started(path)
    path.write_bytes(b"boot 1: ok\n")
    assert follower.poll(0.0) == ["boot 1: ok"]
    with open(path, "wb") as f:  # same inode
        f.write(b"boot 2: starting up\ndemo: model loaded, serving on http://x\n")
    assert follower.poll(0.25) == ["boot 2: starting up", "demo: model loaded, serving on http://x"]
    assert follower.truncations == 1 and follower.rotations == 0
    follower.close()


def test_truncated_to_empty_then_written(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, _ = started(path)
    path.write_bytes(b"old line\n")
    assert follower.poll(0.0) == ["old line"]
    truncate(path)
    assert follower.poll(0.25) == []
    assert follower.truncations == 1
    append(path, b"after\n")
    assert follower.poll(0.5) == ["after"]
    assert follower.truncations == 1
    follower.close()


def test_each_poll_reads_a_bounded_amount(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    follower, _ = started(path)
    line = b"x" * 1023 + b"\n"
    path.write_bytes(line * (READ_CHUNK * 2 // len(line) + 10))
    first = follower.poll(0.0)
    assert len(first) == READ_CHUNK // len(line) and follower.more
    second = follower.poll(0.0)
    assert len(second) == READ_CHUNK // len(line) and follower.more
    assert len(follower.poll(0.0)) == 10 and not follower.more
    follower.close()


def test_an_unopenable_path_is_reported_and_retried(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_bytes(b"")  # a file where the directory should be
    path = blocker / "model.log"
    follower, history = started(path)
    assert history == [] and follower.error is not None and "NotADirectoryError" in follower.error
    assert follower.poll(0.0) == []
    blocker.unlink()
    blocker.mkdir()
    assert follower.poll(0.25) == [] and follower.error is None
    path.write_bytes(b"hello\n")
    assert follower.poll(0.5) == ["hello"]
    follower.close()


def test_a_path_that_is_no_regular_file_is_reported_not_read(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    os.mkfifo(path)  # opened without O_NONBLOCK, this would hold the thread until a writer came
    follower, history = started(path)
    assert history == [] and follower.error == "not a regular file" and follower.open_files == 0
    path.unlink()
    path.mkdir()
    assert follower.poll(0.0) == [] and follower.error == "not a regular file"
    path.rmdir()
    path.write_bytes(b"a file at last\n")
    assert follower.poll(0.25) == ["a file at last"] and follower.error is None
    follower.close()


def test_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"x\n")
    follower, _ = started(path)
    follower.poll(0.0)
    follower.close()
    follower.close()
    assert follower.open_files == 0


# ---------------------------------------------------------------------------------------------
# history_load_hint: the one thing history may say


RULES = LogRules.build(load=["model loaded"], error=["RuntimeError"], fatal=["Error: ShardCannotStart"],
                       info=["loading weights"])


@pytest.mark.parametrize(
    ("lines", "hint"),
    [
        ([], None),
        (["nothing to see"], None),
        (["loading weights", "model loaded on :8000", "GET /health 200", "loading weights 2"],
         "model loaded on :8000"),
        (["model loaded on :8000", "RuntimeError: Engine core died"], None),  # broke after it loaded
        (["model loaded (boot 1)", "Error: ShardCannotStart", "booting"], None),
        (["RuntimeError: boot 1 died", "model loaded (boot 2)"], "model loaded (boot 2)"),
        (["model loaded (1)", "model loaded (2)"], "model loaded (2)"),
    ],
)
def test_history_load_hint(lines: list[str], hint: str | None) -> None:
    assert history_load_hint(lines, RULES) == hint


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


async def test_follow_never_sends_history_to_the_sink(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"demo: model loaded, serving on http://stale\nRuntimeError: Engine core died\n")
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, str(path), lambda s, line: got.append(line), inline_run_sync, 0.25)
        await trio.sleep(2.0)
        assert got == []
        append(path, b"demo: loading model weights\n")
        await wait_until(lambda: len(got) >= 1)
        nursery.cancel_scope.cancel()
    assert got == ["demo: loading model weights"]
    assert path.exists() and not (tmp_path / "model.log.old").exists()


async def test_follow_hands_history_to_on_history_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    path.write_bytes(b"boot 1: model loaded\nboot 1: bye\n")
    got: list[str] = []
    histories: list[list[str]] = []
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, str(path), lambda s, line: got.append(line), inline_run_sync, 0.25,
                               histories.append)
            await wait_until(lambda: histories != [])
            assert got == []  # handed before any new line is read
            append(path, b"boot 2: hello\n")
            await wait_until(lambda: got != [])
            nursery.cancel_scope.cancel()
    assert histories == [["boot 1: model loaded", "boot 1: bye"]]
    assert got == ["boot 2: hello"]
    [following] = [e for e in logs if e["event"] == "model_log.following"]
    assert following["exists"] is True and following["history_lines"] == 2
    assert following["history_bytes"] == len(b"boot 1: model loaded\nboot 1: bye\n")


async def test_follow_keeps_reading_a_renamed_file_its_writer_still_writes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    got: list[str] = []
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, str(path), lambda s, line: got.append(line), inline_run_sync, 0.25)
            await trio.sleep(0.5)
            with open(path, "ab", buffering=0) as writer:
                writer.write(b"one\n")
                await wait_until(lambda: got == ["one"])
                os.rename(path, tmp_path / "model.log.1")
                path.write_bytes(b"new file\n")
                await wait_until(lambda: "new file" in got)
                writer.write(b"two, to the renamed file\n")
                await wait_until(lambda: "two, to the renamed file" in got)
            await trio.sleep(ROTATED_IDLE + 1.0)
            nursery.cancel_scope.cancel()
    assert got == ["one", "new file", "two, to the renamed file"]
    reopened = [e for e in logs if e["event"] == "model_log.reopened"]
    assert [(e["rotations"], e["truncations"]) for e in reopened] == [(1, 0)]
    assert [e["released"] for e in logs if e["event"] == "model_log.released"] == [1]


async def test_follow_sees_a_log_rewritten_and_grown_between_two_polls(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, str(path), lambda s, line: got.append(line), inline_run_sync, 0.25)
        await trio.sleep(0.5)
        path.write_bytes(b"boot 1: ok\n")
        await wait_until(lambda: got == ["boot 1: ok"])
        with open(path, "wb") as f:  # a restarted server's `> model.log`, then more than was read
            f.write(b"boot 2: starting up\ndemo: model loaded, serving on http://x\n")
        await wait_until(lambda: len(got) >= 3)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert got == ["boot 1: ok", "boot 2: starting up", "demo: model loaded, serving on http://x"]


async def test_follow_across_rotation_and_truncation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "model.log"
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, str(path), lambda s, line: got.append(line), inline_run_sync, 0.25)
        await trio.sleep(0.5)
        path.write_bytes(b"one\n")
        await wait_until(lambda: got == ["one"])
        append(path, b"two\nold partial")
        os.rename(path, tmp_path / "model.log.1")
        path.write_bytes(b"three\n")
        await wait_until(lambda: "three" in got)
        truncate(path)
        await trio.sleep(1.0)
        append(path, b"four\n")
        await wait_until(lambda: "four" in got)
        await trio.sleep(ROTATED_IDLE + 1.0)  # the renamed file is let go: its partial line is a line
        nursery.cancel_scope.cancel()
    # The old file's unfinished line is never glued to the new file's first line.
    assert got == ["one", "two", "three", "four", "old partial"]


async def test_follow_with_real_threads(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    got: list[str] = []
    histories: list[list[str]] = []
    path.write_bytes(b"history\n")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, str(path), lambda s, line: got.append(line), trio.to_thread.run_sync, 0.01,
                               histories.append)
            while not histories:
                await trio.sleep(0.01)
            append(path, b"alpha\nbeta\n")
            while len(got) < 2:
                await trio.sleep(0.01)
            append(path, b"gamma\n")
            while len(got) < 3:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert histories == [["history"]]
    assert got == ["alpha", "beta", "gamma"]
