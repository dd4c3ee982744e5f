"""Turning raw output bytes into clean text lines.

This module owns the line discipline for everything the model server writes (its stdout/stderr pipes
and log files): where a line ends, how a line split across reads is joined, how an endless line is cut
while keeping memory bounded, and how a line is cleaned (UTF-8 with replacement, ANSI escapes removed,
trailing whitespace stripped). Pure: no I/O.
"""

from __future__ import annotations

import re

__all__ = ["MAX_LINE_BYTES", "LineSplitter", "clean_line"]

MAX_LINE_BYTES: int = 16 * 1024

# CSI (colours, cursor moves, \x1b[2K), OSC (window titles, hyperlinks; ended by BEL or ST, or cut off at
# the end of the line), charset selection, then any other two-byte escape, then a stray ESC.
_ANSI_RE: re.Pattern[str] = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\|$)"
    r"|\x1b[()][0-9A-Za-z]"
    r"|\x1b[@-Z\\-_]"
    r"|\x1b"
)

_CR: int = 0x0D
_LF: int = 0x0A


def clean_line(raw: bytes) -> str:
    """Decode one line (without its terminator) into printable text."""
    text = raw.decode("utf-8", errors="replace")
    # Most lines carry no escapes; skipping the regex for them keeps the hot path cheap.
    if "\x1b" in text:
        text = _ANSI_RE.sub("", text)
    return text.rstrip()


def _cut_marker(dropped: int) -> str:
    return f" …[cut {dropped} bytes]"


class LineSplitter:
    """Incremental splitter: feed it chunks as they are read, get back the complete lines.

    Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (a progress bar's every redraw becomes a line).
    Lines that are empty after cleaning are dropped. A line longer than ``max_line_bytes`` is emitted as
    its first ``max_line_bytes`` bytes (backed off to a UTF-8 character boundary) plus a
    `` …[cut N bytes]`` marker; the rest of it is counted, not stored, so the buffer never holds more
    than ``max_line_bytes`` bytes whatever the child writes.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self.max_line_bytes: int = max_line_bytes
        self.lines: int = 0
        self.cut: int = 0
        # Start of the current, unterminated line (at most max_line_bytes bytes).
        self._buf: bytearray = bytearray()
        # Bytes of the current line thrown away so far; > 0 exactly while a cut line is being skipped.
        self._dropped: int = 0
        # The last chunk ended with \r: a \n opening the next chunk belongs to that \r\n.
        self._after_cr: bool = False

    @property
    def buffered(self) -> int:
        """Bytes held for the current unterminated line."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[str]:
        """Consume one chunk; return the lines it completed, in order."""
        out: list[str] = []
        if not chunk:
            return out
        if self._after_cr:
            self._after_cr = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return out
        # bytes.splitlines splits on exactly \n, \r\n and \r (ASCII line boundaries only), in C.
        pieces = chunk.splitlines(keepends=True)
        last = len(pieces) - 1
        limit = self.max_line_bytes
        for i, piece in enumerate(pieces):
            end = piece[-1]
            if end == _LF:
                body = piece[:-2] if len(piece) > 1 and piece[-2] == _CR else piece[:-1]
            elif end == _CR:
                body = piece[:-1]
                if i == last:
                    self._after_cr = True
            else:
                # Only the last piece can lack a terminator: keep it for the next chunk.
                self._append(body=piece)
                break
            if not self._buf and not self._dropped and len(body) <= limit:
                # Fast path: the whole line is inside this chunk.
                self._emit(clean_line(body), out)
            else:
                self._append(body)
                self._finish_line(out)
        return out

    def flush(self) -> list[str]:
        """At EOF: return the unterminated remainder as a line, if it has any content."""
        out: list[str] = []
        self._after_cr = False
        if self._buf or self._dropped:
            self._finish_line(out)
        return out

    def _append(self, body: bytes) -> None:
        if self._dropped:
            self._dropped += len(body)
            return
        room = self.max_line_bytes - len(self._buf)
        if len(body) <= room:
            self._buf += body
            return
        self._buf += body[:room]
        self._dropped = len(body) - room
        # If the first dropped byte continues a multi-byte character, drop the character's start too,
        # so the kept part decodes cleanly instead of ending in a replacement character.
        if body[room] & 0xC0 == 0x80:
            back = 0
            while back < 3 and self._buf and self._buf[-1] & 0xC0 == 0x80:
                self._buf.pop()
                back += 1
            if self._buf and self._buf[-1] >= 0xC0:
                self._buf.pop()
                back += 1
            self._dropped += back

    def _finish_line(self, out: list[str]) -> None:
        text = clean_line(bytes(self._buf))
        dropped = self._dropped
        self._buf.clear()
        self._dropped = 0
        if dropped:
            self.cut += 1
            text += _cut_marker(dropped)
        self._emit(text, out)

    def _emit(self, text: str, out: list[str]) -> None:
        if text:
            self.lines += 1
            out.append(text)
