"""The model server's output, copied to `MODEL_LOG` in supervised mode, rotated by size.

Vast's instance portal shows `/var/log/portal/*.log`, and operators look for the server's output in the
file its template names. Lines are handed over without waiting (`write_line` never blocks the pipe
readers: a full buffer drops the line and counts it) and written by one task in batches through a
thread, so a slow disk can never stall the model server's pipes or the event loop. When the file
passes `max_bytes` it becomes `<file>.1` (the previous `.1` is dropped) and a new file starts, so the
log holds at most twice `max_bytes`.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from supervisor.logs import get_logger

BUFFER_LINES = 10_000


class LogFile:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.dropped = 0
        self._send, self._receive = trio.open_memory_channel[str](BUFFER_LINES)
        self._log = get_logger("supervisor.logfile")

    def write_line(self, stream: str, line: str) -> None:
        try:
            self._send.send_nowait(line + "\n")
        except trio.WouldBlock:
            self.dropped += 1

    async def run(self) -> None:
        """Write what comes, batch by batch, until cancelled; then what is left, at once."""
        try:
            while True:
                batch = [await self._receive.receive()]
                batch.extend(self._pending())
                try:
                    await trio.to_thread.run_sync(self._write, "".join(batch))
                except OSError as exc:
                    self._log.warning("logfile.write_failed", path=str(self.path), error=str(exc))
        finally:
            # shepherd is stopping: the server's last lines (why it stopped) belong in the file too
            rest = self._pending()
            if rest:
                try:
                    self._write("".join(rest))
                except OSError:
                    pass

    def _pending(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return lines

    def _write(self, text: str) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        chunk: list[bytes] = []
        for line in text.splitlines(keepends=True):
            data = line.encode("utf-8", "replace")
            if size and size + len(data) > self.max_bytes:  # rotate between lines, never inside one
                self._append(b"".join(chunk))
                chunk, size = [], 0
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            chunk.append(data)
            size += len(data)
        self._append(b"".join(chunk))

    def _append(self, data: bytes) -> None:
        if data:
            with open(self.path, "ab") as out:
                out.write(data)
