"""The restart policy: how long to wait before the next start, and when to give up. No I/O.

Two counters, because a server that loads for minutes breaks supervisord's `startsecs` idea:
- `failures` drives the backoff (initial * factor**(failures-1), capped, with jitter). It returns to
  zero only once the server has stayed `ready` for `reset_after` seconds, so a server that crashes a
  minute after every start still backs off.
- `failures_since_ready` drives the give-up: after `max_failures` consecutive failures without
  reaching `ready`, retrying is pointless (bad weights, no GPU memory); exit non-zero so the
  orchestrator replaces the machine. 0 means never give up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffSettings:
    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.1  # +-10% so a fleet restarted together does not retry in lockstep
    reset_after: float = 600.0
    max_failures: int = 5


@dataclass(frozen=True)
class Decision:
    give_up: bool
    delay: float
    failures: int
    failures_since_ready: int


class RestartPolicy:
    def __init__(self, settings: BackoffSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self.failures = 0
        self.failures_since_ready = 0
        self.restarts = 0
        self._ready_since: float | None = None

    def on_ready(self, now: float) -> None:
        self._ready_since = now
        self.failures_since_ready = 0

    def on_not_ready(self) -> None:
        """The server left `ready` (unhealthy, restarting): the healthy stretch is over."""
        self._ready_since = None

    def on_failure(self, now: float) -> Decision:
        s = self.settings
        if self._ready_since is not None and now - self._ready_since >= s.reset_after:
            self.failures = 0
        self._ready_since = None
        self.failures += 1
        self.failures_since_ready += 1
        give_up = s.max_failures > 0 and self.failures_since_ready >= s.max_failures
        return Decision(give_up, 0.0 if give_up else self.delay(self.failures), self.failures, self.failures_since_ready)

    def delay(self, failures: int) -> float:
        s = self.settings
        try:
            grown = s.initial * s.factor ** max(failures - 1, 0)
        except OverflowError:  # float pow past ~1e308 (a crash loop of 1000+ failures): capped anyway
            grown = s.maximum if s.initial > 0 else 0.0
        base = min(s.maximum, grown)
        return max(0.0, min(s.maximum, base * (1.0 + self._rng.uniform(-s.jitter, s.jitter))))
