"""The autoscaler reporter: the wire object and the state mapping (pure), the cadence on a mock clock
(httpx.MockTransport, no sockets), and the faults against the fake autoscaler over real HTTP:
failover, a slow autoscaler, lost counters, /delete_requests/, error reports, outage logging."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from proxy.ledger import Counters, Ledger, RequestStatus
from supervisor.reporter import (
    WORKER_STATUS_FIELDS,
    DiskUsage,
    ReportState,
    ReportView,
    Reporter,
    WorkerIdentity,
    build_worker_status,
    parse_worker_id,
    send_error_report,
)
from supervisor.states import State, StateMachine
from tests.fake_autoscaler import DELETE, STATUS, FakeAutoscaler
from tests.harness import free_port

TOKEN = "mtoken-0123456789abcdef"
IDENTITY = WorkerIdentity(id=4242, mtoken=TOKEN, version="shepherd-test", url="https://1.2.3.4:40000")

FLOAT_FIELDS = ("loadtime", "cur_load", "rej_load", "new_load", "max_perf", "cur_perf", "additional_disk_usage",
                "disk_usage")
INT_FIELDS = ("id", "num_requests_working", "num_requests_recieved", "cur_capacity", "max_capacity")
STR_FIELDS = ("mtoken", "version", "error_msg", "url")


def check_types(report: dict[str, Any]) -> None:
    assert set(report) == set(WORKER_STATUS_FIELDS)
    for name in FLOAT_FIELDS:
        assert type(report[name]) is float, (name, report[name])
    for name in INT_FIELDS:
        assert type(report[name]) is int, (name, report[name])
    for name in STR_FIELDS:
        assert type(report[name]) is str, (name, report[name])
    assert type(report["working_request_idxs"]) is list
    assert all(type(i) is int for i in report["working_request_idxs"])


def fixed_disk(used: float = 40.0) -> Callable[[], Awaitable[DiskUsage]]:
    async def sample() -> DiskUsage:
        return DiskUsage(100.0, used)

    return sample


def ledger_view(ledger: Ledger, state: ReportState | None = None) -> Callable[[], ReportView]:
    report_state = state or ReportState(0.0)
    return lambda: report_state.view(ledger)


# ---------------------------------------------------------------------------------------------
# Pure: the wire object and the state mapping


def test_build_worker_status_has_vasts_fields_and_types() -> None:
    view = ReportView("ready", 12.5, 300.0, 48.0, "", 3, 17, (5, 6, 9))
    counters = Counters(received_work=64.0, withdrawn_work=16.0, rejected_work=8.0, served_work=32.0)
    body = build_worker_status(IDENTITY, view, counters, DiskUsage(100.0, 41.5), DiskUsage(100.0, 40.0))
    check_types(body)
    assert list(body) == list(WORKER_STATUS_FIELDS)
    assert body["id"] == 4242 and body["mtoken"] == TOKEN and body["url"] == "https://1.2.3.4:40000"
    assert (body["loadtime"], body["max_perf"], body["cur_load"]) == (12.5, 300.0, 48.0)
    assert (body["new_load"], body["rej_load"], body["cur_perf"]) == (48.0, 8.0, 32.0)
    assert (body["num_requests_working"], body["num_requests_recieved"]) == (3, 17)
    assert body["working_request_idxs"] == [5, 6, 9]
    assert (body["additional_disk_usage"], body["disk_usage"]) == (1.5, 41.5)
    assert (body["cur_capacity"], body["max_capacity"]) == (0, 0)


def test_build_worker_status_sanitises_numbers() -> None:
    view = ReportView("loading", math.nan, math.inf, -1.0, "x" * 10_000, 0, 0, ())
    body = build_worker_status(IDENTITY, view, Counters(), DiskUsage(1.0, 0.5))
    check_types(body)
    assert (body["loadtime"], body["max_perf"], body["cur_load"], body["additional_disk_usage"]) == (0.0, 0.0, 0.0, 0.0)
    assert len(body["error_msg"]) == 4096


def test_parse_worker_id() -> None:
    assert [parse_worker_id(t) for t in ("123", " 7 ", None, "", "c-abc")] == [123, 7, 0, 0, 0]


def test_report_state_follows_the_lifecycle() -> None:
    now = [100.0]
    machine = StateMachine(lambda: now[0])
    state = ReportState(machine.since)
    machine.subscribe(state.on_transition)
    ledger = Ledger()
    state.set_max_perf(250.0)

    machine.to(State.LOADING, "started")
    now[0] = 130.0
    machine.to(State.WARMING, "health ok")
    assert (state.view(ledger).loadtime, state.view(ledger).max_perf) == (0.0, 0.0)
    now[0] = 142.0
    machine.to(State.READY, "ready")
    view = state.view(ledger)
    assert (view.state, view.loadtime, view.max_perf, view.error_msg) == ("ready", 42.0, 250.0, "")

    now[0] = 200.0
    machine.to(State.UNHEALTHY, "3 health checks failed")
    machine.to(State.READY, "back")
    assert state.view(ledger).loadtime == 42.0  # not a new load

    machine.to(State.RESTARTING, "error line: CUDA out of memory")
    assert (state.view(ledger).loadtime, state.view(ledger).max_perf, state.error_msg) == (0.0, 0.0, "")
    now[0] = 210.0
    machine.to(State.STARTING, "restart 1")
    machine.to(State.LOADING, "started")
    machine.to(State.FAILED, "fatal line: Error: DownloadError")
    assert state.view(ledger).error_msg == "fatal line: Error: DownloadError"
    assert state.view(ledger).loadtime == 0.0

    # attach mode: the server comes back; the error stays until it is ready again
    machine.to(State.LOADING, "load line seen again")
    assert state.view(ledger).error_msg == "fatal line: Error: DownloadError"
    machine.to(State.WARMING, "health ok")
    now[0] = 215.0
    machine.to(State.READY, "ready")
    assert state.view(ledger).error_msg == ""
    assert state.view(ledger).loadtime == 5.0  # from the start of this run (restart at 210)


def test_report_state_reads_the_ledger_like_vast() -> None:
    ledger = Ledger()
    state = ReportState(0.0)
    waiting = ledger.admit(route="/g", workload=10, now=1.0, request_idx=7)
    running = ledger.admit(route="/g", workload=5, now=1.0, request_idx=8)
    ledger.admit(route="/g", workload=1, now=1.0)  # no request_idx: not in working_request_idxs
    ledger.start(running, 2.0)
    view = state.view(ledger)
    assert view.cur_load == 16.0  # Vast counts queued requests as working
    assert (view.num_requests_working, view.num_requests_recieved) == (3, 3)
    assert sorted(view.working_request_idxs) == [7, 8]
    ledger.finish(waiting, RequestStatus.CANCELLED, 3.0)
    assert state.view(ledger).cur_load == 6.0
    # work the model server holds beyond the proxy's (the estimate's hidden work) is load too
    assert state.view(ledger, hidden_work=4.0).cur_load == 10.0


# ---------------------------------------------------------------------------------------------
# Cadence on a mock clock: the autoscaler is an httpx.MockTransport


class Scripted:
    """A mock autoscaler: records (virtual time, path, body) and answers by `behaviour`."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, dict[str, Any]]] = []
        self.accepted: list[tuple[float, str, dict[str, Any]]] = []
        self.behaviour: Callable[[str, str], Awaitable[int]] | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        path = request.url.path
        self.calls.append((trio.current_time(), path, body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status = await self.behaviour(str(request.url.netloc.decode()), path) if self.behaviour else 200
        finally:
            self.in_flight -= 1
        if 200 <= status < 300:
            self.accepted.append((trio.current_time(), path, body))
        # echo the request, token included, to check it never reaches a log line
        return httpx.Response(status, json={"echo": body} if status >= 400 else {"ok": True})

    def status_times(self) -> list[float]:
        return [t for t, path, _ in self.accepted if path == STATUS]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_first_report_at_once_then_a_heartbeat_every_10s(clock: trio.testing.MockClock) -> None:
    mock = Scripted()
    async with mock.client() as client, trio.open_nursery() as nursery:
        ledger = Ledger()
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
        nursery.start_soon(reporter.run)
        await trio.sleep(35)
        nursery.cancel_scope.cancel()
    assert mock.status_times() == pytest.approx([0.0, 10.0, 20.0, 30.0], abs=0.01)
    assert reporter.reports_sent == 4


async def test_poke_reports_within_min_gap_and_coalesces(clock: trio.testing.MockClock) -> None:
    mock = Scripted()
    async with mock.client() as client, trio.open_nursery() as nursery:
        ledger = Ledger()
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
        nursery.start_soon(reporter.run)
        await trio.sleep(3.0)
        reporter.poke()  # one change
        await trio.sleep(1.0)
        for _ in range(10):  # a burst of arrivals over 0.1 s
            reporter.poke()
            await trio.sleep(0.01)
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    times = mock.status_times()
    assert times[0] == pytest.approx(0.0, abs=0.01)
    assert times[1] == pytest.approx(3.0, abs=0.01)  # not held back to the heartbeat
    burst = [t for t in times if 4.0 <= t < 6.0]
    assert 1 <= len(burst) <= 2
    assert burst[0] == pytest.approx(4.0, abs=0.01)
    assert all(b - a >= 0.2 - 1e-9 for a, b in zip(times, times[1:]))


async def test_state_change_reaches_the_autoscaler_within_1s(clock: trio.testing.MockClock) -> None:
    mock = Scripted()
    machine = StateMachine(trio.current_time)
    state = ReportState(machine.since)
    ledger = Ledger()
    async with mock.client() as client, trio.open_nursery() as nursery:
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, ledger_view(ledger, state), fixed_disk())
        machine.subscribe(state.on_transition)
        machine.subscribe(lambda _t: reporter.poke())
        nursery.start_soon(reporter.run)
        machine.to(State.LOADING, "started")
        await trio.sleep(2.5)
        machine.to(State.WARMING, "health ok")
        state.set_max_perf(123.0)
        machine.to(State.READY, "ready")
        ready_at = trio.current_time()
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    ready = [(t, body) for t, path, body in mock.accepted if path == STATUS and body["loadtime"] > 0]
    assert ready, "no report with loadtime > 0"
    t, body = ready[0]
    assert t - ready_at < 1.0
    assert body["loadtime"] == pytest.approx(2.5, abs=0.01) and body["max_perf"] == 123.0


async def test_a_30s_slow_autoscaler_keeps_one_report_in_flight(clock: trio.testing.MockClock) -> None:
    mock = Scripted()

    async def slow(_netloc: str, _path: str) -> int:
        await trio.sleep(30)
        return 200

    mock.behaviour = slow
    async with mock.client() as client, trio.open_nursery() as nursery:
        ledger = Ledger()
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
        nursery.start_soon(reporter.run)
        pokes = 0
        while trio.current_time() < 20.0:  # a request every 50 ms pokes the reporter
            before = trio.current_time()
            reporter.poke()
            await trio.sleep(0.05)
            assert trio.current_time() - before == pytest.approx(0.05)
            pokes += 1
        nursery.cancel_scope.cancel()
    assert pokes >= 399
    assert mock.max_in_flight == 1
    # each try times out after 5 s, then waits out the backoff (1, 2, 4 s): a handful of tries, not 400
    assert 2 <= len(mock.calls) <= 4
    assert reporter.failures == len(mock.calls)


async def test_counters_survive_failed_reports(clock: trio.testing.MockClock) -> None:
    mock = Scripted()
    up_at = 6.0

    async def flaky(_netloc: str, _path: str) -> int:
        return 200 if trio.current_time() >= up_at else 500

    mock.behaviour = flaky
    ledger = Ledger()
    total = 0.0
    async with mock.client() as client, trio.open_nursery() as nursery:
        reporter = Reporter(client, ["http://a", "http://b"], IDENTITY, ledger, ledger_view(ledger), fixed_disk(),
                            retry_initial=0.5)
        nursery.start_soon(reporter.run)
        for i in range(40):
            record = ledger.admit(route="/g", workload=float(i % 5 + 1), now=0.0, request_idx=i)
            total += record.workload
            ledger.start(record, 0.0)
            ledger.finish(record, RequestStatus.SUCCESS, 0.0)
            reporter.poke()
            await trio.sleep(0.25)  # 10 s of traffic across the outage
        await trio.sleep(12)
        nursery.cancel_scope.cancel()
    accepted = [body for _t, path, body in mock.accepted if path == STATUS]
    assert any(t < up_at for t, path, _ in mock.calls if path == STATUS)  # there were failed tries
    assert sum(b["new_load"] for b in accepted) == pytest.approx(total)
    assert sum(b["cur_perf"] for b in accepted) == pytest.approx(total)
    assert ledger.peek_counters() == Counters()


async def test_delete_requests_batches_and_returns_on_failure(clock: trio.testing.MockClock) -> None:
    mock = Scripted()
    up_at = 3.0

    async def deletes_down(_netloc: str, path: str) -> int:
        return 500 if path == DELETE and trio.current_time() < up_at else 200

    mock.behaviour = deletes_down
    ledger = Ledger()
    for i in range(1200):
        record = ledger.admit(route="/g", workload=1.0, now=1000.0 + i, request_idx=i)
        ledger.finish(record, RequestStatus.ERROR if i % 7 == 0 else RequestStatus.SUCCESS, 1001.0 + i)
    async with mock.client() as client, trio.open_nursery() as nursery:
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, ledger_view(ledger), fixed_disk(),
                            delete_batch=500, retry_initial=0.5)
        nursery.start_soon(reporter.run)
        await trio.sleep(up_at - 0.01)
        assert ledger.finished_pending == 1200  # every failed batch went back
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    batches = [body for _t, path, body in mock.accepted if path == DELETE]
    assert [len(b["requests"]) for b in batches] == [500, 500, 200]
    sent = [item for b in batches for item in b["requests"]]
    assert [item["request_idx"] for item in sent] == list(range(1200))  # oldest first, none twice
    assert all(b["worker_id"] == 4242 and b["mtoken"] == TOKEN for b in batches)
    assert sent[8] == {"request_idx": 8, "success": True, "status": "Success", "entered_queue_at": 1008.0,
                       "work_started_at": None, "work_completed_at": 1009.0}
    assert sent[0]["success"] is False and sent[0]["status"] == "Error"
    assert ledger.finished_pending == 0 and reporter.delete_records_sent == 1200


async def test_outage_is_logged_once_and_the_token_never(clock: trio.testing.MockClock) -> None:
    mock = Scripted()
    up_at = 30.0

    async def down(_netloc: str, _path: str) -> int:
        return 200 if trio.current_time() >= up_at else 503

    mock.behaviour = down
    ledger = Ledger()
    with structlog.testing.capture_logs() as logs:
        async with mock.client() as client, trio.open_nursery() as nursery:
            reporter = Reporter(client, ["http://a"], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
            nursery.start_soon(reporter.run)
            for _ in range(100):
                reporter.poke()
                await trio.sleep(0.3)
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    unreachable = [e for e in logs if e["event"] == "reporter.unreachable"]
    recovered = [e for e in logs if e["event"] == "reporter.recovered"]
    assert reporter.failures >= 5
    assert [e["path"] for e in unreachable] == [STATUS]
    assert unreachable[0]["address"] == "http://a" and "HTTP 503" in unreachable[0]["error"]
    assert [e["path"] for e in recovered] == [STATUS] and recovered[0]["failed_tries"] == reporter.failures
    assert TOKEN not in repr(logs)
    assert TOKEN in repr(mock.calls)  # the 503 body echoed it: the scrubbing was needed
    assert TOKEN not in repr(IDENTITY)


# ---------------------------------------------------------------------------------------------
# Over real HTTP, against the fake autoscaler


@pytest.fixture
def fake() -> Any:
    with FakeAutoscaler() as server:
        yield server


async def test_report_over_http_has_every_field(fake: FakeAutoscaler) -> None:
    ledger = Ledger()
    record = ledger.admit(route="/g", workload=7.0, now=1.0, request_idx=11)
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        reporter = Reporter(client, [fake.url], IDENTITY, ledger, ledger_view(ledger))  # the real disk probe
        nursery.start_soon(reporter.run)
        got = await fake.wait_for_report_async(timeout=5)
        nursery.cancel_scope.cancel()
    body = got.body
    check_types(body)
    assert body["id"] == 4242 and body["version"] == "shepherd-test" and body["url"] == IDENTITY.url
    assert (body["cur_load"], body["num_requests_working"], body["working_request_idxs"]) == (7.0, 1, [11])
    assert body["new_load"] == 7.0 and body["disk_usage"] > 0.0
    assert record.status is RequestStatus.CREATED


async def test_arrivals_and_completions_over_http(fake: FakeAutoscaler) -> None:
    ledger = Ledger()
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        reporter = Reporter(client, [fake.url], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
        nursery.start_soon(reporter.run)
        await fake.wait_for_report_async(timeout=5)
        arrived = time.monotonic()
        now = time.time()
        a = ledger.admit(route="/g", workload=3.0, now=now, request_idx=21)
        b = ledger.admit(route="/g", workload=4.0, now=now, request_idx=22)
        reporter.poke()
        seen = await fake.wait_for_report_async(lambda r: r["num_requests_working"] == 2, timeout=2)
        assert seen.at - arrived < 1.0
        assert seen.body["cur_load"] == 7.0 and sorted(seen.body["working_request_idxs"]) == [21, 22]
        ledger.start(a, now + 0.1)
        ledger.finish(a, RequestStatus.SUCCESS, now + 0.2, 200)
        ledger.reject(b, now + 0.3, 429)
        ended = time.monotonic()
        reporter.poke()
        done = await fake.wait_for_report_async(lambda r: len(r["requests"]) == 2, timeout=3, path=DELETE)
        idle = await fake.wait_for_report_async(lambda r: r["num_requests_working"] == 0, timeout=2, after=ended)
        assert idle.at - ended < 1.0 and done.at - ended < 1.5
        nursery.cancel_scope.cancel()
    items = {item["request_idx"]: item for item in done.body["requests"]}
    assert items[21] == {"request_idx": 21, "success": True, "status": "Success", "entered_queue_at": now,
                         "work_started_at": now + 0.1, "work_completed_at": now + 0.2}
    assert items[22]["status"] == "Rejected" and items[22]["success"] is False
    assert idle.body["cur_load"] == 0.0
    # Vast's new_load is floored per report: the 7 were demand when reported; the later withdrawal of
    # the rejected 4 cannot go below zero, it shows as rej_load instead.
    assert sum(r["new_load"] for r in fake.reports()) == 7.0
    assert sum(r["rej_load"] for r in fake.reports()) == 4.0


async def test_dead_first_address_fails_over_to_the_second(fake: FakeAutoscaler) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    ledger = Ledger()
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            reporter = Reporter(client, [dead, fake.url], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
            nursery.start_soon(reporter.run)
            await fake.wait_for_report_async(timeout=5)
            after = time.monotonic()
            reporter.poke()
            await fake.wait_for_report_async(timeout=5, after=after)
            nursery.cancel_scope.cancel()
    assert reporter.failures >= 2 and reporter.stats().last_address == fake.url
    unreachable = [e for e in logs if e["event"] == "reporter.unreachable"]
    assert [e["address"] for e in unreachable] == [dead]  # once, though it failed on every report
    assert "ConnectError" in unreachable[0]["error"]


async def test_slow_autoscaler_does_not_slow_requests(fake: FakeAutoscaler) -> None:
    fake.set_mode("slow", slow_seconds=30.0)
    ledger = Ledger()
    worst = 0.0
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        reporter = Reporter(client, [fake.url], IDENTITY, ledger, ledger_view(ledger), fixed_disk(), timeout=1.0)
        nursery.start_soon(reporter.run)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # "requests": admit, poke, yield, finish
            t0 = time.perf_counter()
            record = ledger.admit(route="/g", workload=1.0, now=time.time(), request_idx=1)
            reporter.poke()
            await trio.sleep(0)
            ledger.start(record, time.time())
            ledger.finish(record, RequestStatus.SUCCESS, time.time())
            await trio.sleep(0.01)
            worst = max(worst, time.perf_counter() - t0 - 0.01)
        nursery.cancel_scope.cancel()
    assert worst < 0.25  # a reporter that waited on the autoscaler would show its 1 s timeout here
    assert fake.max_in_flight <= 2  # one status and one delete try at a time, however many pokes
    assert reporter.failures >= 1 and fake.reports() == []
    assert ledger.peek_counters().received_work > 0  # kept for the next accepted report


async def test_flush_sends_the_last_word(fake: FakeAutoscaler) -> None:
    ledger = Ledger()
    machine = StateMachine(trio.current_time)
    state = ReportState(machine.since)
    machine.subscribe(state.on_transition)
    record = ledger.admit(route="/g", workload=2.0, now=5.0, request_idx=3)
    ledger.finish(record, RequestStatus.ERROR, 6.0, 502)
    async with httpx.AsyncClient() as client:
        reporter = Reporter(client, [fake.url], IDENTITY, ledger, ledger_view(ledger, state), fixed_disk())
        machine.to(State.FAILED, "gave up after 5 failures without reaching ready; last: error line: boom")
        assert await reporter.flush(timeout=5)
    (body,) = fake.reports()
    assert body["error_msg"].endswith("error line: boom") and body["loadtime"] == 0.0
    (deleted,) = fake.reports(DELETE)
    assert deleted["requests"][0]["status"] == "Error"


async def test_start_failure_sends_one_error_report(fake: FakeAutoscaler) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with httpx.AsyncClient() as client:
        sent = await send_error_report(client, [dead, fake.url], IDENTITY, "cannot load TLS files: no such file",
                                       disk=fixed_disk())
    assert sent
    (body,) = fake.reports()
    check_types(body)
    assert body["error_msg"] == "cannot load TLS files: no such file"
    assert (body["loadtime"], body["max_perf"], body["id"]) == (0.0, 0.0, 4242)


async def test_error_report_to_an_erroring_autoscaler_returns_false(fake: FakeAutoscaler) -> None:
    fake.set_mode("error500")
    async with httpx.AsyncClient() as client:
        assert not await send_error_report(client, [fake.url], IDENTITY, "port in use", disk=fixed_disk())
    assert [r.answered for r in fake.all()] == [500]


async def test_dropped_connection_counts_as_failure(fake: FakeAutoscaler) -> None:
    fake.set_mode("down")
    ledger = Ledger()
    ledger.admit(route="/g", workload=5.0, now=1.0, request_idx=1)
    async with httpx.AsyncClient() as client:
        reporter = Reporter(client, [fake.url], IDENTITY, ledger, ledger_view(ledger), fixed_disk())
        assert not await reporter.flush(timeout=3)
        assert ledger.peek_counters().received_work == 5.0
        fake.set_mode("ok")
        assert await reporter.flush(timeout=3)
    assert [r.answered for r in fake.all()] == [None, 200]
    assert fake.reports()[0]["new_load"] == 5.0 and ledger.peek_counters() == Counters()


def test_route_and_sign_auth_verify_with_the_served_key() -> None:
    with FakeAutoscaler(worker_url="http://127.0.0.1:9") as server:
        pem = httpx.get(server.url + "/pubkey/").content
        route = httpx.post(server.url + "/route/", json={"endpoint": "e", "api_key": "k", "cost": 50}).json()
        server.worker_url = None  # no ready worker: no url, the client polls again
        waiting = httpx.post(server.url + "/route/", json={"endpoint": "e", "api_key": "k", "cost": 50}).json()
    assert "url" not in waiting and waiting["endpoint"] == "e"
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, rsa.RSAPublicKey)
    message = json.dumps({"url": "http://127.0.0.1:9"}, indent=4, sort_keys=True).encode()
    key.verify(base64.b64decode(route["signature"]), message, padding.PKCS1v15(), hashes.SHA256())
    assert set(route) == {"endpoint", "url", "cost", "reqnum", "signature", "__request_id", "request_idx"}
    for fmt in ("url", "sorted", "legacy"):
        auth = server.sign_auth("https://5.6.7.8:1234", fmt, cost=242.0)
        signed = {
            "url": {"url": auth["url"]},
            "sorted": {k: v for k, v in auth.items() if k not in ("signature", "__request_id")},
            "legacy": {k: auth[k] for k in ("cost", "endpoint", "reqnum", "url")},
        }[fmt]
        text = json.dumps(signed, indent=4, sort_keys=fmt != "legacy").encode()
        key.verify(base64.b64decode(auth["signature"]), text, padding.PKCS1v15(), hashes.SHA256())
