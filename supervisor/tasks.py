"""Background tasks that must outlive their own errors, and the file descriptor limit they need.

A probe, the load monitor, the reporter, the key fetch and the reaper run beside the proxy for the
whole life of the process. An exception in one of them (`psutil` raising `OSError(EMFILE)` when the
descriptors run out, a parser meeting an odd answer) once ended shepherd with exit 1 and orphaned the
model server. `keep_running` contains it: the error is logged once (again only if it changes), the task
is started again after a backoff (1 s doubling to 60 s, reset after a clean minute), and nothing
propagates but cancellation.
"""

from __future__ import annotations

import resource
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from supervisor.logs import get_logger

INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 60.0
HEALTHY_AFTER = 60.0  # a run this long without error resets the backoff


async def keep_running(name: str, task: Callable[[], Awaitable[Any]]) -> None:
    """Run `task` until it returns; restart it after any exception (never propagated)."""
    log = get_logger("supervisor.tasks")
    delay = INITIAL_BACKOFF
    last_error = ""
    while True:
        started = trio.current_time()
        try:
            await task()
            return
        except Exception as exc:  # noqa: BLE001 - containing every error is this function's job
            error = f"{type(exc).__name__}: {exc}"
            if trio.current_time() - started >= HEALTHY_AFTER:
                delay, last_error = INITIAL_BACKOFF, ""
            if error != last_error:
                log.error("task.error", task=name, error=error, retry_in=delay, exc_info=exc)
                last_error = error
        await trio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the common soft 1024 is one connection flood
    away from EMFILE). Returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # some sandboxes refuse: the connection cap still bounds what we open
    return soft, hard
