"""Envelope parsing: valid bodies, each kind of bad field, the unsecured shortcut, workload fallback."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.spec import Route, field_workload
from proxy.envelope import AuthData, Envelope, EnvelopeError, parse_envelope, workload_of

AUTH: dict[str, Any] = {
    "cost": 242.0,
    "endpoint": "my-endpoint",
    "reqnum": 7,
    "request_idx": 1234,
    "signature": "c2ln",
    "url": "https://1.2.3.4:5000",
    "__request_id": "abc",
}


def body(**doc: Any) -> bytes:
    return json.dumps(doc).encode()


def bad(data: bytes, *, unsecured: bool = False) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(data, unsecured=unsecured)
    return info.value


def test_full_envelope() -> None:
    env = parse_envelope(body(auth_data=AUTH, payload={"inputs": "hi"}, session_id=None), unsecured=False)
    assert env.payload == {"inputs": "hi"}
    assert env.session_id is None
    assert env.auth is not None
    assert (env.auth.cost, env.auth.endpoint, env.auth.reqnum, env.auth.request_idx) == (242.0, "my-endpoint", 7, 1234)
    assert (env.auth.signature, env.auth.url) == ("c2ln", "https://1.2.3.4:5000")
    assert env.auth.extra == {"__request_id": "abc"}
    assert env.auth.raw == AUTH


def test_2024_client_without_request_idx_is_accepted() -> None:
    auth = {k: v for k, v in AUTH.items() if k in ("cost", "endpoint", "reqnum", "signature", "url")}
    env = parse_envelope(body(auth_data=auth, payload={}), unsecured=False)
    assert env.auth is not None and env.auth.request_idx is None


def test_null_request_idx_is_absent() -> None:
    env = parse_envelope(body(auth_data={**AUTH, "request_idx": None}, payload={}), unsecured=False)
    assert env.auth is not None and env.auth.request_idx is None


@pytest.mark.parametrize("field", ["cost", "endpoint", "reqnum", "signature", "url"])
def test_each_missing_field_is_named(field: str) -> None:
    auth = {k: v for k, v in AUTH.items() if k != field}
    err = bad(body(auth_data=auth, payload={}))
    assert err.status == 422
    assert err.fields == {"auth_data": {field: "missing parameter"}}


def test_all_bad_fields_are_named_together() -> None:
    err = bad(body(auth_data={"reqnum": True, "url": 5, "request_idx": "x"}, payload=[1], session_id=3))
    assert err.status == 422
    assert err.fields == {
        "auth_data": {
            "cost": "missing parameter",
            "endpoint": "missing parameter",
            "signature": "missing parameter",
            "reqnum": "must be an integer",
            "url": "must be a string",
            "request_idx": "must be an integer or null",
        },
        "payload": "must be an object",
        "session_id": "must be a string or null",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7, 7), (7.0, 7), ("7", 7), (" -3 ", -3), ("+12", 12)],
)
def test_reqnum_lenient_integers(value: Any, expected: int) -> None:
    env = parse_envelope(body(auth_data={**AUTH, "reqnum": value}, payload={}), unsecured=False)
    assert env.auth is not None and env.auth.reqnum == expected
    # The received value is kept for the signed message.
    assert env.auth.raw["reqnum"] == value


@pytest.mark.parametrize("value", [True, False, 7.5, "7.0", "seven", "", "٣", None, [], {}, "1" * 21])
def test_reqnum_rejects_non_integers(value: Any) -> None:
    err = bad(body(auth_data={**AUTH, "reqnum": value}, payload={}))
    assert err.fields == {"auth_data": {"reqnum": "must be an integer"}}


def test_non_standard_json_literals_are_invalid_json() -> None:
    # Infinity / NaN are not JSON (RFC 8259); the strict parser refuses the whole body.
    err = bad(b'{"auth_data": {"cost": 1, "endpoint": "e", "reqnum": Infinity, "signature": "s", "url": "u"}, "payload": {}}')
    assert err.status == 422 and err.fields == {"error": "invalid JSON"}


@pytest.mark.parametrize("cost", ["242", 242, 242.5])
def test_cost_string_or_number_kept_as_received(cost: Any) -> None:
    env = parse_envelope(body(auth_data={**AUTH, "cost": cost}, payload={}), unsecured=False)
    assert env.auth is not None and env.auth.cost == cost and type(env.auth.cost) is type(cost)


@pytest.mark.parametrize("cost", [True, None, [], {}])
def test_cost_rejects_other_types(cost: Any) -> None:
    assert bad(body(auth_data={**AUTH, "cost": cost}, payload={})).fields == {
        "auth_data": {"cost": "must be a string or a number"}
    }


def test_missing_payload() -> None:
    assert bad(body(auth_data=AUTH)).fields == {"payload": "missing parameter"}


def test_auth_data_not_an_object() -> None:
    assert bad(body(auth_data="token", payload={})).fields == {"auth_data": "must be an object"}


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}"])
def test_invalid_json(data: bytes) -> None:
    err = bad(data, unsecured=True)
    assert (err.status, err.fields) == (422, {"error": "invalid JSON"})


@pytest.mark.parametrize("data", [b"[]", b"1", b'"x"', b"null"])
def test_body_must_be_an_object(data: bytes) -> None:
    err = bad(data, unsecured=True)
    assert (err.status, err.fields) == (422, {"error": "body must be a JSON object"})


def test_secured_without_auth_data_is_401() -> None:
    err = bad(body(payload={"x": 1}))
    assert (err.status, err.fields) == (401, {"auth_data": "missing parameter"})


def test_null_auth_data() -> None:
    assert bad(body(auth_data=None, payload={})).status == 401
    env = parse_envelope(body(auth_data=None, payload={"p": 1}), unsecured=True)
    assert (env.auth, env.payload) == (None, {"p": 1})
    assert bad(body(auth_data=None), unsecured=True).fields == {"payload": "missing parameter"}


def test_unsecured_bare_body_is_the_payload() -> None:
    env = parse_envelope(body(prompt="hi", payload="kept"), unsecured=True)
    assert env == Envelope(auth=None, payload={"prompt": "hi", "payload": "kept"}, session_id=None, bare=True)


def test_unsecured_envelope_is_parsed_the_same_way() -> None:
    env = parse_envelope(body(auth_data=AUTH, payload={"p": 1}, session_id="s1"), unsecured=True)
    assert env.auth is not None and env.auth.reqnum == 7
    assert (env.payload, env.session_id) == ({"p": 1}, "s1")
    assert bad(body(auth_data={}, payload={}), unsecured=True).fields["auth_data"]["url"] == "missing parameter"


def _env(payload: dict[str, Any], cost: Any = None) -> Envelope:
    auth = None
    if cost is not None:
        auth = AuthData(cost=cost, endpoint="e", reqnum=1, request_idx=None, signature="s", url="u", extra={}, raw={})
    return Envelope(auth=auth, payload=payload, session_id=None)


def test_workload_prefers_the_route_formula() -> None:
    route = Route("/generate", workload=field_workload("parameters", "max_new_tokens"))
    assert workload_of(route, _env({"parameters": {"max_new_tokens": 64}}, cost=5)) == 64.0


@pytest.mark.parametrize(
    ("cost", "expected"),
    [(5, 5.0), ("12.5", 12.5), (0, 0.0), (-1, 1.0), ("nan", 1.0), ("inf", 1.0), ("x", 1.0), (10**400, 1.0), (None, 1.0)],
)
def test_workload_falls_back_to_cost_then_one(cost: Any, expected: float) -> None:
    assert workload_of(Route("/x"), _env({}, cost=cost)) == expected


def test_workload_ignores_bad_formula_results() -> None:
    def broken(_payload: Any) -> float:
        raise KeyError("boom")

    assert workload_of(Route("/x", workload=broken), _env({}, cost=3)) == 3.0
    assert workload_of(Route("/x", workload=lambda _p: float("nan")), _env({}, cost=4)) == 4.0
    assert workload_of(Route("/x", workload=lambda _p: -2.0), _env({})) == 1.0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
AUTH_KEYS = st.sampled_from(["cost", "endpoint", "reqnum", "request_idx", "signature", "url", "__request_id"])


def _check_outcome(data: bytes, unsecured: bool) -> None:
    try:
        env = parse_envelope(data, unsecured=unsecured)
    except EnvelopeError as err:
        assert err.status in (401, 422)
        assert json.loads(json.dumps(err.fields)) == err.fields  # always serialisable
        return
    assert isinstance(env.payload, dict)
    assert env.auth is not None or unsecured
    if env.auth is not None:
        assert isinstance(env.auth.reqnum, int) and not isinstance(env.auth.reqnum, bool)
    assert workload_of(Route("/x"), env) >= 0.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_fuzz_arbitrary_bytes(data: bytes, unsecured: bool) -> None:
    _check_outcome(data, unsecured)


@settings(max_examples=300, deadline=None)
@given(JSON, st.booleans())
def test_fuzz_arbitrary_json(doc: Any, unsecured: bool) -> None:
    _check_outcome(json.dumps(doc).encode(), unsecured)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(AUTH_KEYS, JSON, max_size=7), JSON, JSON, st.booleans())
def test_fuzz_envelope_shaped_json(auth: dict[str, Any], payload: Any, session: Any, unsecured: bool) -> None:
    _check_outcome(json.dumps({"auth_data": auth, "payload": payload, "session_id": session}).encode(), unsecured)
