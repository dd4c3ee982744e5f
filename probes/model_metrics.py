"""The model server's own queue, read from its metrics: one GET with a short timeout, never raising.

This module owns the names each backend uses for its queue, and their reading:

- `prometheus`: the Prometheus text of vLLM or TGI, parsed with `prometheus_client`'s parser.
  vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (0..1;
  `vllm:gpu_cache_usage_perc` before 0.9). TGI: `tgi_queue_size` (waiting), `tgi_batch_current_size`
  (running). llama.cpp's llama-server (only when started with `--metrics`): `llamacpp:requests_deferred`
  (waiting), `llamacpp:requests_processing` (running). Counts are summed over label sets (engines,
  models); the KV cache usage is their mean, since a fraction of several equal engines does not add up.
- `comfyui`: `GET /queue` -> `{"queue_running": [...], "queue_pending": [...]}`, counted.
- `comfyui-wrapper`: Vast's ComfyUI API wrapper's `GET /queue-info` -> `preprocess_queue_size`,
  `generation_queue_size`, `postprocess_queue_size`: the first two wait, the last runs (its jobs have left
  ComfyUI; the wrapper is uploading or posting their outputs).

A metric the server does not expose reads None (not 0): the estimator then relies on the proxy alone.

A server that answers 404 or 501 at the metrics path has no metrics there (llama-server without
`--metrics` answers 501): that reads `unsupported`, is logged once, and the path is asked again only
after a backoff that doubles up to `BACKOFF_MAX_S`, so an operator who never enables metrics does not
pay for a failing request every probe interval. Any 200 answer ends the backoff.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from supervisor.logs import get_logger

WAITING = ("vllm:num_requests_waiting", "tgi_queue_size", "llamacpp:requests_deferred")
RUNNING = ("vllm:num_requests_running", "tgi_batch_current_size", "llamacpp:requests_processing")
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # in order of preference
_WANTED = frozenset(WAITING + RUNNING + KV_CACHE)
_NAME_END = re.compile(r"[{\s]")

KINDS = ("prometheus", "comfyui", "comfyui-wrapper")
# Statuses meaning "no metrics at this path" (llama-server without --metrics: 501; others 404).
NO_METRICS_STATUSES = frozenset({404, 501})
BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 300.0


@dataclass(frozen=True)
class ModelQueue:
    waiting: float | None  # requests queued in the model server
    running: float | None  # requests in its running batch
    kv_cache_usage: float | None  # 0..1
    ok: bool  # the server answered and its answer was read
    error: str  # "" when ok
    unsupported: bool = False  # the server has no metrics at this path (404/501): not a failure to retry soon

    @property
    def known(self) -> bool:
        return self.waiting is not None or self.running is not None


def _failed(error: str) -> ModelQueue:
    return ModelQueue(None, None, None, False, error)


def _relevant_lines(text: str) -> str:
    """Only the families we read: a malformed family we do not use must not cost us the queue, and
    the parser gets a few lines instead of every histogram bucket of the server."""
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            name = parts[2] if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") else ""
        else:
            name = _NAME_END.split(line, maxsplit=1)[0]
        if name in _WANTED:
            kept.append(line)
    return "\n".join(kept) + "\n"


def parse_prometheus(text: str) -> ModelQueue:
    """Queue numbers from Prometheus exposition text. Raises ValueError on text the parser rejects."""
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(_relevant_lines(text)):
        for sample in family.samples:
            if sample.name in _WANTED and math.isfinite(sample.value):
                values.setdefault(sample.name, []).append(float(sample.value))

    def total(names: Iterable[str]) -> float | None:
        found = [sum(values[n]) for n in names if n in values]
        return sum(found) if found else None

    kv: float | None = None
    for name in KV_CACHE:
        if name in values:
            kv = min(max(sum(values[name]) / len(values[name]), 0.0), 1.0)
            break
    return ModelQueue(total(WAITING), total(RUNNING), kv, True, "")


def parse_comfyui_queue(body: Any) -> ModelQueue:
    """Queue numbers from ComfyUI's `GET /queue` JSON. Raises ValueError on another shape."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    pending, running = body.get("queue_pending"), body.get("queue_running")
    if not isinstance(pending, list) or not isinstance(running, list):
        raise ValueError("expected queue_pending and queue_running lists")
    return ModelQueue(float(len(pending)), float(len(running)), None, True, "")


def parse_wrapper_queue(body: Any) -> ModelQueue:
    """Queue numbers from the ComfyUI API wrapper's `GET /queue-info`. Raises ValueError on another shape."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    sizes = [body.get(k) for k in ("preprocess_queue_size", "generation_queue_size", "postprocess_queue_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes):
        raise ValueError("expected preprocess/generation/postprocess_queue_size counts")
    return ModelQueue(float(sizes[0] + sizes[1]), float(sizes[2]), None, True, "")


class ModelMetricsProbe:
    """Reads the model server's queue at `base_url + path` (`/metrics` or ComfyUI's `/queue`)."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, kind: str = "prometheus", path: str = "/metrics",
        timeout: float = 2.0, clock: Callable[[], float] = trio.current_time,
        backoff_initial: float = BACKOFF_INITIAL_S, backoff_max: float = BACKOFF_MAX_S,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self._client = client
        self._url = base_url.rstrip("/") + "/" + path.lstrip("/")
        self._kind = kind
        self._timeout = httpx.Timeout(timeout)
        self._clock = clock
        self._backoff_initial, self._backoff_max = backoff_initial, backoff_max
        self._backoff = 0.0  # seconds until the next try after a "no metrics" answer; 0: not backing off
        self._retry_at = -math.inf
        self._unsupported: ModelQueue | None = None  # the last "no metrics" answer, repeated while backing off
        self._log = get_logger("probes.model_metrics")

    @property
    def url(self) -> str:
        return self._url

    @property
    def retry_at(self) -> float:
        """When the path is asked again after a "no metrics" answer (-inf: not backing off)."""
        return self._retry_at

    async def sample(self) -> ModelQueue:
        if self._unsupported is not None and self._clock() < self._retry_at:
            return self._unsupported  # backing off: the answer would be the same 404/501
        try:
            response = await self._client.get(self._url, timeout=self._timeout)
        except httpx.TimeoutException:
            return _failed("timed out")
        except httpx.HTTPError as exc:
            return _failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if response.status_code in NO_METRICS_STATUSES:
            return self._no_metrics(response.status_code)
        if response.status_code != 200:
            return _failed(f"{self._url} answered {response.status_code}")
        if self._unsupported is not None:
            self._log.info("model_metrics.available", url=self._url)
        self._unsupported, self._backoff, self._retry_at = None, 0.0, -math.inf
        try:
            if self._kind == "comfyui":
                return parse_comfyui_queue(response.json())
            if self._kind == "comfyui-wrapper":
                return parse_wrapper_queue(response.json())
            return parse_prometheus(response.text)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # json.JSONDecodeError is a ValueError; the Prometheus parser raises ValueError too.
            return _failed(f"unreadable {self._kind} answer: {exc}")

    def _no_metrics(self, status: int) -> ModelQueue:
        first = self._unsupported is None
        self._backoff = self._backoff_initial if first else min(self._backoff * 2.0, self._backoff_max)
        self._retry_at = self._clock() + self._backoff
        hint = " (llama-server: start it with --metrics)" if status == 501 else ""
        self._unsupported = ModelQueue(
            None, None, None, False, f"no metrics: {self._url} answered {status}{hint}", unsupported=True,
        )
        if first:  # once, not every interval: the answer will not change until the server restarts
            self._log.warning("model_metrics.unavailable", url=self._url, status=status,
                              retry_in_s=self._backoff, hint=hint.strip(" ()") or None)
        return self._unsupported
