"""`comfyui-json`: Vast's ComfyUI template as it is (mode 1 of issue 10), behind shepherd.

Vast's ComfyUI image runs ComfyUI (port 18188) and Vast's API wrapper beside it (port 18288), which takes
`{"input": {"request_id"?, "workflow_json" | ("modifier", "modifications"), "s3"?, "webhook"?, ...}}` on
`POST /generate/sync` and answers `{id, status, message, comfyui_response, output[], timings}`. shepherd
attaches to it as Vast's "comfyui-json" worker does (vast-ai/pyworker workers/comfyui-json, PR #85):

- route `/generate/sync`, forwarded unchanged with the wrapper's status passed through (200 done, 499
  cancelled, 5xx failed, 503 with Retry-After when its queue is full); strict FIFO, one at a time;
  `max_queue_time` 10 s; a constant workload of 100 per request; no upstream read timeout (a workflow
  takes as long as it takes). Not `rerun_if_crashed`: a job writes files, uploads to S3, calls webhooks.
- readiness: the wrapper's log `/var/log/portal/api-wrapper.log` (attach mode by default) and its line
  `BACKENDS_READY: N backend(s) reachable, ready to serve`, then `GET /health`. `BACKENDS_READY` is a
  prefix of `BACKENDS_READY_TIMEOUT`, so the load pattern needs the colon: the error wins.
- benchmark: the first of `misc/benchmark.json`, `$BENCHMARK_JSON_PATH`,
  `/opt/comfyui-api-wrapper/workflows/pyworker_benchmark.json` (a request body, or a list of them to
  cycle through), else a `Text2Image` modifier request of `BENCHMARK_TEST_WIDTH` x `HEIGHT` x `STEPS`
  (512 x 512 x 20). Capacity is workload per second, 100 per request served.
- queue: the wrapper's `GET /queue-info` (probes/model_metrics.py, kind `comfyui-wrapper`).
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path
from typing import Any

from backends.spec import BackendSpec, Route, ServerLimits
from supervisor.logs import get_logger

WORKLOAD = 100.0
BENCHMARK_FILES = ("misc/benchmark.json", "$BENCHMARK_JSON_PATH",
                   "/opt/comfyui-api-wrapper/workflows/pyworker_benchmark.json")
_PROMPTS = ("a lighthouse on a cliff at dusk", "a red fox in fresh snow", "a bowl of ramen, studio light",
            "an old map of an imaginary island", "a glass greenhouse full of ferns")


@functools.lru_cache(maxsize=1)
def benchmark_requests() -> tuple[dict[str, Any], ...]:
    """The request bodies of the first benchmark file that exists (read once); () when none does."""
    for name in BENCHMARK_FILES:
        path = os.environ.get(name[1:], "") if name.startswith("$") else name
        if not path or not Path(path).is_file():
            continue
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            get_logger("backends.comfyui").warning("benchmark.file_unusable", path=path, error=str(exc))
            continue
        bodies = data if isinstance(data, list) else [data]
        if not bodies or not all(isinstance(b, dict) for b in bodies):
            get_logger("backends.comfyui").warning("benchmark.file_unusable", path=path,
                                                   error="expected a request body (a JSON object) or a list of them")
            continue
        return tuple(bodies)
    return ()


def _size(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), 1)
    except ValueError:
        return default


def benchmark_payload(rng: random.Random, _limits: ServerLimits) -> dict[str, Any]:
    bodies = benchmark_requests()
    if bodies:
        return json.loads(json.dumps(rng.choice(bodies)))  # a copy: the cached body is never changed
    return {"input": {
        "request_id": f"shepherd-benchmark-{rng.randrange(1 << 32):08x}",
        "modifier": "Text2Image",
        "modifications": {
            "prompt": rng.choice(_PROMPTS), "seed": rng.randrange(1 << 31),
            "width": _size("BENCHMARK_TEST_WIDTH", 512), "height": _size("BENCHMARK_TEST_HEIGHT", 512),
            "steps": _size("BENCHMARK_TEST_STEPS", 20),
        },
    }}


def _constant(_payload: Any) -> float:
    return WORKLOAD


COMFYUI_JSON = BackendSpec(
    name="comfyui-json",
    description="Vast's ComfyUI template: its API wrapper (port 18288) in front of ComfyUI",
    default_url="http://127.0.0.1:18288",
    default_log="/var/log/portal/api-wrapper.log",
    health_path="/health",
    load_patterns=("re:\\bBACKENDS_READY:",),
    error_patterns=("BACKENDS_READY_TIMEOUT", "BACKEND_UNRECOVERABLE", "Application startup failed"),
    routes=(
        Route("/generate/sync", parallel=False, max_queue_time=10.0, timeout=None, workload=_constant,
              max_workload=WORKLOAD, benchmark=benchmark_payload),
    ),
    metrics_path="/queue-info",
    metrics_kind="comfyui-wrapper",
)
