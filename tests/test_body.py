"""Request bodies within their limits: size, time, and the bytes all bodies hold at once (proxy/body.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import trio
import trio.testing

from proxy.body import BodyBudget, BodyTimeout, BodyTooLarge, BudgetFull, ClientGone, read_body


def receiver(messages: Iterable[dict[str, Any]], then_wait: bool = True) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            await trio.lowlevel.checkpoint()
            return queue.pop(0)
        if then_wait:
            await trio.sleep_forever()  # a client that stopped sending
        return {"type": "http.disconnect"}

    return receive


def chunk(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


CL = [(b"content-length", b"6")]


async def test_a_body_in_pieces_is_joined_and_its_bytes_are_held_until_the_hold_ends() -> None:
    budget = BodyBudget(100)
    with budget.hold() as hold:
        body = await read_body(CL, receiver([chunk(b"abc"), chunk(b"def", more=False)]), 10, hold, 5.0)
        assert body == b"abcdef" and budget.used == 6
    assert budget.used == 0


async def test_a_head_without_its_body_times_out(autojump_clock: trio.testing.MockClock) -> None:
    budget = BodyBudget(100)
    started = trio.current_time()
    with budget.hold() as hold, pytest.raises(BodyTimeout):
        await read_body(CL, receiver([]), 10, hold, 30.0)
    assert trio.current_time() - started == pytest.approx(30.0)
    assert budget.used == 0  # what it reserved is given back


async def test_a_dripped_body_times_out_as_a_whole(autojump_clock: trio.testing.MockClock) -> None:
    async def drip() -> dict[str, Any]:
        await trio.sleep(1.0)  # a byte a second, for ever: each piece in time, the whole never
        return chunk(b"x")

    budget = BodyBudget(10_000)
    with budget.hold() as hold, pytest.raises(BodyTimeout):
        await read_body([], drip, 10_000, hold, 30.0)


async def test_the_budget_refuses_what_it_cannot_cover_and_recovers() -> None:
    budget = BodyBudget(10)
    with budget.hold() as first:
        await read_body(CL, receiver([chunk(b"abcdef", more=False)]), 100, first, 5.0)
        with budget.hold() as second, pytest.raises(BudgetFull):
            await read_body(CL, receiver([chunk(b"abcdef", more=False)]), 100, second, 5.0)
        assert budget.refused == 1 and budget.used == 6
    with budget.hold() as third:  # once the first request ended, there is room again
        await read_body(CL, receiver([chunk(b"abcdef", more=False)]), 100, third, 5.0)


async def test_a_chunked_body_reserves_as_it_grows() -> None:
    budget = BodyBudget(5)
    with budget.hold() as hold, pytest.raises(BudgetFull):
        await read_body([], receiver([chunk(b"abc"), chunk(b"def", more=False)]), 100, hold, 5.0)
    assert budget.used == 0


async def test_size_limit_before_and_while_reading() -> None:
    budget = BodyBudget(1000)
    with budget.hold() as hold, pytest.raises(BodyTooLarge):
        await read_body([(b"content-length", b"11")], receiver([]), 10, hold, 5.0)
    assert budget.used == 0  # refused before anything was reserved or read
    with budget.hold() as hold, pytest.raises(BodyTooLarge):
        await read_body([], receiver([chunk(b"x" * 6), chunk(b"x" * 6, more=False)]), 10, hold, 5.0)


async def test_a_client_that_leaves_is_noticed() -> None:
    with BodyBudget(100).hold() as hold, pytest.raises(ClientGone):
        await read_body(CL, receiver([chunk(b"abc")], then_wait=False), 10, hold, 5.0)


async def test_a_body_of_known_length_is_filled_in_place_and_must_be_whole() -> None:
    budget = BodyBudget(100)
    with budget.hold() as hold:
        body = await read_body(CL, receiver([chunk(b"ab"), chunk(b"cd"), chunk(b"ef", more=False)]), 10, hold, 5.0)
        assert body == b"abcdef" and isinstance(body, bytearray) and len(body) == 6
    with budget.hold() as hold, pytest.raises(ClientGone):  # ended short of its Content-Length
        await read_body(CL, receiver([chunk(b"ab"), chunk(b"cd", more=False)]), 10, hold, 5.0)
    with budget.hold() as hold, pytest.raises(BodyTooLarge):  # more than it announced
        await read_body(CL, receiver([chunk(b"abcd"), chunk(b"efgh", more=False)]), 10, hold, 5.0)
