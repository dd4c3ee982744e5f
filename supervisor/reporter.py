"""Reporting to Vast's serverless autoscaler: `/worker_status/` and `/delete_requests/`.

This module owns what the autoscaler is told and when:

- the wire object (`build_worker_status`, pure): exactly the field set of Vast's current worker,
  with its types and its meanings, odd ones included (vast-protocol.md §2.1): `cur_load` is the
  workload of the requests in flight (Vast counts a request as working from admission, so queued
  ones count), `new_load` / `rej_load` / `cur_perf` are workload received / rejected / served since
  the last *accepted* report, `num_requests_recieved` (sic) is cumulative, `additional_disk_usage` is
  the growth in used GB of `/` since the last accepted report, `cur_capacity` / `max_capacity` are 0;
- how lifecycle states map onto it (`ReportState`, pure): `loadtime` and `max_perf` are 0 until
  `ready` and again while the server restarts; on `ready` `loadtime` is the seconds from the start
  of that run to ready; `error_msg` is the reason of a give-up or fatal error (`failed`), kept until
  the worker is `ready` again;
- the sending (`Reporter`): a status loop and a delete loop, each in its own task, so a slow or dead
  autoscaler never delays a request, a probe or a state change. `poke()` only sets a flag; the status
  loop sends at most one report at a time, so pokes made during a send coalesce into one follow-up
  and nothing queues up. Each POST has its own timeout and goes to the addresses in order until one
  accepts it (2xx). Counters are taken just before a send and put back if no address accepted it;
  finished records likewise. An outage is logged once per address and path when it starts and once
  when it ends; the master token never reaches a log line.

`error_msg` often quotes a model server's log line; it leaves the process only through the Reporter's
`redact` (supervisor/redact.py's `Redactor.redact` in a running worker), applied before the text is
cut to `MAX_ERROR_MSG` (a cut secret would no longer be recognised). The state machine already
redacts the reasons it passes on; this is the same function applied at the door.

Beside Vast's numbers, `Reporter.stats()` gives the sensible ones for `/status` (served work per
second rather than per report interval, the spelled-right cumulative request count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx
import psutil
import trio

from proxy.ledger import Counters, Ledger
from supervisor.config import Config
from supervisor.logs import get_logger
from supervisor.redact import keep, mask
from supervisor.states import State, Transition

__all__ = [
    "DiskProbe",
    "DiskUsage",
    "ReportState",
    "ReportView",
    "Reporter",
    "ReporterStats",
    "WorkerIdentity",
    "WORKER_STATUS_FIELDS",
    "build_worker_status",
    "parse_worker_id",
    "read_disk_usage",
    "send_error_report",
]

# Vast's current WorkerStatusData, in its order (vast-cli `vastai/serverless/server/lib/data_types.py`).
WORKER_STATUS_FIELDS: tuple[str, ...] = (
    "id", "mtoken", "version", "loadtime", "cur_load", "rej_load", "new_load", "error_msg", "max_perf",
    "cur_perf", "cur_capacity", "max_capacity", "num_requests_working", "num_requests_recieved",
    "additional_disk_usage", "disk_usage", "working_request_idxs", "url",
)
STATUS_PATH = "/worker_status/"
DELETE_PATH = "/delete_requests/"
# Vast's worker skips this address for /delete_requests/: it is a Redis-backed API that takes only
# status reports. Some templates list it first in REPORT_ADDR.
NO_DELETE_ADDRESSES = frozenset({"https://cloud.vast.ai/api/v0"})
MAX_ERROR_MSG = 4096  # a whole traceback line can be long; the autoscaler needs the gist
_ERROR_TEXT_LIMIT = 200
_GB = float(2**30)  # Vast's "GB" is GiB (psutil bytes / 2**30)


# ---------------------------------------------------------------------------------------------
# Values


def parse_worker_id(text: str | None) -> int:
    """`int(CONTAINER_ID)`; 0 when it is missing or not a number (what Vast's bootstrap beacon sends)."""
    try:
        return int((text or "").strip())
    except ValueError:
        return 0


@dataclass(frozen=True)
class WorkerIdentity:
    id: int
    mtoken: str = field(repr=False)  # never in a repr, hence never in a log line by accident
    version: str
    url: str  # "" when unknown (no PUBLIC_IPADDR / VAST_TCP_PORT_<port>)

    @classmethod
    def from_config(cls, config: Config, version: str) -> WorkerIdentity:
        worker_id = parse_worker_id(config.container_id)
        if config.container_id and worker_id == 0 and config.container_id.strip() != "0":
            get_logger("supervisor.reporter").warning(
                "reporter.container_id_not_numeric", container_id=config.container_id, reported_id=0
            )
        return cls(worker_id, config.master_token or "", version, config.public_url or "")


@dataclass(frozen=True)
class DiskUsage:
    total_gb: float
    used_gb: float


def read_disk_usage(path: str = "/") -> DiskUsage:
    """Used and total GiB of the filesystem holding `path` (blocking: a statvfs)."""
    usage = psutil.disk_usage(path)
    return DiskUsage(usage.total / _GB, usage.used / _GB)


class DiskProbe:
    """`read_disk_usage` off the event loop; the last good reading (or zeros) when it fails."""

    def __init__(self, path: str = "/", run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync) -> None:
        self._path = path
        self._run_sync = run_sync
        self._last = DiskUsage(0.0, 0.0)

    async def sample(self) -> DiskUsage:
        try:
            self._last = await self._run_sync(read_disk_usage, self._path)
        except OSError:
            pass  # a disk figure is not worth failing a report for
        return self._last


@dataclass(frozen=True)
class ReportView:
    """What the rest of shepherd contributes to a report, read at send time."""

    state: str
    loadtime: float  # 0 until ready
    max_perf: float  # 0 until ready
    cur_load: float  # workload of the requests in flight (queued and running)
    error_msg: str
    num_requests_working: int
    num_requests_recieved: int  # cumulative, as Vast sends it
    working_request_idxs: tuple[int, ...]

    @classmethod
    def idle(cls, state: str, error_msg: str = "") -> ReportView:
        return cls(state, 0.0, 0.0, 0.0, error_msg, 0, 0, ())


def build_worker_status(
    identity: WorkerIdentity,
    view: ReportView,
    counters: Counters,
    disk: DiskUsage,
    previous_disk: DiskUsage | None = None,
) -> dict[str, Any]:
    """The `/worker_status/` body: Vast's current field set, with the types Vast sends.

    `previous_disk` is the disk reading of the last accepted report (None: none yet, growth 0).
    Floats are floats even when whole, ints are ints: `id`, the request counts, and
    `cur_capacity` / `max_capacity`, which Vast sends as the literal 0.
    """
    added = disk.used_gb - previous_disk.used_gb if previous_disk is not None else 0.0
    return {
        "id": int(identity.id),
        "mtoken": identity.mtoken,
        "version": identity.version,
        "loadtime": _num(view.loadtime),
        "cur_load": _num(view.cur_load),
        "rej_load": _num(counters.rej_load),
        "new_load": _num(counters.new_load),
        "error_msg": view.error_msg[:MAX_ERROR_MSG],
        "max_perf": _num(view.max_perf),
        "cur_perf": _num(counters.cur_perf),
        "cur_capacity": 0,
        "max_capacity": 0,
        "num_requests_working": int(view.num_requests_working),
        "num_requests_recieved": int(view.num_requests_recieved),
        "additional_disk_usage": _num(added, allow_negative=True),
        "disk_usage": _num(disk.used_gb),
        "working_request_idxs": [int(i) for i in view.working_request_idxs],
        "url": identity.url,
    }


def _num(value: float, allow_negative: bool = False) -> float:
    # JSON has no NaN/inf, and the autoscaler should never see a negative load.
    value = float(value)
    if not math.isfinite(value):
        return 0.0
    return value if allow_negative else max(value, 0.0)


# ---------------------------------------------------------------------------------------------
# Lifecycle -> Vast's load and error fields

_LOADED_STATES = frozenset({State.READY, State.UNHEALTHY, State.DRAINING, State.STOPPED})


class ReportState:
    """Turns lifecycle transitions into `loadtime`, `max_perf` and `error_msg`. Pure; subscribe
    `on_transition` to the StateMachine and call `set_max_perf` from the warm-up.

    - `loadtime`: 0 until `ready`; then the seconds from the start of this run of the model server
      (shepherd's start, or the `starting` after a restart) to `ready`; 0 again from `restarting`
      until the next `ready`. `unhealthy` keeps it (the server is loaded, it is answering badly).
    - `max_perf`: the measured capacity while loaded, else 0: a restarting worker has none.
    - `error_msg`: the reason of `failed` (the matching log line, the probe failure, the give-up),
      kept until the next `ready` clears it. A restart is not an error to the autoscaler: it is
      recovered locally, and an error makes Vast treat the worker as broken.
    """

    def __init__(self, started_at: float, state: State = State.STARTING) -> None:
        self.state = state
        self._run_started = started_at
        self._loaded = state in _LOADED_STATES
        self._loadtime = 0.0
        self._max_perf = 0.0
        self.error_msg = ""

    def set_max_perf(self, value: float) -> None:
        self._max_perf = max(float(value), 0.0) if math.isfinite(value) else 0.0

    def on_transition(self, t: Transition) -> None:
        self.state = t.to
        if t.to is State.STARTING:
            self._run_started = t.at
            self._loaded = False
        elif t.to is State.READY:
            if not self._loaded:  # unhealthy -> ready keeps the original load time
                self._loadtime = max(t.at - self._run_started, 0.0)
                self._loaded = True
            self.error_msg = ""
        elif t.to is State.FAILED:
            self._loaded = False
            self.error_msg = t.reason
        elif t.to in (State.RESTARTING, State.PROVISIONING, State.LOADING, State.WARMING):
            self._loaded = False

    @property
    def loadtime(self) -> float:
        return self._loadtime if self._loaded else 0.0

    @property
    def max_perf(self) -> float:
        return self._max_perf if self._loaded else 0.0

    def view(self, ledger: Ledger, hidden_work: float = 0.0) -> ReportView:
        """`hidden_work`: units the model server holds that never passed the proxy (the estimate's);
        the admission's 429 decision counts the same work."""
        return ReportView(
            state=self.state.value,
            loadtime=self.loadtime,
            max_perf=self.max_perf,
            cur_load=ledger.waiting_work + ledger.running_work + hidden_work,
            error_msg=self.error_msg,
            num_requests_working=ledger.in_flight,
            num_requests_recieved=ledger.num_received,
            working_request_idxs=tuple(ledger.working_request_idxs),
        )


# ---------------------------------------------------------------------------------------------
# Sending


@dataclass(frozen=True)
class ReporterStats:
    """For `/status` and `/metrics`: Vast's per-report numbers and the sensible ones beside them."""

    addresses: tuple[str, ...]
    reports_sent: int
    failures: int  # failed POSTs, each address try counted
    last_report_at: float | None  # wall clock (unix s) of the last accepted status report
    last_address: str | None  # the address that accepted it
    unreachable: tuple[str, ...]  # "address path" pairs in an outage now
    delete_records_sent: int
    delete_pending: int
    delete_dropped: int
    cur_perf: float  # Vast's wire meaning: workload served between the last two accepted reports
    served_per_s: float | None  # the same per second: the worker's actual throughput
    num_requests_received: int  # = Vast's cumulative `num_requests_recieved`, spelled right

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["addresses"] = list(self.addresses)
        data["unreachable"] = list(self.unreachable)
        return data


@dataclass
class _Outage:
    since: float
    tries: int = 1


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:_ERROR_TEXT_LIMIT] if text else type(exc).__name__


class _Poster:
    """POSTs a body to the addresses in order until one accepts; logs outages once per address and path."""

    def __init__(self, client: httpx.AsyncClient, mtoken: str, timeout: float, clock: Callable[[], float]) -> None:
        self._client = client
        self._mtoken = mtoken
        self._timeout = timeout
        self._clock = clock
        self._outages: dict[tuple[str, str], _Outage] = {}
        self.failures = 0
        self._log = get_logger("supervisor.reporter")

    @property
    def unreachable(self) -> tuple[str, ...]:
        return tuple(f"{address} {path}" for address, path in self._outages)

    async def post(self, addresses: Sequence[str], path: str, body: dict[str, Any]) -> str | None:
        """The address that accepted the body (2xx), or None when none did."""
        for address in addresses:
            error = await self._try(address + path, body)
            if error is None:
                outage = self._outages.pop((address, path), None)
                if outage is not None:
                    self._log.info("reporter.recovered", address=address, path=path, failed_tries=outage.tries,
                                   down_s=round(self._clock() - outage.since, 3))
                return address
            self.failures += 1
            outage = self._outages.get((address, path))
            if outage is None:
                self._outages[(address, path)] = _Outage(self._clock())
                self._log.warning("reporter.unreachable", address=address, path=path, error=error,
                                  timeout_s=self._timeout)
            else:
                outage.tries += 1
        return None

    async def _try(self, url: str, body: dict[str, Any]) -> str | None:
        try:
            # httpx's timeout is per phase; the trio deadline also bounds a server that trickles bytes.
            with trio.fail_after(self._timeout):
                response = await self._client.post(url, json=body, timeout=self._timeout)
        except (httpx.TimeoutException, trio.TooSlowError):
            return f"timed out after {self._timeout:g}s"
        except httpx.HTTPError as exc:
            return self._scrub(_describe(exc))
        if 200 <= response.status_code < 300:
            return None
        snippet = response.text[:_ERROR_TEXT_LIMIT].strip()
        return self._scrub(f"HTTP {response.status_code}" + (f": {snippet}" if snippet else ""))

    def _scrub(self, text: str) -> str:
        # An error page could echo the request; the token must not reach the log through it.
        return text.replace(self._mtoken, mask(self._mtoken)) if self._mtoken else text


class Reporter:
    """Sends `/worker_status/` and `/delete_requests/`; see the module docstring for the rules.

    `poke()` is sync and cheap: call it from request handlers (arrival, start, end, reject) and
    state listeners, from trio's thread. `run()` runs until cancelled. `flush()` sends what is
    pending now (before exiting), `send_error_once()` one error report.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        addresses: Sequence[str],
        identity: WorkerIdentity,
        ledger: Ledger,
        view: Callable[[], ReportView],
        disk: Callable[[], Awaitable[DiskUsage]] | None = None,
        *,
        heartbeat: float = 10.0,
        min_gap: float = 0.2,
        timeout: float = 5.0,
        delete_batch: int = 500,
        delete_interval: float = 1.0,
        retry_initial: float = 1.0,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
        redact: Callable[[str], str] = keep,
    ) -> None:
        self._redact = redact
        self._addresses = tuple(a.strip().rstrip("/") for a in addresses if a.strip())
        if not self._addresses:
            raise ValueError("Reporter needs at least one address")
        self._delete_addresses = tuple(a for a in self._addresses if a not in NO_DELETE_ADDRESSES)
        self._identity = identity
        self._ledger = ledger
        self._view = view
        self._disk = disk if disk is not None else DiskProbe("/").sample
        self._heartbeat = heartbeat
        self._min_gap = min_gap
        self._delete_batch = delete_batch
        self._delete_interval = delete_interval
        self._retry_initial = retry_initial
        self._clock = clock
        self._wall = wall
        self._poster = _Poster(client, identity.mtoken, timeout, clock)
        self._log = get_logger("supervisor.reporter")
        # status loop
        self._wake = trio.Event()
        self._poke_pending = False
        self._last_attempt_start = -math.inf
        self._last_attempt_end = -math.inf
        self._last_success = -math.inf
        self._status_backoff: float | None = None  # set while every address fails
        self._disk_baseline: DiskUsage | None = None
        # delete loop
        self._delete_wake = trio.Event()
        self._next_delete_at = -math.inf
        self._delete_backoff: float | None = None
        # numbers for stats
        self.reports_sent = 0
        self.delete_records_sent = 0
        self._last_report_wall: float | None = None
        self._last_address: str | None = None
        self._cur_perf = 0.0
        self._served_per_s: float | None = None

    @property
    def failures(self) -> int:
        return self._poster.failures

    # -- the caller's side -----------------------------------------------------------------------

    def poke(self) -> None:
        """Something changed: a report goes out within `min_gap` (coalesced with other pokes)."""
        self._poke_pending = True
        self._wake.set()
        self._delete_wake.set()

    def stats(self) -> ReporterStats:
        return ReporterStats(
            addresses=self._addresses,
            reports_sent=self.reports_sent,
            failures=self.failures,
            last_report_at=self._last_report_wall,
            last_address=self._last_address,
            unreachable=self._poster.unreachable,
            delete_records_sent=self.delete_records_sent,
            delete_pending=self._ledger.finished_pending,
            delete_dropped=self._ledger.dropped_finished,
            cur_perf=self._cur_perf,
            served_per_s=self._served_per_s,
            num_requests_received=self._ledger.num_received,
        )

    async def run(self) -> None:
        self._log.info("reporter.start", addresses=list(self._addresses), worker_id=self._identity.id,
                       url=self._identity.url or None, heartbeat_s=self._heartbeat)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._status_loop)
            nursery.start_soon(self._delete_loop)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Send a status report and the pending finished records now, within `timeout` in all.
        For the last word before exit (`failed`, `stopped`). True when everything was accepted."""
        ok = False
        with trio.move_on_after(timeout):
            ok = await self._send_status()
            while ok and self._ledger.finished_pending:
                ok = await self._send_deletes()
        return ok

    async def send_error_once(self, error_msg: str) -> bool:
        """One full status report carrying `error_msg` (the start failed); True when accepted."""
        disk = await self._disk()
        error_msg = self._redact(error_msg)
        body = build_worker_status(self._identity, ReportView.idle(State.FAILED.value, error_msg), Counters(), disk)
        address = await self._poster.post(self._addresses, STATUS_PATH, body)
        self._log.info("reporter.error_report", sent=address is not None, address=address, error_msg=error_msg)
        return address is not None

    # -- /worker_status/ -------------------------------------------------------------------------

    def _public(self, view: ReportView) -> ReportView:
        # The only free text in a report; redacted whole, before build_worker_status cuts it.
        return replace(view, error_msg=self._redact(view.error_msg)) if view.error_msg else view

    def _status_due(self) -> float:
        if self._status_backoff is not None:
            # Every address failed last time: wait out the backoff, pokes or not, so that a dead
            # autoscaler costs one attempt per backoff period rather than one per request.
            return self._last_attempt_end + self._status_backoff
        due = self._last_success + self._heartbeat
        if self._poke_pending:
            due = min(due, self._last_attempt_start + self._min_gap)
        return due

    async def _status_loop(self) -> None:
        while True:
            due = self._status_due()
            if self._clock() < due:
                with trio.move_on_at(due):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = trio.Event()
                continue
            self._poke_pending = False
            if await self._send_status():
                self._status_backoff = None
            else:
                self._status_backoff = min(
                    self._retry_initial if self._status_backoff is None else self._status_backoff * 2,
                    self._heartbeat,
                )

    async def _send_status(self) -> bool:
        self._last_attempt_start = self._clock()
        disk = await self._disk()
        view = self._public(self._view())
        # Taken as late as possible and put back unless delivered: a failed report loses nothing.
        counters = self._ledger.take_counters()
        body = build_worker_status(self._identity, view, counters, disk, self._disk_baseline)
        try:
            address = await self._poster.post(self._addresses, STATUS_PATH, body)
        except BaseException:
            self._ledger.restore_counters(counters)  # cancelled mid-send: assume not delivered
            raise
        now = self._clock()
        self._last_attempt_end = now
        if address is None:
            self._ledger.restore_counters(counters)
            return False
        if self._last_success > -math.inf and now > self._last_success:
            self._served_per_s = counters.cur_perf / (now - self._last_success)
        self._cur_perf = counters.cur_perf
        self._last_success = now
        self._disk_baseline = disk
        self._last_report_wall = self._wall()
        self._last_address = address
        self.reports_sent += 1
        return True

    # -- /delete_requests/ -----------------------------------------------------------------------

    async def _delete_loop(self) -> None:
        if not self._delete_addresses:
            self._log.warning("reporter.no_delete_address", addresses=list(self._addresses),
                              why="no address takes /delete_requests/; finished requests are not reported")
        while True:
            if self._ledger.finished_pending == 0 or self._clock() < self._next_delete_at:
                wait_until = self._clock() + self._delete_interval
                if self._ledger.finished_pending:
                    wait_until = self._next_delete_at
                with trio.move_on_at(wait_until):
                    await self._delete_wake.wait()
                if self._delete_wake.is_set():
                    self._delete_wake = trio.Event()
                continue
            started = self._clock()
            if await self._send_deletes():
                self._delete_backoff = None
                # A backlog bigger than one batch drains at once; otherwise one send per interval.
                backlog = self._ledger.finished_pending >= self._delete_batch
                self._next_delete_at = started if backlog else started + self._delete_interval
            else:
                self._delete_backoff = min(
                    self._retry_initial if self._delete_backoff is None else self._delete_backoff * 2,
                    self._heartbeat,
                )
                self._next_delete_at = self._clock() + self._delete_backoff

    async def _send_deletes(self) -> bool:
        batch = self._ledger.take_finished(self._delete_batch)
        if not batch:
            return True
        if not self._delete_addresses:
            return True  # nowhere to send them; the ledger must not fill up for nothing
        body = {
            "worker_id": self._identity.id,
            "mtoken": self._identity.mtoken,
            "requests": [record.delete_item() for record in batch],
        }
        try:
            address = await self._poster.post(self._delete_addresses, DELETE_PATH, body)
        except BaseException:
            self._ledger.return_finished(batch)
            raise
        if address is None:
            self._ledger.return_finished(batch)  # retried later; the ledger's cap bounds the backlog
            return False
        self.delete_records_sent += len(batch)
        return True


async def send_error_report(
    client: httpx.AsyncClient,
    addresses: Sequence[str],
    identity: WorkerIdentity,
    error_msg: str,
    *,
    timeout: float = 5.0,
    disk: Callable[[], Awaitable[DiskUsage]] | None = None,
    redact: Callable[[str], str] = keep,
) -> bool:
    """For a start that failed before any Reporter ran (bad TLS files, port in use): one full status
    report with `error_msg`, to the first address that accepts it. Vast's bootstrap keeps sending its
    beacon every 10 s; shepherd sends once and exits, and the supervisor of the container decides."""
    reporter = Reporter(
        client, addresses, identity, Ledger(keep_finished=False), lambda: ReportView.idle(State.FAILED.value),
        disk, timeout=timeout, redact=redact,
    )
    return await reporter.send_error_once(error_msg)
