"""The model server's HTTP health check: one GET with a short timeout, never raising.

A server with no health route at all answers it 404 for ever (llama-cpp-python's server under
`--backend llamacpp`): with a `fallback` path (the OpenAI backends' `GET /v1/models`), a 404 from the
health path sends the check there, and once the fallback has answered 200 the check asks only it, with
one warning naming both paths. A server is never held in `loading` by a route it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from supervisor.logs import get_logger


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    status: int | None  # HTTP status, None when no answer came
    error: str  # "" when ok
    timed_out: bool = False  # connected (or connecting) but no answer in time: busy or hung, not refused

    @property
    def refused(self) -> bool:
        """No server listening yet (still loading), as opposed to a server answering badly."""
        return self.status is None


class HealthProbe:
    def __init__(self, client: httpx.AsyncClient, url: str, timeout: float, fallback: str | None = None) -> None:
        self._client = client
        self._url = url
        self._fallback = fallback
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 2.0))

    async def sample(self) -> HealthResult:
        result = await self._get(self._url)
        if result.status == 404 and self._fallback is not None:
            fallback = await self._get(self._fallback)
            if fallback.ok:
                get_logger("probes.health").warning(
                    "health.fallback", health=self._url, fallback=self._fallback,
                    why="the health path answers 404: the server has no such route; its readiness is read "
                        "from the fallback from now on (set MODEL_HEALTH_ENDPOINT to choose)",
                )
                self._url, self._fallback = self._fallback, None
            return fallback
        return result

    async def _get(self, url: str) -> HealthResult:
        try:
            response = await self._client.get(url, timeout=self._timeout)
        except httpx.TimeoutException:
            return HealthResult(False, None, "timed out", timed_out=True)
        except httpx.HTTPError as exc:
            return HealthResult(False, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if response.status_code == 200:
            return HealthResult(True, 200, "")
        return HealthResult(False, response.status_code, f"health answered {response.status_code}")
