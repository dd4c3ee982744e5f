"""Signature checks: the three signed formats as the Vast system signs them, failures and their reasons,
the verified-pair cache, key sources (file, remote with failover, rotation, rate-limited refresh), and
the bounds of issue 8: no message over the cap is built or tried, canonical base64 only, the decoded
signature handed to the replay window."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.signature
from proxy.envelope import (
    AUTH_MAX_BYTES,
    AUTH_MAX_DEPTH,
    AuthData,
    EnvelopeError,
    Over,
    json_size,
    measure_json,
    parse_envelope,
)
from proxy.signature import (
    FORMATS,
    KeyFetchError,
    PemFileKeySource,
    RemoteKeySource,
    StaticKeySource,
    Verifier,
    decode_signature,
    load_public_key,
    message_for,
    signs_reqnum,
)

URL = "https://1.2.3.4:5000"
AUTH: dict[str, Any] = {
    "cost": 242.0,
    "endpoint": "my-endpoint",
    "reqnum": 7,
    "request_idx": 1234,
    "signature": "",
    "url": URL,
    "__request_id": "rid-1",
}


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_b() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# The messages below are written out independently of `message_for`, from the protocol reference.
def vast_message(fmt: str, auth: dict[str, Any]) -> bytes:
    if fmt == "url":
        return json.dumps({"url": auth["url"]}, indent=4, sort_keys=True).encode()
    if fmt == "sorted":
        fields = {k: v for k, v in auth.items() if k not in ("signature", "__request_id")}
        return json.dumps(fields, indent=4, sort_keys=True).encode()
    fields = {"cost": auth["cost"], "endpoint": auth["endpoint"], "reqnum": auth["reqnum"], "url": auth["url"]}
    return json.dumps(fields, indent=4).encode()


def signed(key: rsa.RSAPrivateKey, fmt: str, **changes: Any) -> AuthData:
    """auth_data as a client receives it from /route/ and sends it on, parsed as the proxy parses it."""
    raw = {**AUTH, **changes}
    signature = key.sign(vast_message(fmt, raw), padding.PKCS1v15(), hashes.SHA256())
    raw["signature"] = base64.b64encode(signature).decode()
    return auth_of(raw)


def auth_of(raw: dict[str, Any]) -> AuthData:
    env = parse_envelope(json.dumps({"auth_data": raw, "payload": {}}).encode(), unsecured=False)
    assert env.auth is not None
    return env.auth


class CountingKey:
    """A public key that counts RSA verifications."""

    def __init__(self, key: rsa.RSAPublicKey) -> None:
        self.key = key
        self.calls = 0

    def verify(self, *args: Any) -> None:
        self.calls += 1
        self.key.verify(*args)

    def public_numbers(self) -> rsa.RSAPublicNumbers:
        return self.key.public_numbers()


def counting_verifier(key: rsa.RSAPrivateKey, **kwargs: Any) -> tuple[Verifier, CountingKey]:
    counting = CountingKey(key.public_key())
    return Verifier(StaticKeySource(counting), **kwargs), counting  # type: ignore[arg-type]


# -- message_for ----------------------------------------------------------------------------------


def test_url_message_bytes() -> None:
    assert message_for("url", AUTH) == b'{\n    "url": "https://1.2.3.4:5000"\n}'


def test_sorted_message_drops_signature_and_request_id_keeps_the_rest() -> None:
    message = json.loads(message_for("sorted", {**AUTH, "signature": "x", "extra": 1}))
    assert list(message) == ["cost", "endpoint", "extra", "reqnum", "request_idx", "url"]


def test_legacy_message_keeps_field_order_and_received_types() -> None:
    assert message_for("legacy", {**AUTH, "cost": "242"}) == (
        b'{\n    "cost": "242",\n    "endpoint": "my-endpoint",\n    "reqnum": 7,\n    "url": "https://1.2.3.4:5000"\n}'
    )
    assert b'"cost": 242.0' in message_for("legacy", AUTH)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown signature format"):
        message_for("v9", AUTH)
    with pytest.raises(ValueError, match="unknown signature format"):
        Verifier(StaticKeySource(None), fmt="v9")


# -- Verifier -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["url", "sorted", "legacy"])
async def test_each_format_verifies_in_auto_and_alone(key_a: rsa.RSAPrivateKey, fmt: str) -> None:
    auth = signed(key_a, fmt)
    source = StaticKeySource(key_a.public_key())
    for mode in ("auto", fmt):
        result = await Verifier(source, fmt=mode).verify(auth)
        assert (result.ok, result.reason, result.fmt) == (True, "ok", fmt)


async def test_a_fixed_format_refuses_the_others(key_a: rsa.RSAPrivateKey) -> None:
    result = await Verifier(StaticKeySource(key_a.public_key()), fmt="url").verify(signed(key_a, "legacy"))
    assert (result.ok, result.reason) == (False, "signature mismatch")


async def test_wrong_key(key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey) -> None:
    result = await Verifier(StaticKeySource(key_a.public_key())).verify(signed(key_b, "url"))
    assert (result.ok, result.reason, result.fmt) == (False, "signature mismatch", None)


async def test_expected_url_mismatch_costs_no_crypto(key_a: rsa.RSAPrivateKey) -> None:
    verifier, counting = counting_verifier(key_a, expected_url="https://9.9.9.9:1/")
    result = await verifier.verify(signed(key_a, "url"))
    assert (result.ok, result.reason) == (False, "url mismatch")
    assert counting.calls == 0


async def test_expected_url_ignores_trailing_slash(key_a: rsa.RSAPrivateKey) -> None:
    verifier, _ = counting_verifier(key_a, expected_url=URL + "/")
    assert (await verifier.verify(signed(key_a, "url"))).ok
    assert (await verifier.verify(signed(key_a, "url", url=URL + "/"))).ok


async def test_tampered_field_breaks_sorted_but_not_url(key_a: rsa.RSAPrivateKey) -> None:
    verifier = Verifier(StaticKeySource(key_a.public_key()))
    for fmt, expected in (("sorted", False), ("url", True)):
        auth = signed(key_a, fmt)
        tampered = auth_of({**auth.raw, "cost": 1.0})
        assert (await verifier.verify(tampered)).ok is expected


@pytest.mark.parametrize("garbage", ["not base64!", "abc", "é", "YWJj\n====="])
async def test_garbage_signature_encoding(key_a: rsa.RSAPrivateKey, garbage: str) -> None:
    verifier, counting = counting_verifier(key_a)
    result = await verifier.verify(auth_of({**AUTH, "signature": garbage}))
    assert (result.ok, result.reason) == (False, "bad signature encoding")
    assert counting.calls == 0


async def test_valid_base64_of_the_wrong_length_is_a_mismatch(key_a: rsa.RSAPrivateKey) -> None:
    result = await Verifier(StaticKeySource(key_a.public_key())).verify(auth_of({**AUTH, "signature": "YWJj"}))
    assert (result.ok, result.reason) == (False, "signature mismatch")


async def test_no_key_loaded(key_a: rsa.RSAPrivateKey) -> None:
    result = await Verifier(StaticKeySource(None)).verify(signed(key_a, "url"))
    assert (result.ok, result.reason) == (False, "public key not loaded")


async def test_cache_hit_skips_crypto(key_a: rsa.RSAPrivateKey) -> None:
    verifier, counting = counting_verifier(key_a)
    auth = signed(key_a, "url")
    assert (await verifier.verify(auth)).ok
    assert counting.calls == 1
    # Same url-only signature on another request (other reqnum, request_idx): one dict lookup.
    again = auth_of({**auth.raw, "reqnum": 8, "request_idx": 99})
    for _ in range(3):
        result = await verifier.verify(again)
        assert (result.ok, result.fmt) == (True, "url")
    assert counting.calls == 1


async def test_cache_hit_for_a_later_format_skips_earlier_crypto(key_a: rsa.RSAPrivateKey) -> None:
    verifier, counting = counting_verifier(key_a)
    auth = signed(key_a, "legacy")
    assert (await verifier.verify(auth)).fmt == "legacy"
    assert counting.calls == 3  # url and sorted failed first
    assert (await verifier.verify(auth)).fmt == "legacy"
    assert counting.calls == 3


async def test_failures_are_not_cached(key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey) -> None:
    verifier, counting = counting_verifier(key_a, fmt="url")
    auth = signed(key_b, "url")
    assert not (await verifier.verify(auth)).ok
    assert not (await verifier.verify(auth)).ok
    assert counting.calls == 2


async def test_cache_is_bounded_lru(key_a: rsa.RSAPrivateKey) -> None:
    verifier, counting = counting_verifier(key_a, fmt="url", cache_size=2)
    auths = [signed(key_a, "url", url=f"https://10.0.0.{i}:1") for i in range(3)]
    for auth in auths:
        assert (await verifier.verify(auth)).ok
    assert counting.calls == 3
    assert (await verifier.verify(auths[2])).ok  # newest: cached
    assert counting.calls == 3
    assert (await verifier.verify(auths[0])).ok  # oldest: evicted
    assert counting.calls == 4


# -- issue 8: bounded messages, canonical base64, the decoded signature ----------------------------


def test_only_sorted_and_legacy_sign_reqnum() -> None:
    assert [signs_reqnum(fmt) for fmt in FORMATS] == [False, True, True]
    assert signs_reqnum(None) is False


def _deep(depth: int, leaf: Any) -> Any:
    node = leaf
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize("depth", [9, 850, 1000, 5000])
def test_deep_auth_data_gives_no_message_and_no_recursion_error(depth: int) -> None:
    # Today: json.dumps(indent=4) over it, RecursionError from ~1000 levels (a 500 per request).
    raw = {**AUTH, "k": _deep(depth, list(range(1000)))}
    assert message_for("sorted", raw) is None
    assert message_for("url", raw) == b'{\n    "url": "https://1.2.3.4:5000"\n}'  # url alone is small
    assert message_for("legacy", raw) is not None


def test_a_message_over_the_cap_is_none_even_when_auth_data_is_under_it() -> None:
    # 450 short keys: under 4 KB as compact JSON, more than 6 KB indented.
    raw = {**AUTH, **{f"{i:03}": 0 for i in range(450)}}
    assert json_size(raw, limit=AUTH_MAX_BYTES, max_depth=AUTH_MAX_DEPTH) is not None
    message = message_for("sorted", raw)
    assert message is None
    assert len(json.dumps({k: v for k, v in raw.items() if k != "signature"}, indent=4)) > AUTH_MAX_BYTES
    assert message_for("sorted", raw, max_bytes=10**6) is not None  # the cap is a parameter
    assert message_for("url", {"url": "u" * AUTH_MAX_BYTES}) is None


class DumpSpy:
    """Records the length of every text the indenting encoder writes in proxy.signature."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = json.dumps

        def dumps(value: Any, *args: Any, **kwargs: Any) -> str:
            text = real(value, *args, **kwargs)
            self.sizes.append(len(text))
            return text

        monkeypatch.setattr(proxy.signature.json, "dumps", dumps)


async def test_the_850_deep_attack_is_never_serialised_and_only_small_messages_are_tried(
    key_a: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The finding's body, handed straight to the verifier (parse_envelope refuses it earlier now):
    # a garbage signature, a valid url, 850 levels around many items. Measured on the bounded work
    # (the messages built and the RSA checks made), not on time.
    spy = DumpSpy(monkeypatch)
    raw = {**AUTH, "signature": base64.b64encode(b"\0" * 256).decode(), "k": _deep(850, [0] * 50_000)}
    auth = AuthData(cost=1, endpoint="e", reqnum=1, request_idx=None, signature=raw["signature"], url=URL,
                    extra={}, raw=raw)
    verifier, counting = counting_verifier(key_a)
    result = await verifier.verify(auth)
    assert (result.ok, result.reason) == (False, "signature mismatch")
    assert counting.calls == 2  # url and legacy; the sorted message was over the cap, never built
    assert all(size <= AUTH_MAX_BYTES for size in spy.sizes)
    assert sum(spy.sizes) <= 2 * AUTH_MAX_BYTES


async def test_a_cached_url_signature_builds_one_message(
    key_a: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier, _ = counting_verifier(key_a)
    auth = signed(key_a, "url")
    assert (await verifier.verify(auth)).ok
    built: list[str] = []
    real = proxy.signature.message_for

    def recording(fmt: str, raw: Any, *args: Any) -> bytes | None:
        built.append(fmt)
        return real(fmt, raw, *args)

    monkeypatch.setattr(proxy.signature, "message_for", recording)
    assert (await verifier.verify(auth)).ok
    assert built == ["url"]  # cheapest first, and nothing more once it hit


def _spellings(signature: bytes) -> list[str]:
    """Every base64 text that b64decode(validate=True) turns into `signature`: the canonical one and
    the others that differ only in the unused low bits of the last character."""
    canonical = base64.b64encode(signature).decode()
    body = canonical.rstrip("=")
    padding_ = canonical[len(body):]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    texts = [body[:-1] + c + padding_ for c in alphabet]
    return [t for t in texts if base64.b64decode(t, validate=True) == signature]


def test_decode_signature_accepts_only_the_canonical_spelling() -> None:
    signature = bytes(range(256))  # 256 bytes, like a 2048-bit RSA signature: 4 unused bits, 16 spellings
    spellings = _spellings(signature)
    assert len(spellings) == 16
    assert [decode_signature(t) for t in spellings].count(signature) == 1
    assert decode_signature(base64.b64encode(signature).decode()) == signature
    for garbage in ("YWJj\n", "YWJ", "YW==", "YWJj====", "YWJj ", "é", "-_8="):
        assert decode_signature(garbage) is None
    assert decode_signature("") == b""  # canonical for no bytes; no signature matches it


async def test_other_spellings_of_a_valid_signature_are_refused(key_a: rsa.RSAPrivateKey) -> None:
    # Today all 16 verified, and a replay window keyed on the text counted them as 16 requests.
    auth = signed(key_a, "sorted")
    decoded = base64.b64decode(auth.signature)
    verifier = Verifier(StaticKeySource(key_a.public_key()))
    results = [await verifier.verify(auth_of({**auth.raw, "signature": t})) for t in _spellings(decoded)]
    assert [r.ok for r in results].count(True) == 1
    assert {r.reason for r in results if not r.ok} == {"bad signature encoding"}


async def test_the_result_carries_the_decoded_signature(key_a: rsa.RSAPrivateKey) -> None:
    verifier = Verifier(StaticKeySource(key_a.public_key()))
    auth = signed(key_a, "legacy")
    first = await verifier.verify(auth)
    cached = await verifier.verify(auth)
    assert first.signature_bytes == cached.signature_bytes == base64.b64decode(auth.signature)
    assert (first.fmt, cached.fmt) == ("legacy", "legacy")
    bad = await verifier.verify(auth_of({**auth.raw, "signature": "not base64!"}))
    assert bad.signature_bytes is None


# -- key sources ----------------------------------------------------------------------------------


class PubkeyServer:
    """`GET /pubkey/` per host via httpx.MockTransport; each host's behaviour is swappable."""

    def __init__(self) -> None:
        self.hosts: dict[str, Callable[[], httpx.Response]] = {}
        self.calls: list[tuple[str, float]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.url.host, trio.current_time()))
        assert request.url.path == "/pubkey/"
        return self.hosts[request.url.host]()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


def serve(body: bytes | str) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(200, content=body)


def down() -> httpx.Response:
    raise httpx.ConnectError("connection refused")


async def test_remote_failover_and_json_quoted_pem(key_a: rsa.RSAPrivateKey) -> None:
    server = PubkeyServer()
    server.hosts = {"first": down, "second": serve(json.dumps(pem(key_a).decode()))}
    async with server.client() as client:
        source = RemoteKeySource(["http://first/", "http://second//"], client)
        key = await source.fetch_once()
    assert key.public_numbers() == key_a.public_key().public_numbers()
    assert [host for host, _ in server.calls] == ["first", "second"]


async def test_remote_all_down_names_each_address(key_a: rsa.RSAPrivateKey) -> None:
    server = PubkeyServer()
    server.hosts = {"a": down, "b": lambda: httpx.Response(500), "c": serve("not a key")}
    async with server.client() as client:
        with pytest.raises(KeyFetchError) as info:
            await RemoteKeySource(["http://a", "http://b", "http://c"], client).fetch_once()
    message = str(info.value)
    assert "http://a/pubkey/: ConnectError" in message
    assert "http://b/pubkey/: HTTP 500" in message
    assert "http://c/pubkey/: not a PEM public key" in message


async def test_remote_slow_address_times_out_then_fails_over(
    key_a: rsa.RSAPrivateKey, clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow":
            await trio.sleep(3600)
        return httpx.Response(200, content=pem(key_a))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        source = RemoteKeySource(["http://slow", "http://fast"], client, fetch_timeout=10.0)
        start = trio.current_time()
        await source.fetch_once()
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_fetch_until_loaded_backs_off_and_logs_once(
    key_a: rsa.RSAPrivateKey, clock: trio.testing.MockClock
) -> None:
    server = PubkeyServer()
    server.hosts = {"k": down}
    async with server.client() as client:
        source = RemoteKeySource(["http://k"], client, max_backoff=30.0)
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source.fetch_until_loaded)
                with trio.fail_after(200):
                    while len(server.calls) < 8:
                        await trio.sleep(0.5)
                    assert source.current() is None
                    server.hosts["k"] = serve(pem(key_a))
                    await source.wait_loaded()
    times = [t for _, t in server.calls]
    gaps = [round(b - a) for a, b in zip(times, times[1:])]
    assert gaps == [1, 2, 4, 8, 16, 30, 30, 30]
    assert source.current() is not None
    events = [entry["event"] for entry in logs]
    assert events.count("pubkey.fetch_failed") == 1
    assert events.count("pubkey.loaded") == 1


async def test_key_rotation_and_rate_limited_refresh(
    key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey, clock: trio.testing.MockClock
) -> None:
    server = PubkeyServer()
    server.hosts = {"k": serve(pem(key_a))}
    async with server.client() as client:
        source = RemoteKeySource(["http://k"], client, min_refresh_interval=60.0)
        await source.fetch_until_loaded()
        verifier = Verifier(source)
        assert (await verifier.verify(signed(key_a, "url"))).ok
        assert len(server.calls) == 1

        # The autoscaler rotates to key B; a B-signed request fails with A, refreshes, succeeds.
        server.hosts["k"] = serve(pem(key_b))
        result = await verifier.verify(signed(key_b, "sorted"))
        assert (result.ok, result.fmt) == (True, "sorted")
        assert len(server.calls) == 2
        # A-signed pairs verified before the rotation are no longer trusted from the cache.
        assert not (await verifier.verify(signed(key_a, "url"))).ok

        # Bad signatures within the interval do not fetch again.
        for _ in range(5):
            assert not (await verifier.verify(signed(key_a, "legacy", reqnum=_))).ok
        assert len(server.calls) == 2

        clock.jump(60.0)
        assert not (await verifier.verify(signed(key_a, "url"))).ok
        assert len(server.calls) == 3  # key unchanged: refresh says so, no second crypto round


async def test_concurrent_refreshes_share_one_fetch(
    key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey, clock: trio.testing.MockClock
) -> None:
    fetches = 0

    async def handler(_request: httpx.Request) -> httpx.Response:
        nonlocal fetches
        fetches += 1
        await trio.sleep(1.0)  # long enough for every refresher to arrive while the fetch runs
        return httpx.Response(200, content=pem(key_b if fetches > 1 else key_a))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        source = RemoteKeySource(["http://k"], client)
        await source.fetch_until_loaded()
        results: list[bool] = []

        async def refresh() -> None:
            results.append(await source.refresh())

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(refresh)
    assert fetches == 2
    assert results == [True] * 5


async def test_remote_source_needs_an_address() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(ValueError, match="at least one address"):
            RemoteKeySource([" ", ""], client)


def test_pem_file_key_source(tmp_path: Path, key_a: rsa.RSAPrivateKey) -> None:
    good = tmp_path / "key.pem"
    good.write_bytes(pem(key_a))
    key = PemFileKeySource(good).current()
    assert key is not None and key.public_numbers() == key_a.public_key().public_numbers()


def test_pem_file_key_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read public key file .*missing.pem"):
        PemFileKeySource(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="junk.pem.*not a PEM public key"):
        PemFileKeySource(junk)
    ec_file = tmp_path / "ec.pem"
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ec_file.write_bytes(ec_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ValueError, match="expected an RSA key"):
        PemFileKeySource(ec_file)


def test_load_public_key_rejects_bad_json_string() -> None:
    with pytest.raises(ValueError, match="malformed JSON string"):
        load_public_key('"-----BEGIN')


# -- fuzzing --------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
AUTH_DICTS = st.dictionaries(
    st.sampled_from(["cost", "endpoint", "reqnum", "request_idx", "signature", "url", "__request_id"]) | st.text(max_size=8),
    JSON,
    max_size=8,
)


def _refused_for_size(message: dict[str, Any]) -> bool:
    """Whether `message_for` may give None for this message: over the cap, or too deep."""
    over = measure_json(message, limit=AUTH_MAX_BYTES, max_depth=AUTH_MAX_DEPTH, indent=4)
    return over in (Over.SIZE, Over.DEPTH)


def _message_dict(fmt: str, raw: dict[str, Any]) -> dict[str, Any]:
    """What each format signs, from the protocol reference (missing keys as null)."""
    if fmt == "url":
        return {"url": raw.get("url")}
    if fmt == "sorted":
        return {k: v for k, v in raw.items() if k not in ("signature", "__request_id")}
    return {k: raw.get(k) for k in ("cost", "endpoint", "reqnum", "url")}


@settings(max_examples=200, deadline=None)
@given(AUTH_DICTS)
def test_fuzz_message_for_never_raises(raw: dict[str, Any]) -> None:
    # Updated for issue 8: a message over the cap (or nested past AUTH_MAX_DEPTH) is now None, not built.
    for fmt in ("url", "sorted", "legacy"):
        message = message_for(fmt, raw)
        fields = _message_dict(fmt, raw)
        if message is None:
            assert _refused_for_size(fields)
        else:
            assert message == json.dumps(fields, indent=4, sort_keys=fmt != "legacy").encode()
            assert len(message) <= AUTH_MAX_BYTES


@settings(max_examples=300, deadline=None)
@given(st.text() | JSON)
def test_fuzz_url_message_is_the_indented_json_dump(url: Any) -> None:
    # Updated for issue 8: the same bytes, unless they would be over the cap (then None).
    expected = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
    message = message_for("url", {"url": url})
    assert message == expected or (message is None and _refused_for_size({"url": url}))


@pytest.fixture(scope="module")
def fuzz_verifier(key_a: rsa.RSAPrivateKey) -> Verifier:
    return Verifier(StaticKeySource(key_a.public_key()))


@settings(max_examples=150, deadline=None)
@given(AUTH_DICTS, st.one_of(st.text(max_size=40), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())))
def test_fuzz_verify_never_raises(fuzz_verifier: Verifier, raw: dict[str, Any], signature: str) -> None:
    candidate = {**raw, "signature": signature}
    try:
        auth = auth_of(candidate)
    except (EnvelopeError, AssertionError):
        # Not a valid envelope: hand the verifier an AuthData whose raw dict is arbitrary anyway.
        auth = AuthData(
            cost=1, endpoint="e", reqnum=1, request_idx=None, signature=signature, url=str(raw.get("url")), extra={}, raw=candidate
        )
    result = trio.run(fuzz_verifier.verify, auth)
    assert result.ok is False
    assert result.reason in ("signature mismatch", "bad signature encoding")
