"""The request envelope: turning a request body into `auth_data`, `payload` and `session_id`.

Pure functions, no I/O. This module owns what a well-formed body is and how a bad one is described
to the client (422 with a JSON body naming each bad field, the way Vast's worker does), the bytes
forwarded to the model, the size limits on `auth_data` (and the bounded JSON size walk that enforces
them, shared with `proxy/signature.py`), and the workload of a request (the route's formula, else
`auth_data.cost`, else 1; clamped to the route's maximum).

Wire shape (vast-protocol.md §1.2):

    {"auth_data": {"cost", "endpoint", "reqnum", "request_idx", "signature", "url", ...},
     "payload": {...}, "session_id": null}

Decisions, all deliberate:

- `cost`, `endpoint`, `reqnum`, `signature`, `url` are required. `request_idx` is optional: 2024
  clients never send it (current Vast workers 422 them; we accept them, `request_idx` is then None).
- `reqnum` / `request_idx` accept a JSON integer, an integral finite float (`5.0`) and a base-10
  integer string (`"5"`), because Vast's worker never validated them and some clients stringify.
  Booleans are rejected (`true` is not a request number even though Python says `True == 1`).
- `cost` may be a string or a number (Vast annotates `str` but receives numbers); anything else,
  including a boolean, is rejected. It is kept exactly as received; `raw` keeps the whole
  `auth_data` object as received, because the signed message is built from the received values.
- In secured mode a body with no `auth_data` key, or `"auth_data": null`, is answered 401, not 422:
  the credentials are missing, the body is not malformed. With `unsecured=True` a body without the
  key is the payload itself, even if it happens to contain a `payload` key (DESIGN.md: "taken as the
  payload itself"); `"auth_data": null` is an envelope without credentials (`payload` required).
- `session_id` must be a string or null.

Bounds (the public port is hostile ground, DESIGN.md; SECURITY.md):

- `auth_data` is capped at `AUTH_MAX_BYTES` (4096) bytes, measured as its compact JSON text
  (`json.dumps(v, separators=(",", ":"))`, ASCII escapes), and at `AUTH_MAX_DEPTH` (8) levels of
  nesting, `auth_data` itself being level 1. Both are checked right after the body is parsed, before
  anything else looks at `auth_data`, by `json_size`: an iterative walk that stops as soon as the cap
  is passed, so the unbounded thing is never serialised. Over either limit: 422 naming `auth_data`
  and the limit. Why these numbers: every Vast generation sends a flat object of seven scalars, about
  550 bytes with a 2048-bit signature and 900 with a 4096-bit one; 4 KiB leaves room for a longer
  url, extra keys and a bigger key, and keeps every signed message (built from it, see
  `proxy/signature.py`) small. Depth 8 leaves room for a nested field Vast might add one day; what
  matters for cost is the byte cap, and 8 keeps every recursive encoder far from Python's limit.
- The bytes forwarded to the model (`Envelope.payload_bytes`) are produced here, so nothing
  serialises after admission: orjson parses nesting up to 1024 levels but writes only 254, so a
  payload nested deeper is a 422 here instead of a failure in the middle of the request.
- `workload_of` clamps to the route's `max_workload` (the caller passes the route's value or the
  global default): `cost` is unsigned in the url format and payload fields are the client's, so an
  unclamped workload lets one client refuse everyone else (429) or overflow the numbers reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from json.encoder import encode_basestring_ascii
from typing import Any, Final

import orjson

from backends.spec import Route

MISSING: Final = "missing parameter"
_REQUIRED_AUTH: Final = ("cost", "endpoint", "reqnum", "signature", "url")
_KNOWN_AUTH: Final = frozenset((*_REQUIRED_AUTH, "request_idx"))

AUTH_MAX_BYTES: Final = 4096  # compact JSON size of `auth_data`; also the cap on any signed message
AUTH_MAX_DEPTH: Final = 8  # levels of nesting in `auth_data`, the object itself being level 1
PAYLOAD_UNSERIALISABLE: Final = "nested too deeply / not serialisable"
# Digits of an integer the size walk will write out (Python refuses int -> str past 4300 digits).
_MAX_INT_BITS: Final = 13_000


class EnvelopeError(Exception):
    """A body that cannot be served. `fields` is the JSON error body; `status` the HTTP status."""

    def __init__(self, fields: dict[str, Any], status: int = 422) -> None:
        super().__init__(f"{status} {fields!r}")
        self.fields = fields
        self.status = status


@dataclass(frozen=True, slots=True)
class AuthData:
    """`auth_data` as sent by the client after `/route/`."""

    cost: str | float
    endpoint: str
    reqnum: int
    request_idx: int | None  # None: a 2024 client that does not send it
    signature: str
    url: str
    extra: Mapping[str, Any]  # every other key, e.g. `__request_id`
    raw: Mapping[str, Any]  # the object exactly as received: signed messages are built from it


@dataclass(frozen=True, slots=True)
class Envelope:
    auth: AuthData | None  # None only in unsecured mode, when `auth_data` was absent or null
    payload: dict[str, Any]
    session_id: str | None
    # What goes to the model server: the body itself when bare (no copy of a large upload), else
    # `orjson.dumps(payload)`, made here so that nothing can fail to serialise after admission.
    payload_bytes: bytes | bytearray
    bare: bool = False  # the whole body is the payload (unsecured, no envelope)


def parse_envelope(body: bytes | bytearray, *, unsecured: bool) -> Envelope:
    """Parse and validate a request body; raises `EnvelopeError` (and nothing else) when it is bad."""
    try:
        doc = orjson.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, invalid UTF-8 and over-long integers;
        # RecursionError a deeply nested document.
        raise EnvelopeError({"error": "invalid JSON"}) from None
    if type(doc) is not dict:
        raise EnvelopeError({"error": "body must be a JSON object"})

    if "auth_data" not in doc:
        if unsecured:
            return Envelope(auth=None, payload=doc, session_id=None, payload_bytes=body, bare=True)
        raise EnvelopeError({"auth_data": MISSING}, status=401)

    errors: dict[str, Any] = {}
    raw_auth = doc["auth_data"]
    auth: AuthData | None = None
    if raw_auth is None:
        if not unsecured:
            raise EnvelopeError({"auth_data": MISSING}, status=401)
    else:
        # Bounded first: everything after this (field checks, signed messages) may assume it small.
        too_big = _auth_limit_error(raw_auth)
        if too_big is not None:
            errors["auth_data"] = too_big
        else:
            auth = _parse_auth(raw_auth, errors)

    payload = doc.get("payload", _ABSENT)
    if payload is _ABSENT:
        errors["payload"] = MISSING
    elif type(payload) is not dict:
        errors["payload"] = "must be an object"

    session_id = doc.get("session_id")
    if session_id is not None and type(session_id) is not str:
        errors["session_id"] = "must be a string or null"

    if errors:
        raise EnvelopeError(errors)
    try:
        payload_bytes = orjson.dumps(payload)
    except (orjson.JSONEncodeError, TypeError, RecursionError):
        # orjson reads 1024 levels but writes 254 (JSONEncodeError is a TypeError).
        raise EnvelopeError({"payload": PAYLOAD_UNSERIALISABLE}) from None
    return Envelope(auth=auth, payload=payload, session_id=session_id, payload_bytes=payload_bytes)  # type: ignore[arg-type]


class Over(StrEnum):
    """Why `measure_json` gave up."""

    SIZE = "size"  # the text would be longer than the limit
    DEPTH = "depth"  # a list or object sits deeper than allowed
    TYPE = "type"  # not plain JSON data: a non-string key, or a value of another type


def json_size(value: object, *, limit: int, max_depth: int, indent: int | None = None) -> int | None:
    """The length of `json.dumps(value, indent=indent)` (compact separators `,` `:` when `indent` is
    None; ASCII escapes; `sort_keys` changes nothing), or None when `measure_json` gives up."""
    size = measure_json(value, limit=limit, max_depth=max_depth, indent=indent)
    return size if type(size) is int else None


def measure_json(value: object, *, limit: int, max_depth: int, indent: int | None = None) -> int | Over:
    """`json_size`, saying why when it gives up: over `limit` bytes, a list or object deeper than
    `max_depth` levels (the outermost is level 1), or not plain JSON data.

    Iterative and bounded: every node visited adds at least one byte to the total and the walk stops
    as soon as the total passes `limit`, so it visits O(limit) nodes whatever the input's size or
    depth, never builds the text, and never recurses.
    """
    total = 0
    stack: list[tuple[object, int]] = [(value, 1)]  # (value, its level if it is a container)
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if len(node) + 2 > limit - total:  # its text is at least one byte a character
                return Over.SIZE
            total += len(encode_basestring_ascii(node))
        elif node is None or node is True:
            total += 4
        elif node is False:
            total += 5
        elif isinstance(node, int):
            if node.bit_length() > _MAX_INT_BITS:
                return Over.SIZE
            total += len(int.__repr__(node))
        elif isinstance(node, float):
            total += len(_float_text(node))
        elif isinstance(node, (dict, list, tuple)):
            if depth > max_depth:
                return Over.DEPTH
            count = len(node)
            if count == 0:
                total += 2
            else:
                # Brackets and commas; with an indent, a newline and indent before each item and
                # before the closing bracket; for an object, the key separator of each item.
                total += 2 + (count - 1)
                if indent is not None:
                    total += count * (1 + indent * depth) + 1 + indent * (depth - 1)
                if isinstance(node, dict):
                    total += count * (1 if indent is None else 2)
                if total > limit:  # checked before looking at any item: `count` may be huge
                    return Over.SIZE
                if isinstance(node, dict):
                    for key, item in node.items():
                        if not isinstance(key, str):
                            return Over.TYPE
                        if len(key) + 2 > limit - total:
                            return Over.SIZE
                        total += len(encode_basestring_ascii(key))
                        stack.append((item, depth + 1))
                else:
                    stack.extend((item, depth + 1) for item in node)
        else:
            return Over.TYPE
        if total > limit:
            return Over.SIZE
    return total


def workload_of(route: Route, envelope: Envelope, max_workload: float, trust_cost: bool = True) -> float:
    """Workload units of a request: the route's formula, else a usable `auth_data.cost` when
    `trust_cost`, else 1; never more than `max_workload` (the caller's choice: `route.max_workload`,
    else the global one). The caller passes `trust_cost=False` when the signature did not cover
    `cost` (the url format): an unsigned number must not decide who else gets a 429."""
    if not (max_workload > 0.0 and math.isfinite(max_workload)):
        raise ValueError(f"max_workload must be a positive finite number, got {max_workload!r}")
    try:
        units = route.workload(envelope.payload)
    except Exception:
        # A formula that trips over an odd payload must not fail the request: the model server
        # judges the payload, the workload only feeds estimates.
        units = None
    value = _non_negative_finite(units)
    if value is None and envelope.auth is not None and trust_cost:
        cost = envelope.auth.cost
        if type(cost) is str:
            try:
                cost = float(cost)
            except ValueError:
                cost = None
        value = _non_negative_finite(cost)
    return min(1.0 if value is None else value, max_workload)


class _Absent:
    pass


_ABSENT: Final = _Absent()


def _auth_limit_error(raw: object) -> str | None:
    """Why `auth_data` is over its limits, or None when it is within them (or not an object at all:
    `_parse_auth` says so)."""
    over = measure_json(raw, limit=AUTH_MAX_BYTES, max_depth=AUTH_MAX_DEPTH)
    if over is Over.DEPTH:
        return f"must be nested at most {AUTH_MAX_DEPTH} levels deep"
    if over is Over.SIZE:
        return f"must be at most {AUTH_MAX_BYTES} bytes as compact JSON"
    return None  # Over.TYPE cannot come out of a JSON parser


def _float_text(value: float) -> str:
    # As json.dumps writes floats (allow_nan: NaN and the infinities are not JSON, but never fail).
    if value != value:
        return "NaN"
    if value == math.inf:
        return "Infinity"
    if value == -math.inf:
        return "-Infinity"
    return float.__repr__(value)


def _non_negative_finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _parse_auth(raw: object, errors: dict[str, Any]) -> AuthData | None:
    if type(raw) is not dict:
        errors["auth_data"] = "must be an object"
        return None
    bad: dict[str, str] = {}
    for name in _REQUIRED_AUTH:
        if name not in raw:
            bad[name] = MISSING

    cost = raw.get("cost")
    if "cost" not in bad and (type(cost) is not str and not _is_number(cost)):
        bad["cost"] = "must be a string or a number"
    endpoint = raw.get("endpoint")
    if "endpoint" not in bad and type(endpoint) is not str:
        bad["endpoint"] = "must be a string"
    signature = raw.get("signature")
    if "signature" not in bad and type(signature) is not str:
        bad["signature"] = "must be a string"
    url = raw.get("url")
    if "url" not in bad and type(url) is not str:
        bad["url"] = "must be a string"
    reqnum = None
    if "reqnum" not in bad:
        reqnum = _as_int(raw["reqnum"])
        if reqnum is None:
            bad["reqnum"] = "must be an integer"
    request_idx = None
    if raw.get("request_idx") is not None:
        request_idx = _as_int(raw["request_idx"])
        if request_idx is None:
            bad["request_idx"] = "must be an integer or null"

    if bad:
        errors["auth_data"] = bad
        return None
    extra = {k: v for k, v in raw.items() if k not in _KNOWN_AUTH}
    return AuthData(
        cost=cost,  # type: ignore[arg-type]
        endpoint=endpoint,  # type: ignore[arg-type]
        reqnum=reqnum,  # type: ignore[arg-type]
        request_idx=request_idx,
        signature=signature,  # type: ignore[arg-type]
        url=url,  # type: ignore[arg-type]
        extra=extra,
        raw=raw,
    )


def _is_number(value: object) -> bool:
    return type(value) is int or type(value) is float


def _as_int(value: object) -> int | None:
    """An integer from a JSON int, an integral finite float or a base-10 integer string."""
    kind = type(value)
    if kind is int:
        return value  # type: ignore[return-value]
    if kind is float:
        return int(value) if math.isfinite(value) and value == int(value) else None  # type: ignore[arg-type]
    if kind is str and 0 < len(value) <= 20:  # type: ignore[arg-type]
        text = value.strip()  # type: ignore[union-attr]
        digits = text[1:] if text[:1] in "+-" else text
        # isdecimal() alone accepts non-ASCII digits such as "٣"; a request number is ASCII.
        if digits.isascii() and digits.isdecimal():
            return int(text)
    return None
