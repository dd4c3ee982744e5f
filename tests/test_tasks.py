"""Background tasks outlive their own errors (supervisor/tasks.py)."""

from __future__ import annotations

import errno
import resource

import trio
import trio.testing
from structlog.testing import capture_logs

from supervisor.tasks import MAX_BACKOFF, keep_running, raise_fd_limit


async def test_a_failing_task_is_restarted_with_backoff_and_logged_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def flaky() -> str:
        starts.append(trio.current_time())
        if len(starts) < 6:
            raise OSError(errno.EMFILE, "Too many open files")  # what psutil raised when fds ran out
        return "done"

    with capture_logs() as logs:
        await keep_running("load", flaky)  # returns once the task does: no exception escapes
    assert len(starts) == 6
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0]
    errors = [e for e in logs if e["event"] == "task.error"]
    assert len(errors) == 1 and errors[0]["task"] == "load" and "Too many open files" in errors[0]["error"]


async def test_a_new_error_is_logged_and_the_backoff_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def changing() -> None:
        nonlocal calls
        calls += 1
        if calls <= 10:
            raise ValueError("parse error" if calls < 10 else "another error")

    with capture_logs() as logs:
        started = trio.current_time()
        await keep_running("reporter", changing)
    assert [e["error"] for e in logs if e["event"] == "task.error"] == [
        "ValueError: parse error", "ValueError: another error"]
    # 1+2+4+8+16+32 then capped at 60 for the rest
    assert trio.current_time() - started == 1 + 2 + 4 + 8 + 16 + 32 + MAX_BACKOFF * 4


async def test_cancellation_still_stops_it(autojump_clock: trio.testing.MockClock) -> None:
    async def forever() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(5) as scope:
        await keep_running("probe", forever)
    assert scope.cancelled_caught


def test_the_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        hard = before[1]
        low = 256 if hard == resource.RLIM_INFINITY or hard > 256 else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        soft, reported_hard = raise_fd_limit()
        assert reported_hard == hard
        assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > low or hard == low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
