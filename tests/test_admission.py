"""Admission control on a mock clock: FIFO order and cancellation, 429 on estimates and queue timeouts,
waiting for readiness, 503 when not ready or draining, and a bounded Retry-After (issue 8 finding 5)."""

from __future__ import annotations

import orjson
import pytest
import trio
import trio.testing

from backends.spec import Route
from proxy.admission import MAX_RETRY_AFTER, Admission, Comeback, Rejected
from proxy.ledger import Ledger, RequestRecord, RequestStatus

SERIAL = Route("/serial", parallel=False, max_queue_time=1000.0)
PARALLEL = Route("/parallel", parallel=True, max_queue_time=30.0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Readiness:
    """The lifecycle as admission sees it: a flag, a change notification, and whether the supervised
    process has exited (`gone`, ahead of the state change). Also used by tests/test_comeback.py."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.gone = False
        self._changed = trio.Event()

    def is_ready(self) -> bool:
        return self.ready

    def changed(self) -> trio.Event:
        """The event the next change sets, as the worker's `next_state_change`."""
        return self._changed

    def set(self, ready: bool) -> None:
        self.ready = ready
        self._changed.set()
        self._changed = trio.Event()


class World:
    def __init__(self, *, ready: bool = True, capacity: float = 0.0, gone: bool | None = None) -> None:
        """`gone`: whether the supervised process has exited (`self.gone`, for the test to change);
        None: no process to look at, as in attach mode."""
        self.ledger = Ledger()
        self.readiness = Readiness(ready)
        self.capacity = capacity
        self.gone = bool(gone)
        self.admission = Admission(
            self.ledger,
            capacity=lambda: self.capacity,
            is_ready=self.readiness.is_ready,
            ready_changed=self.readiness.changed,
            wall_clock=trio.current_time,
            **({"server_gone": lambda: self.gone} if gone is not None else {}),
        )

    def admit(self, route: Route, workload: float = 1.0, idx: int | None = None) -> RequestRecord:
        return self.ledger.admit(route=route.path, workload=workload, now=trio.current_time(), request_idx=idx)

    async def serve(self, route: Route, record: RequestRecord, order: list[int], hold: float = 1.0) -> None:
        """What the proxy does: take a slot, work, finish the record (cancelled if the client left)."""
        try:
            async with self.admission.slot(route, record):
                order.append(record.key)
                await trio.sleep(hold)
        except trio.Cancelled:
            self.ledger.finish(record, RequestStatus.CANCELLED, trio.current_time())
            raise
        self.ledger.finish(record, RequestStatus.SUCCESS, trio.current_time(), 200)


async def test_fifo_order_is_arrival_order(clock: trio.testing.MockClock) -> None:
    world = World()
    order: list[int] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        holder = world.admit(SERIAL)

        async def hold() -> None:
            async with world.admission.slot(SERIAL, holder):
                await release.wait()

        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        waiters = [world.admit(SERIAL) for _ in range(10)]
        for position, record in enumerate(waiters, start=1):
            nursery.start_soon(world.serve, SERIAL, record, order)
            await trio.testing.wait_all_tasks_blocked()  # queued before the next one arrives
            assert world.admission.queued(SERIAL.path) == position
        assert all(r.status is RequestStatus.CREATED for r in waiters)
        release.set()
    assert order == [r.key for r in waiters]
    starts = [r.work_started_at for r in waiters]
    assert starts == sorted(starts) and len(set(starts)) == 10  # one at a time, 1 s each
    assert world.ledger.in_flight == 1  # only the holder, which this test never finished


async def test_cancelled_waiter_does_not_block_the_next(clock: trio.testing.MockClock) -> None:
    world = World()
    order: list[int] = []
    release = trio.Event()
    scopes: list[trio.CancelScope] = []

    async def client(record: RequestRecord) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await world.serve(SERIAL, record, order)

    async with trio.open_nursery() as nursery:
        holder = world.admit(SERIAL)

        async def hold() -> None:
            async with world.admission.slot(SERIAL, holder):
                await release.wait()

        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        records = [world.admit(SERIAL) for _ in range(3)]
        for record in records:
            nursery.start_soon(client, record)
            await trio.testing.wait_all_tasks_blocked()
        scopes[1].cancel()  # the middle client leaves
        await trio.testing.wait_all_tasks_blocked()
        assert world.admission.queued(SERIAL.path) == 2
        release.set()
    assert order == [records[0].key, records[2].key]
    assert [r.status for r in records] == [RequestStatus.SUCCESS, RequestStatus.CANCELLED, RequestStatus.SUCCESS]
    assert records[1].work_started_at is None
    assert world.admission.queued(SERIAL.path) == 0


async def test_parallel_routes_enter_at_once(clock: trio.testing.MockClock) -> None:
    world = World()
    inside = 0
    peak = 0

    async def one() -> None:
        nonlocal inside, peak
        async with world.admission.slot(PARALLEL, world.admit(PARALLEL)):
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(1)
            inside -= 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert peak == 5
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_429_when_the_estimate_exceeds_max_queue_time(clock: trio.testing.MockClock) -> None:
    world = World(capacity=10.0)
    busy = world.admit(PARALLEL, workload=500.0)
    world.ledger.start(busy, 0.0)
    record = world.admit(PARALLEL, workload=10.0, idx=7)
    with pytest.raises(Rejected) as info:
        async with world.admission.slot(PARALLEL, record):
            pytest.fail("must not enter")
    # 500 units ahead at 10 units/s is 50 s against 30 s allowed: retry in 20 s.
    assert (info.value.status, info.value.retry_after) == (429, 20)
    assert (record.status, record.http_status) == (RequestStatus.REJECTED, 429)
    assert world.ledger.peek_counters().rejected_work == 10.0
    assert world.ledger.waiting_work == 0.0


async def test_estimate_within_max_queue_time_is_admitted(clock: trio.testing.MockClock) -> None:
    world = World(capacity=10.0)
    world.ledger.start(world.admit(PARALLEL, workload=300.0), 0.0)  # exactly 30 s ahead
    record = world.admit(PARALLEL, workload=1000.0)  # its own size does not count
    async with world.admission.slot(PARALLEL, record):
        assert record.status is RequestStatus.STARTED
    assert world.admission.estimated_wait() == pytest.approx(130.0)


async def test_unknown_capacity_never_rejects_on_estimates(clock: trio.testing.MockClock) -> None:
    world = World(capacity=0.0)
    world.ledger.start(world.admit(PARALLEL, workload=1e9), 0.0)
    record = world.admit(PARALLEL)
    async with world.admission.slot(PARALLEL, record):
        assert record.status is RequestStatus.STARTED
    assert world.admission.estimated_wait() is None


async def test_fifo_wait_past_max_queue_time_is_429(clock: trio.testing.MockClock) -> None:
    world = World()
    route = Route("/serial", parallel=False, max_queue_time=30.0)
    order: list[int] = []
    async with trio.open_nursery() as nursery:
        first, second, third = (world.admit(route) for _ in range(3))
        nursery.start_soon(world.serve, route, first, order, 45.0)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with pytest.raises(Rejected) as info:
            async with world.admission.slot(route, second):
                pytest.fail("must not enter")
        assert trio.current_time() - start == pytest.approx(30.0)
        assert (info.value.status, second.status) == (429, RequestStatus.REJECTED)
        assert info.value.retry_after >= 1
        # The lock is intact: the next request gets it once the first is done.
        await world.serve(route, third, order)
    assert order == [first.key, third.key]


async def test_waits_for_ready_then_proceeds(clock: trio.testing.MockClock) -> None:
    world = World(ready=False)
    record = world.admit(PARALLEL)
    entered_at: list[float] = []

    async def request() -> None:
        async with world.admission.slot(PARALLEL, record):
            entered_at.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(3.0)
        world.readiness.set(False)  # a change that is not readiness: keep waiting
        await trio.sleep(2.0)
        assert entered_at == [] and record.status is RequestStatus.CREATED
        world.readiness.set(True)
    assert entered_at == [pytest.approx(start + 5.0)]
    assert record.status is RequestStatus.STARTED


async def test_503_when_not_ready_within_max_queue_time(clock: trio.testing.MockClock) -> None:
    world = World(ready=False)
    record = world.admit(PARALLEL)
    start = trio.current_time()
    with pytest.raises(Rejected) as info:
        async with world.admission.slot(PARALLEL, record):
            pytest.fail("must not enter")
    assert trio.current_time() - start == pytest.approx(PARALLEL.max_queue_time)
    assert (info.value.status, info.value.retry_after, info.value.reason) == (503, 5, "not ready")
    assert (record.status, record.http_status) == (RequestStatus.REJECTED, 503)


async def test_503_at_once_when_draining(clock: trio.testing.MockClock) -> None:
    world = World()
    world.admission.set_draining()
    record = world.admit(SERIAL)
    start = trio.current_time()
    with pytest.raises(Rejected) as info:
        async with world.admission.slot(SERIAL, record):
            pytest.fail("must not enter")
    assert trio.current_time() == start
    assert (info.value.status, info.value.reason) == (503, "draining")
    assert record.status is RequestStatus.REJECTED


async def test_draining_wakes_requests_waiting_for_ready(clock: trio.testing.MockClock) -> None:
    world = World(ready=False)
    record = world.admit(PARALLEL)
    outcome: list[Rejected] = []

    async def request() -> None:
        with pytest.raises(Rejected) as info:
            async with world.admission.slot(PARALLEL, record):
                pytest.fail("must not enter")
        outcome.append(info.value)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(2.0)
        world.admission.set_draining()
    assert [(r.status, r.reason) for r in outcome] == [(503, "draining")]
    assert trio.current_time() - start == pytest.approx(2.0)


# -- a refused connection while `ready`: wait for the restart the supervisor is about to notice
# (issue 9: `wait_comeback` takes the request's deadline and says why it gives up, since a server
# that did not come back in time is a 503 and one that never went down a 502; it returned a bool.)


async def test_comeback_after_a_crash_is_awaited(clock: trio.testing.MockClock) -> None:
    world = World(ready=True)
    result: list[Comeback] = []

    async def request() -> None:
        result.append(await world.admission.wait_comeback(trio.current_time() + PARALLEL.max_queue_time))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(0.005)  # the supervisor notices the exit
        world.readiness.set(False)
        await trio.sleep(5.0)  # restart and reload
        assert result == []
        world.readiness.set(True)
    assert result == [Comeback.RETRY]
    assert trio.current_time() == pytest.approx(5.005)


async def test_no_comeback_when_the_server_never_went_down(clock: trio.testing.MockClock) -> None:
    world = World(ready=True)
    assert await world.admission.wait_comeback(100.0, down_within=1.0) is Comeback.NOT_DOWN
    assert trio.current_time() == pytest.approx(1.0)


async def test_no_comeback_past_the_queue_time(clock: trio.testing.MockClock) -> None:
    world = World(ready=True)
    async with trio.open_nursery() as nursery:
        async def crash() -> None:
            world.readiness.set(False)

        nursery.start_soon(crash)
        deadline = trio.current_time() + PARALLEL.max_queue_time
        assert await world.admission.wait_comeback(deadline) is Comeback.NOT_BACK  # never back within 30 s
    assert trio.current_time() == pytest.approx(PARALLEL.max_queue_time)


async def test_a_server_known_gone_is_awaited_past_down_within(clock: trio.testing.MockClock) -> None:
    """The process has exited but the state machine is late to say so (a busy supervisor): the
    request must not give up after `down_within` with a 502, it waits for the restart."""
    world = World(ready=True, gone=True)
    result: list[Comeback] = []

    async def request() -> None:
        result.append(await world.admission.wait_comeback(30.0, down_within=1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(3.0)  # well past down_within
        world.readiness.set(False)
        world.gone = False  # the new process runs
        await trio.sleep(2.0)
        world.readiness.set(True)
    assert result == [Comeback.RETRY]
    assert trio.current_time() == pytest.approx(5.0)


async def test_a_death_found_only_after_down_within_is_awaited(clock: trio.testing.MockClock) -> None:
    """Still alive at the refusal (the kernel closes the socket a moment before the process is
    gone), exited by the end of `down_within`: the request waits for the restart."""
    world = World(ready=True, gone=False)
    result: list[Comeback] = []

    async def request() -> None:
        result.append(await world.admission.wait_comeback(30.0, down_within=1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(0.001)
        world.gone = True
        await trio.sleep(2.0)
        assert result == []
        world.readiness.set(False)
        await trio.sleep(1.0)
        world.readiness.set(True)
    assert result == [Comeback.RETRY]
    assert trio.current_time() == pytest.approx(3.001)


async def test_a_restart_faster_than_the_waiter_is_a_comeback(clock: trio.testing.MockClock) -> None:
    """Any change of state from `ready` means it went down: ready again by the time the request
    looks is a comeback, not a server that never went down."""
    world = World(ready=True)
    result: list[Comeback] = []

    async def request() -> None:
        result.append(await world.admission.wait_comeback(30.0, down_within=1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(0.1)
        world.readiness.set(False)
        world.readiness.set(True)  # before the waiter runs again
    assert result == [Comeback.RETRY]
    assert trio.current_time() == pytest.approx(0.1)


async def test_draining_ends_a_comeback_wait(clock: trio.testing.MockClock) -> None:
    world = World(ready=True)
    result: list[Comeback] = []

    async def request() -> None:
        result.append(await world.admission.wait_comeback(30.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(0.1)
        world.readiness.set(False)
        await trio.sleep(1.0)
        world.admission.set_draining()
    assert result == [Comeback.DRAINING]
    assert trio.current_time() == pytest.approx(1.1)


# -- a change of state between a look at it and the wait for the next one is never missed (issue 9:
# requests waiting for `ready` slept through it until their deadline, then got 503)


def flipping(world: World, ready_after_look: int, to: bool) -> Admission:
    """An admission whose `is_ready` sets readiness to `to` right after its n-th look: the lifecycle
    moving on between the look and the wait (trio runs the tasks of a batch in any order)."""
    looks = 0

    def is_ready() -> bool:
        nonlocal looks
        looks += 1
        ready = world.readiness.ready
        if looks == ready_after_look:
            world.readiness.set(to)
        return ready

    return Admission(world.ledger, lambda: 0.0, is_ready, world.readiness.changed, wall_clock=trio.current_time)


async def test_ready_right_after_the_look_is_not_missed(clock: trio.testing.MockClock) -> None:
    world = World(ready=False)
    admission = flipping(world, ready_after_look=2, to=True)  # the 2nd look is the waiting loop's
    async with admission.slot(PARALLEL, world.admit(PARALLEL)):
        pass
    assert trio.current_time() == 0.0  # not a 503 at the deadline


async def test_a_crash_right_after_the_look_is_not_missed(clock: trio.testing.MockClock) -> None:
    world = World(ready=True)
    admission = flipping(world, ready_after_look=1, to=False)
    result: list[Comeback] = []

    async def request() -> None:
        result.append(await admission.wait_comeback(30.0, down_within=1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.sleep(2.0)  # past down_within: only a missed change would have given up by now
        assert result == []
        world.readiness.set(True)
    assert result == [Comeback.RETRY] and trio.current_time() == pytest.approx(2.0)


async def test_hidden_work_counts_in_the_estimated_wait(clock: trio.testing.MockClock) -> None:
    # 400 units the model server holds that never passed the proxy, at 10 units/s: 40 s > 30 s.
    world = World(ready=True, capacity=10.0)
    world.admission = Admission(
        world.ledger, capacity=lambda: 10.0, is_ready=world.readiness.is_ready,
        ready_changed=world.readiness.changed, wall_clock=trio.current_time, hidden_work=lambda: 400.0,
    )
    record = world.admit(PARALLEL, workload=1.0)
    with pytest.raises(Rejected) as rejected:
        async with world.admission.slot(PARALLEL, record):
            pass
    assert rejected.value.status == 429 and rejected.value.retry_after == 10
    assert world.admission.estimated_wait() == pytest.approx(40.0)


@pytest.mark.parametrize("huge", [1e15, 1e300, 1.7976931348623157e308])
async def test_retry_after_is_bounded_whatever_the_work_ahead(clock: trio.testing.MockClock, huge: float) -> None:
    # Today: 1e15 units ahead at 100 units/s gave Retry-After 9999999999970, and 1e300 an integer
    # orjson could not write (a 500 for every other request).
    world = World(capacity=100.0)
    world.ledger.start(world.admit(PARALLEL, workload=huge), 0.0)
    record = world.admit(PARALLEL, workload=1.0)
    with pytest.raises(Rejected) as info:
        async with world.admission.slot(PARALLEL, record):
            pytest.fail("must not enter")
    assert (info.value.status, info.value.retry_after) == (429, MAX_RETRY_AFTER)
    assert MAX_RETRY_AFTER == 300
    orjson.dumps({"retry_after": info.value.retry_after})  # what the handler writes


async def test_a_long_503_retry_after_is_bounded_too(clock: trio.testing.MockClock) -> None:
    world = World(ready=True)
    world.admission = Admission(
        world.ledger, capacity=lambda: 0.0, is_ready=world.readiness.is_ready,
        ready_changed=world.readiness.changed, wall_clock=trio.current_time, unavailable_retry_after=86_400,
    )
    world.admission.set_draining()
    with pytest.raises(Rejected) as info:
        async with world.admission.slot(PARALLEL, world.admit(PARALLEL)):
            pass
    assert (info.value.status, info.value.retry_after) == (503, MAX_RETRY_AFTER)


async def test_a_lone_request_sees_no_residue_of_finished_work(clock: trio.testing.MockClock) -> None:
    # Its own workload is taken out of the total exactly (the ledger's integer units). Today's float
    # arithmetic left 0.3 + 0.1 + 0.2 - 0.1 - 0.2 - 0.3 = 1.1e-16 units "ahead" of a lone request,
    # which at a tiny capacity (1e-20 units/s) was an 11,000-second wait and a 429.
    world = World(capacity=1e-20)
    record = world.admit(PARALLEL, workload=0.3)
    for workload in (0.1, 0.2):
        world.ledger.reject(world.admit(PARALLEL, workload=workload), 0.0, 429)
    assert world.admission.wait_ahead_of(record) == 0.0
    async with world.admission.slot(PARALLEL, record):
        assert record.status is RequestStatus.STARTED
