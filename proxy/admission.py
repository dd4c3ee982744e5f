"""Admission control: whether an admitted request may go to the model now, later, or not at all.

This module owns the queueing policy in front of the model server. For one request, in order:

1. Draining: 503 at once (the worker is going away; the client should ask `/route/` again).
2. Not ready: wait for readiness, at most until the request's queue deadline
   (`route.max_queue_time` after it arrived), else 503. Draining during the wait also gives 503.
3. Estimated wait over the time left before the deadline: 429. The estimate is Vast's
   (vast-protocol.md §1.5 step 6): the work ahead of this request, i.e. all work running and waiting
   in the ledger except its own, divided by the capacity in units/s. A capacity of 0 (or anything not
   positive and finite) means "not measured yet" (before the benchmark): then no 429 is given on an
   estimate, because dividing by a made-up 1e-6 would refuse every request on a fresh worker; the
   deadline in step 4 still bounds the wait.
4. Parallel routes go to the model at once. Non-parallel routes wait in a strict FIFO, one request at
   a time per route path (a route that can only take one request at a time is a property of the
   route's handler, not of the whole model server). Waiting past the deadline gives 429: the queue is
   longer than `max_queue_time`, which is exactly what 429 tells Vast's client. A waiter whose client
   leaves (its task is cancelled) leaves the FIFO without holding up the ones behind it.

After admission, a request that meets a dead model server (`wait_comeback`: its connection was
refused, or reset before any answer, so it never ran) is held until the server is `ready` again and
then sent once more, all within `max_queue_time` of its first failure: a crash and restart lose
nothing. Not back by then: 503 with Retry-After; draining meanwhile: 503. A server that refuses
while `ready` has usually just died: the supervisor says so within moments (the exit flips the
state at once), and `server_gone` (the supervised process has exited) tells a death the state
machine has not caught up with yet from a refusal that is real (a server someone else runs, attach
mode): only the latter gives up, after `down_within` (1 s), with a 502.

Waiting for a change of readiness subscribes before it looks (`ready_changed()` is the event the
next change will set, taken before the state is read): a change made between the look and the wait
is never missed. It once
was, when trio ran the lifecycle's step before the waiter's in one batch: the request then slept
through `ready` until its deadline.

`Retry-After` on a 429 is the estimated excess wait rounded up; on a 503 it is
`unavailable_retry_after`; either is kept within 1 s and `MAX_RETRY_AFTER` (300 s). Workloads are
the client's to declare (clamped per route, `proxy.envelope.workload_of`), so the estimate can be
wild: `cost=1e15` once gave `Retry-After: 9999999999400`, and `1e300` an integer orjson could not
write (a 500). Five minutes is past any useful prediction (the autoscaler adds workers, capacity is
refined online, Vast's client polls `/route/` every few seconds anyway) and tells a client to go
elsewhere, which is what a 429 means. A rejection is written to the ledger here (`Ledger.reject`) before
`Rejected` is raised; entering the model marks the record started; finishing it (success, error,
cancelled) is the caller's job, after the `async with`.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, NoReturn

import trio

from backends.spec import Route
from proxy.ledger import Ledger, RequestRecord

MAX_RETRY_AFTER: Final = 300  # seconds; the most a Retry-After ever says (see the module docstring)


class Rejected(Exception):
    """The request is refused with `status` (429 or 503); send `Retry-After: retry_after`."""

    def __init__(self, status: int, retry_after: int, reason: str) -> None:
        super().__init__(f"{status} {reason} (retry after {retry_after} s)")
        self.status = status
        self.retry_after = retry_after
        self.reason = reason


class Comeback(enum.Enum):
    """What `wait_comeback` found for a request that met a dead model server."""

    RETRY = "retry"  # it went down and is ready again: send the request once more
    NOT_DOWN = "not down"  # it never went down: the refusal is real (502)
    NOT_BACK = "not back"  # down, and not ready again before the deadline (503)
    DRAINING = "draining"  # the worker is going away (503)


class Admission:
    """Per-request admission decisions over one ledger.

    `capacity()` is the measured throughput in workload units per second (0 while unknown);
    `is_ready()` whether the model server takes requests; `ready_changed()` the event the next
    change of readiness will set (the lifecycle's current state-change event). `server_gone()` is True
    when the supervised model server's process has exited, even before the state says so (always
    False when shepherd does not run the server). `wall_clock` stamps the ledger's
    `work_started_at`; deadlines use trio's clock.
    """

    def __init__(
        self,
        ledger: Ledger,
        capacity: Callable[[], float],
        is_ready: Callable[[], bool],
        ready_changed: Callable[[], trio.Event],
        *,
        wall_clock: Callable[[], float] = time.time,
        unavailable_retry_after: int = 5,
        hidden_work: Callable[[], float] = lambda: 0.0,
        server_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self._ledger = ledger
        self._server_gone = server_gone
        self._capacity = capacity
        self._is_ready = is_ready
        self._ready_changed = ready_changed
        self._wall_clock = wall_clock
        self._unavailable_retry_after = unavailable_retry_after
        # Work the model server does that never passed the proxy (its own queue, the GPU): it is
        # ahead of a new request too. The same number feeds the reporter's cur_load.
        self._hidden_work = hidden_work
        self._drain = trio.Event()
        self._fifos: dict[str, trio.StrictFIFOLock] = {}

    @property
    def draining(self) -> bool:
        return self._drain.is_set()

    @property
    def unavailable_retry_after(self) -> int:
        """The Retry-After of a 503 (not ready, draining), in seconds."""
        return min(max(self._unavailable_retry_after, 1), MAX_RETRY_AFTER)

    def set_draining(self) -> None:
        """Refuse new requests and wake those waiting for readiness (they get 503). Requests already
        queued in a FIFO keep their place: they were accepted and drain like running ones."""
        self._drain.set()

    def estimated_wait(self, extra_work: float = 0.0) -> float | None:
        """Seconds until `extra_work` more units would be served; None while capacity is unknown."""
        capacity = self._capacity()
        if not (capacity > 0.0 and math.isfinite(capacity)):
            return None
        work = self._ledger.running_work + self._ledger.waiting_work + self._hidden_work() + extra_work
        return max(work, 0.0) / capacity

    def wait_ahead_of(self, record: RequestRecord) -> float | None:
        """Seconds until the work ahead of `record` (everything in flight but itself) is served;
        None while capacity is unknown. The ledger subtracts exactly: no residue of a finished
        request, or of this one, counts as work ahead."""
        capacity = self._capacity()
        if not (capacity > 0.0 and math.isfinite(capacity)):
            return None
        return max(self._ledger.work_ahead_of(record) + self._hidden_work(), 0.0) / capacity

    def queued(self, route_path: str) -> int:
        """Requests waiting in the FIFO of a non-parallel route."""
        fifo = self._fifos.get(route_path)
        return 0 if fifo is None else fifo.statistics().tasks_waiting

    @asynccontextmanager
    async def slot(self, route: Route, record: RequestRecord) -> AsyncIterator[None]:
        """Hold the right to run `record` (admitted, still Created) against the model.

        Raises `Rejected` on entry. The record is Started when the body runs.
        """
        deadline = trio.current_time() + route.max_queue_time
        if self.draining:
            self._reject(record, 503, self._unavailable_retry_after, "draining")
        if not self._is_ready():
            await self._wait_ready(deadline)
            if self.draining:
                self._reject(record, 503, self._unavailable_retry_after, "draining")
            if not self._is_ready():
                self._reject(record, 503, self._unavailable_retry_after, "not ready")

        # Work ahead of this request: everything in the ledger but itself.
        wait = self.wait_ahead_of(record)
        remaining = deadline - trio.current_time()
        if wait is not None and wait > remaining:
            self._reject(record, 429, _seconds(wait - remaining), "estimated wait over max_queue_time")

        if route.parallel:
            self._ledger.start(record, self._wall_clock())
            yield
            return

        fifo = self._fifos.setdefault(route.path, trio.StrictFIFOLock())
        try:
            fifo.acquire_nowait()  # a free lock has no waiters: taking it keeps FIFO order
        except trio.WouldBlock:
            with trio.move_on_at(deadline) as scope:
                await fifo.acquire()
            # Only a waiter still parked is cancelled: once handed the lock, acquire() returns.
            if scope.cancelled_caught:
                wait = self.wait_ahead_of(record)
                self._reject(record, 429, _seconds(wait or 0.0), "queue wait over max_queue_time")
        try:
            self._ledger.start(record, self._wall_clock())
            yield
        finally:
            fifo.release()

    async def wait_comeback(self, deadline: float, down_within: float = 1.0) -> Comeback:
        """The model server refused a request (no connection, or one reset before any answer):
        it has probably just died. Wait until it is `ready` again, at most until `deadline` (trio's
        clock): RETRY then. While the state still says `ready`, the death is awaited `down_within`
        seconds at most, unless `server_gone()` confirms it: a server that neither goes down nor is
        gone by then really refuses (NOT_DOWN). NOT_BACK when it is not ready by the deadline;
        DRAINING as soon as the worker drains."""
        changed = self._ready_changed()
        if self._is_ready() and not self.draining:
            # Any change of state from `ready` is the server going down (it may be back already).
            bound = deadline if self._server_gone() else min(deadline, trio.current_time() + down_within)
            if not await self._changed_by(changed, bound) and not self.draining:
                if not self._server_gone():
                    return Comeback.NOT_DOWN
                # It has exited; the supervisor, busy or slow, has not said so yet: it will.
                changed = self._ready_changed()
                if self._is_ready():
                    await self._changed_by(changed, deadline)
        await self._wait_ready(deadline)
        if self.draining:
            return Comeback.DRAINING
        return Comeback.RETRY if self._is_ready() else Comeback.NOT_BACK

    async def _wait_ready(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            while True:
                # Subscribed before the look: a change from here on wakes the wait, even one
                # made before the wait begins (trio runs the tasks of one batch in any order).
                changed = self._ready_changed()
                if self._is_ready() or self.draining:
                    return
                await self._change_or_drain(changed)

    async def _changed_by(self, changed: trio.Event, deadline: float) -> bool:
        """Wait for `changed` (or draining) until `deadline`; True if it came."""
        with trio.move_on_at(deadline):
            await self._change_or_drain(changed)
            return True
        return False

    async def _change_or_drain(self, changed: trio.Event) -> None:
        async with trio.open_nursery() as nursery:

            async def wake(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wake, changed)
            nursery.start_soon(wake, self._drain)

    def _reject(self, record: RequestRecord, status: int, retry_after: int, reason: str) -> NoReturn:
        self._ledger.reject(record, self._wall_clock(), status)
        raise Rejected(status, min(max(retry_after, 1), MAX_RETRY_AFTER), reason)


def _seconds(value: float) -> int:
    """Whole seconds, rounded up, within 1 and MAX_RETRY_AFTER (an infinite or NaN wait is the most)."""
    if not value <= MAX_RETRY_AFTER:  # also NaN and inf: never math.ceil() a huge float
        return MAX_RETRY_AFTER
    return max(1, math.ceil(value))
