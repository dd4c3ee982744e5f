"""The health check (probes/health.py): a server without a health route is read from the fallback."""

from __future__ import annotations

import httpx
import structlog

from probes.health import HealthProbe


def server(routes: dict[str, int]) -> tuple[httpx.AsyncClient, list[str]]:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(routes.get(request.url.path, 404))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), asked


async def test_a_server_without_a_health_route_is_read_from_the_fallback_once_it_answers() -> None:
    # llama-cpp-python's server: no /health (404), /v1/models answers once the model is loaded.
    routes = {"/v1/models": 503}
    client, asked = server(routes)
    probe = HealthProbe(client, "http://m/health", 5.0, fallback="http://m/v1/models")
    with structlog.testing.capture_logs() as logs:
        loading = await probe.sample()
        routes["/v1/models"] = 200
        ready = await probe.sample()
        again = await probe.sample()
    assert (loading.ok, loading.status) == (False, 503)  # the fallback's answer, not the 404
    assert ready.ok and again.ok
    assert asked == ["/health", "/v1/models", "/health", "/v1/models", "/v1/models"]  # then only the fallback
    [warning] = [e for e in logs if e["event"] == "health.fallback"]
    assert warning["log_level"] == "warning" and warning["fallback"] == "http://m/v1/models"
    await client.aclose()


async def test_a_health_route_that_exists_is_never_bypassed() -> None:
    client, asked = server({"/health": 503, "/v1/models": 200})
    probe = HealthProbe(client, "http://m/health", 5.0, fallback="http://m/v1/models")
    assert not (await probe.sample()).ok  # 503: loading, whatever /v1/models says
    assert asked == ["/health"]
    client2, asked2 = server({"/v1/models": 200})
    no_fallback = HealthProbe(client2, "http://m/health", 5.0)
    assert (await no_fallback.sample()).status == 404 and asked2 == ["/health"]
    await client.aclose()
    await client2.aclose()
