"""Signature checks on `auth_data`: the signed message formats, the verifier, and the public key sources.

This module owns the answer to "did the Vast system sign this request". The primitive is the one all
Vast generations use (vast-protocol.md §1.3): RSASSA-PKCS1-v1_5 with SHA-256 over a UTF-8 JSON text,
the signature base64 in `auth_data.signature`, the RSA public key served as PEM at
`GET {REPORT_ADDR}/pubkey/`. What text is signed changed twice and is disputed (vast-cli#493), so the
format is a setting, and `auto` tries every known one:

- `url`     (current, ≥ vast-sdk 0.4.2): `json.dumps({"url": url}, indent=4, sort_keys=True)`.
- `sorted`  (2025): every `auth_data` key except `signature` and `__request_id`,
            `json.dumps(..., indent=4, sort_keys=True)`.
- `legacy`  (2023-2024): `cost, endpoint, reqnum, url` in that order, `json.dumps(..., indent=4)`.

Values are taken exactly as received (a `cost` of `242.0` and one of `"242"` sign differently).

Message building is pure (`message_for`) and bounded: a message longer than `AUTH_MAX_BYTES` is
never built (its length is measured first by `proxy.envelope.json_size`, a walk that stops at the
cap) and never tried; Vast's real messages are a few hundred bytes. Only `sorted` and `legacy` sign
`reqnum` (`signs_reqnum`): with `url`, the reqnum is the client's to choose, which the replay window
must know (`proxy/replay.py`).

`Verifier` adds the crypto, a bounded LRU of verified (signature, message) pairs (the url-only
format makes one signature valid for every request to this worker, so the common case is a dict
hit), and one retry after a key refresh (key rotation). Messages are built lazily in the order
`url`, `sorted`, `legacy` (cheapest first), stopping at the first cached pair. The signature text
must be canonical base64 (what Python's `base64.b64encode` writes: alphabet, padding and zero
unused bits), so one signature has one spelling; `VerifyResult.signature_bytes` carries the decoded
bytes for the replay window.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import structlog
import trio
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from proxy.envelope import AUTH_MAX_BYTES, AUTH_MAX_DEPTH, AuthData, json_size

FORMATS: Final = ("url", "sorted", "legacy")  # also the order `auto` tries them in (cheapest first)
_SIGNS_REQNUM: Final = frozenset(("sorted", "legacy"))
_LEGACY_KEYS: Final = ("cost", "endpoint", "reqnum", "url")
_UNSIGNED_KEYS: Final = frozenset(("signature", "__request_id"))
_INDENT: Final = 4
_URL_FRAME: Final = len(b'{\n    "url": \n}')

_log = structlog.get_logger("proxy.signature")


def signs_reqnum(fmt: str | None) -> bool:
    """Whether a signature in `fmt` covers `auth_data.reqnum` (else the client chose it freely)."""
    return fmt in _SIGNS_REQNUM


def message_for(fmt: str, auth_raw: Mapping[str, Any], max_bytes: int = AUTH_MAX_BYTES) -> bytes | None:
    """The exact bytes the Vast system signs for `auth_raw` (the received `auth_data` object) in `fmt`,
    or None when they would be longer than `max_bytes` (or `auth_raw` holds something that is not
    JSON data): such a message is not built, and not tried.

    Safe on any input, however large or deep: the length is measured by a walk that stops at
    `max_bytes` before anything is serialised.
    """
    if fmt == "url":
        url = auth_raw.get("url")
        if type(url) is str:
            # The same bytes as json.dumps({"url": url}, indent=4, sort_keys=True), without the
            # pure-Python indenting encoder: this runs on every request.
            if len(url) + 2 + _URL_FRAME > max_bytes:  # the quoted url is at least this long
                return None
            text = b'{\n    "url": ' + json.dumps(url).encode() + b"\n}"
            return text if len(text) <= max_bytes else None
        return _bounded_dump({"url": url}, max_bytes, sort_keys=True)
    if fmt == "sorted":
        # Each key costs more than one byte of the message: a mapping with more keys than
        # `max_bytes` cannot fit, and copying it would be unbounded work.
        if len(auth_raw) > max_bytes:
            return None
        message: dict[str, Any] = {k: v for k, v in auth_raw.items() if k not in _UNSIGNED_KEYS}
        return _bounded_dump(message, max_bytes, sort_keys=True)
    if fmt == "legacy":
        message = {k: auth_raw.get(k) for k in _LEGACY_KEYS}
        return _bounded_dump(message, max_bytes, sort_keys=False)
    raise ValueError(f"unknown signature format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _bounded_dump(message: dict[str, Any], max_bytes: int, *, sort_keys: bool) -> bytes | None:
    # The message has one level more than any value in it; AUTH_MAX_DEPTH bounds the indenting
    # encoder's recursion (it is pure Python) as well as the work.
    if json_size(message, limit=max_bytes, max_depth=AUTH_MAX_DEPTH, indent=_INDENT) is None:
        return None
    text = json.dumps(message, indent=_INDENT, sort_keys=sort_keys).encode()
    # The walk is exact; this only keeps the promise should the two ever disagree.
    return text if len(text) <= max_bytes else None


def decode_signature(text: str) -> bytes | None:
    """The bytes of a canonical base64 signature, or None.

    Canonical: the standard alphabet, `=` padding to a multiple of 4, unused bits zero: exactly what
    `base64.b64encode` writes, so that the same bytes have one spelling (`b64decode` alone accepts
    16 spellings of a 256-byte signature, which a replay window keyed on the text would count as 16
    requests).
    """
    if not text.isascii():
        return None
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded) != text.encode("ascii"):
        return None
    return decoded


def load_public_key(pem: bytes | str) -> RSAPublicKey:
    """An RSA public key from PEM text, which may also arrive as a JSON string (`"-----BEGIN..."`).

    Raises ValueError with a message fit for an operator.
    """
    text = pem.decode("utf-8", "replace") if isinstance(pem, bytes) else pem
    text = text.strip()
    if text.startswith('"'):
        try:
            text = json.loads(text)
        except ValueError:
            raise ValueError("public key is a malformed JSON string") from None
        if not isinstance(text, str):  # pragma: no cover - a JSON text starting with '"' is a string
            raise ValueError("public key is not a string")
    try:
        key = serialization.load_pem_public_key(text.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key (expected -----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"public key is {type(key).__name__}, expected an RSA key")
    return key


class KeySource(Protocol):
    """Where the verifier gets the public key. `refresh` returns True when the key changed."""

    def current(self) -> RSAPublicKey | None: ...

    async def refresh(self) -> bool: ...


class StaticKeySource:
    """A fixed key (or none): for a key given inline, and for tests."""

    def __init__(self, key: RSAPublicKey | None) -> None:
        self._key = key

    def current(self) -> RSAPublicKey | None:
        return self._key

    async def refresh(self) -> bool:
        await trio.lowlevel.checkpoint()
        return False


class PemFileKeySource(StaticKeySource):
    """A key read once from a PEM file at construction; a file cannot rotate under us."""

    def __init__(self, path: str | Path) -> None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read public key file {str(path)!r}: {exc.strerror or exc}") from None
        try:
            key = load_public_key(data)
        except ValueError as exc:
            raise ValueError(f"public key file {str(path)!r}: {exc}") from None
        super().__init__(key)


class KeyFetchError(Exception):
    """No address served a usable key; the message names each address and what went wrong."""


class RemoteKeySource:
    """The key from `GET {addr}/pubkey/`, addresses tried in order (failover, as for reports).

    Start `fetch_until_loaded` in a nursery at startup; `wait_loaded` gates readiness. After that,
    `refresh` (called by the verifier when a signature fails) re-fetches at most once per
    `min_refresh_interval` seconds, so a flood of bad signatures cannot turn into a flood of fetches.
    Concurrent callers share one fetch.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        client: httpx.AsyncClient,
        *,
        min_refresh_interval: float = 60.0,
        fetch_timeout: float = 10.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._addresses = tuple(a.strip().rstrip("/") for a in addresses if a.strip())
        if not self._addresses:
            raise ValueError("RemoteKeySource needs at least one address")
        self._client = client
        self._min_refresh_interval = min_refresh_interval
        self._fetch_timeout = fetch_timeout
        self._max_backoff = max_backoff
        self._clock = clock
        self._key: RSAPublicKey | None = None
        self._loaded = trio.Event()
        self._last_refresh: float | None = None
        self._refreshing: _Refresh | None = None

    def current(self) -> RSAPublicKey | None:
        return self._key

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    async def fetch_once(self) -> RSAPublicKey:
        """One pass over the addresses; the first usable key wins. Raises KeyFetchError."""
        failures: list[str] = []
        for address in self._addresses:
            url = f"{address}/pubkey/"
            try:
                # httpx timeouts are per phase; the deadline bounds a server that trickles bytes.
                with trio.fail_after(self._fetch_timeout):
                    response = await self._client.get(url, timeout=self._fetch_timeout)
                response.raise_for_status()
                return load_public_key(response.content)
            except (httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
                failures.append(f"{url}: {_describe(exc)}")
        raise KeyFetchError("; ".join(failures))

    async def fetch_until_loaded(self) -> RSAPublicKey:
        """Fetch until a key is loaded, backing off 1, 2, 4 ... `max_backoff` s; returns the key.

        One warning per outage (the first failure) and one info line when the key arrives.
        """
        delay = 1.0
        attempts = 0
        while True:
            attempts += 1
            try:
                key = await self.fetch_once()
            except KeyFetchError as exc:
                if attempts == 1:
                    _log.warning("pubkey.fetch_failed", error=str(exc), retry_in=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            self._install(key)
            _log.info("pubkey.loaded", attempts=attempts)
            return key

    async def refresh(self) -> bool:
        """Re-fetch the key unless one was fetched less than `min_refresh_interval` ago."""
        if self._refreshing is not None:
            pending = self._refreshing
            await pending.done.wait()
            return pending.changed
        now = self._clock()
        if self._last_refresh is not None and now - self._last_refresh < self._min_refresh_interval:
            await trio.lowlevel.checkpoint()
            return False
        self._last_refresh = now
        self._refreshing = pending = _Refresh()
        try:
            key = await self.fetch_once()
        except KeyFetchError as exc:
            _log.warning("pubkey.refresh_failed", error=str(exc))
        else:
            pending.changed = self._install(key)
            if pending.changed:
                _log.info("pubkey.rotated")
        finally:
            self._refreshing = None
            pending.done.set()
        return pending.changed

    def _install(self, key: RSAPublicKey) -> bool:
        old = self._key
        changed = old is None or old.public_numbers() != key.public_numbers()
        if changed:
            self._key = key
        self._loaded.set()
        return changed


class _Refresh:
    """One refresh in progress; concurrent callers wait for it and share its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.changed = False


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    reason: str  # "ok" or why not, fit for a log line (never contains the signature)
    fmt: str | None  # the format that verified
    # The decoded signature (canonical base64, so one value per signature): the replay window's key.
    # Set whenever the text decoded, so always when `ok`.
    signature_bytes: bytes | None = None


class Verifier:
    """Checks `auth_data` signatures against the key source's current key."""

    def __init__(
        self,
        key_source: KeySource,
        fmt: str = "auto",
        expected_url: str | None = None,
        cache_size: int = 4096,
    ) -> None:
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown signature format {fmt!r}; expected auto, {', '.join(FORMATS)}")
        self._source = key_source
        self._formats = FORMATS if fmt == "auto" else (fmt,)
        self._expected_url = expected_url.rstrip("/") if expected_url is not None else None
        self._cache_size = cache_size
        # (signature bytes, message) -> format. Keyed on the decoded bytes: a non-canonical spelling
        # never decodes, so it can neither hit nor fill the cache.
        self._cache: OrderedDict[tuple[bytes, bytes], str] = OrderedDict()
        self._cache_key: RSAPublicKey | None = None  # the key the cached pairs were verified with

    async def verify(self, auth: AuthData) -> VerifyResult:
        if self._expected_url is not None and auth.url.rstrip("/") != self._expected_url:
            await trio.lowlevel.checkpoint()
            return VerifyResult(False, "url mismatch", None)
        key = self._source.current()
        if key is None:
            await trio.lowlevel.checkpoint()
            return VerifyResult(False, "public key not loaded", None)

        signature = decode_signature(auth.signature)
        if signature is None:
            await trio.lowlevel.checkpoint()
            return VerifyResult(False, "bad signature encoding", None)

        messages: list[tuple[str, bytes]] = []
        if key is not self._cache_key:
            # Pairs verified with a previous key must not outlive its rotation.
            self._cache.clear()
            self._cache_key = key
        # Messages are built lazily, cheapest first: a cached url-only pair needs one message and
        # one lookup. A message over the cap is not built (None) and not tried.
        for fmt in self._formats:
            message = message_for(fmt, auth.raw)
            if message is None:
                continue
            if (signature, message) in self._cache:
                self._cache.move_to_end((signature, message))
                await trio.lowlevel.checkpoint()
                return VerifyResult(True, "ok", fmt, signature)
            messages.append((fmt, message))

        fmt = self._check(key, signature, messages)
        if fmt is not None:
            await trio.lowlevel.checkpoint()
        elif await self._source.refresh():
            # Only a key that actually changed is worth a second round of crypto.
            key = self._source.current()
            if key is not None:
                fmt = self._check(key, signature, messages)
        if fmt is None:
            return VerifyResult(False, "signature mismatch", None, signature)
        return VerifyResult(True, "ok", fmt, signature)

    def _check(self, key: RSAPublicKey, signature: bytes, messages: list[tuple[str, bytes]]) -> str | None:
        # In the event loop on purpose: a 2048-bit PKCS#1 v1.5 verify is tens of microseconds,
        # less than a thread hand-off would cost.
        for fmt, message in messages:
            try:
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            except (InvalidSignature, ValueError, TypeError):
                continue
            self._remember(key, signature, message, fmt)
            return fmt
        return None

    def _remember(self, key: RSAPublicKey, signature: bytes, message: bytes, fmt: str) -> None:
        if self._cache_size <= 0:
            return
        if key is not self._cache_key:
            self._cache.clear()
            self._cache_key = key
        self._cache[(signature, message)] = fmt
        self._cache.move_to_end((signature, message))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, (httpx.TimeoutException, trio.TooSlowError)):
        return "timed out"
    if not isinstance(exc, httpx.HTTPError):  # our own ValueError: already a sentence
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

