"""The `generic` backend: any OpenAI-compatible HTTP server, described by the environment.

No default command and no log grammar: give the command (or MODEL_LOG), MODEL_SERVER_URL and, if
wanted, the MODEL_*_LOG_MSG patterns. Readiness then rests on the health path alone. It proxies the
OpenAI routes (`/v1/completions`, `/v1/chat/completions`).
"""

from __future__ import annotations

from backends.openai import ROUTES
from backends.spec import BackendSpec

SPEC = BackendSpec(
    name="generic",
    description="any OpenAI-compatible HTTP server; patterns from the environment",
    default_url="http://127.0.0.1:18000",
    health_path="/health",
    routes=ROUTES,
    limits_kind="openai",
    health_fallback="/v1/models",
)
