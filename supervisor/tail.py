"""Attach mode: follow the model server's log file (created later, rotated by rename, truncated).

The file is polled, not watched: inotify does not cross every container filesystem, and one
`stat` every 0.25 s costs nothing. All file calls run in a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

import trio

from supervisor.lines import LineSplitter
from supervisor.logs import get_logger

POLL_INTERVAL = 0.25
READ_CHUNK = 1024 * 1024


def set_aside_stale_log(path: str) -> bool:
    """Move an existing log to `<path>.old` so lines from the last boot never mark the server ready."""
    try:
        os.replace(path, path + ".old")
        return True
    except FileNotFoundError:
        return False


class FileFollower:
    """Synchronous core of the tail: each `read()` returns the bytes appended since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self.rotations = 0
        self.truncations = 0

    def read(self) -> tuple[bytes, bool]:
        """Returns (data, restarted): `restarted` is True when a new or truncated file began, so a
        partial line buffered from the old one is emitted on its own, never joined to new text."""
        if self._file is None:
            if not self._open():
                return b"", False
            return self._file.read(READ_CHUNK), True  # type: ignore[union-attr]
        # Truncated in place (copytruncate)? Checked before reading, so the new content is read
        # from its start even when it has already grown again.
        if os.fstat(self._file.fileno()).st_size < self._file.tell():
            self._file.seek(0)
            self.truncations += 1
            return self._file.read(READ_CHUNK), True
        data = self._file.read(READ_CHUNK)
        if data:
            return data, False
        # At the end of the open file: has it been replaced by a new one (rotation by rename)?
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return b"", False  # renamed away, new one not created yet: keep the old handle
        if current.st_ino == self._inode:
            return b"", False
        self._file.close()
        self._file = None
        self.rotations += 1
        if self._open():
            return self._file.read(READ_CHUNK), True  # type: ignore[union-attr]
        return b"", True

    def _open(self) -> bool:
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open across reads
        except FileNotFoundError:
            return False
        self._inode = os.fstat(self._file.fileno()).st_ino
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def follow(
    path: str,
    sink: Callable[[str, str], None],
    run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    poll_interval: float = POLL_INTERVAL,
) -> None:
    follower = FileFollower(path)
    splitter = LineSplitter()
    log = get_logger("supervisor.tail")
    seen = (0, 0)
    try:
        while True:
            data, restarted = await run_sync(follower.read)
            if (follower.rotations, follower.truncations) != seen:
                log.info("model_log.reopened", path=path, rotations=follower.rotations,
                         truncations=follower.truncations)
                seen = (follower.rotations, follower.truncations)
            if restarted:
                for line in splitter.flush():
                    sink("log", line)
                splitter = LineSplitter()
            if data:
                for line in splitter.feed(data):
                    sink("log", line)
            else:
                await trio.sleep(poll_interval)
    finally:
        follower.close()
