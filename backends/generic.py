"""The `generic` backend: any HTTP model server, described entirely by the environment.

No default command and no log grammar: give the command (or MODEL_LOG), MODEL_SERVER_URL and the
MODEL_*_LOG_MSG patterns. Readiness then rests on the health path alone.
"""

from __future__ import annotations

from backends.spec import BackendSpec

SPEC = BackendSpec(
    name="generic",
    description="any HTTP server; patterns and routes from the environment",
    default_url="http://127.0.0.1:18000",
    health_path="/health",
)
