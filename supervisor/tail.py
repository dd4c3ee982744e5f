"""Attach mode: following MODEL_LOG, a file written by a model server that someone else started.

This module owns reading that file: which file the path names at each moment, which of its bytes are
new, and which lines it already held when shepherd started (its history). It never moves, renames
or writes the file: a server that already writes to it must keep being heard.

Which file, and which bytes (checked on every poll, by identity and size):
- A file is known by its (device, inode). When the path names another inode (the file was renamed
  away and a new one created: Vast's base image renames `<name>.log` to `<name>.log.old` whenever its
  program starts; logrotate's `create`), the old file is read to its end and the new one from its
  start. The old file stays open and is still read while its writer keeps writing to it (a writer
  holds its descriptor until it reopens the path, which can take a SIGHUP or a restart), until it
  has not grown for ROTATED_IDLE seconds; at most MAX_ROTATED such files are held.
- The same inode rewritten in place (copytruncate, a shell's `>` redirection by a restarted server)
  shows as a size below the read position, or, when it has already grown past it again, as
  changed bytes just before the read position: then it is read again from its start.
- The path missing (renamed away, not created again yet, or not created at all yet) is waited for;
  the file still open is kept.

History, and what it may mean: `FileFollower.start` takes the file's identity and size when shepherd
starts following it (`Lifecycle.attach`, a moment after the process starts). Lines that lie entirely
within that size are history: they never reach the line sink, so they
are never matched as new output (an error line from the last boot must not mark this server failed,
nor a load line from the last boot mark it loaded). A line that was being written at that moment and
is completed afterwards is new. History cannot be told apart by boot: a file appended to (`>>`, `tee
-a`) holds the last boot and this one; a server that loaded long ago and is silent since (shepherd
restarted beside it) left its load line long ago, so the file's modification time cannot tell either.
So `follow` hands the history's lines (its last HISTORY_BYTES) once to `on_history`, where the
lifecycle takes the one thing they can say, `history_load_hint`: when the last of them that matches
a load or error pattern is a load line, the server loaded and has not reported an error since. That
is a hint, as the load line always is: `ready` still needs the health path to answer 200 and the
warm-up to pass (log lines are a hint; HTTP confirms), so a stale load line never makes a server
that is still loading (and not answering) ready. Error lines in history are never acted on. Without
a hint (or without an `on_history`) the server shows it has loaded by a new load line, or, after
`load_line_grace`, by answering its health check.

Cost and safety: the file is polled, not watched (inotify does not cross every container
filesystem, and a `stat` every 0.25 s costs nothing). Every file call runs in a worker thread (the
`run_sync` of `follow`); each poll reads at most READ_CHUNK bytes of each open file, and lines are
cut at MAX_LINE_BYTES by the `LineSplitter`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from supervisor.lines import MAX_LINE_BYTES, LineSplitter
from supervisor.logs import get_logger
from supervisor.rules import Kind, LogRules

POLL_INTERVAL = 0.25
READ_CHUNK = 1024 * 1024  # bytes read from one open file per poll
HISTORY_BYTES = READ_CHUNK  # the end of the history that is read at start (its last word matters)
ROTATED_IDLE = 5.0  # seconds a renamed-away file is still read after its last growth
MAX_ROTATED = 4  # renamed-away files read at once; past it the oldest is read once more and closed
FINGERPRINT_BYTES = 64  # bytes before the read position compared on each poll, to notice a rewrite

Ident = tuple[int, int]  # (st_dev, st_ino)


def history_load_hint(lines: Sequence[str], rules: LogRules) -> str | None:
    """The load line that the history ends on, or None.

    The last history line that matches a load, error or fatal pattern decides: a load line means the
    server loaded and reported no error since (the hint); an error or fatal line means it broke after
    it loaded, or that the load line is from a boot that ended badly (no hint, and no error either:
    history is never acted on as an error). Info lines and unmatched lines are passed over."""
    for line in reversed(lines):
        match = rules.match(line)
        if match is None or match.kind is Kind.INFO:
            continue
        return line if match.kind is Kind.LOADED else None
    return None


@dataclass
class _OpenFile:
    """One open file and how far it has been read."""

    fd: int
    ident: Ident
    splitter: LineSplitter
    pos: int = 0
    fingerprint: bytes = b""  # the last bytes before `pos`, as read
    mtime_ns: int = -1
    quiet_since: float = 0.0  # (renamed-away files) when it last grew
    # The splitter holds the unterminated end of the history: dropped, never emitted, when the file is
    # rewritten or closed before the line is completed (it is not new output).
    partial_is_history: bool = False


class FileFollower:
    """Synchronous core of the tail (run in a worker thread): `start()` once, then `poll(now)`."""

    def __init__(
        self,
        path: str,
        max_line_bytes: int = MAX_LINE_BYTES,
        rotated_idle: float = ROTATED_IDLE,
        history_bytes: int = HISTORY_BYTES,
    ) -> None:
        self.path: str = path
        self.max_line_bytes: int = max_line_bytes
        self.rotated_idle: float = rotated_idle
        self.history_limit: int = history_bytes
        self._current: _OpenFile | None = None
        self._rotated: list[_OpenFile] = []
        self.rotations: int = 0
        self.truncations: int = 0
        self.released: int = 0  # renamed-away files closed
        self.history_size: int | None = None  # the file's size at start; None: there was no file
        self.more: bool = False  # the last poll stopped at READ_CHUNK somewhere: poll again without waiting
        self.error: str | None = None  # why the path cannot be opened now (not "it does not exist")

    @property
    def open_files(self) -> int:
        return (self._current is not None) + len(self._rotated)

    def start(self) -> list[str]:
        """Take the file as it is now: its identity and size mark the end of the history. Returns the
        complete lines of the history's last `history_bytes` (a line cut by that window is left out)."""
        opened = self._open()
        if opened is None:
            return []
        self._current = opened  # from here on `close()` closes it, whatever happens next
        size = os.fstat(opened.fd).st_size
        begin = max(0, size - self.history_limit)
        raw = os.pread(opened.fd, size - begin, begin) if size > begin else b""
        opened.pos = begin + len(raw)  # == size unless it shrank in between; then the next poll sees it
        opened.fingerprint = raw[-FINGERPRINT_BYTES:]
        self.history_size = opened.pos
        if begin > 0:
            # The window opened mid-line: that line's start is not here, so it is no line at all.
            newline = raw.find(b"\n")
            raw = raw[newline + 1 :] if newline >= 0 else b""
        lines = opened.splitter.feed(raw)
        opened.partial_is_history = opened.splitter.buffered > 0
        return lines

    def poll(self, now: float) -> list[str]:
        """The new lines since the last poll, in order: renamed-away files' first (their writer wrote
        them before it moved to the new file, or while it had not yet), then the current file's."""
        self.more = False
        out: list[str] = []
        for old in list(self._rotated):
            data = self._read(old)
            if data:
                old.quiet_since = now
                out += old.splitter.feed(data)
            elif now - old.quiet_since >= self.rotated_idle:
                self._release(old, out)
        current = self._current
        if current is None:
            current = self._current = self._open()
            if current is None:
                return out  # not created yet
        elif self._rewritten(current):
            self.truncations += 1
            self._restart(current, out)
        out += self._feed(current, self._read(current))
        self._follow_path(now, out)
        return out

    def close(self) -> None:
        for opened in [*self._rotated, *([self._current] if self._current else [])]:
            os.close(opened.fd)
        self._rotated.clear()
        self._current = None

    # -- internals

    def _open(self) -> _OpenFile | None:
        """The file the path names now, or None: not there yet, or not readable (`error` says why;
        a permission fixed later is picked up by a later poll)."""
        try:
            # O_NONBLOCK: a FIFO at the path must not hold the worker thread until a writer comes.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            self.error = None
            return None
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc.strerror or exc}"
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)  # a directory or a pipe has no size or position to follow
            self.error = "not a regular file"
            return None
        self.error = None
        return _OpenFile(fd=fd, ident=(st.st_dev, st.st_ino), splitter=LineSplitter(self.max_line_bytes))

    def _follow_path(self, now: float, out: list[str]) -> None:
        """Has the path been given to another file? Then that file is the current one, from its start."""
        assert self._current is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return  # renamed away, no new file yet (or no access to it): keep reading the old one
        if (st.st_dev, st.st_ino) == self._current.ident:
            return
        new = self._open()
        if new is None:
            return  # gone again between stat and open: next poll
        if new.ident == self._current.ident:  # renamed back between stat and open
            os.close(new.fd)
            return
        old = self._current
        old.quiet_since = now
        self._rotated.append(old)
        self._current = new
        self.rotations += 1
        while len(self._rotated) > MAX_ROTATED:
            oldest = self._rotated[0]
            out += oldest.splitter.feed(self._read(oldest))
            self._release(oldest, out)
        out += self._feed(new, self._read(new))

    def _rewritten(self, opened: _OpenFile) -> bool:
        """Truncated (size below the read position), or rewritten and grown again past it (the bytes
        just before the read position are not those read)."""
        st = os.fstat(opened.fd)
        if st.st_size < opened.pos:
            return True
        changed = st.st_mtime_ns != opened.mtime_ns or st.st_size != opened.pos
        opened.mtime_ns = st.st_mtime_ns
        if not changed or not opened.fingerprint:
            return False
        size = len(opened.fingerprint)
        return os.pread(opened.fd, size, opened.pos - size) != opened.fingerprint

    def _restart(self, opened: _OpenFile, out: list[str]) -> None:
        """The same file's content begins again: what was held of an unterminated line is a line of
        its own (unless it was history), and reading starts over at 0."""
        flushed = opened.splitter.flush()
        if not opened.partial_is_history:
            out += flushed
        opened.partial_is_history = False
        opened.splitter = LineSplitter(self.max_line_bytes)
        opened.pos = 0
        opened.fingerprint = b""

    def _read(self, opened: _OpenFile) -> bytes:
        data = os.pread(opened.fd, READ_CHUNK, opened.pos)
        if data:
            opened.pos += len(data)
            opened.fingerprint = (opened.fingerprint + data[-FINGERPRINT_BYTES:])[-FINGERPRINT_BYTES:]
            if len(data) == READ_CHUNK:
                self.more = True
        return data

    def _feed(self, opened: _OpenFile, data: bytes) -> list[str]:
        if not data:
            return []
        opened.partial_is_history = False  # the line now holds new bytes: it is new output
        return opened.splitter.feed(data)

    def _release(self, old: _OpenFile, out: list[str]) -> None:
        flushed = old.splitter.flush()
        if not old.partial_is_history:
            out += flushed
        os.close(old.fd)
        self._rotated.remove(old)
        self.released += 1


async def follow(
    path: str,
    sink: Callable[[str, str], None],
    run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    poll_interval: float = POLL_INTERVAL,
    on_history: Callable[[list[str]], None] | None = None,
) -> None:
    """Follow `path` until cancelled: each new line goes to `sink("log", line)`; the history's lines
    go once to `on_history` (when given; see the module docstring), never to `sink`."""
    follower = FileFollower(path)
    log = get_logger("supervisor.tail")
    try:
        try:
            history: list[str] = await run_sync(follower.start)
        except OSError as exc:  # an I/O error on the file: follow it as if it had not been there yet
            log.warning("model_log.unreadable", path=path, error=f"{type(exc).__name__}: {exc}")
            follower.close()
            history = []
        log.info("model_log.following", path=path, exists=follower.history_size is not None,
                 history_bytes=follower.history_size or 0, history_lines=len(history))
        if on_history is not None:
            on_history(history)
        seen: tuple[int, int, int] = (0, 0, 0)
        error: str | None = None
        while True:
            try:
                lines = await run_sync(follower.poll, trio.current_time())
            except OSError as exc:  # a read failed (EIO...): what it had read is lost, try again later
                lines = []
                follower.error = f"{type(exc).__name__}: {exc}"
            if follower.error != error:
                error = follower.error
                if error is not None:  # once per distinct error, not once per poll
                    log.warning("model_log.unreadable", path=path, error=error)
            counters = (follower.rotations, follower.truncations, follower.released)
            if counters[:2] != seen[:2]:
                log.info("model_log.reopened", path=path, rotations=follower.rotations,
                         truncations=follower.truncations)
            if counters[2] != seen[2]:
                log.info("model_log.released", path=path, released=follower.released,
                         why=f"a renamed-away file did not grow for {follower.rotated_idle:g}s")
            seen = counters
            for line in lines:
                sink("log", line)
            if follower.more:
                await trio.lowlevel.checkpoint()  # more is waiting: read on, but let others run
            else:
                await trio.sleep(poll_interval)
    finally:
        follower.close()
