"""The model server's own queue, read from its metrics: one GET with a short timeout, never raising.

This module owns the names each backend uses for its queue, and their reading:

- `prometheus`: the Prometheus text of vLLM or TGI, parsed with `prometheus_client`'s parser.
  vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (0..1;
  `vllm:gpu_cache_usage_perc` before 0.9). TGI: `tgi_queue_size` (waiting), `tgi_batch_current_size`
  (running). Counts are summed over label sets (engines, models); the KV cache usage is their mean,
  since a fraction of several equal engines does not add up.
- `comfyui`: `GET /queue` -> `{"queue_running": [...], "queue_pending": [...]}`, counted.

A metric the server does not expose reads None (not 0): the estimator then relies on the proxy alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

WAITING = ("vllm:num_requests_waiting", "tgi_queue_size")
RUNNING = ("vllm:num_requests_running", "tgi_batch_current_size")
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # in order of preference
_WANTED = frozenset(WAITING + RUNNING + KV_CACHE)
_NAME_END = re.compile(r"[{\s]")

KINDS = ("prometheus", "comfyui")


@dataclass(frozen=True)
class ModelQueue:
    waiting: float | None  # requests queued in the model server
    running: float | None  # requests in its running batch
    kv_cache_usage: float | None  # 0..1
    ok: bool  # the server answered and its answer was read
    error: str  # "" when ok

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


class ModelMetricsProbe:
    """Reads the model server's queue at `base_url + path` (`/metrics` or ComfyUI's `/queue`)."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, kind: str = "prometheus", path: str = "/metrics",
        timeout: float = 2.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self._client = client
        self._url = base_url.rstrip("/") + "/" + path.lstrip("/")
        self._kind = kind
        self._timeout = httpx.Timeout(timeout)

    @property
    def url(self) -> str:
        return self._url

    async def sample(self) -> ModelQueue:
        try:
            response = await self._client.get(self._url, timeout=self._timeout)
        except httpx.TimeoutException:
            return _failed("timed out")
        except httpx.HTTPError as exc:
            return _failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if response.status_code != 200:
            return _failed(f"{self._url} answered {response.status_code}")
        try:
            if self._kind == "comfyui":
                return parse_comfyui_queue(response.json())
            return parse_prometheus(response.text)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # json.JSONDecodeError is a ValueError; the Prometheus parser raises ValueError too.
            return _failed(f"unreadable {self._kind} answer: {exc}")
