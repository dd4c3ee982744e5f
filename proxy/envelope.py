"""The request envelope: turning a request body into `auth_data`, `payload` and `session_id`.

Pure functions, no I/O. This module owns what a well-formed body is and how a bad one is described
to the client (422 with a JSON body naming each bad field, the way Vast's worker does), and the
workload of a request (the route's formula, else `auth_data.cost`, else 1).

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from backends.spec import Route

MISSING: Final = "missing parameter"
_REQUIRED_AUTH: Final = ("cost", "endpoint", "reqnum", "signature", "url")
_KNOWN_AUTH: Final = frozenset((*_REQUIRED_AUTH, "request_idx"))


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
    bare: bool = False  # the whole body is the payload (unsecured, no envelope)


def parse_envelope(body: bytes, *, unsecured: bool) -> Envelope:
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
            return Envelope(auth=None, payload=doc, session_id=None, bare=True)
        raise EnvelopeError({"auth_data": MISSING}, status=401)

    errors: dict[str, Any] = {}
    raw_auth = doc["auth_data"]
    auth: AuthData | None = None
    if raw_auth is None:
        if not unsecured:
            raise EnvelopeError({"auth_data": MISSING}, status=401)
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
    return Envelope(auth=auth, payload=payload, session_id=session_id)  # type: ignore[arg-type]


def workload_of(route: Route, envelope: Envelope) -> float:
    """Workload units of a request: the route's formula, else a usable `auth_data.cost`, else 1."""
    try:
        units = route.workload(envelope.payload)
    except Exception:
        # A formula that trips over an odd payload must not fail the request: the model server
        # judges the payload, the workload only feeds estimates.
        units = None
    value = _non_negative_finite(units)
    if value is None and envelope.auth is not None:
        cost = envelope.auth.cost
        if type(cost) is str:
            try:
                cost = float(cost)
            except ValueError:
                cost = None
        value = _non_negative_finite(cost)
    return 1.0 if value is None else value


class _Absent:
    pass


_ABSENT: Final = _Absent()


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
