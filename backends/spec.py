"""What shepherd knows about one kind of model server: a frozen description, no I/O.

A backend names its default launch command, the log lines that mean loaded / broken / informative,
the health path, and the routes shepherd exposes in front of it (each with its workload formula and
benchmark payload). Backends are data; the supervisor and the proxy interpret them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# payload -> workload units, or None to fall back to auth_data.cost, then 1.
WorkloadFn = Callable[[Mapping[str, Any]], float | None]
# seeded RNG -> one benchmark payload (built locally, never downloaded).
BenchmarkFn = Callable[[random.Random], dict[str, Any]]


def no_workload(_payload: Mapping[str, Any]) -> float | None:
    """Default formula: the route has none (auth_data.cost, then 1, is used)."""
    return None


def field_workload(*path: str, default: float | None = None) -> WorkloadFn:
    """Workload read from a numeric field of the payload, e.g. ("parameters", "max_new_tokens")."""

    def workload(payload: Mapping[str, Any]) -> float | None:
        node: Any = payload
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return default
            node = node[key]
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            return default
        return max(float(node), 0.0)

    return workload


@dataclass(frozen=True)
class Route:
    """One path on shepherd's port that is forwarded to the model server."""

    path: str
    upstream_path: str | None = None  # defaults to `path`
    methods: tuple[str, ...] = ("POST",)
    parallel: bool = True  # False: requests wait in a strict FIFO, one at a time
    max_queue_time: float = 30.0  # seconds a request may wait before 429 / 503
    timeout: float | None = 600.0  # upstream read timeout for non-streaming answers; None: no limit
    workload: WorkloadFn = no_workload
    # The most workload units one request may claim (its formula's result or `auth_data.cost`, both
    # the client's to choose); None: the global MAX_WORKLOAD. See proxy.envelope.workload_of.
    max_workload: float | None = None
    benchmark: BenchmarkFn | None = None

    @property
    def target(self) -> str:
        return self.upstream_path or self.path


@dataclass(frozen=True)
class BackendSpec:
    """A model server kind. Patterns are substrings, regexes after `re:`, or JSON field tests after `json:`
    (supervisor/rules.py)."""

    name: str
    description: str
    default_url: str
    # Argument list; `{host}` and `{port}` are filled from the model server URL.
    default_command: tuple[str, ...] | None = None
    health_path: str = "/health"
    load_patterns: tuple[str, ...] = ()
    error_patterns: tuple[str, ...] = ()  # restart (supervised) / failed (attach)
    fatal_patterns: tuple[str, ...] = ()  # give up at once: retrying cannot help
    info_patterns: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    metrics_path: str | None = None  # the server's own queue metrics endpoint, if any
    metrics_kind: str = "prometheus"  # or "comfyui" (GET /queue)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def route(self, path: str) -> Route | None:
        for route in self.routes:
            if route.path == path:
                return route
        return None
