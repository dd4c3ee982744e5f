"""Checking the signature of a large body before parsing it whole.

Parsing JSON costs time linear in its size, in the event loop (orjson holds the GIL, so a thread would
not help): about a millisecond per MiB of base64 text and several times that for small numbers
(`python bench/parse_cost.py`). An unsigned client could make shepherd pay that for every 64 MiB body
it sends; the cut and check below cost tens of microseconds whatever the body's size. Vast's client always puts
`auth_data` first (`{"auth_data": ..., "payload": ...}`), so for a body over `AUTH_FIRST_ABOVE` bytes
in secured mode the `auth_data` object is cut out of the body's first few KiB (a bounded scan) and its
signature checked before anything else is parsed. A large body that does not start with `auth_data`
is refused (422) in secured mode. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Final

AUTH_FIRST_ABOVE: Final = 256 * 1024  # bodies up to this size are simply parsed whole (≈ 5 ms worst case)
_LEAD: Final = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"auth_data"[ \t\r\n]*:[ \t\r\n]*')
# A JSON string (escapes included), a quote that opens a string never closed, or one structural
# character: enough to find an object's end.
_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|"|[{}\[\]]')


def auth_data_prefix(body: bytes | bytearray, max_bytes: int) -> bytes | None:
    """The raw text of the `auth_data` object when the body starts with it and it ends within
    `max_bytes`; else None. Looks at no more than `max_bytes` (plus the short lead-in) of the body."""
    lead = _LEAD.match(body, 0, 64)
    if lead is None:
        return None
    start = lead.end()
    window = bytes(body[start:start + max_bytes])
    if window[:1] != b"{":
        return None
    depth = 0
    for token in _TOKEN.finditer(window):
        char = token[0]
        if char == b'"':
            return None  # a string runs past the window
        if char in (b"{", b"["):
            depth += 1
        elif char in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                return window[:token.end()]
    return None
