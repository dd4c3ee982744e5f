"""The model server's HTTP health check: one GET with a short timeout, never raising."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


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
    def __init__(self, client: httpx.AsyncClient, url: str, timeout: float) -> None:
        self._client = client
        self._url = url
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 2.0))

    async def sample(self) -> HealthResult:
        try:
            response = await self._client.get(self._url, timeout=self._timeout)
        except httpx.TimeoutException:
            return HealthResult(False, None, "timed out", timed_out=True)
        except httpx.HTTPError as exc:
            return HealthResult(False, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if response.status_code == 200:
            return HealthResult(True, 200, "")
        return HealthResult(False, response.status_code, f"health answered {response.status_code}")
