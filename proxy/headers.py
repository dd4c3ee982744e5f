"""What of a client's request head goes on to the model server: `upstream_request`.

This module owns the rules for the forwarded request's header fields and query string:

- hop-by-hop fields (RFC 9110 §7.6.1: Connection, Keep-Alive, Proxy-Connection, Proxy-Authenticate,
  Proxy-Authorization, TE, Trailer, Transfer-Encoding, Upgrade) are removed, and so is every field
  the client named in its Connection field(s) (comma-separated, any case, optional whitespace);
- the client's own forwarding fields (X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host,
  X-Real-IP, Forwarded) are removed, and shepherd writes its own, from what it saw itself:
  `x-forwarded-for: <client address>`, `x-forwarded-proto: <scheme>` and
  `forwarded: for=<client address>;proto=<scheme>` (RFC 7239: an IPv6 address is bracketed and
  quoted, an unknown client is `for=unknown` and gets no X-Forwarded-For);
- with `strip_credentials` (secured mode, after the signature check) the endpoint key is removed:
  the `Authorization` field, and the `api_key` query parameter under any spelling a server could
  decode to it (any ASCII case, any percent-encoding, with or without `=`). Every other parameter is
  kept byte for byte, in order, with the separator that preceded it.

Host and Content-Length are not touched here: the forwarder writes both (`proxy/upstream.py`), and
drops the client's. Pure: no I/O. On the hot path: one pass over the fields, a second only when a
Connection field names something unusual, and the query is left alone unless it could hold the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import unquote_to_bytes

__all__ = ["FORWARDING", "HOP_BY_HOP", "strip_api_key", "upstream_request"]

Header = tuple[bytes, bytes]

# RFC 9110 §7.6.1, plus Proxy-Connection (pre-standard, still sent) and "trailers" (a common misspelling
# of Trailer that the forwarder also drops).
HOP_BY_HOP: frozenset[bytes] = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})

# Fields that tell the server who the client is. A client's own would let it pose as anyone (a model
# server that rate-limits or logs by client address would believe it); shepherd writes these itself.
FORWARDING: frozenset[bytes] = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded",
})

_DROP: frozenset[bytes] = HOP_BY_HOP | FORWARDING
_DROP_WITH_CREDENTIALS: frozenset[bytes] = _DROP | {b"authorization"}

# The endpoint key's query parameter, compared after percent-decoding and ASCII lower-casing.
_API_KEY: bytes = b"api_key"
# Parameters are separated by "&", and also by ";": some servers still split on it (Python's parse_qs
# did until 3.9.2), so "x=1;api_key=..." would hand them the key.
_SEPARATOR = re.compile(rb"[&;]")
# A name longer than this cannot decode to "api_key" (each of its 7 bytes is at most "%XX").
_MAX_ENCODED_NAME = 3 * len(_API_KEY)

_OWS = b" \t"
# What the client address may hold to be written as it is; anything else is not an address we saw.
_ADDRESS = re.compile(r"[0-9A-Za-z.:%_\-]{1,64}")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,15}")


def upstream_request(
    headers: Iterable[Header],
    query: bytes,
    *,
    client_host: str | None,
    scheme: str,
    strip_credentials: bool,
) -> tuple[bytes, list[Header]]:
    """The query string and header fields to send to the model server for a client's request.

    `headers`: the client's fields as ASGI gives them (lowercase byte names; other cases are
    handled too). `query`: the raw query string. `client_host`: the client's address as the socket
    saw it (None when unknown). `scheme`: what the client spoke to shepherd ("http" or "https").
    `strip_credentials`: remove the endpoint key (secured mode, once the signature is checked).
    Returns the query and the fields in their original order, shepherd's forwarding fields last.
    """
    drop = _DROP_WITH_CREDENTIALS if strip_credentials else _DROP
    kept: list[Header] = []
    named: set[bytes] | None = None  # fields named in Connection beyond those always dropped
    for header in headers:
        name = header[0].lower()
        if name in drop:
            if name == b"connection":
                for option in header[1].split(b","):
                    option = option.strip(_OWS).lower()
                    if option and option not in drop:
                        if named is None:
                            named = set()
                        named.add(option)
            continue
        kept.append(header)
    if named:
        # Rare (a plain "Connection: keep-alive" or "close" names nothing new): a field named in
        # Connection may come before the Connection field itself, so filter once more.
        kept = [h for h in kept if h[0].lower() not in named]
    kept.extend(_forwarding(client_host, scheme))
    if strip_credentials and query:
        query = strip_api_key(query)
    return query, kept


def strip_api_key(query: bytes) -> bytes:
    """`query` without its `api_key` parameters, whatever their case or percent-encoding, with or
    without a value; every other parameter is kept byte for byte, in order."""
    # Fast path: the name cannot be there unless "key" is there, or a percent-escape could spell it.
    if b"%" not in query and b"key" not in query.lower():
        return query
    if b";" not in query:  # the common case: one separator, split and join in C
        params = query.split(b"&")
        kept = [param for param in params if not _is_api_key(param)]
        return query if len(kept) == len(params) else b"&".join(kept)
    kept = []
    start = 0
    # Each parameter is kept with the separator before it; the first one kept loses its separator.
    for match in _SEPARATOR.finditer(query + b"&"):
        segment = query[start:match.start()]
        separator_before = query[start - 1:start] if start else b""
        start = match.end()
        if not _is_api_key(segment):
            kept.append(separator_before + segment if kept else segment)
    return b"".join(kept)


def _is_api_key(segment: bytes) -> bool:
    name = segment.split(b"=", 1)[0]
    if not len(_API_KEY) <= len(name) <= _MAX_ENCODED_NAME:
        return False
    if b"%" in name:
        name = unquote_to_bytes(name)
    return name.lower() == _API_KEY


@lru_cache(maxsize=4096)
def _forwarding(client_host: str | None, scheme: str) -> tuple[Header, ...]:
    """Shepherd's own forwarding fields; cached, as clients come back and the scheme never changes."""
    proto = scheme.lower() if _SCHEME.fullmatch(scheme) else "http"
    host = client_host if client_host is not None and _ADDRESS.fullmatch(client_host) else None
    if host is None:
        return (
            (b"x-forwarded-proto", proto.encode()),
            (b"forwarded", f"for=unknown;proto={proto}".encode()),
        )
    # RFC 7239 §6: an IPv6 address is written in brackets, and then quoted (":" and "[" are not
    # token characters); an IPv4 address or a name is a token as it is.
    node = f'"[{host}]"' if ":" in host else host
    return (
        (b"x-forwarded-for", host.encode()),
        (b"x-forwarded-proto", proto.encode()),
        (b"forwarded", f"for={node};proto={proto}".encode()),
    )
