"""Replay protection on `reqnum`, optional (REPLAY_WINDOW, off by default). Pure, no I/O.

This module owns the answer to "has this signed request been seen already". Vast's 2024 worker
refused a request whose `reqnum` was more than 100 below the highest seen, or whose exact signed
message it had accepted among the last 100 (vast-protocol.md §1.4). The current url-only signature
makes one signature valid for every request to a worker, so the window is off by default. With it on:

- A (reqnum, signature bytes) pair passes once among the last `window` accepted. The key is the
  decoded signature (`VerifyResult.signature_bytes`, canonical base64), not its text, so another
  spelling of the same bytes is the same request.
- A reqnum more than `window` below the highest *signed* reqnum seen is refused.
- Only a reqnum the signature covers (`sorted`, `legacy`: `proxy.signature.signs_reqnum`) moves the
  highest. With `url` the client chooses the reqnum freely: one request with `reqnum=2**63` would
  otherwise push every later legitimate request "too far behind".

What this does not give with url-only signatures: the client picks a fresh reqnum for each replay,
so the window cannot stop a holder of a valid url signature from sending more requests. That is the
signature format's property (SECURITY.md), not something a worker can fix.

Memory: at most `window` remembered pairs, each a reqnum and the signature bytes (the signature is
at most `AUTH_MAX_BYTES` of base64), so O(window).
"""

from __future__ import annotations

from collections import OrderedDict


class ReplayGuard:
    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = window
        self._highest: int | None = None  # the highest reqnum a signature covered
        self._recent: OrderedDict[tuple[int, bytes], None] = OrderedDict()

    def accept(self, reqnum: int, signature: bytes, reqnum_signed: bool) -> str | None:
        """None when the request may pass (and it is remembered); else why it is a replay.

        `signature` is the decoded signature; `reqnum_signed` whether it covers `reqnum`.
        """
        if self._highest is not None and reqnum < self._highest - self.window:
            return f"reqnum {reqnum} is more than {self.window} behind the newest ({self._highest})"
        key = (reqnum, signature)
        if key in self._recent:
            return f"reqnum {reqnum} was already used"
        self._recent[key] = None
        while len(self._recent) > self.window:
            self._recent.popitem(last=False)
        if reqnum_signed:
            self._highest = reqnum if self._highest is None else max(self._highest, reqnum)
        return None
