"""shepherd's one HTTP port: the Quart (quart-trio) app, and the ASGI dispatcher in front of it.

Quart serves the status routes: `/ping`, `/health` (shepherd is up), `/ready` (the model is ready),
`/status` (JSON snapshot), `/metrics`, and JSON 404/405 for anything else. The backend's proxy routes
are dispatched before Quart to `RequestHandler` (plain ASGI): that path runs for every inference
request and Quart's per-request machinery (request/response objects, context locals) would cost more
than the rest of the proxy. The app knows nothing of the supervisor: it is handed callables.

`/status` and `/metrics` show internal addresses, pids, host memory and the autoscaler's address, so
on a public port (secured mode) they are served only with `Authorization: Bearer $MASTER_TOKEN`, and
`/ready` there tells the state without the reason. The admin listener (`METRICS_PORT`, loopback by
default) and unsecured mode (a network the deployer trusts: Kubernetes, local) serve them openly.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from backends.spec import Route
from proxy.handler import Receive, RequestHandler, Scope, Send

StatusFn = Callable[[], dict[str, Any]]
MetricsFn = Callable[[], tuple[bytes, str]]  # (exposition text, content type)

RETRY_AFTER_S = "5"


@dataclass(frozen=True)
class StatusAccess:
    """Who may read `/status`, `/metrics` and `/ready`'s reason on this listener."""

    open: bool  # the admin listener, or unsecured mode
    token: str | None = None  # MASTER_TOKEN: `Authorization: Bearer <token>` opens them on a closed listener

    def allows(self, authorization: str | None) -> bool:
        if self.open:
            return True
        if not self.token or not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())


OPEN = StatusAccess(open=True)


def create_app(status: StatusFn, metrics: MetricsFn | None = None, access: StatusAccess = OPEN) -> QuartTrio:
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

    def refused() -> Response:
        if access.token:
            response = jsonify({"error": "authorization required (Bearer MASTER_TOKEN), or use METRICS_PORT"})
            response.status_code = 401
            response.headers["WWW-Authenticate"] = "Bearer"
        else:
            response = jsonify({"error": "not served on the public port in secured mode; use METRICS_PORT"})
            response.status_code = 403
        return response

    @app.get("/ready")
    async def ready() -> Response:
        snapshot = status()
        if snapshot["state"] == "ready":
            return jsonify({"ready": True, "state": "ready"})
        body = {"ready": False, "state": snapshot["state"]}
        if access.allows(request.headers.get("authorization")):
            body["reason"] = snapshot.get("reason", "")
        response = jsonify(body)
        response.status_code = 503
        response.headers["Retry-After"] = RETRY_AFTER_S
        return response

    @app.get("/status")
    async def status_route() -> Response:
        if not access.allows(request.headers.get("authorization")):
            return refused()
        return jsonify(status())

    if metrics is not None:
        @app.get("/metrics")
        async def metrics_route() -> Response:
            if not access.allows(request.headers.get("authorization")):
                return refused()
            body, content_type = metrics()
            return Response(body, content_type=content_type)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        response = jsonify({"error": error.name, "status": error.code})
        response.status_code = error.code or 500
        return response

    return app


class Gateway:
    """The ASGI application hypercorn serves: proxy routes go to the handler, the rest to Quart."""

    def __init__(self, app: QuartTrio, routes: Mapping[str, Route], handler: RequestHandler | None) -> None:
        self.app = app
        self.routes = dict(routes)
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.handler is not None:
            route = self.routes.get(scope["path"])
            if route is not None:
                await self.handler.handle(route, scope, receive, send)
                return
        await self.app(scope, receive, send)
