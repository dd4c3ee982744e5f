"""The `tgi` backend: Hugging Face text-generation-inference, launched with `--json-output`.

Its router logs `Connected` (JSON: `"message":"Connected","target":"text_generation_router"`) just
before it starts serving, so readiness also waits for `/health`. The launcher's final errors repeat
on every retry (a missing model, a shard that cannot start), so they give up instead of restarting.
Workload is `parameters.max_new_tokens`, 256 when absent (Vast's TGI worker uses the same default).
"""

from __future__ import annotations

import random

from backends.spec import BackendSpec, Route, field_workload

_WORDS = (
    "model", "answer", "question", "river", "mountain", "window", "garden", "history", "energy", "music",
    "planet", "signal", "forest", "engine", "letter", "harbor", "market", "winter", "silver", "bridge",
)


def benchmark_payload(rng: random.Random) -> dict:
    # Built locally from a fixed word list: nothing is downloaded at run time.
    return {
        "inputs": " ".join(rng.choice(_WORDS) for _ in range(250)),
        "parameters": {"max_new_tokens": 128},
    }


_workload = field_workload("parameters", "max_new_tokens", default=256.0)

SPEC = BackendSpec(
    name="tgi",
    description="Hugging Face text-generation-inference",
    default_url="http://127.0.0.1:5001",
    default_command=(
        "text-generation-launcher", "--json-output", "--hostname", "{host}", "--port", "{port}",
    ),
    health_path="/health",
    load_patterns=('"message":"Connected","target":"text_generation_router"',),
    fatal_patterns=("Error: DownloadError", "Error: ShardCannotStart", "Error: WebserverFailed"),
    info_patterns=('"message":"Download',),
    routes=(
        Route("/generate", workload=_workload, benchmark=benchmark_payload),
        Route("/generate_stream", workload=_workload, timeout=None),
    ),
    metrics_path="/metrics",
    extra={"model_env": "MODEL_ID"},
)
