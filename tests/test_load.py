"""The load monitor: probes in, meters advanced, one estimate out (fake probes, mock clock)."""

from __future__ import annotations

import trio
import trio.testing

from probes.gpu import GpuDevice, GpuSnapshot
from probes.host import HostSnapshot
from probes.model_metrics import ModelQueue
from proxy.ledger import Ledger, RequestStatus
from supervisor.load import LoadMonitor


class FakeProbe:
    def __init__(self, value: object) -> None:
        self.value = value
        self.calls = 0

    async def sample(self) -> object:
        self.calls += 1
        await trio.sleep(0.01)  # a probe takes time; the monitor samples them together
        return self.value


def gpu(util: int) -> GpuSnapshot:
    device = GpuDevice(0, "H200", "GPU-0", util, 0, 100, 50, 300.0, 40, None, ())
    return GpuSnapshot(True, "", (device,))


NO_GPU = GpuSnapshot(False, "no GPU: test", ())
HOST = HostSnapshot(1.0, 100, 50, 1000, 10, None)


def monitor(ledger: Ledger, gpu_probe: FakeProbe, model: FakeProbe | None = None, max_perf: float = 10.0) -> LoadMonitor:
    return LoadMonitor(ledger, gpu_probe, FakeProbe(HOST), model, max_perf=lambda: max_perf, interval=1.0)


async def test_idle_is_zero_and_capacity_is_the_benchmark() -> None:
    m = monitor(Ledger(), FakeProbe(NO_GPU))
    await m.sample_once()
    assert m.current.utilisation == 0.0 and m.current.wait_seconds == 0.0
    assert m.capacity() == 10.0
    assert m.gpu is NO_GPU and m.host is HOST


async def test_probes_are_sampled_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    probes = [FakeProbe(NO_GPU), FakeProbe(ModelQueue(0, 0, None, True, ""))]
    m = monitor(Ledger(), probes[0], probes[1])
    start = trio.current_time()
    await m.sample_once()
    assert trio.current_time() - start < 0.015  # three 10 ms probes, not 30 ms in a row
    assert [p.calls for p in probes] == [1, 1]


async def test_queued_work_raises_the_estimate_monotonically() -> None:
    ledger = Ledger()
    m = monitor(ledger, FakeProbe(NO_GPU))
    seen = []
    for _ in range(4):
        ledger.admit(route="/generate", workload=50.0, now=0.0)
        seen.append(m.tick().utilisation)
    assert seen == sorted(seen) and seen[0] > 0
    assert m.current.wait_seconds == 200.0 / 10.0  # all work ahead of a new request / capacity


async def test_model_server_queue_counts_as_hidden_work() -> None:
    ledger = Ledger()
    quiet = monitor(ledger, FakeProbe(NO_GPU), FakeProbe(ModelQueue(0, 0, None, True, "")))
    busy = monitor(ledger, FakeProbe(NO_GPU), FakeProbe(ModelQueue(5, 4, 0.9, True, "")))
    await quiet.sample_once()
    await busy.sample_once()
    assert busy.current.utilisation > quiet.current.utilisation
    assert busy.current.hidden_work > 0


async def test_online_throughput_is_measured_from_served_work(autojump_clock: trio.testing.MockClock) -> None:
    ledger = Ledger()
    m = monitor(ledger, FakeProbe(gpu(90)), max_perf=0.0)  # no benchmark: capacity must be learnt
    backlog = [ledger.admit(route="/generate", workload=10.0, now=0.0) for _ in range(2)]  # always waiting
    assert m.tick().capacity == 0.0  # nothing served yet: capacity unknown
    for _ in range(40):
        running = [ledger.admit(route="/generate", workload=10.0, now=0.0) for _ in range(2)]
        for record in running:
            ledger.start(record, 0.0)
        await trio.sleep(1.0)
        for record in running:
            ledger.finish(record, RequestStatus.SUCCESS, 0.0)
        m.tick()
    assert ledger.waiting == len(backlog)
    assert 15.0 <= m.capacity() <= 25.0  # 20 units served per second while backlogged
