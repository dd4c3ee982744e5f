"""The load monitor: samples the probes on a timer, feeds the meters, and keeps the current estimate.

One task, one tick every PROBE_INTERVAL: the GPU, host and model-metrics probes are sampled at once
(each in its own thread hop or HTTP call), the smoothers and the throughput meter are advanced, and
`estimate()` (pure) is run on the resulting snapshot. Readers (admission, reporter, /status,
/metrics) only read the cached results, so nothing on the request path waits for a probe.
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
    ) -> None:
        self.ledger = ledger
        self._gpu, self._host, self._model = gpu, host, model_metrics
        self._max_perf = max_perf
        self.interval = interval
        self._clock = clock
        self.gpu: GpuSnapshot | None = None
        self.host: HostSnapshot | None = None
        self.model_queue: ModelQueue | None = None
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

    def snapshot(self) -> LoadSnapshot:
        now = self._clock()
        ledger, queue, gpu = self.ledger, self.model_queue, self.gpu
        available = gpu is not None and gpu.available and gpu.devices
        return LoadSnapshot(
            running_work=ledger.running_work,
            waiting_work=ledger.waiting_work,
            max_perf=self._max_perf(),
            online_perf=self._throughput.rate(now),
            model_waiting=queue.waiting if queue and queue.ok else None,
            model_running=queue.running if queue and queue.ok else None,
            kv_cache_usage=queue.kv_cache_usage if queue and queue.ok else None,
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
        waiting_model = self.model_queue.waiting if self.model_queue and self.model_queue.ok else None
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

    async def sample_once(self) -> None:
        async with trio.open_nursery() as nursery:
            async def gpu() -> None:
                self.gpu = await self._gpu.sample()

            async def host() -> None:
                self.host = await self._host.sample()

            async def model() -> None:
                self.model_queue = await self._model.sample()

            nursery.start_soon(gpu)
            nursery.start_soon(host)
            if self._model is not None:
                nursery.start_soon(model)
        self.tick()

    async def run(self) -> None:
        while True:
            await self.sample_once()
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
            "model_queue": asdict(self.model_queue) if self.model_queue is not None else None,
        }
