"""OpenAI-compatible model servers: vLLM, SGLang, llama.cpp's server and Ollama.

They share routes (`/v1/completions`, `/v1/chat/completions`, parallel, queued up to 600 s as Vast's
workers do) and the workload formula (`max_tokens`; without it `auth_data.cost`, then 1). They differ
in their log grammar, health path and default port. No default command: the model to serve is
always the user's choice, so the command is given after `--` (or MODEL_CMD, or MODEL_LOG to attach).

Error patterns are deliberately narrow: Vast's workers treat any `Traceback` line as fatal, and vLLM
prints tracebacks for a single failed request while it keeps serving.
"""

from __future__ import annotations

import random

from backends.spec import BackendSpec, Route, field_workload

_WORDS = (
    "zebra", "context", "question", "answer", "river", "mountain", "history", "energy", "planet", "signal",
    "forest", "engine", "letter", "harbor", "market", "winter", "silver", "bridge", "garden", "window",
)


def completion_payload(rng: random.Random) -> dict:
    # Built locally: no tokenizer or word list is downloaded at run time.
    return {"prompt": " ".join(rng.choice(_WORDS) for _ in range(250)), "max_tokens": 500, "temperature": 0.7}


_workload = field_workload("max_tokens")
ROUTES = (
    Route("/v1/completions", max_queue_time=600.0, timeout=None, workload=_workload, benchmark=completion_payload),
    Route("/v1/chat/completions", max_queue_time=600.0, timeout=None, workload=_workload),
)


def _spec(name: str, description: str, url: str, load: tuple[str, ...], errors: tuple[str, ...],
          health: str = "/health", metrics: str | None = None, info: tuple[str, ...] = ()) -> BackendSpec:
    return BackendSpec(
        name=name, description=description, default_url=url, health_path=health, load_patterns=load,
        error_patterns=errors, info_patterns=info, routes=ROUTES, metrics_path=metrics,
    )


VLLM = _spec("vllm", "vLLM OpenAI-compatible server", "http://127.0.0.1:18000",
             ("Application startup complete.",), ("RuntimeError: Engine", "EngineDeadError"),
             metrics="/metrics", info=('"message":"Download', "Loading weights"))
SGLANG = _spec("sglang", "SGLang server", "http://127.0.0.1:18000",
               ("The server is fired up and ready to roll!",), ("RuntimeError: Engine",))
LLAMACPP = _spec("llamacpp", "llama.cpp server", "http://127.0.0.1:18000",
                 ("model loaded",), ("error loading model", "failed to load model",
                                     "main: exiting due to model loading error"))
OLLAMA = _spec("ollama", "Ollama", "http://127.0.0.1:11434", ("Listening on",),
               ("Error: pull model manifest:", "level=FATAL", "panic:"), health="/", info=("downloading",))
