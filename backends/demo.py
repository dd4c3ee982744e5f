"""The `demo` backend: the bundled pure-Python demo model server (`backends/demo_server.py`).

It exists so that shepherd can be tried and tested end to end without a GPU: it loads (prints
progress, then a ready line), serves a TGI-like `/generate` and SSE `/generate_stream`, and has
switches (crash, hang, ignore SIGTERM, grandchild, flood, invalid UTF-8) for the fault tests.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from backends.spec import BackendSpec, Route, ServerLimits, field_workload

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def benchmark_payload(rng: random.Random, _limits: ServerLimits) -> dict:
    return {
        "inputs": " ".join(rng.choice(_WORDS) for _ in range(32)),
        "parameters": {"max_new_tokens": 32},
    }


_workload = field_workload("parameters", "max_new_tokens", default=16.0)
# The demo server refuses more than 4096 new tokens (demo_server.MAX_NEW_TOKENS): a request claiming
# more cannot be that much work, so it must not count as more in the 429 decision either.
_MAX_WORKLOAD = 4096.0

SPEC = BackendSpec(
    name="demo",
    description="bundled demo model server (no GPU needed)",
    default_url="http://127.0.0.1:5001",
    # The script's own path: it runs from any working directory, installed or not.
    default_command=(sys.executable, str(Path(__file__).with_name("demo_server.py")), "--host", "{host}",
                     "--port", "{port}"),
    health_path="/health",
    load_patterns=("model loaded, serving on",),
    error_patterns=("demo: model error",),
    fatal_patterns=("demo: fatal model error",),
    info_patterns=("demo: loading model weights",),
    routes=(
        Route("/generate", workload=_workload, benchmark=benchmark_payload, max_workload=_MAX_WORKLOAD,
              rerun_if_crashed=True),
        Route("/generate_stream", workload=_workload, timeout=None, max_workload=_MAX_WORKLOAD,
              rerun_if_crashed=True),
    ),
)
