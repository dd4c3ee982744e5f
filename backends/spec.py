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


@dataclass(frozen=True)
class ServerLimits:
    """What the model server said about itself before the benchmark; None where it said nothing.

    The benchmark fits its payloads to these (probes/limits.py asks for them): a request that does not
    fit the server's context is answered with an error, and that measures nothing.
    """

    model: str | None = None  # the name to put in `model` (Ollama requires it; vLLM checks it)
    context_tokens: int | None = None  # the most tokens, prompt and output together, one request may hold
    tokens_per_word: float | None = None  # of the benchmark's own words, by the server's tokenizer
    slots: int | None = None  # requests the server runs at once (llama-server's -np)


# seeded RNG, the server's limits -> one benchmark payload (built locally, never downloaded).
BenchmarkFn = Callable[[random.Random, ServerLimits], dict[str, Any]]


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
    # The request's only effect is its answer (text generation): one the model server had taken when
    # it died, with nothing of the answer relayed yet, is sent again after the restart instead of
    # answered 502. False for routes whose requests act on the world (files, webhooks, jobs).
    rerun_if_crashed: bool = False

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
    # With no command and no MODEL_LOG: attach to this log (the file the backend's Vast image writes).
    default_log: str | None = None
    health_path: str = "/health"
    # Asked when the health path answers 404 (the server has no such route): see probes/health.py.
    health_fallback: str | None = None
    load_patterns: tuple[str, ...] = ()
    error_patterns: tuple[str, ...] = ()  # restart (supervised) / failed (attach)
    fatal_patterns: tuple[str, ...] = ()  # give up at once: retrying cannot help
    info_patterns: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    metrics_path: str | None = None  # the server's own queue metrics endpoint, if any
    metrics_kind: str = "prometheus"  # or "comfyui" (GET /queue)
    # How to ask the server for its limits before a benchmark (probes/limits.py): "llamacpp" (/props),
    # "openai" (/v1/models, /tokenize) or None (ask nothing).
    limits_kind: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def route(self, path: str) -> Route | None:
        for route in self.routes:
            if route.path == path:
                return route
        return None
