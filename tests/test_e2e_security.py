"""The security review's findings, end to end: a real shepherd, real sockets, hostile clients (SECURITY.md).

Each test here failed on the main before the review's fixes: a flood of silent connections held every
one of them for good; a payload orjson could parse but not write left a ledger record in flight for
ever (and a 500 with an empty body for every later request); `/status` and `/metrics` showed internals
to anyone; secured mode started without knowing which url signatures must carry.
"""

from __future__ import annotations

import itertools
import json
import resource
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import signing
from tests.harness import TEST_MASTER_TOKEN, Shepherd, free_port, wait_until

BASE = {"RESTART_DELAY": "0.05", "STOP_TIMEOUT": "5", "SKIP_BENCHMARK": "true", "MAX_PERF": "100000",
        "PROBE_INTERVAL": "0.5"}
PAYLOAD = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
REQNUMS = itertools.count(1)


def requests_in_flight(s: Shepherd) -> tuple[int, int]:
    r = s.status()["requests"]
    return r["running"], r["waiting"]


# -- connections: a flood of silent clients neither kills shepherd nor locks others out (finding 3)


def test_a_flood_of_silent_connections_is_bounded_and_shepherd_lives(shepherds: list[Shepherd]) -> None:
    # 512 descriptors, soft and hard: shepherd cannot raise them, so it lowers its connection cap to fit.
    s = Shepherd(["--backend", "demo"], env={**BASE, "HEADER_TIMEOUT": "2", "BODY_TIMEOUT": "2",
                                             "MAX_CONNECTIONS_PER_IP": "100"}, nofile=512)
    shepherds.append(s)
    s.wait_state("ready")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            # a head that promises a body which never comes
            sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n")
            socks.append(sock)
        # Another client, from another address, is served all the while.
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=f"http://127.0.0.1:{s.port}", transport=transport, timeout=10) as other:
            response = other.post("/generate", json=PAYLOAD)
            assert response.status_code == 200, response.text
        answers = [_read_all(sock) for sock in socks]  # every one ends: refused at once, or timed out
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408 ")]
        assert len(refused) >= 200 and len(refused) + len(timed_out) == 300, answers[:3]
        assert b"too many open connections" in refused[0]
    finally:
        for sock in socks:
            sock.close()
    assert s.proc.poll() is None
    start = [e for e in s.find("shepherd.start")][0]
    assert start["fd_limit"] == 512 and start["max_connections"] == (512 - 256) // 2
    assert s.find("task.error") == []
    wait_until(lambda: requests_in_flight(s) == (0, 0), 10, "no request left in flight")
    s.signal(signal.SIGTERM)
    assert s.wait_exit(30) == 0


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(15)
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- secured mode: the management surface, the url check, and payloads that cannot be written


@dataclass
class Secured:
    s: Shepherd
    key: RSAPrivateKey
    url: str
    admin_port: int

    def envelope(self, payload: Any, **auth: Any) -> dict[str, Any]:
        return {"auth_data": signing.signed_auth(self.key, "url", url=self.url, reqnum=next(REQNUMS), **auth),
                "payload": payload}

    def body(self, payload_text: bytes, **auth: Any) -> bytes:
        """A signed envelope around payload text written by hand (deeper than any encoder writes)."""
        auth_data = signing.signed_auth(self.key, "url", url=self.url, reqnum=next(REQNUMS), **auth)
        return b'{"auth_data": ' + json.dumps(auth_data).encode() + b', "payload": ' + payload_text + b"}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    key = signing.new_key()
    pem = signing.write_public_key(key, tmp_path_factory.mktemp("keys") / "autoscaler.pem")
    port, public_port, admin_port = free_port(), free_port(), free_port()
    s = Shepherd(["--backend", "demo"], port=port, env={
        **BASE, "UNSECURED": "false", "PUBLIC_KEY_FILE": str(pem), "PUBLIC_IPADDR": "127.0.0.1",
        f"VAST_TCP_PORT_{port}": str(public_port), "METRICS_PORT": str(admin_port),
    })
    try:
        s.wait_state("ready")
        yield Secured(s, key, f"http://127.0.0.1:{public_port}", admin_port)
    finally:
        s.close()


def test_status_and_metrics_need_the_master_token_on_the_public_port(secured: Secured) -> None:
    http = secured.s.http
    for path in ("/status", "/metrics"):
        assert http.get(path).status_code == 401
        assert http.get(path, headers={"authorization": "Bearer wrong-token"}).status_code == 401
        assert http.get(path, headers={"authorization": f"Bearer {TEST_MASTER_TOKEN}"}).status_code == 200
    assert http.get("/ping").text == "pong" and http.get("/health").status_code == 200
    assert http.get("/ready").json() == {"ready": True, "state": "ready"}


def test_the_admin_listener_serves_status_openly_and_no_proxy_route(secured: Secured) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{secured.admin_port}", timeout=10) as admin:
        status = admin.get("/status")
        assert status.status_code == 200 and status.json()["state"] == "ready"
        assert "connections" in status.json()
        assert b"shepherd_" in admin.get("/metrics").content
        assert admin.post("/generate", json=secured.envelope(PAYLOAD)).status_code == 404
    start = secured.s.find("shepherd.start")[0]
    assert start["signed_url"] == secured.url and start["admin"] == f"127.0.0.1:{secured.admin_port}"


def _nested(depth: int, leaf: Any = 1) -> bytes:
    return b"[" * depth + json.dumps(leaf).encode() + b"]" * depth


def test_signed_payloads_nested_past_what_orjson_writes_are_422_and_leave_nothing(secured: Secured) -> None:
    http = secured.s.http
    for depth in (255, 600, 1023):
        body = secured.body(b'{"inputs": ' + _nested(depth) + b', "parameters": {"max_new_tokens": 1e300}}')
        response = http.post("/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, (depth, response.status_code, response.text)
        assert response.json()  # never an empty body
    assert requests_in_flight(secured.s) == (0, 0)
    ok = http.post("/generate", json=secured.envelope(PAYLOAD))  # and the next request is served
    assert ok.status_code == 200, ok.text


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=8))


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["deep", "huge_numbers", "wide", "plain"]))
    if kind == "deep":
        return b'{"inputs": ' + _nested(draw(st.integers(200, 1020)), draw(json_leaves)) + b"}"
    if kind == "huge_numbers":
        big = draw(st.sampled_from([1e300, 1e15, 10**30, -1e300, 2**63]))
        return json.dumps({"inputs": "x", "parameters": {"max_new_tokens": big}, "max_tokens": big}).encode()
    if kind == "wide":
        wide = {"inputs": "x", **{f"k{i}": draw(json_leaves) for i in range(draw(st.integers(0, 50)))}}
        return json.dumps(wide).encode()
    return json.dumps(PAYLOAD).encode()


def test_property_no_body_leaves_the_ledger_in_flight_or_gets_an_empty_500(secured: Secured) -> None:
    http = secured.s.http
    statuses: list[int] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(payload=hostile_payloads(), cost=st.sampled_from([242.0, 1e15, 1e300, "1e300", 0]))
    def one(payload: bytes, cost: Any) -> None:
        body = secured.body(payload, cost=cost)
        response = http.post("/generate", content=body, headers={"content-type": "application/json"})
        statuses.append(response.status_code)
        assert response.status_code != 500 and response.content, (response.status_code, response.text)
        if response.status_code in (429, 503):
            assert 0 < int(response.headers["retry-after"]) <= 300

    one()
    wait_until(lambda: requests_in_flight(secured.s) == (0, 0), 10, "ledger back to zero")
    report = secured.s.status()
    assert report["requests"]["running_work"] == 0 and report["requests"]["waiting_work"] == 0
    assert secured.s.find("proxy.internal_error") == []
    assert http.post("/generate", json=secured.envelope(PAYLOAD)).status_code == 200


def test_secured_mode_without_the_public_url_does_not_start(tmp_path: Path) -> None:
    pem = signing.write_public_key(signing.new_key(), tmp_path / "k.pem")
    s = Shepherd(["--backend", "demo"], env={**BASE, "UNSECURED": "false", "PUBLIC_KEY_FILE": str(pem)})
    try:
        assert s.wait_exit(30) == 2
        assert any("PUBLIC_IPADDR" in line and "SKIP_URL_CHECK" in line for line in s.stderr), s.stderr
    finally:
        s.close()


# -- large bodies: the signature before the parse, and the bytes held at once (findings 1 and 7)


def test_a_large_body_is_judged_by_its_leading_auth_data_before_it_is_parsed(secured: Secured) -> None:
    http = secured.s.http
    filler = b'"' + b"a" * (2 * 1024 * 1024) + b'"'  # 2 MiB: well past the auth-first threshold
    payload = b'{"inputs": "hello", "parameters": {"max_new_tokens": 3}, "pad": ' + filler + b"}"
    good = secured.body(payload)
    assert http.post("/generate", content=good).status_code == 200
    forged = good.replace(b'"signature": "', b'"signature": "AAAA', 1)
    mark = secured.s.mark()
    refused = http.post("/generate", content=forged)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid signature"
    auth = json.dumps(secured.envelope(PAYLOAD)["auth_data"]).encode()
    payload_first = b'{"payload": ' + payload + b', "auth_data": ' + auth + b"}"
    late = http.post("/generate", content=payload_first)
    assert late.status_code == 422 and "first key" in late.json()["auth_data"]
    # A valid auth_data first and a forged one later (the one a parser keeps): the later one counts.
    twice = good[:-1] + b', "auth_data": ' + auth.replace(b'"signature": "', b'"signature": "AAAA', 1) + b"}"
    assert http.post("/generate", content=twice).status_code == 401
    wait_until(lambda: len([e for e in secured.s.events[mark:] if e.get("event") == "access"]) >= 3, 10, "access")
    early = sorted(e["status"] for e in secured.s.events[mark:] if e.get("checked") == "auth-first")
    assert early == [401, 422]  # the forged and the payload-first bodies; the duplicate needed the parse


def test_stalled_uploads_are_bounded_in_bytes_and_time(shepherds: list[Shepherd]) -> None:
    s = Shepherd(["--backend", "demo"], env={**BASE, "MAX_BODY_BYTES": "1000000",
                                             "MAX_BODY_BYTES_IN_FLIGHT": "2500000", "BODY_TIMEOUT": "2"})
    shepherds.append(s)
    s.wait_state("ready")
    stalled = []
    for _ in range(2):  # each promises 1 MB and sends half of it
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 500_000)
        stalled.append(sock)
    wait_until(lambda: s.status()["connections"]["body_bytes_in_flight"] == 2_000_000, 10, "two reservations")
    third = s.http.post("/generate", content=b"{" + b" " * 900_000 + b"}")
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert b"HTTP/1.1 408 " in _read_all(stalled[0]) and b"HTTP/1.1 408 " in _read_all(stalled[1])
    wait_until(lambda: s.status()["connections"]["body_bytes_in_flight"] == 0, 10, "reservations released")
    assert s.http.post("/generate", json=PAYLOAD).status_code == 200
    for sock in stalled:
        sock.close()
