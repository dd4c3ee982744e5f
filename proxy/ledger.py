"""The request ledger: every request the proxy has taken in, what it weighs, and how it ended.

Pure bookkeeping; time is passed in (wall-clock unix seconds, as Vast's `/delete_requests/` carries
them). This module owns the numbers the autoscaler is told about requests:

- in-flight totals, kept O(1) per operation: `waiting_work` (admitted, not yet at the model),
  `running_work` (at the model), `in_flight`, and `working_request_idxs`. The work totals are exact:
  kept as integers counting 2**-1074 (the smallest positive double, so every finite workload converts
  without rounding) and turned into a float only when read (about 1 µs a request). A float running
  sum drifts: after a 1e300-unit request finished, a running 1-unit request read as 0 (1e300 + 1 -
  1e300 is 0 in floats), and 0.3 + 0.1 + 0.2 - 0.1 - 0.2 - 0.3 leaves 1e-16 behind; exact sums return to exactly 0 when everything has finished, and stay above 0 while any request
  with a positive workload is in flight. Workloads must be finite and >= 0 (the caller clamps them,
  `proxy.envelope.workload_of`);
- the per-report counters Vast resets after each successful `/worker_status/` (`take_counters`,
  and `restore_counters` when the send failed, so nothing is lost):
  received work (`new_load` = received − withdrawn, floored at 0 like Vast's `received − cancelled`),
  rejected work (`rej_load`), served work (`cur_perf`);
- the cumulative `num_received` (Vast's `num_requests_recieved`, never reset; it counts admitted
  requests, not distinct reqnums: cached url-only signatures make reqnums repeat);
- finished records waiting to be sent to `/delete_requests/` (`take_finished` / `return_finished`),
  capped at `max_finished` (oldest dropped and counted), and not kept at all when no reporter runs.

Request lifecycle: `admit` (Created, waiting) -> `start` (Started, running) -> `finish` (Success,
Error, Cancelled); or `reject` (Rejected) while still Created; or `refuse` (Rejected, never admitted,
e.g. a bad signature). The first terminal status wins: finishing an already finished record is a
no-op, so callers may `finish(..., CANCELLED)` in a `finally` without checking.

Identity: `request_idx` is the client's (`auth_data.request_idx`), None when it sent none (2024
clients, unsecured bodies). Such records are not reported to `/delete_requests/` or in
`working_request_idxs`: the autoscaler never issued them and a made-up index could collide with a
real one. `key` is a local counter from 1, unique per ledger, for everything internal.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

_SCALE_BITS: Final = 1074  # a finite double is an integer multiple of 2**-1074
_ONE: Final = 1 << _SCALE_BITS


def _units(workload: float) -> int:
    """`workload` (finite, >= 0) as an exact integer multiple of 2**-1074."""
    numerator, denominator = workload.as_integer_ratio()  # the denominator is a power of two
    return numerator << (_SCALE_BITS - (denominator.bit_length() - 1))


def _work(units: int) -> float:
    """Exact units back to a float, correctly rounded; inf past the largest double."""
    try:
        return units / _ONE  # int / int: one correctly rounded division, no float overflow on the way
    except OverflowError:
        return math.inf


class RequestStatus(StrEnum):
    """Vast's request statuses, spelled as on the wire."""

    CREATED = "Created"
    STARTED = "Started"
    SUCCESS = "Success"
    ERROR = "Error"
    CANCELLED = "Cancelled"
    REJECTED = "Rejected"


_FINISHED = frozenset((RequestStatus.SUCCESS, RequestStatus.ERROR, RequestStatus.CANCELLED))
# Vast counts a cancelled request as a success in /delete_requests/ (the worker did nothing wrong).
_SUCCESSFUL = frozenset((RequestStatus.SUCCESS, RequestStatus.CANCELLED))


@dataclass(slots=True)
class RequestRecord:
    """One request. Mutated only by its Ledger."""

    key: int
    request_idx: int | None
    reqnum: int | None
    route: str
    workload: float
    status: RequestStatus
    entered_queue_at: float
    work_started_at: float | None = None
    work_completed_at: float | None = None
    http_status: int | None = None

    @property
    def success(self) -> bool:
        return self.status in _SUCCESSFUL

    @property
    def in_flight(self) -> bool:
        return self.status is RequestStatus.CREATED or self.status is RequestStatus.STARTED

    def delete_item(self) -> dict[str, Any]:
        """This record as one entry of `/delete_requests/`'s `requests` list (times may be null)."""
        return {
            "request_idx": self.request_idx,
            "success": self.success,
            "status": self.status.value,
            "entered_queue_at": self.entered_queue_at,
            "work_started_at": self.work_started_at,
            "work_completed_at": self.work_completed_at,
        }


@dataclass(frozen=True, slots=True)
class Counters:
    """Work units counted since the last successful report. Add two to merge them."""

    received_work: float = 0.0
    withdrawn_work: float = 0.0  # admitted, then cancelled or rejected: not demand Vast should see
    rejected_work: float = 0.0
    served_work: float = 0.0

    @property
    def new_load(self) -> float:
        return max(self.received_work - self.withdrawn_work, 0.0)

    @property
    def rej_load(self) -> float:
        return self.rejected_work

    @property
    def cur_perf(self) -> float:
        return self.served_work

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.received_work + other.received_work,
            self.withdrawn_work + other.withdrawn_work,
            self.rejected_work + other.rejected_work,
            self.served_work + other.served_work,
        )


class Ledger:
    def __init__(self, max_finished: int = 10_000, keep_finished: bool = True) -> None:
        if max_finished < 0:
            raise ValueError("max_finished must be >= 0")
        self._max_finished = max_finished
        self._keep_finished = keep_finished
        self._next_key = 1
        self._in_flight: dict[int, RequestRecord] = {}
        self._waiting_count = 0
        self._waiting_units = 0  # exact, see _units
        self._running_count = 0
        self._running_units = 0
        self._counters = Counters()
        self._num_received = 0
        # Cumulative work, never reset: online throughput and mean request size come from their growth.
        self.served_total = 0.0
        self.received_total = 0.0
        self._finished: deque[RequestRecord] = deque()
        self._dropped_finished = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def admit(
        self, *, route: str, workload: float, now: float, request_idx: int | None = None, reqnum: int | None = None
    ) -> RequestRecord:
        """A request taken in: Created, counted as waiting and as received."""
        record = self._new(route, workload, now, request_idx, reqnum, RequestStatus.CREATED)
        self._in_flight[record.key] = record
        self._waiting_count += 1
        self._waiting_units += _units(record.workload)
        self._num_received += 1
        self.received_total += record.workload
        self._add(received=record.workload)
        return record

    def refuse(
        self,
        *,
        route: str,
        workload: float,
        now: float,
        http_status: int,
        request_idx: int | None = None,
        reqnum: int | None = None,
    ) -> RequestRecord:
        """A request turned away before admission (bad signature, draining): Rejected at once."""
        record = self._new(route, workload, now, request_idx, reqnum, RequestStatus.REJECTED)
        record.work_completed_at = now
        record.http_status = http_status
        self._add(rejected=record.workload)
        self._retain(record)
        return record

    def start(self, record: RequestRecord, now: float) -> None:
        """The request goes to the model: waiting -> running."""
        if record.status is not RequestStatus.CREATED:
            raise ValueError(f"cannot start a request in status {record.status.value}")
        record.status = RequestStatus.STARTED
        record.work_started_at = now
        self._leave_waiting(record)
        self._running_count += 1
        self._running_units += _units(record.workload)

    def finish(self, record: RequestRecord, status: RequestStatus, now: float, http_status: int | None = None) -> bool:
        """End an in-flight request as Success, Error or Cancelled. False if it had already ended."""
        if status not in _FINISHED:
            raise ValueError(f"finish() takes Success, Error or Cancelled, not {status.value}")
        if not self._end(record, status, now, http_status):
            return False
        if status is RequestStatus.SUCCESS:
            self._add(served=record.workload)
            self.served_total += record.workload
        elif status is RequestStatus.CANCELLED:
            self._add(withdrawn=record.workload)
        return True

    def reject(self, record: RequestRecord, now: float, http_status: int) -> bool:
        """Turn away an admitted request that never reached the model. False if it had already ended."""
        if record.status is RequestStatus.STARTED:
            raise ValueError("cannot reject a request that already reached the model")
        if not self._end(record, RequestStatus.REJECTED, now, http_status):
            return False
        self._add(withdrawn=record.workload, rejected=record.workload)
        return True

    # -- totals ----------------------------------------------------------------------------------

    @property
    def waiting_work(self) -> float:
        return _work(self._waiting_units)

    @property
    def running_work(self) -> float:
        return _work(self._running_units)

    def work_ahead_of(self, record: RequestRecord) -> float:
        """Running plus waiting work, less `record`'s own while it is in flight: exact, so a lone
        request never sees a residue of other work ahead of it."""
        units = self._waiting_units + self._running_units
        if record.in_flight and self._in_flight.get(record.key) is record:
            units -= _units(record.workload)
        return _work(units)

    @property
    def waiting(self) -> int:
        return self._waiting_count

    @property
    def running(self) -> int:
        return self._running_count

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_received(self) -> int:
        return self._num_received

    @property
    def working_request_idxs(self) -> list[int]:
        """Client request indexes of in-flight requests (waiting ones too, as Vast counts them)."""
        return [r.request_idx for r in self._in_flight.values() if r.request_idx is not None]

    # -- per-report counters ---------------------------------------------------------------------

    def peek_counters(self) -> Counters:
        return self._counters

    def take_counters(self) -> Counters:
        """The counters since the last report, reset to zero. Put them back if the send fails."""
        taken, self._counters = self._counters, Counters()
        return taken

    def restore_counters(self, counters: Counters) -> None:
        self._counters = counters + self._counters

    # -- finished records for /delete_requests/ ---------------------------------------------------

    @property
    def finished_pending(self) -> int:
        return len(self._finished)

    @property
    def dropped_finished(self) -> int:
        """Finished records dropped because `max_finished` were already waiting to be sent."""
        return self._dropped_finished

    def take_finished(self, limit: int | None = None) -> list[RequestRecord]:
        """Oldest finished records first; they leave the ledger (return them if the send fails)."""
        count = len(self._finished) if limit is None else min(limit, len(self._finished))
        return [self._finished.popleft() for _ in range(count)]

    def return_finished(self, records: Iterable[RequestRecord]) -> None:
        """Put back records a failed send took, ahead of newer ones; the cap still holds."""
        self._finished.extendleft(reversed(list(records)))
        self._enforce_cap()

    # -- internals -------------------------------------------------------------------------------

    def _new(
        self,
        route: str,
        workload: float,
        now: float,
        request_idx: int | None,
        reqnum: int | None,
        status: RequestStatus,
    ) -> RequestRecord:
        try:
            value = float(workload)
        except (OverflowError, TypeError, ValueError):
            value = math.nan
        if not (value >= 0.0 and math.isfinite(value)):  # NaN or inf would poison every total
            raise ValueError(f"workload must be a finite non-negative number, got {workload!r}")
        record = RequestRecord(
            key=self._next_key,
            request_idx=request_idx,
            reqnum=reqnum,
            route=route,
            workload=value,
            status=status,
            entered_queue_at=now,
        )
        self._next_key += 1
        return record

    def _end(self, record: RequestRecord, status: RequestStatus, now: float, http_status: int | None) -> bool:
        if self._in_flight.pop(record.key, None) is None:
            return False
        if record.status is RequestStatus.CREATED:
            self._leave_waiting(record)
        else:
            self._running_count -= 1
            self._running_units -= _units(record.workload)
        record.status = status
        record.work_completed_at = now
        record.http_status = http_status
        self._retain(record)
        return True

    def _leave_waiting(self, record: RequestRecord) -> None:
        self._waiting_count -= 1
        self._waiting_units -= _units(record.workload)

    def _add(
        self, *, received: float = 0.0, withdrawn: float = 0.0, rejected: float = 0.0, served: float = 0.0
    ) -> None:
        c = self._counters
        self._counters = Counters(
            c.received_work + received,
            c.withdrawn_work + withdrawn,
            c.rejected_work + rejected,
            c.served_work + served,
        )

    def _retain(self, record: RequestRecord) -> None:
        if not self._keep_finished or record.request_idx is None:
            return
        self._finished.append(record)
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        while len(self._finished) > self._max_finished:
            self._finished.popleft()
            self._dropped_finished += 1
