"""Replay protection on `reqnum`, optional (REPLAY_WINDOW, off by default). Pure, no I/O.

Vast's 2024 worker refused a request whose `reqnum` was more than 100 below the highest seen, or whose
exact signed message it had accepted among the last 100. The current url-only signature makes one
signature valid for every request to a worker, so the window is off by default; with it on, a
(reqnum, signature) pair is accepted once, and reqnums far behind the newest are refused.
"""

from __future__ import annotations

from collections import OrderedDict


class ReplayGuard:
    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = window
        self._highest: int | None = None
        self._recent: OrderedDict[tuple[int, str], None] = OrderedDict()

    def accept(self, reqnum: int, signature: str) -> str | None:
        """None when the request may pass (and it is remembered); else why it is a replay."""
        if self._highest is not None and reqnum < self._highest - self.window:
            return f"reqnum {reqnum} is more than {self.window} behind the newest ({self._highest})"
        key = (reqnum, signature)
        if key in self._recent:
            return f"reqnum {reqnum} was already used"
        self._recent[key] = None
        while len(self._recent) > self.window:
            self._recent.popitem(last=False)
        self._highest = reqnum if self._highest is None else max(self._highest, reqnum)
        return None
