"""The GPUs, read through NVML (`nvidia-ml-py`, module `pynvml`).

This module owns the NVML session: `nvmlInit` once (lazily, on the first sample), device handles kept,
and every reading of one sample done in a single `run_sync` call (NVML calls block, so they run off
the event loop, and the thread hop is paid once). The NVML module and the thread runner are
constructor arguments, so tests pass a fake module whose errors are real `pynvml.NVMLError`s.

What can go wrong, and what the probe does (each state change logged once, never per sample):
- no library, no driver, no permission, no device: `available=False` with a reason; init is retried
  with backoff (a driver can appear after a container restart, but is not polled every second);
- a GPU lost mid-run (`GpuIsLost`, `Unknown`): that state is reported, NVML is shut down, and a
  re-init is attempted later with backoff;
- one field the device does not support (`NotSupported`, or any other non-fatal NVML error): that
  field is None, the rest of the sample stands.

Per device: name, UUID, utilisation (GPU and memory, percent), memory, power, temperature, the
compute processes, and on Hopper and newer the SM activity from GPM (`NVML_GPM_METRIC_SM_UTIL`
between this sample and the previous one). Process pids are host pids when shepherd runs in a
container (the driver knows no PID namespaces): a pid in our model server's tree is `ours=True`, a pid
that exists here but is not ours is `ours=False`, a pid that does not exist in our namespace is
`ours=None` (cannot tell).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psutil
import structlog
import trio

RunSync = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # as NVML reports it: a host pid inside containers
    used_memory: int | None  # bytes; None where the driver does not say (e.g. Windows WDDM)
    ours: bool | None  # in our model server's tree; None: cannot tell (pid not visible here)


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    uuid: str
    util_gpu: int | None  # percent of the last sample period with a kernel running (a duty cycle)
    util_memory: int | None  # percent of that period the memory was read or written
    memory_total: int | None  # bytes
    memory_used: int | None  # bytes
    power_watts: float | None
    temperature_c: int | None
    sm_active: float | None  # 0..1 share of SMs busy between the last two samples (GPM); None if unsupported
    processes: tuple[GpuProcess, ...] | None  # None: the driver would not list them


@dataclass(frozen=True)
class GpuSnapshot:
    available: bool
    reason: str  # why not available; "" when available
    devices: tuple[GpuDevice, ...]

    @property
    def utilisation(self) -> float | None:
        """Mean GPU duty cycle over the devices, 0..1 (the estimator smooths it); None if unknown."""
        values = [d.util_gpu for d in self.devices if d.util_gpu is not None]
        return sum(values) / (100.0 * len(values)) if values else None

    @property
    def memory_fraction(self) -> float | None:
        known = [d for d in self.devices if d.memory_total and d.memory_used is not None]
        total = sum(d.memory_total or 0 for d in known)
        return sum(d.memory_used or 0 for d in known) / total if total else None

    @property
    def pid_note(self) -> str:
        """Says when GPU processes could not be matched to our process tree; "" when all were."""
        unknown = sum(1 for d in self.devices for p in d.processes or () if p.ours is None)
        if not unknown:
            return ""
        return (f"{unknown} GPU process(es) have pids not visible in this PID namespace (host pids in a "
                "container): cannot tell whether they belong to the model server")


def _unavailable(reason: str) -> GpuSnapshot:
    return GpuSnapshot(False, reason, ())


class _Lost(Exception):
    """A device call failed in a way that invalidates the whole NVML session."""


class GpuProbe:
    """`await sample()` periodically; `await aclose()` at shutdown.

    `own_pids()` returns the pids of the model server's process tree; it is called in the worker
    thread and must only read. `clock` drives the re-init backoff (trio's clock, so tests can mock it).
    """

    def __init__(
        self,
        nvml: ModuleType | Any,
        run_sync: RunSync = trio.to_thread.run_sync,
        own_pids: Callable[[], set[int]] = lambda: set(),
        log: Any = None,
        *,
        pid_visible: Callable[[int], bool] = psutil.pid_exists,
        clock: Callable[[], float] = trio.current_time,
        retry_initial_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self._nvml = nvml
        self._run_sync = run_sync
        self._own_pids = own_pids
        self._log = log if log is not None else structlog.get_logger("probes.gpu")
        self._pid_visible = pid_visible
        self._clock = clock
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._retry_delay = retry_initial_s
        self._next_init_at: float | None = None  # None: try at the next sample
        self._lock = threading.Lock()  # one sample at a time touches the handles and GPM samples
        self._handles: list[Any] | None = None
        self._static: list[tuple[str, str]] = []
        self._gpm: list[bool] = []
        self._gpm_prev: list[Any] = []
        self._last = _unavailable("not sampled yet")
        self._state: str | None = None  # the last state logged

        nvml_error = getattr(nvml, "NVMLError", None)
        self._nvml_error: type[BaseException] = nvml_error if isinstance(nvml_error, type) else _Never
        self._lost_errors = self._error_classes(
            "NVMLError_GpuIsLost", "NVMLError_Unknown", "NVMLError_Uninitialized", "NVMLError_DriverNotLoaded"
        )
        self._not_supported = self._error_classes("NVMLError_NotSupported")

    async def sample(self) -> GpuSnapshot:
        if self._handles is None and self._next_init_at is not None and self._clock() < self._next_init_at:
            return self._last  # waiting out the backoff: no thread hop, nothing new to say
        state, snapshot = await self._run_sync(self._sample_sync)
        self._remember(state, snapshot)
        return snapshot

    async def aclose(self) -> None:
        await self._run_sync(self._close_sync)

    # -- in the worker thread --------------------------------------------------------------------

    def _sample_sync(self) -> tuple[str, GpuSnapshot]:
        with self._lock:
            if self._handles is None:
                failure = self._init()
                if failure is not None:
                    return failure
            try:
                return "ok", GpuSnapshot(True, "", self._read_devices())
            except _Lost as exc:
                self._teardown()
                return "lost", _unavailable(f"GPU lost: {exc}")
            except Exception as exc:  # a driver or binding bug must not take the sidecar down
                self._teardown()
                return "error", _unavailable(f"NVML failed: {type(exc).__name__}: {exc}")

    def _close_sync(self) -> None:
        with self._lock:
            self._teardown()

    def _init(self) -> tuple[str, GpuSnapshot] | None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            return self._init_failure(exc)
        try:
            count = int(nvml.nvmlDeviceGetCount())
            if count <= 0:
                self._shutdown()
                return "no_devices", _unavailable("no GPU: NVML sees no device")
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            self._shutdown()
            return self._init_failure(exc)
        self._handles = handles
        self._static = [(self._text(nvml.nvmlDeviceGetName, h), self._text(nvml.nvmlDeviceGetUUID, h))
                        for h in handles]
        self._gpm = [self._gpm_supported(h) for h in handles]
        self._gpm_prev = [None] * count
        return None

    def _init_failure(self, exc: BaseException) -> tuple[str, GpuSnapshot]:
        reasons = (
            ("NVMLError_LibraryNotFound", "no_library",
             "no GPU: the NVML library (NVIDIA driver) is not in this container"),
            ("NVMLError_DriverNotLoaded", "no_driver", "no GPU: the NVIDIA driver is not loaded"),
            ("NVMLError_NoPermission", "no_permission", "no GPU: no permission to use NVML"),
            ("NVMLError_GpuIsLost", "lost", "GPU lost"),
        )
        for class_name, state, reason in reasons:
            cls = getattr(self._nvml, class_name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return state, _unavailable(reason)
        return "error", _unavailable(f"NVML init failed: {type(exc).__name__}: {exc}")

    def _read_devices(self) -> tuple[GpuDevice, ...]:
        nvml = self._nvml
        assert self._handles is not None
        readings = []
        for index, handle in enumerate(self._handles):
            util = self._field(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = self._field(nvml.nvmlDeviceGetMemoryInfo, handle)
            power_mw = self._field(nvml.nvmlDeviceGetPowerUsage, handle)
            sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
            temperature = self._field(nvml.nvmlDeviceGetTemperature, handle, sensor)
            processes = self._field(nvml.nvmlDeviceGetComputeRunningProcesses, handle)
            readings.append((index, util, memory, power_mw, temperature, processes, self._sm_active(index, handle)))

        # The process tree is walked only when some GPU has processes to match.
        own = self._own() if any(r[5] for r in readings) else set()
        devices = []
        for index, util, memory, power_mw, temperature, processes, sm in readings:
            name, uuid = self._static[index]
            devices.append(GpuDevice(
                index=index,
                name=name,
                uuid=uuid,
                util_gpu=_int_attr(util, "gpu"),
                util_memory=_int_attr(util, "memory"),
                memory_total=_int_attr(memory, "total"),
                memory_used=_int_attr(memory, "used"),
                power_watts=None if power_mw is None else float(power_mw) / 1000.0,
                temperature_c=None if temperature is None else int(temperature),
                sm_active=sm,
                processes=None if processes is None else tuple(self._process(p, own) for p in processes),
            ))
        return tuple(devices)

    def _process(self, info: Any, own: set[int] | None) -> GpuProcess:
        pid = int(info.pid)
        used = getattr(info, "usedGpuMemory", None)
        if own is not None and pid in own:
            ours: bool | None = True
        elif own is None or not self._visible(pid):
            ours = None
        else:
            ours = False
        return GpuProcess(pid=pid, used_memory=None if used is None else int(used), ours=ours)

    def _own(self) -> set[int] | None:
        try:
            return set(self._own_pids())
        except Exception:
            return None  # no tree to compare with: every match is "cannot tell"

    def _visible(self, pid: int) -> bool:
        try:
            return bool(self._pid_visible(pid))
        except Exception:
            return False

    def _field(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One reading; None when the device cannot give it. A lost GPU ends the whole sample."""
        try:
            return fn(*args)
        except self._lost_errors as exc:
            raise _Lost(str(exc) or type(exc).__name__) from exc
        except self._nvml_error:
            return None  # NotSupported, NoPermission, FunctionNotFound...: this field only
        except (AttributeError, TypeError):
            return None  # an older binding without the function

    def _text(self, fn: Callable[..., Any], handle: Any) -> str:
        try:
            value = fn(handle)
        except Exception:
            return ""
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    # -- GPM (Hopper and newer) ------------------------------------------------------------------

    def _gpm_supported(self, handle: Any) -> bool:
        try:
            return bool(self._nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except Exception:
            return False  # older driver or binding, or a pre-Hopper GPU

    def _sm_active(self, index: int, handle: Any) -> float | None:
        if not self._gpm[index]:
            return None
        nvml = self._nvml
        try:
            sample = nvml.nvmlGpmSampleAlloc()
        except self._lost_errors as exc:
            raise _Lost(str(exc)) from exc
        except Exception:
            self._gpm[index] = False
            return None
        try:
            nvml.nvmlGpmSampleGet(handle, sample)
        except self._lost_errors as exc:
            self._free(sample)
            raise _Lost(str(exc)) from exc
        except Exception:
            self._free(sample)
            self._gpm[index] = False
            return None
        previous, self._gpm_prev[index] = self._gpm_prev[index], sample
        if previous is None:
            return None  # a rate needs two samples
        try:
            return self._sm_util_between(previous, sample)
        except self._lost_errors as exc:
            raise _Lost(str(exc)) from exc
        except self._not_supported:
            self._gpm[index] = False
            return None
        except Exception:
            return None
        finally:
            self._free(previous)

    def _sm_util_between(self, first: Any, second: Any) -> float | None:
        nvml = self._nvml
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 1
        request.sample1 = first
        request.sample2 = second
        request.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
        nvml.nvmlGpmMetricsGet(request)
        metric = request.metrics[0]
        if metric.nvmlReturn != getattr(nvml, "NVML_SUCCESS", 0):
            return None
        return min(max(float(metric.value) / 100.0, 0.0), 1.0)

    def _free(self, sample: Any) -> None:
        try:
            self._nvml.nvmlGpmSampleFree(sample)
        except Exception:
            pass  # freeing after a lost GPU can fail; the session is torn down anyway

    # -- teardown --------------------------------------------------------------------------------

    def _teardown(self) -> None:
        for sample in self._gpm_prev:
            if sample is not None:
                self._free(sample)
        self._gpm_prev = []
        if self._handles is not None:
            self._handles = None
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass  # a lost GPU may refuse a clean shutdown; the next nvmlInit starts over

    def _error_classes(self, *names: str) -> tuple[type[BaseException], ...]:
        found = tuple(c for c in (getattr(self._nvml, n, None) for n in names) if isinstance(c, type))
        return found or (_Never,)

    # -- back on the event loop ------------------------------------------------------------------

    def _remember(self, state: str, snapshot: GpuSnapshot) -> None:
        self._last = snapshot
        if state == "ok":
            self._retry_delay = self._retry_initial
            self._next_init_at = None
        else:
            self._next_init_at = self._clock() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2.0, self._retry_max)
        if state == self._state:
            return
        previous, self._state = self._state, state
        if state == "ok":
            names = [d.name for d in snapshot.devices]
            if previous in ("lost", "error"):
                self._log.warning("gpu.recovered", devices=len(names), names=names)
            else:
                self._log.info("gpu.found", devices=len(names), names=names)
        elif state in ("lost", "error"):
            self._log.error("gpu.lost" if state == "lost" else "gpu.error", reason=snapshot.reason,
                            retry_in_s=self._next_retry_in())
        else:
            self._log.warning("gpu.unavailable", reason=snapshot.reason)

    def _next_retry_in(self) -> float | None:
        return None if self._next_init_at is None else round(self._next_init_at - self._clock(), 3)


class _Never(Exception):
    """Stands in for an error class the NVML module lacks: never raised, so never caught."""


def _int_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None) if obj is not None else None
    return None if value is None else int(value)


class UnavailableGpuProbe:
    """The probe when NVML cannot even be imported: reports why, logs it once."""

    def __init__(self, reason: str, log: Any = None) -> None:
        self._snapshot = _unavailable(reason)
        self._log = log if log is not None else structlog.get_logger("probes.gpu")
        self._logged = False

    async def sample(self) -> GpuSnapshot:
        if not self._logged:
            self._logged = True
            self._log.warning("gpu.unavailable", reason=self._snapshot.reason)
        return self._snapshot

    async def aclose(self) -> None:
        return None


def default_gpu_probe(**kwargs: Any) -> GpuProbe | UnavailableGpuProbe:
    """A probe over the real `pynvml` module (from nvidia-ml-py), or one that says it is missing."""
    try:
        import pynvml
    except ImportError as exc:
        return UnavailableGpuProbe(f"no GPU: nvidia-ml-py is not installed ({exc})", kwargs.get("log"))
    return GpuProbe(pynvml, **kwargs)
