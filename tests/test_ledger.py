"""The request ledger: lifecycle, O(1) totals against a recomputation (exact since issue 8 finding 5),
per-report counters that survive a failed report, and the bounded queue of finished records for
/delete_requests/."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from proxy.ledger import Counters, Ledger, RequestRecord, RequestStatus

S = RequestStatus


def test_statuses_are_vasts_strings() -> None:
    assert [s.value for s in RequestStatus] == ["Created", "Started", "Success", "Error", "Cancelled", "Rejected"]
    assert f"{S.SUCCESS}" == "Success"


def test_lifecycle_moves_work_from_waiting_to_running_to_served() -> None:
    ledger = Ledger()
    rec = ledger.admit(route="/generate", workload=10, now=100.0, request_idx=5, reqnum=9)
    assert (rec.key, rec.status, rec.entered_queue_at) == (1, S.CREATED, 100.0)
    assert (ledger.waiting_work, ledger.running_work, ledger.in_flight, ledger.num_received) == (10.0, 0.0, 1, 1)
    assert ledger.working_request_idxs == [5]

    ledger.start(rec, 101.0)
    assert (rec.status, rec.work_started_at) == (S.STARTED, 101.0)
    assert (ledger.waiting_work, ledger.running_work) == (0.0, 10.0)

    assert ledger.finish(rec, S.SUCCESS, 103.5, 200)
    assert (rec.status, rec.work_completed_at, rec.http_status) == (S.SUCCESS, 103.5, 200)
    assert (ledger.running_work, ledger.in_flight, ledger.working_request_idxs) == (0.0, 0, [])
    counters = ledger.take_counters()
    assert (counters.new_load, counters.rej_load, counters.cur_perf) == (10.0, 0.0, 10.0)
    assert ledger.take_finished() == [rec]
    assert rec.delete_item() == {
        "request_idx": 5,
        "success": True,
        "status": "Success",
        "entered_queue_at": 100.0,
        "work_started_at": 101.0,
        "work_completed_at": 103.5,
    }


def test_first_terminal_status_wins() -> None:
    ledger = Ledger()
    rec = ledger.admit(route="/r", workload=3, now=0.0, request_idx=1)
    assert ledger.reject(rec, 1.0, 429)
    assert not ledger.finish(rec, S.CANCELLED, 2.0)
    assert not ledger.reject(rec, 2.0, 503)
    assert (rec.status, rec.http_status, rec.work_completed_at) == (S.REJECTED, 429, 1.0)
    counters = ledger.take_counters()
    assert (counters.rejected_work, counters.withdrawn_work, counters.new_load) == (3.0, 3.0, 0.0)
    assert len(ledger.take_finished()) == 1


def test_invalid_transitions_are_bugs() -> None:
    ledger = Ledger()
    rec = ledger.admit(route="/r", workload=1, now=0.0)
    with pytest.raises(ValueError, match="Success, Error or Cancelled"):
        ledger.finish(rec, S.REJECTED, 1.0)
    ledger.start(rec, 1.0)
    with pytest.raises(ValueError, match="cannot start"):
        ledger.start(rec, 1.0)
    with pytest.raises(ValueError, match="already reached the model"):
        ledger.reject(rec, 1.0, 429)
    for bad in (-1.0, math.nan, math.inf, 10**400):  # inf, 10**400: no exact total holds them
        with pytest.raises(ValueError, match="non-negative"):
            ledger.admit(route="/r", workload=bad, now=0.0)


def test_cancelled_counts_as_success_and_is_withdrawn_from_new_load() -> None:
    ledger = Ledger()
    rec = ledger.admit(route="/r", workload=4, now=0.0, request_idx=1)
    ledger.start(rec, 0.5)
    ledger.finish(rec, S.CANCELLED, 1.0, 499)
    assert rec.success and rec.delete_item()["status"] == "Cancelled"
    counters = ledger.take_counters()
    assert (counters.received_work, counters.new_load, counters.cur_perf) == (4.0, 0.0, 0.0)


def test_error_is_not_a_success_and_not_served() -> None:
    ledger = Ledger()
    rec = ledger.admit(route="/r", workload=4, now=0.0, request_idx=1)
    ledger.start(rec, 0.5)
    ledger.finish(rec, S.ERROR, 1.0, 502)
    assert not rec.success
    assert ledger.take_counters() == Counters(received_work=4.0)


def test_refused_requests_are_rejected_load_only() -> None:
    ledger = Ledger()
    rec = ledger.refuse(route="/r", workload=7, now=5.0, http_status=401, request_idx=3)
    assert (rec.status, rec.http_status, rec.work_started_at) == (S.REJECTED, 401, None)
    assert (ledger.in_flight, ledger.num_received) == (0, 0)
    assert ledger.take_counters() == Counters(rejected_work=7.0)
    assert [r.delete_item()["success"] for r in ledger.take_finished()] == [False]


def test_new_load_is_floored_at_zero_across_reports() -> None:
    ledger = Ledger()
    rec = ledger.admit(route="/r", workload=5, now=0.0)
    ledger.take_counters()  # reported as received
    ledger.finish(rec, S.CANCELLED, 1.0)
    counters = ledger.take_counters()
    assert (counters.received_work, counters.withdrawn_work, counters.new_load) == (0.0, 5.0, 0.0)


def test_restored_counters_merge_with_new_ones() -> None:
    ledger = Ledger()
    ledger.finish(ledger.admit(route="/r", workload=2, now=0.0), S.SUCCESS, 1.0)
    taken = ledger.take_counters()
    ledger.admit(route="/r", workload=3, now=2.0)
    ledger.restore_counters(taken)  # the report failed
    assert ledger.take_counters() == Counters(received_work=5.0, served_work=2.0)


def test_records_without_request_idx_are_not_reported() -> None:
    ledger = Ledger()
    anon = ledger.admit(route="/r", workload=1, now=0.0)
    known = ledger.admit(route="/r", workload=1, now=0.0, request_idx=0)
    assert ledger.working_request_idxs == [0]
    assert anon.key != known.key
    ledger.finish(anon, S.SUCCESS, 1.0)
    ledger.finish(known, S.SUCCESS, 1.0)
    assert ledger.take_finished() == [known]


def test_keep_finished_false_keeps_nothing() -> None:
    ledger = Ledger(keep_finished=False)
    ledger.finish(ledger.admit(route="/r", workload=1, now=0.0, request_idx=1), S.SUCCESS, 1.0)
    ledger.refuse(route="/r", workload=1, now=0.0, http_status=401, request_idx=2)
    assert (ledger.finished_pending, ledger.take_finished(), ledger.dropped_finished) == (0, [], 0)
    assert ledger.take_counters().served_work == 1.0  # counters still work


def test_finished_queue_is_capped_oldest_dropped() -> None:
    ledger = Ledger(max_finished=3)
    for idx in range(5):
        ledger.finish(ledger.admit(route="/r", workload=1, now=idx, request_idx=idx), S.SUCCESS, idx + 0.5)
    assert ledger.dropped_finished == 2
    assert [r.request_idx for r in ledger.take_finished()] == [2, 3, 4]


def test_returned_records_go_back_ahead_of_newer_ones_within_the_cap() -> None:
    ledger = Ledger(max_finished=4)
    for idx in range(3):
        ledger.finish(ledger.admit(route="/r", workload=1, now=0.0, request_idx=idx), S.SUCCESS, 1.0)
    sent = ledger.take_finished(limit=2)
    assert [r.request_idx for r in sent] == [0, 1]
    for idx in (3, 4):
        ledger.finish(ledger.admit(route="/r", workload=1, now=0.0, request_idx=idx), S.SUCCESS, 1.0)
    ledger.return_finished(sent)  # the send failed: 5 pending, cap 4, the oldest goes
    assert ledger.dropped_finished == 1
    assert [r.request_idx for r in ledger.take_finished()] == [1, 2, 3, 4]


def test_zero_weight_requests_leave_exact_zero_totals() -> None:
    ledger = Ledger()
    recs = [ledger.admit(route="/r", workload=w, now=0.0) for w in (0.1, 0.2, 0.0, 0.7)]
    for rec in recs:
        ledger.start(rec, 0.0)
    for rec in recs:
        ledger.finish(rec, S.SUCCESS, 1.0)
    assert (ledger.running_work, ledger.waiting_work) == (0.0, 0.0)


def exact(workloads: Iterable[float]) -> float:
    """The correctly rounded sum of `workloads`, as an exact ledger must report it."""
    total = sum((Fraction(w) for w in workloads), Fraction(0))
    try:
        return float(total)
    except OverflowError:
        return math.inf


def test_a_running_request_keeps_its_work_after_a_huge_one_finishes() -> None:
    # Today: running_work was a float sum, 1e300 + 1 - 1e300 == 0, so a running request weighed 0.
    ledger = Ledger()
    huge = ledger.admit(route="/r", workload=1e300, now=0.0)
    small = ledger.admit(route="/r", workload=1.0, now=0.0)
    ledger.start(huge, 0.0)
    ledger.start(small, 0.0)
    ledger.finish(huge, S.SUCCESS, 1.0)
    assert ledger.running_work == 1.0
    tiny = ledger.admit(route="/r", workload=5e-324, now=1.0)  # the smallest double still counts
    assert ledger.waiting_work == 5e-324 and ledger.work_ahead_of(tiny) == 1.0
    ledger.finish(small, S.SUCCESS, 2.0)
    ledger.finish(tiny, S.CANCELLED, 2.0)
    assert (ledger.running_work, ledger.waiting_work) == (0.0, 0.0)


def test_totals_past_the_largest_double_read_as_infinity_and_still_return_to_zero() -> None:
    ledger = Ledger()
    records = [ledger.admit(route="/r", workload=1.7e308, now=0.0) for _ in range(3)]
    assert ledger.waiting_work == math.inf
    for record in records:
        ledger.reject(record, 1.0, 429)
    assert ledger.waiting_work == 0.0


WILD = st.one_of(
    st.floats(0.0, 1.7976931348623157e308, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 5e-324, 1e-9, 0.1, 0.2, 0.7, 1.0, 1e15, 1e16 + 2, 1e300, 1.7976931348623157e308]),
    st.integers(0, 2**63).map(float),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(WILD, min_size=1, max_size=12), st.data())
def test_any_sequence_with_wild_workloads_ends_at_exactly_zero(workloads: list[float], data: st.DataObject) -> None:
    ledger = Ledger()
    waiting: list[RequestRecord] = []
    running: list[RequestRecord] = []
    pending = list(workloads)
    while pending or waiting or running:
        moves = (["admit"] if pending else []) + (["start", "reject"] if waiting else []) + (["finish"] if running else [])
        move = data.draw(st.sampled_from(moves))
        if move == "admit":
            waiting.append(ledger.admit(route="/r", workload=pending.pop(), now=0.0))
        elif move in ("start", "reject"):
            record = waiting.pop(data.draw(st.integers(0, len(waiting) - 1)))
            if move == "start":
                ledger.start(record, 0.0)
                running.append(record)
            else:
                ledger.reject(record, 0.0, 429)
        else:
            record = running.pop(data.draw(st.integers(0, len(running) - 1)))
            ledger.finish(record, data.draw(st.sampled_from([S.SUCCESS, S.ERROR, S.CANCELLED])), 0.0)
        assert ledger.waiting_work == exact(r.workload for r in waiting)
        assert ledger.running_work == exact(r.workload for r in running)
        # Never a running request with positive work while the total says nothing runs.
        assert (ledger.running_work > 0.0) == any(r.workload > 0.0 for r in running)
        assert (ledger.waiting_work > 0.0) == any(r.workload > 0.0 for r in waiting)
    assert (ledger.waiting_work, ledger.running_work, ledger.in_flight) == (0.0, 0.0, 0)


WORKLOADS = st.one_of(st.integers(0, 10_000).map(float), st.floats(0.0, 1e4, allow_nan=False), st.just(0.1))


class LedgerMachine(RuleBasedStateMachine):
    """Random operation sequences against a plain recomputation."""

    @initialize(cap=st.integers(0, 6))
    def setup(self, cap: int) -> None:
        self.cap = cap
        self.ledger = Ledger(max_finished=cap)
        self.records: list[RequestRecord] = []
        self.now = 0.0
        # Lifetime totals the ledger must account for: reported (taken, not restored) + held + current.
        self.lifetime = Counters()
        self.reported = Counters()
        self.held: list[Counters] = []
        self.finished: deque[RequestRecord] = deque()
        self.dropped = 0
        self.sending: list[list[RequestRecord]] = []
        self.received = 0

    def _tick(self) -> float:
        self.now += 1.0
        return self.now

    def _retain(self, rec: RequestRecord) -> None:
        if rec.request_idx is None:
            return
        self.finished.append(rec)
        self._cap()

    def _cap(self) -> None:
        while len(self.finished) > self.cap:
            self.finished.popleft()
            self.dropped += 1

    def _in(self, status: RequestStatus) -> list[RequestRecord]:
        return [r for r in self.records if r.status is status]

    @rule(workload=WORKLOADS, idx=st.none() | st.integers(0, 50))
    def admit(self, workload: float, idx: int | None) -> None:
        rec = self.ledger.admit(route="/r", workload=workload, now=self._tick(), request_idx=idx)
        self.records.append(rec)
        self.received += 1
        self.lifetime += Counters(received_work=workload)

    @rule(workload=WORKLOADS, idx=st.none() | st.integers(0, 50))
    def refuse(self, workload: float, idx: int | None) -> None:
        rec = self.ledger.refuse(route="/r", workload=workload, now=self._tick(), http_status=401, request_idx=idx)
        self.lifetime += Counters(rejected_work=workload)
        self._retain(rec)

    @precondition(lambda self: any(r.status is S.CREATED for r in self.records))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self.ledger.start(data.draw(st.sampled_from(self._in(S.CREATED))), self._tick())

    @precondition(lambda self: any(r.in_flight for r in self.records))
    @rule(data=st.data(), status=st.sampled_from([S.SUCCESS, S.ERROR, S.CANCELLED]))
    def finish(self, data: st.DataObject, status: RequestStatus) -> None:
        rec = data.draw(st.sampled_from([r for r in self.records if r.in_flight]))
        assert self.ledger.finish(rec, status, self._tick(), 200)
        if status is S.SUCCESS:
            self.lifetime += Counters(served_work=rec.workload)
        elif status is S.CANCELLED:
            self.lifetime += Counters(withdrawn_work=rec.workload)
        self._retain(rec)

    @precondition(lambda self: any(r.status is S.CREATED for r in self.records))
    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        rec = data.draw(st.sampled_from(self._in(S.CREATED)))
        assert self.ledger.reject(rec, self._tick(), 429)
        self.lifetime += Counters(withdrawn_work=rec.workload, rejected_work=rec.workload)
        self._retain(rec)

    @precondition(lambda self: any(not r.in_flight for r in self.records))
    @rule(data=st.data())
    def finish_again_is_a_no_op(self, data: st.DataObject) -> None:
        rec = data.draw(st.sampled_from([r for r in self.records if not r.in_flight]))
        before = (rec.status, self.ledger.peek_counters(), self.ledger.finished_pending)
        assert not self.ledger.finish(rec, S.ERROR, self._tick())
        assert before == (rec.status, self.ledger.peek_counters(), self.ledger.finished_pending)

    @rule(succeeded=st.booleans())
    def report(self, succeeded: bool) -> None:
        taken = self.ledger.take_counters()
        if succeeded:
            self.reported += taken
        else:
            self.held.append(taken)

    @precondition(lambda self: bool(self.held))
    @rule()
    def restore(self) -> None:
        self.ledger.restore_counters(self.held.pop())

    @rule(limit=st.integers(0, 4), succeeded=st.booleans())
    def send_finished(self, limit: int, succeeded: bool) -> None:
        taken = self.ledger.take_finished(limit)
        expected = [self.finished.popleft() for _ in range(min(limit, len(self.finished)))]
        assert taken == expected
        if not succeeded:
            self.sending.append(taken)

    @precondition(lambda self: bool(self.sending))
    @rule()
    def return_failed_send(self) -> None:
        taken = self.sending.pop()
        self.ledger.return_finished(taken)
        self.finished.extendleft(reversed(taken))
        self._cap()

    @invariant()
    def totals_match_a_recomputation(self) -> None:
        ledger = self.ledger
        waiting = self._in(S.CREATED)
        running = self._in(S.STARTED)
        # Exact since issue 8 (was math.isclose against a float sum): the totals are the correctly
        # rounded sums of the workloads in flight.
        assert ledger.waiting_work == exact(r.workload for r in waiting)
        assert ledger.running_work == exact(r.workload for r in running)
        assert (ledger.waiting, ledger.running, ledger.in_flight) == (len(waiting), len(running), len(waiting) + len(running))
        assert sorted(ledger.working_request_idxs) == sorted(
            r.request_idx for r in waiting + running if r.request_idx is not None
        )
        assert ledger.num_received == self.received

    @invariant()
    def counters_are_never_lost(self) -> None:
        accounted = self.reported + self.ledger.peek_counters()
        for held in self.held:
            accounted += held
        for name in ("received_work", "withdrawn_work", "rejected_work", "served_work"):
            assert math.isclose(getattr(accounted, name), getattr(self.lifetime, name), rel_tol=1e-9, abs_tol=1e-6)
        current = self.ledger.peek_counters()
        assert current.new_load >= 0.0 and current.rej_load >= 0.0 and current.cur_perf >= 0.0

    @invariant()
    def finished_queue_matches(self) -> None:
        assert self.ledger.finished_pending == len(self.finished) <= self.cap
        assert self.ledger.dropped_finished == self.dropped


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase
