"""Reading a request body within its limits: size, time, and the bytes all bodies hold at once.

- Size: a `Content-Length` over the limit is refused before a byte is read; a chunked body as soon as it
  passes the limit (`BodyTooLarge`, 413).
- Time: the whole body must arrive within `timeout` seconds of the request head (`BodyTimeout`, 408).
  A client that sends a head and then nothing, or drips its body, holds its connection and its bytes
  for that long at most.
- Memory: a `BodyBudget` counts the bytes of request bodies held at once, over all requests. A body
  with a `Content-Length` reserves it all up front; a chunked one reserves as it arrives. Past the
  budget the request is refused (`BudgetFull`, 503) rather than queued, because a queued upload still
  holds its connection. A reservation is held until the request has ended (the body, or the payload
  made from it, lives that long), then released by the `BodyBudget.hold` context.

A body of known length is written in place into one buffer of that size; a chunked one into one
growing buffer. A list of chunks joined at the end doubled the peak memory of every large upload.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import trio

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class BudgetFull(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyBudget:
    """Bytes of request bodies held at once by all requests together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    @contextmanager
    def hold(self) -> Iterator[Hold]:
        hold = Hold(self)
        try:
            yield hold
        finally:
            self.used -= hold.bytes


class Hold:
    """One request's share of the budget; `take` raises BudgetFull when the budget cannot cover it."""

    __slots__ = ("budget", "bytes")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def take(self, size: int) -> None:
        budget = self.budget
        if budget.used + size > budget.limit:
            budget.refused += 1
            raise BudgetFull
        budget.used += size
        self.bytes += size


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # hypercorn (h11) refuses a malformed one before we see it
    return None


async def read_body(
    headers: list[tuple[bytes, bytes]], receive: Receive, limit: int, hold: Hold, timeout: float
) -> bytes | bytearray:
    """The whole body, within `limit` bytes, `timeout` seconds and the budget of `hold`."""
    length = declared_length(headers)
    if length is not None:
        if length > limit:
            raise BodyTooLarge  # refused before a byte of the body is read
        hold.take(length)
    with trio.move_on_after(timeout) as scope:
        first = await receive()
        if first["type"] == "http.disconnect":
            raise ClientGone
        chunk = first.get("body", b"")
        if not first.get("more_body", False):
            _check(len(chunk), limit, length, hold)
            return chunk  # the common case: one message, no copy
        if length is not None:
            return await _fill(bytearray(length), chunk, receive)
        buffer = bytearray(chunk)
        _check(len(buffer), limit, length, hold)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            buffer += message.get("body", b"")
            _check(len(buffer), limit, length, hold)
            if not message.get("more_body", False):
                return buffer
    assert scope.cancelled_caught
    raise BodyTimeout


async def _fill(buffer: bytearray, first: bytes, receive: Receive) -> bytearray:
    """A body of known length, written in place: growing a buffer would copy it again and again."""
    view = memoryview(buffer)
    size = len(first)
    view[:size] = first
    while size < len(buffer):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if size + len(chunk) > len(buffer):
            raise BodyTooLarge  # more than the Content-Length (hypercorn's h11 would not let it through)
        view[size:size + len(chunk)] = chunk
        size += len(chunk)
        if not message.get("more_body", False):
            break
    view.release()
    if size < len(buffer):
        raise ClientGone  # the body ended short of its Content-Length
    return buffer


def _check(size: int, limit: int, declared: int | None, hold: Hold) -> None:
    if size > limit:
        raise BodyTooLarge
    if declared is None and size > hold.bytes:
        hold.take(size - hold.bytes)  # a chunked body reserves as it grows
