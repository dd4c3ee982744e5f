"""Measuring the model server's capacity (`max_perf`), and remembering it across restarts.

This module owns three things:

- `run_benchmark`: the measurement. A warm-up request, then `runs` rounds of `concurrency` requests
  (1 for a non-parallel route), each POSTing a payload built locally by the route's benchmark
  generator, fitted to the limits the server states (`backends.spec.ServerLimits`, asked by
  `probes/limits.py`), straight to the model server (raw payload, no envelope: shepherd's proxy is not
  in the path). A round's throughput is its workload divided by its wall time, counted only when every
  request of the round was served (2xx). Capacity is the median of those rounds (`robust_capacity`).
- `BenchmarkCache`: a JSON file `{key: {"max_perf": float, "at": iso}}` so a restart of the same
  server skips the benchmark, keyed (`cache_key`) by backend, model identity (`model_identity`: the
  model and the flags that change capacity, such as context length and parallel slots), GPU names and
  benchmark settings, so a changed model or GPU never reuses a stale number. Vast's legacy
  `.has_benchmark` (one float on its first line) is honoured on a first boot only (see
  `BenchmarkCache.get`).
- `measure_capacity`: the one call the lifecycle's warm-up makes: a configured number, else the
  cache, else a benchmark, whose result is cached only when no request of it failed.

"Not ready" versus "broken": while the model server refuses connections or answers 503 it is still
coming up (ComfyUI's GUI line, for one, is printed before its API wrapper listens). Vast's worker
treats that as a failed benchmark and locks the worker in an error (pyworker PR #85); here it is
retried with backoff (0.2 s doubling to 5 s) until `deadline_s`. Any other failure (another 4xx/5xx,
a read timeout, a broken connection) spoils its round; when no round is served whole the benchmark
raises `BenchmarkError`, a capacity of 0 is never returned. The error says whether the server
*answered* (an HTTP error from a live server: its configuration refuses the payload, and a restart
cannot change that) or not (timeouts, broken connections: a restart may help); the caller decides.

`BenchmarkCache` is synchronous (small files, plain `open`); async callers run it through
`trio.to_thread.run_sync`, which `measure_capacity` does via its injectable `run_sync`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import statistics
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import trio

from backends.spec import BackendSpec, Route, ServerLimits
from supervisor.logs import get_logger

__all__ = [
    "BenchmarkCache",
    "BenchmarkError",
    "BenchmarkResult",
    "BenchmarkSettings",
    "Capacity",
    "benchmark_route",
    "cache_key",
    "measure_capacity",
    "model_identity",
    "prompt_text",
    "robust_capacity",
    "run_benchmark",
]

RunSync = Callable[..., Awaitable[Any]]
# sample prompt -> what the server says of its limits (probes.limits.probe_limits, bound to a server)
ProbeLimits = Callable[[str], Awaitable[ServerLimits]]

STATISTIC = "median"
CACHE_VERSION = 1  # part of every key: a change to how capacity is measured invalidates old entries
MAX_CACHE_ENTRIES = 64  # newest kept; a cache is per machine, a few models at most
_ERROR_TEXT_LIMIT = 200  # characters of a failure kept for the error message


class BenchmarkError(Exception):
    """The benchmark could not measure a capacity; `reason` says why, fit for `error_msg`.

    `answered`: the server answered with an HTTP error (not 503), so it is alive and what failed is
    the request against its configuration (a context too small, a route it does not serve). A
    restart cannot fix that; the caller goes on without a measured capacity instead.
    """

    def __init__(self, reason: str, answered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answered = answered


@dataclass(frozen=True)
class BenchmarkSettings:
    runs: int = 3
    concurrency: int = 8
    warmup: bool = True
    deadline_s: float = 600.0  # how long the server may stay "not ready" (refused, 503) during the benchmark
    seed: int = 0
    request_timeout_s: float = 300.0  # one benchmark request; generation can be slow on a cold GPU
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.runs < 1 or self.concurrency < 1:
            raise ValueError("benchmark runs and concurrency must be >= 1")

    def key_fields(self) -> dict[str, Any]:
        """The settings that change what is measured (timeouts and the deadline do not)."""
        return {"runs": self.runs, "concurrency": self.concurrency, "warmup": self.warmup, "seed": self.seed}


@dataclass(frozen=True)
class BenchmarkResult:
    max_perf: float  # workload units per second
    rounds: tuple[float, ...]  # throughput of each round; a round with any failed request is 0.0
    statistic: str  # how max_perf was derived from the rounds
    failed: int = 0  # requests that failed, over all rounds

    @property
    def complete(self) -> bool:
        """Every request of every round served: only such a result is worth caching."""
        return self.failed == 0


@dataclass(frozen=True)
class Capacity:
    """Where `max_perf` came from: "configured", "cache", "legacy" (.has_benchmark) or "benchmark"."""

    max_perf: float
    source: str
    result: BenchmarkResult | None = None


def robust_capacity(rounds: Sequence[float]) -> float:
    """The median of the rounds that served something (0.0 when none did).

    Vast takes the max over rounds. A max is biased upwards: it picks the luckiest round (a prefix
    cache hit, short outputs, a neighbour idle on a shared GPU), and an over-stated capacity makes the
    autoscaler under-provision and the queue time it promised grow. The mean is pulled by one
    outlier in either direction (a cold first round, a pause). The median of three or more rounds
    ignores one outlier on each side; failed rounds are left out because they measure an error,
    not the server's speed (all of them failing is an error of its own).
    """
    served = [r for r in rounds if r > 0.0 and math.isfinite(r)]
    return float(statistics.median(served)) if served else 0.0


def benchmark_route(spec: BackendSpec) -> Route | None:
    """The backend's route that has a benchmark generator (the first one), or None."""
    for route in spec.routes:
        if route.benchmark is not None:
            return route
    return None


# ---------------------------------------------------------------------------------------------
# The measurement


class _Kind(Enum):
    OK = "ok"
    NOT_READY = "not_ready"  # refused, connect error, 503: the server is still coming up
    FAILED = "failed"


@dataclass(frozen=True)
class _Answer:
    kind: _Kind
    workload: float = 0.0
    error: str = ""
    answered: bool = False  # an HTTP answer (an error status from a live server), not a broken exchange


@dataclass(frozen=True)
class _Round:
    answers: tuple[_Answer, ...]
    seconds: float

    @property
    def successes(self) -> int:
        return sum(1 for a in self.answers if a.kind is _Kind.OK)

    @property
    def not_ready(self) -> bool:
        """Nothing served and the server said "not yet": redo the round, it says nothing about speed."""
        return self.successes == 0 and any(a.kind is _Kind.NOT_READY for a in self.answers)

    @property
    def failed(self) -> int:
        return len(self.answers) - self.successes

    @property
    def throughput(self) -> float:
        """Workload per second, or 0.0 when any request failed: a round in which the server refused
        some of the work measures how fast it refuses, not how fast it serves."""
        if self.failed or self.seconds <= 0:
            return 0.0
        return sum(a.workload for a in self.answers) / self.seconds

    @property
    def first_error(self) -> str:
        return next((a.error for a in self.answers if a.kind is not _Kind.OK), "")


def _workload(route: Route, payload: Mapping[str, Any]) -> float:
    try:
        value = route.workload(payload)
    except Exception:  # a formula bug must not fail the benchmark; 1 unit per request is Vast's default
        return 1.0
    if value is None or not math.isfinite(value) or value < 0:
        return 1.0
    return float(value)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:_ERROR_TEXT_LIMIT] if text else type(exc).__name__


async def _one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], workload: float, timeout: float
) -> _Answer:
    try:
        # httpx's timeout is per phase; the trio deadline bounds a server that trickles its answer.
        with trio.fail_after(timeout):
            response = await client.post(url, json=payload, timeout=timeout)
            await response.aread()  # the work is only done when the whole answer has arrived
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        return _Answer(_Kind.NOT_READY, error=_describe(exc))
    except (httpx.TimeoutException, trio.TooSlowError):
        return _Answer(_Kind.FAILED, error=f"timed out after {timeout:g}s")
    except httpx.HTTPError as exc:
        return _Answer(_Kind.FAILED, error=_describe(exc))
    if response.status_code == 503:
        return _Answer(_Kind.NOT_READY, error="HTTP 503")
    if 200 <= response.status_code < 300:
        return _Answer(_Kind.OK, workload=workload)
    return _Answer(_Kind.FAILED, error=f"HTTP {response.status_code}{_said(response)}", answered=True)


def _said(response: httpx.Response) -> str:
    """The start of an error answer's text (llama-server: `Context size has been exceeded`), one line."""
    text = " ".join(response.text[:_ERROR_TEXT_LIMIT].split())
    return f": {text}" if text else ""


async def _round(
    client: httpx.AsyncClient, url: str, route: Route, payloads: Sequence[dict[str, Any]], timeout: float
) -> _Round:
    answers: list[_Answer] = [_Answer(_Kind.FAILED, error="not sent")] * len(payloads)
    # Workloads are computed before the clock starts: only the model server's time is measured.
    weights = [_workload(route, p) for p in payloads]

    async def send(i: int) -> None:
        answers[i] = await _one(client, url, payloads[i], weights[i], timeout)

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(len(payloads)):
            nursery.start_soon(send, i)
    return _Round(tuple(answers), trio.current_time() - started)


async def run_benchmark(
    client: httpx.AsyncClient, base_url: str, route: Route, settings: BenchmarkSettings = BenchmarkSettings(),
    limits: ServerLimits = ServerLimits(),
) -> BenchmarkResult:
    """Measure the route's capacity in workload units per second. Raises BenchmarkError.

    The warm-up (or, without one, the first round) is repeated with backoff while the server is
    not ready, up to `settings.deadline_s`; so is any later round in which the server went back to
    "not ready" without serving anything. Payloads come from
    `route.benchmark(random.Random(seed), limits)`, fitted to what the server said of itself.
    """
    generate = route.benchmark
    if generate is None:
        raise BenchmarkError(f"route {route.path} has no benchmark payload generator")
    log = get_logger("supervisor.benchmark")
    url = base_url.rstrip("/") + route.target
    rng = random.Random(settings.seed)
    concurrency = settings.concurrency if route.parallel else 1
    deadline = trio.current_time() + settings.deadline_s
    started = trio.current_time()
    log.info("benchmark.start", url=url, runs=settings.runs, concurrency=concurrency, warmup=settings.warmup)

    async def until_ready(label: str, count: int) -> _Round:
        """Run one step (fresh payloads each try), waiting out "not ready" answers until the deadline."""
        delay = settings.retry_initial_s
        tries = 0
        while True:
            payloads = [generate(rng, limits) for _ in range(count)]
            step = await _round(client, url, route, payloads, settings.request_timeout_s)
            if not step.not_ready:
                if tries:
                    log.info("benchmark.server_ready", step=label, waited_s=round(trio.current_time() - started, 3))
                return step
            tries += 1
            if tries == 1:  # once per wait, not once per try
                log.info("benchmark.waiting", step=label, error=step.first_error, deadline_s=settings.deadline_s)
            if trio.current_time() + delay > deadline:
                raise BenchmarkError(
                    f"benchmark: model server not ready after {settings.deadline_s:g}s ({step.first_error})"
                )
            await trio.sleep(delay)
            delay = min(delay * 2, settings.retry_max_s)

    if settings.warmup:
        warm = await until_ready("warmup", 1)
        if warm.successes == 0:
            log.warning("benchmark.warmup_failed", error=warm.first_error)

    rounds: list[float] = []
    last_error, failed, answered = "", 0, False
    for index in range(settings.runs):
        step = await until_ready(f"round {index + 1}", concurrency)
        rounds.append(step.throughput)
        failed += step.failed
        if step.failed:
            last_error = step.first_error
            answered = answered or any(a.answered for a in step.answers)
        log.info(
            "benchmark.round", round=index + 1, throughput=round(step.throughput, 3), ok=step.successes,
            failed=len(step.answers) - step.successes, seconds=round(step.seconds, 3),
            **({"error": step.first_error} if step.successes < len(step.answers) else {}),
        )

    max_perf = robust_capacity(rounds)
    if max_perf <= 0.0:
        raise BenchmarkError(
            f"benchmark: {failed} of {settings.runs * concurrency} requests failed, no round was served whole; "
            f"last error: {last_error or 'none served'}",
            answered=answered,
        )
    result = BenchmarkResult(max_perf=max_perf, rounds=tuple(rounds), statistic=STATISTIC, failed=failed)
    log.info("benchmark.done", max_perf=round(max_perf, 3), statistic=STATISTIC, rounds=[round(r, 3) for r in rounds])
    return result


# ---------------------------------------------------------------------------------------------
# Identity of what was measured

# Environment variables that name the model, most specific first (TGI reads MODEL_ID itself; Vast's
# openai workers use MODEL_NAME / *_MODEL for their benchmark model).
MODEL_ENV_VARS: tuple[str, ...] = (
    "MODEL_ID", "MODEL_NAME", "HF_MODEL_ID", "HF_MODEL", "HF_MODEL_REPO", "VLLM_MODEL", "SGLANG_MODEL",
    "LLAMA_MODEL", "OLLAMA_MODEL", "MODEL_PATH", "COMFY_MODEL",
)
_MODEL_FLAGS: tuple[str, ...] = ("--model-id", "--model", "--model-path", "--model_path", "--model-name", "-m")
# Flags that change throughput for the same weights; they become part of the identity.
_CAPACITY_FLAGS: tuple[str, ...] = (
    "--revision", "--quantize", "--quantization", "--dtype", "--kv-cache-dtype", "--tensor-parallel-size", "-tp",
    "--tp", "--tp-size", "--num-shard", "--max-model-len", "--max-batch-total-tokens", "--ctx-size", "-c",
    "--n-gpu-layers", "-ngl",
    # How many requests run at once: llama-server's slots, vLLM's and SGLang's batch limits.
    "--parallel", "-np", "--max-num-seqs", "--max-num-batched-tokens", "--max-running-requests",
    "--gpu-memory-utilization", "--mem-fraction-static",
)


def _flag_values(command: Sequence[str]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs of a command line (the last occurrence wins)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(command):
        if not arg.startswith("-"):
            continue
        if "=" in arg and arg.startswith("--"):
            name, _, value = arg.partition("=")
            values[name] = value
        elif i + 1 < len(command) and not command[i + 1].startswith("-"):
            values[arg] = command[i + 1]
    return values


def model_identity(command: Sequence[str], env: Mapping[str, str]) -> str:
    """What model the server serves, as text for the cache key; "unknown" when nothing names it.

    The command line wins (it is what actually runs: `--model-id`, `--model`, `--model-path`, `-m`,
    or vLLM's `serve <model>`); then the first of MODEL_ENV_VARS that is set. Flags that change
    throughput for the same weights (revision, quantization, dtype, tensor parallelism, context
    length, GPU layers) are appended, so changing one of them re-benchmarks too.
    """
    flags = _flag_values(command)
    model = next((flags[f] for f in _MODEL_FLAGS if flags.get(f)), "")
    if not model:
        for i, arg in enumerate(command[:-1]):
            if arg == "serve" and not command[i + 1].startswith("-"):
                model = command[i + 1]
                break
    if not model:
        model = next((env[v].strip() for v in MODEL_ENV_VARS if env.get(v, "").strip()), "")
    extras = [f"{name.lstrip('-')}={flags[name]}" for name in _CAPACITY_FLAGS if flags.get(name)]
    if not model and env.get("MODEL_REVISION"):
        extras.append(f"revision={env['MODEL_REVISION']}")
    identity = model or "unknown"
    return f"{identity} ({', '.join(extras)})" if extras else identity


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._/-]+", "_", text).strip("_")
    return slug[:limit] or "none"


def cache_key(backend: str, model_identity: str, gpu_names: Sequence[str], settings: BenchmarkSettings) -> str:
    """`<backend>/<model>/<gpus>/r<runs>c<concurrency>-<hash>`: readable, and exact through the hash.

    GPU order does not matter (sorted), their number does. The hash covers every field in full, so
    two identities whose readable parts were cut or slugged alike still get different keys.
    """
    gpus = sorted(gpu_names)
    identity = {
        "v": CACHE_VERSION, "backend": backend, "model": model_identity, "gpus": gpus,
        "settings": settings.key_fields(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if gpus:
        counts: dict[str, int] = {}
        for name in gpus:
            counts[name] = counts.get(name, 0) + 1
        gpu_text = "+".join(f"{n}x{name}" for name, n in counts.items())
    else:
        gpu_text = "nogpu"
    return (
        f"{_slug(backend, 32)}/{_slug(model_identity, 80)}/{_slug(gpu_text, 80)}/"
        f"r{settings.runs}c{settings.concurrency}-{digest}"
    )


# ---------------------------------------------------------------------------------------------
# The cache file


def _usable(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0.0 else None


class BenchmarkCache:
    """Benchmark results on disk: `path` (JSON, keyed) and Vast's `legacy_path` (`.has_benchmark`).

    Synchronous; call it through `trio.to_thread.run_sync` from async code. A missing, unreadable or
    corrupt file reads as empty (corruption is logged); a failed write is logged and reported as
    False, never raised: a cache problem costs a benchmark, not the worker.
    """

    def __init__(self, path: Path, legacy_path: Path | None = None) -> None:
        self.path = path
        self.legacy_path = legacy_path
        self._log = get_logger("supervisor.benchmark")

    def get(self, key: str) -> float | None:
        """The cached `max_perf` for `key`, else the legacy value on a first boot, else None."""
        return self.lookup(key)[0]

    def lookup(self, key: str) -> tuple[float | None, str]:
        """`(max_perf, source)` with source "cache", "legacy" or "" (nothing usable).

        The legacy `.has_benchmark` is read only while this cache holds no entries at all. Once
        shepherd has recorded a measurement here, the legacy file (which names no model, GPU or
        settings) is as likely to describe another model as this one; reading it whenever *this*
        key is missing would hand a changed model exactly the stale number the key exists to refuse.
        So it serves one purpose: a first boot of an image whose template pre-wrote it (Vast's null
        worker writes `100`), or that an earlier PyWorker benchmarked.
        """
        entries = self._read()
        entry = entries.get(key)
        if isinstance(entry, Mapping):
            value = _usable(entry.get("max_perf"))
            if value is not None:
                return value, "cache"
        if not entries and self.legacy_path is not None:
            value = self._read_legacy(self.legacy_path)
            if value is not None:
                return value, "legacy"
        return None, ""

    def put(self, key: str, max_perf: float) -> bool:
        """Record `max_perf` under `key`, atomically (temporary file + os.replace). False on failure."""
        if _usable(max_perf) is None:
            raise ValueError(f"max_perf must be a positive finite number, got {max_perf!r}")
        entries = self._read()
        entries[key] = {"max_perf": float(max_perf), "at": datetime.now(timezone.utc).isoformat()}
        if len(entries) > MAX_CACHE_ENTRIES:
            newest = sorted(entries.items(), key=lambda kv: str(kv[1].get("at", "")) if isinstance(kv[1], Mapping)
                            else "", reverse=True)
            entries = dict(newest[:MAX_CACHE_ENTRIES])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(entries, out, indent=2, sort_keys=True)
                    out.flush()
                    os.fsync(out.fileno())  # a crash must leave the old file or the new one, not half of it
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            self._log.warning("benchmark.cache_write_failed", path=str(self.path), error=str(exc))
            return False
        return True

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            self._log.warning("benchmark.cache_unreadable", path=str(self.path), error=str(exc))
            return {}
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            self._log.warning("benchmark.cache_corrupt", path=str(self.path), error=str(exc))
            return {}
        if not isinstance(data, dict):
            self._log.warning("benchmark.cache_corrupt", path=str(self.path), error="not a JSON object")
            return {}
        return data

    def _read_legacy(self, path: Path) -> float | None:
        try:
            first = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._log.warning("benchmark.legacy_unreadable", path=str(path), error=str(exc))
            return None
        try:
            value = _usable(float(first[0].strip())) if first else None
        except ValueError:
            value = None
        if value is None:
            self._log.warning("benchmark.legacy_invalid", path=str(path), expected="a positive number on line 1")
        return value


# ---------------------------------------------------------------------------------------------
# The warm-up's one call


async def measure_capacity(
    client: httpx.AsyncClient,
    base_url: str,
    route: Route,
    settings: BenchmarkSettings,
    cache: BenchmarkCache | None,
    key: str,
    *,
    fixed_max_perf: float | None = None,
    probe: ProbeLimits | None = None,
    run_sync: RunSync = trio.to_thread.run_sync,
) -> Capacity:
    """`max_perf` from, in order: `fixed_max_perf` (--skip-benchmark --max-perf N), the cache, a benchmark
    (whose result is cached when every request of it was served). Raises BenchmarkError when the
    benchmark fails. Before a benchmark, `probe` asks the server for its limits, to fit the payloads."""
    log = get_logger("supervisor.benchmark")
    if fixed_max_perf is not None:
        if _usable(fixed_max_perf) is None:
            raise ValueError(f"max_perf must be a positive finite number, got {fixed_max_perf!r}")
        log.info("benchmark.skipped", max_perf=fixed_max_perf, source="configured")
        return Capacity(float(fixed_max_perf), "configured")
    if cache is not None:
        value, source = await run_sync(cache.lookup, key)
        if value is not None:
            log.info("benchmark.skipped", max_perf=value, source=source, key=key,
                     path=str(cache.path if source == "cache" else cache.legacy_path))
            return Capacity(value, source)
    limits = ServerLimits()
    if probe is not None and route.benchmark is not None:
        limits = await probe(prompt_text(route.benchmark(random.Random(settings.seed), limits)))
    result = await run_benchmark(client, base_url, route, settings, limits)
    if cache is not None and result.complete:
        await run_sync(cache.put, key, result.max_perf)
    elif cache is not None:
        log.warning("benchmark.not_cached", failed=result.failed, why="some requests failed; measured again next start")
    return Capacity(result.max_perf, "benchmark", result)


def prompt_text(payload: Mapping[str, Any]) -> str:
    """The prompt of a benchmark payload (`prompt`, TGI's `inputs`, or the chat messages' text)."""
    for name in ("prompt", "inputs"):
        if isinstance(payload.get(name), str):
            return payload[name]
    messages = payload.get("messages")
    if isinstance(messages, list):
        return " ".join(m["content"] for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), str))
    return ""
