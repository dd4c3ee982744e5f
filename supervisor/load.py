"""The load monitor: samples the probes on a timer, feeds the meters, and keeps the current estimate.

One task, one tick every PROBE_INTERVAL: the GPU, host and model-metrics probes are sampled at once
(each in its own thread hop or HTTP call), the smoothers and the throughput meter are advanced, and
`estimate()` (pure) is run on the resulting snapshot. Readers (admission, reporter, /status,
/metrics) only read the cached results, so nothing on the request path waits for a probe.

The model server's queue is scraped in a task of its own: under load one scrape of vLLM's /metrics
took 8 s, and the estimate must keep ticking meanwhile. Each sample keeps the time its scrape began,
and the estimate uses it only while it is fresh (younger than `STALE_INTERVALS` probe intervals),
read (ok), and taken since the worker last became ready (`hold_model_queue` / `accept_model_queue`: a
queue seen during the warm-up benchmark is the benchmark's, not the clients'). Otherwise the model
queue is unknown to the estimate, never an idle server, and `/status` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import trio

from probes.gpu import GpuSnapshot
from probes.host import HostSnapshot
from probes.model_metrics import ModelQueue
from proxy.ledger import Ledger
from supervisor.estimate import (
    DutyCycleSmoother,
    Estimate,
    Ewma,
    LoadSnapshot,
    ThroughputMeter,
    estimate,
)
from supervisor.logs import get_logger

SMOOTHING_WINDOW_S = 10.0
# A model-queue sample older than this many probe intervals is stale: unknown, not idle.
STALE_INTERVALS = 3.0


class LoadMonitor:
    def __init__(
        self,
        ledger: Ledger,
        gpu: Any,  # GpuProbe-like: async sample() -> GpuSnapshot
        host: Any,  # HostProbe-like: async sample() -> HostSnapshot
        model_metrics: Any | None,  # ModelMetricsProbe-like, or None when the backend exposes none
        max_perf: Callable[[], float],
        interval: float,
        clock: Callable[[], float] = trio.current_time,
        capacity_source: Callable[[], str] | None = None,  # where max_perf came from ("configured", ...)
    ) -> None:
        self.ledger = ledger
        self._gpu, self._host, self._model = gpu, host, model_metrics
        self._max_perf = max_perf
        self.interval = interval
        self._clock = clock
        self.gpu: GpuSnapshot | None = None
        self.host: HostSnapshot | None = None
        self.model_queue: ModelQueue | None = None
        self.model_queue_at: float | None = None  # when the scrape of model_queue began
        # Which `ready` a sample belongs to: a sample counts only if its scrape began after the latest
        # `accept_model_queue` and no hold was on. An epoch, not a time: a scrape that began in the
        # same clock instant as `ready` (the mock clock; coarse clocks) still began before it.
        self._queue_epoch = 0
        self._queue_held = False
        self._model_queue_tag: tuple[int, bool] = (0, False)  # (epoch, held) when model_queue's scrape began
        self._capacity_source = capacity_source
        self._gpu_duty = DutyCycleSmoother(SMOOTHING_WINDOW_S)
        self._busy = DutyCycleSmoother(SMOOTHING_WINDOW_S)
        self._throughput = ThroughputMeter()
        self._work = Ewma(60.0)
        self._served_seen = 0.0
        self._received_seen = 0
        self._received_work_seen = 0.0
        # Idle until the first tick: nothing admitted yet, nothing measured.
        self.current: Estimate = estimate(LoadSnapshot(0.0, 0.0, 0.0, None, None, None, None, None, None, 0))
        self._stall_logged = False
        self._log = get_logger("supervisor.load")

    def capacity(self) -> float:
        """Units/s for the admission's 429 decision: the same number the estimate uses."""
        return self.current.capacity

    def hidden_work(self) -> float:
        """Units in the model server that never passed the proxy, as of the last tick; the 429
        decision and the reporter's cur_load add it to the ledger's live work."""
        return self.current.hidden_work

    def _max_perf_source(self) -> str:
        source = self._capacity_source() if self._capacity_source is not None else ""
        return source if source not in ("", "none") else "benchmark"

    def hold_model_queue(self) -> None:
        """Until `accept_model_queue`, the estimate ignores the model server's queue (warming: the
        queue then is the benchmark's)."""
        self._queue_held = True

    def accept_model_queue(self) -> None:
        """From now on, samples whose scrape begins after this call count (the worker became ready)."""
        self._queue_held = False
        self._queue_epoch += 1

    def stale_after(self) -> float:
        return STALE_INTERVALS * self.interval

    def model_queue_age(self, now: float | None = None) -> float | None:
        if self.model_queue_at is None:
            return None
        return max((self._clock() if now is None else now) - self.model_queue_at, 0.0)

    def model_queue_note(self, now: float | None = None) -> str:
        """Why the estimate does not use the model server's queue now; "" when it does."""
        queue, at = self.model_queue, self.model_queue_at
        if self._model is None:
            return "the backend exposes no queue metrics"
        if queue is None or at is None:
            return "not sampled yet"
        if not queue.ok:
            return f"unknown: {queue.error}"
        age = self.model_queue_age(now)
        assert age is not None
        if age > self.stale_after():
            return f"stale: sampled {age:.1f} s ago (limit {self.stale_after():g} s)"
        if self._queue_held or self._model_queue_tag != (self._queue_epoch, False):
            return "taken before the worker was ready"
        return ""

    def fresh_model_queue(self, now: float | None = None) -> ModelQueue | None:
        """The last sample if it was read and is not stale (what /metrics exports), else None."""
        queue, age = self.model_queue, self.model_queue_age(now)
        if queue is None or not queue.ok or age is None or age > self.stale_after():
            return None
        return queue

    def usable_model_queue(self, now: float | None = None) -> ModelQueue | None:
        """The sample the estimate may use: read, fresh, and taken since ready; else None (unknown)."""
        return self.model_queue if self.model_queue_note(now) == "" else None

    def snapshot(self) -> LoadSnapshot:
        now = self._clock()
        ledger, queue, gpu = self.ledger, self.usable_model_queue(now), self.gpu
        available = gpu is not None and gpu.available and gpu.devices
        return LoadSnapshot(
            running_work=ledger.running_work,
            waiting_work=ledger.waiting_work,
            max_perf=self._max_perf(),
            max_perf_source=self._max_perf_source(),
            online_perf=self._throughput.rate(now),
            model_waiting=queue.waiting if queue else None,
            model_running=queue.running if queue else None,
            kv_cache_usage=queue.kv_cache_usage if queue else None,
            gpu_util=self._gpu_duty.value_at(now) if available else None,
            gpu_memory_frac=gpu.memory_fraction if available else None,  # type: ignore[union-attr]
            in_flight=ledger.running,
            proxy_busy=self._busy.value_at(now),
            mean_request_work=self._work.value,
        )

    def tick(self) -> Estimate:
        """Advance the meters with what the ledger did since the last tick, then re-estimate."""
        now = self._clock()
        ledger = self.ledger
        served = ledger.served_total - self._served_seen
        self._served_seen = ledger.served_total
        usable = self.usable_model_queue(now)
        waiting_model = usable.waiting if usable else None
        self._throughput.set_backlogged(now, ledger.waiting > 0 or bool(waiting_model))
        if served > 0:
            self._throughput.served(now, served)
        arrived = ledger.num_received - self._received_seen
        if arrived > 0:
            self._work.update(now, (ledger.received_total - self._received_work_seen) / arrived)
        self._received_seen, self._received_work_seen = ledger.num_received, ledger.received_total
        self._busy.update(now, 1.0 if ledger.running else 0.0)
        if self.gpu is not None and self.gpu.available:
            self._gpu_duty.update(now, self.gpu.utilisation)
        self.current = estimate(self.snapshot())
        if self.current.stalled and not self._stall_logged:
            self._log.warning("load.stall", in_flight=ledger.running, gpu=self.gpu.utilisation if self.gpu else None)
        self._stall_logged = self.current.stalled
        return self.current

    async def sample_gpu(self) -> GpuSnapshot:
        self.gpu = await self._gpu.sample()
        return self.gpu

    async def sample_model(self) -> None:
        """One scrape of the model server's queue, stamped with the time it began (the numbers are
        at least that old)."""
        started, tag = self._clock(), (self._queue_epoch, self._queue_held)
        queue = await self._model.sample()
        self.model_queue, self.model_queue_at, self._model_queue_tag = queue, started, tag

    async def sample_once(self) -> None:
        """Every probe once, together, then a tick (the model scrape included: for tests and one-offs)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample_machine)
            if self._model is not None:
                nursery.start_soon(self.sample_model)
        self.tick()

    async def _sample_machine(self) -> None:
        async with trio.open_nursery() as nursery:
            async def gpu() -> None:
                self.gpu = await self._gpu.sample()

            async def host() -> None:
                self.host = await self._host.sample()

            nursery.start_soon(gpu)
            nursery.start_soon(host)

    async def _model_loop(self) -> None:
        while True:
            await self.sample_model()
            await trio.sleep(self.interval)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self._model is not None:
                nursery.start_soon(self._model_loop)  # a slow scrape must not hold the ticks back
            while True:
                await self._sample_machine()
                self.tick()
                await trio.sleep(self.interval)

    def status(self) -> dict[str, Any]:
        e = self.current
        return {
            "estimate": {
                "utilisation": e.utilisation, "wait_seconds": e.wait_seconds, "capacity": e.capacity,
                "capacity_source": e.capacity_source, "stalled": e.stalled, "hidden_work": e.hidden_work,
                "pending_work": e.pending_work,
            },
            "gpu": asdict(self.gpu) if self.gpu is not None else None,
            "host": asdict(self.host) if self.host is not None else None,
            "model_queue": self._model_queue_status(),
        }

    def _model_queue_status(self) -> dict[str, Any] | None:
        if self.model_queue is None:
            return None
        now = self._clock()
        note = self.model_queue_note(now)
        age = self.model_queue_age(now)
        return {
            **asdict(self.model_queue),
            "age_s": round(age, 3) if age is not None else None,
            "in_estimate": note == "",
            "note": note,
        }
