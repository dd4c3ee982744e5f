"""A fake NVML module for the GPU probe's tests: the functions `probes.gpu` calls, with real
`pynvml.NVMLError` subclasses as errors (built as `pynvml.NVMLError(code)`, which maps the code to its
subclass exactly as the real binding does on a failed call).

Devices are `FakeDevice`s the test edits between samples; `fail_init`, `lost` and per-device
`unsupported` sets inject the failures; counters record what the probe called.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

# The error classes and constants, re-exported like the real module has them.
NVMLError = pynvml.NVMLError
NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
NVMLError_NoPermission = pynvml.NVMLError_NoPermission
NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
NVMLError_Unknown = pynvml.NVMLError_Unknown
NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
NVMLError_NotSupported = pynvml.NVMLError_NotSupported
NVML_SUCCESS = pynvml.NVML_SUCCESS
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVML_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION
NVML_GPM_METRIC_SM_UTIL = pynvml.NVML_GPM_METRIC_SM_UTIL


def error(code: int) -> pynvml.NVMLError:
    """The exception the real binding raises for this return code (a subclass, e.g. GpuIsLost)."""
    return pynvml.NVMLError(code)


@dataclass
class FakeDevice:
    name: str = "NVIDIA H200"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    util_gpu: int = 0
    util_memory: int = 0
    memory_total: int = 150_000_000_000
    memory_used: int = 0
    power_mw: int = 75_000
    temperature_c: int = 35
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    gpm: bool = False  # Hopper or newer with a GPM-capable driver
    sm_util_percent: float = 0.0  # what the next GPM sample will measure
    unsupported: set[str] = field(default_factory=set)  # function names raising NotSupported


class FakeGpmSample:
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.sm_util_percent: float | None = None


class FakeGpmMetricsGet:
    """Stands in for `pynvml.c_nvmlGpmMetricsGet_t`: the fields the probe sets and reads."""

    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: FakeGpmSample | None = None
        self.sample2: FakeGpmSample | None = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=NVML_SUCCESS, value=0.0) for _ in range(4)]


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_SUCCESS = NVML_SUCCESS
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_GPM_METRICS_GET_VERSION = NVML_GPM_METRICS_GET_VERSION
    NVML_GPM_METRIC_SM_UTIL = NVML_GPM_METRIC_SM_UTIL
    c_nvmlGpmMetricsGet_t = FakeGpmMetricsGet

    def __init__(self, devices: list[FakeDevice] | None = None) -> None:
        self.devices = devices if devices is not None else [FakeDevice()]
        self.fail_init: int | None = None  # an NVML_ERROR_* code nvmlInit raises
        self.lost: int | None = None  # an NVML_ERROR_* code every device call raises (e.g. GPU_IS_LOST)
        self.initialised = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.gpm_allocated: set[int] = set()
        self.calls: list[str] = []

    # -- session ---------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.fail_init is not None:
            raise error(self.fail_init)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        if not self.initialised:
            raise error(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check_session()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._check_session()
        return self.devices[index]

    # -- per device ------------------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeDevice) -> bytes:
        self._call("nvmlDeviceGetName", handle)
        return handle.name.encode()  # older bindings return bytes; the probe decodes them

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        self._call("nvmlDeviceGetUUID", handle)
        return handle.uuid

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> SimpleNamespace:
        self._call("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=handle.util_gpu, memory=handle.util_memory)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo", handle)
        free = handle.memory_total - handle.memory_used
        return SimpleNamespace(total=handle.memory_total, used=handle.memory_used, free=free)

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> int:
        self._call("nvmlDeviceGetPowerUsage", handle)
        return handle.power_mw

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature", handle)
        assert sensor == NVML_TEMPERATURE_GPU
        return handle.temperature_c

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]

    # -- GPM -------------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: FakeDevice) -> SimpleNamespace:
        self._call("nvmlGpmQueryDeviceSupport", handle)
        return SimpleNamespace(version=1, isSupportedDevice=int(handle.gpm))

    def nvmlGpmSampleAlloc(self) -> FakeGpmSample:
        self._check_session()
        sample = FakeGpmSample()
        self.gpm_allocated.add(sample.id)
        return sample

    def nvmlGpmSampleFree(self, sample: FakeGpmSample) -> None:
        self.gpm_allocated.discard(sample.id)

    def nvmlGpmSampleGet(self, handle: FakeDevice, sample: FakeGpmSample) -> FakeGpmSample:
        self._call("nvmlGpmSampleGet", handle)
        sample.sm_util_percent = handle.sm_util_percent
        return sample

    def nvmlGpmMetricsGet(self, request: FakeGpmMetricsGet) -> FakeGpmMetricsGet:
        self._check_session()
        assert request.version == NVML_GPM_METRICS_GET_VERSION and request.numMetrics == 1
        assert request.sample1 is not None and request.sample2 is not None
        assert request.sample1.id in self.gpm_allocated and request.sample2.id in self.gpm_allocated
        assert request.metrics[0].metricId == NVML_GPM_METRIC_SM_UTIL
        request.metrics[0].value = request.sample2.sm_util_percent
        return request

    # -- internals -------------------------------------------------------------------------------

    def _check_session(self) -> None:
        if not self.initialised:
            raise error(pynvml.NVML_ERROR_UNINITIALIZED)
        if self.lost is not None:
            raise error(self.lost)

    def _call(self, name: str, handle: FakeDevice) -> None:
        self.calls.append(name)
        self._check_session()
        if name in handle.unsupported:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)


class RecordingLog:
    """A structlog-like logger that keeps what it was told."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str, event: str, **kw: Any) -> None:
        self.records.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._record("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._record("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._record("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._record("error", event, **kw)

    def events(self) -> list[str]:
        return [event for _, event, _ in self.records]
