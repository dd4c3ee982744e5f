"""The Quart (quart-trio) application: shepherd's one HTTP port.

Status routes live here: `/ping`, `/health` (shepherd is up), `/ready` (the model is ready),
`/status` (JSON snapshot). The app knows nothing of the supervisor: it is handed a `status()`
callable that returns the current snapshot as a dict with at least `state`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Response, jsonify
from quart_trio import QuartTrio

StatusFn = Callable[[], dict[str, Any]]

RETRY_AFTER_S = "5"


def create_app(status: StatusFn) -> QuartTrio:
    app = QuartTrio("shepherd")
    app.config["RESPONSE_TIMEOUT"] = None  # long streams must not be cut at Quart's 60 s
    app.config["BODY_TIMEOUT"] = None
    app.config["JSON_SORT_KEYS"] = False

    @app.get("/ping")
    async def ping() -> Response:
        return Response("pong", content_type="text/plain")

    @app.get("/health")
    async def health() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        snapshot = status()
        if snapshot["state"] == "ready":
            return jsonify({"ready": True, "state": "ready"})
        response = jsonify({"ready": False, "state": snapshot["state"], "reason": snapshot.get("reason", "")})
        response.status_code = 503
        response.headers["Retry-After"] = RETRY_AFTER_S
        return response

    @app.get("/status")
    async def status_route() -> Response:
        return jsonify(status())

    return app
