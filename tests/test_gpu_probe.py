"""The GPU probe over a fake NVML module whose errors are real pynvml.NVMLError subclasses."""

from __future__ import annotations

import sys
from typing import Any

import pynvml
import pytest
import trio
import trio.testing

from probes.gpu import GpuProbe, GpuProcess, UnavailableGpuProbe, default_gpu_probe
from tests.fake_nvml import FakeDevice, FakeNvml, RecordingLog


class InlineRunner:
    """Stands in for trio.to_thread.run_sync: runs the function here and counts the hops."""

    def __init__(self) -> None:
        self.hops = 0

    async def __call__(self, fn: Any, *args: Any) -> Any:
        self.hops += 1
        return fn(*args)


def _probe(nvml: FakeNvml, **kwargs: Any) -> tuple[GpuProbe, InlineRunner, RecordingLog]:
    runner, log = InlineRunner(), RecordingLog()
    kwargs.setdefault("pid_visible", lambda pid: pid < 100_000)
    return GpuProbe(nvml, run_sync=runner, log=log, **kwargs), runner, log


def _two_gpus() -> FakeNvml:
    return FakeNvml([
        FakeDevice(name="NVIDIA H200", uuid="GPU-aaaa", util_gpu=97, util_memory=40, memory_used=120_000_000_000,
                   power_mw=412_500, temperature_c=61, processes=[(4242, 118_000_000_000)], gpm=True,
                   sm_util_percent=63.0),
        FakeDevice(name="NVIDIA H200", uuid="GPU-bbbb", util_gpu=3, util_memory=0, memory_used=600_000_000,
                   power_mw=90_000, temperature_c=33),
    ])


def test_the_fake_raises_what_the_real_binding_raises() -> None:
    # pynvml maps a return code to its subclass in NVMLError.__new__; the fake relies on that.
    err = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert type(err) is pynvml.NVMLError_GpuIsLost and isinstance(err, pynvml.NVMLError)
    assert type(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)) is pynvml.NVMLError_NotSupported


async def test_normal_multi_device_sample() -> None:
    nvml = _two_gpus()
    probe, runner, log = _probe(nvml, own_pids=lambda: {1, 4242})

    first = await probe.sample()
    assert first.available and first.reason == ""
    a, b = first.devices
    assert (a.index, a.name, a.uuid) == (0, "NVIDIA H200", "GPU-aaaa")  # bytes names decoded
    assert (a.util_gpu, a.util_memory, a.temperature_c) == (97, 40, 61)
    assert (a.memory_total, a.memory_used) == (150_000_000_000, 120_000_000_000)
    assert a.power_watts == pytest.approx(412.5)
    assert a.processes == (GpuProcess(pid=4242, used_memory=118_000_000_000, ours=True),)
    assert a.sm_active is None  # GPM needs two samples
    assert b.sm_active is None and b.processes == ()  # no GPM on this one
    assert first.utilisation == pytest.approx(0.5)
    assert first.memory_fraction == pytest.approx(120.6 / 300.0)

    nvml.devices[0].util_gpu = 50
    second = await probe.sample()
    assert second.devices[0].util_gpu == 50
    assert second.devices[0].sm_active == pytest.approx(0.63)
    assert nvml.init_calls == 1  # initialised once, handles kept
    assert runner.hops == 2  # one thread hop per sample
    assert log.events() == ["gpu.found"]
    assert len(nvml.gpm_allocated) == 1  # only the latest GPM sample is kept

    await probe.aclose()
    assert nvml.shutdown_calls == 1 and not nvml.gpm_allocated


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
    ],
)
async def test_no_gpu_is_reported_and_logged_once(
    code: int, words: str, autojump_clock: trio.testing.MockClock
) -> None:
    nvml = FakeNvml()
    nvml.fail_init = code
    probe, runner, log = _probe(nvml, retry_initial_s=5.0)
    for _ in range(20):
        snapshot = await probe.sample()
        assert not snapshot.available and snapshot.devices == ()
        assert words in snapshot.reason
        await trio.sleep(1.0)
    assert log.events() == ["gpu.unavailable"]
    # Init is retried, but with backoff (5, 10 s...), not every second.
    assert 2 <= nvml.init_calls <= 4
    assert runner.hops == nvml.init_calls


async def test_zero_devices(autojump_clock: trio.testing.MockClock) -> None:
    probe, _, log = _probe(FakeNvml(devices=[]))
    snapshot = await probe.sample()
    assert not snapshot.available and "no device" in snapshot.reason
    assert log.events() == ["gpu.unavailable"]


async def test_gpu_lost_mid_run_then_recovered(autojump_clock: trio.testing.MockClock) -> None:
    nvml = _two_gpus()
    probe, _, log = _probe(nvml, retry_initial_s=5.0, retry_max_s=20.0)
    assert (await probe.sample()).available

    nvml.lost = pynvml.NVML_ERROR_GPU_IS_LOST
    lost = await probe.sample()
    assert not lost.available and lost.reason.startswith("GPU lost")
    assert nvml.shutdown_calls == 1  # the session was closed, to start over later
    assert not nvml.gpm_allocated

    # While lost, nvmlInit succeeds but the devices still fail: reported, re-tried with backoff.
    for _ in range(30):
        assert not (await probe.sample()).available
        await trio.sleep(1.0)
    assert 3 <= nvml.init_calls <= 6  # 1 + retries after 5, 10, 20, 20 s: not one per second

    nvml.lost = None
    await trio.sleep(20.0)
    recovered = await probe.sample()
    assert recovered.available and len(recovered.devices) == 2
    assert log.events() == ["gpu.found", "gpu.lost", "gpu.recovered"]  # each change once


async def test_unknown_error_mid_run_counts_as_lost(autojump_clock: trio.testing.MockClock) -> None:
    nvml = FakeNvml()
    probe, _, log = _probe(nvml)
    await probe.sample()
    nvml.lost = pynvml.NVML_ERROR_UNKNOWN
    assert not (await probe.sample()).available
    assert log.events() == ["gpu.found", "gpu.lost"]


async def test_unsupported_fields_are_none_not_a_failure() -> None:
    nvml = FakeNvml([FakeDevice(unsupported={
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature", "nvmlDeviceGetComputeRunningProcesses",
        "nvmlGpmQueryDeviceSupport",
    })])
    probe, _, log = _probe(nvml)
    (device,) = (await probe.sample()).devices
    assert (device.power_watts, device.temperature_c, device.processes, device.sm_active) == (None, None, None, None)
    assert device.util_gpu == 0 and device.memory_total == 150_000_000_000
    assert log.events() == ["gpu.found"]


async def test_processes_matched_to_our_tree() -> None:
    nvml = FakeNvml([FakeDevice(processes=[(100, 5), (200, 6), (3_000_000, None)])])
    probe, _, _ = _probe(nvml, own_pids=lambda: {100, 101})
    snapshot = await probe.sample()
    (device,) = snapshot.devices
    assert device.processes == (
        GpuProcess(100, 5, True),  # in our tree
        GpuProcess(200, 6, False),  # visible here, not ours
        GpuProcess(3_000_000, None, None),  # a host pid we cannot see: cannot tell
    )
    assert "cannot tell" in snapshot.pid_note


async def test_own_pids_failing_means_cannot_tell() -> None:
    def broken() -> set[int]:
        raise RuntimeError("no tree")

    probe, _, _ = _probe(FakeNvml([FakeDevice(processes=[(100, 5)])]), own_pids=broken)
    (device,) = (await probe.sample()).devices
    assert device.processes == (GpuProcess(100, 5, None),)


async def test_gpm_missing_from_an_older_binding() -> None:
    nvml = _two_gpus()
    for name in ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmMetricsGet"):
        setattr(nvml, name, None)  # calling None raises TypeError, as a missing symbol would fail
    probe, _, _ = _probe(nvml)
    await probe.sample()
    snapshot = await probe.sample()
    assert snapshot.available and snapshot.devices[0].sm_active is None


async def test_runs_in_a_real_worker_thread() -> None:
    nvml = _two_gpus()
    probe = GpuProbe(nvml, log=RecordingLog())  # the default runner: trio.to_thread.run_sync
    assert (await probe.sample()).available
    await probe.aclose()


async def test_default_probe_without_a_driver_reports_no_gpu(autojump_clock: trio.testing.MockClock) -> None:
    log = RecordingLog()
    probe = default_gpu_probe(log=log)
    snapshot = await probe.sample()
    if snapshot.available:  # pragma: no cover - only on a machine with an NVIDIA GPU
        await probe.aclose()
        pytest.skip("this machine has a GPU")
    assert snapshot.reason.startswith("no GPU")
    await probe.sample()
    assert log.events() == ["gpu.unavailable"]


async def test_default_probe_without_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    log = RecordingLog()
    probe = default_gpu_probe(log=log)
    assert isinstance(probe, UnavailableGpuProbe)
    for _ in range(3):
        snapshot = await probe.sample()
        assert not snapshot.available and "nvidia-ml-py" in snapshot.reason
    assert log.events() == ["gpu.unavailable"]
