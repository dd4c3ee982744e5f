"""The `tgi` backend: Hugging Face text-generation-inference, launched with `--json-output`.

Its router logs `Connected` just before it starts serving, so readiness also waits for `/health`. With
`--json-output` the router's line is tracing's JSON with the event flattened; its `target` is the Rust
module path, `text_generation_router` in TGI 2.0 and `text_generation_router::server` from 2.1 on, so
the load pattern tests the JSON fields (`json:`, see supervisor/rules.py), not a substring of the raw
line. The launcher's final errors repeat on every retry (a model that cannot be downloaded or loaded,
bad arguments, a missing router binary), so they give up instead of restarting. Workload is
`parameters.max_new_tokens`, 256 when absent (Vast's TGI worker uses the same default).

Verified against the source of TGI v3.3.7 (huggingface/text-generation-inference@dfb3fbe7, 2025-12-18)
and v2.0.4 / v2.1.0 for the target change; tests/emulators/tgi.py prints v3.3.7's lines.
"""

from __future__ import annotations

import random

from backends.spec import BackendSpec, Route, ServerLimits, field_workload

_WORDS = (
    "model", "answer", "question", "river", "mountain", "window", "garden", "history", "energy", "music",
    "planet", "signal", "forest", "engine", "letter", "harbor", "market", "winter", "silver", "bridge",
)


def benchmark_payload(rng: random.Random, _limits: ServerLimits) -> dict:
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
    load_patterns=(
        # router/src/server.rs:2302 @v3.3.7 (`tracing::info!("Connected")`, also :2393 @v2.4.1; in
        # router/src/main.rs:355 @v2.0.4, target `text_generation_router`), printed through
        # router/src/logging.rs:83 (`.json().flatten_event(true)`): the message is a top-level field
        # and the target the module path, `"target":"text_generation_router::server"`.
        "json:message=Connected,target^=text_generation_router",
        # Without --json-output (attach mode with a hand-started TGI): tracing's full text format,
        # `<time>  INFO text_generation_router::server: router/src/server.rs:2302: Connected`.
        r"re:\btext_generation_router(?:::\w+)*: \S+: Connected$",
    ),
    # launcher/src/main.rs @v3.3.7: `fn main() -> Result<(), LauncherError>` (:2038), so an error ends
    # the launcher with Rust's `Error: {:?}` of the LauncherError variants at :1415-1432. Each one
    # below repeats on every retry: DownloadError (the model cannot be fetched), ShardCannotStart (a
    # shard failed to load the model: bad weights, unsupported architecture, out of memory at load),
    # WebserverFailed (the router died, e.g. its port is taken), WebserverCannotStart (no router
    # binary), ArgumentValidation / NotEnoughCUDADevices (the flags cannot work on this machine).
    fatal_patterns=(
        "Error: DownloadError", "Error: ShardCannotStart", "Error: WebserverFailed", "Error: WebserverCannotStart",
        "Error: ArgumentValidation(", "Error: NotEnoughCUDADevices(",
    ),
    info_patterns=('"message":"Download',),
    routes=(
        Route("/generate", workload=_workload, benchmark=benchmark_payload, rerun_if_crashed=True),
        Route("/generate_stream", workload=_workload, timeout=None, rerun_if_crashed=True),
    ),
    metrics_path="/metrics",
    limits_kind="tgi",
    extra={"model_env": "MODEL_ID"},
)
