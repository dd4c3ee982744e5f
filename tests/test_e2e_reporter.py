"""End to end: the real entrypoint reporting to a fake Vast autoscaler (`tests/fake_autoscaler.py`).

shepherd runs secured (UNSECURED=false, the key fetched from the fake's `/pubkey/`), with the
identity Vast gives a worker (CONTAINER_ID, MASTER_TOKEN, PUBLIC_IPADDR, VAST_TCP_PORT_<port>), and
requests carry `auth_data` signed by the fake for the reported url.

One shepherd and one fake are shared by the tests that do not disturb each other (`worker`); their
requests go through `Traffic`, which keeps a tally of the work shepherd admitted, served and refused,
so that the sums over every report the fake accepted can be compared with it exactly. The fault
tests (dead first address, crash loop, port in use) start their own.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_autoscaler import DELETE, STATUS, FakeAutoscaler
from tests.harness import Shepherd, free_port, wait_until

CONTAINER_ID = "42"
SECRET = "mtoken-e2e-s3cret"
# Vast's current /worker_status/ object (vast-protocol.md §2.1, plus `disk_usage`), with the JSON
# type each field must have on the wire. bool is excluded explicitly (True is an int to Python).
FLOAT, INT, STR = "float", "int", "str"
FIELD_TYPES: dict[str, str] = {
    "id": INT, "mtoken": STR, "version": STR, "loadtime": FLOAT, "cur_load": FLOAT, "rej_load": FLOAT,
    "new_load": FLOAT, "error_msg": STR, "max_perf": FLOAT, "cur_perf": FLOAT, "cur_capacity": INT,
    "max_capacity": INT, "num_requests_working": INT, "num_requests_recieved": INT,
    "additional_disk_usage": FLOAT, "disk_usage": FLOAT, "working_request_idxs": "list[int]", "url": STR,
}
FAST = {"RESTART_DELAY": "0.05", "RESTART_MAX_DELAY": "0.2", "STOP_TIMEOUT": "5"}


def has_type(value: Any, kind: str) -> bool:
    if kind == FLOAT:
        return type(value) is float
    if kind == INT:
        return type(value) is int
    if kind == STR:
        return type(value) is str
    return type(value) is list and all(type(v) is int for v in value)


def reporting_env(fake_url: str, public_port: int, worker_port: int, **extra: str) -> dict[str, str]:
    return {
        **FAST,
        "REPORT_ADDR": fake_url, "CONTAINER_ID": CONTAINER_ID, "MASTER_TOKEN": SECRET,
        "PUBLIC_IPADDR": "127.0.0.1", f"VAST_TCP_PORT_{worker_port}": str(public_port),
        "UNSECURED": "false", **extra,
    }


def payload(tokens: int, sleep: float = 0.0) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": tokens}
    if sleep:
        params["sleep"] = sleep
    return {"inputs": "hello", "parameters": params}


@dataclass
class Traffic:
    """Signed requests to the shared shepherd, with a tally of what it must have counted."""

    shepherd: Shepherd
    fake: FakeAutoscaler
    url: str  # the public url: what the fake signs and what shepherd reports
    admitted: float = 0.0  # workload of requests that passed the signature check (-> new_load)
    served: float = 0.0  # ... and were answered 200 (-> cur_perf)
    refused: float = 0.0  # workload of requests refused 401 (-> rej_load)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, body: dict[str, Any], workload: float) -> tuple[httpx.Response, float]:
        """POST /generate; returns the response and its latency in seconds. Tallies the workload."""
        started = time.monotonic()
        response = self.shepherd.http.post("/generate", json=body)
        took = time.monotonic() - started
        with self.lock:
            if response.status_code == 401:
                self.refused += workload
            else:
                self.admitted += workload
                if response.status_code == 200:
                    self.served += workload
        return response, took

    def generate(self, tokens: int, sleep: float = 0.0, url: str | None = None) -> tuple[httpx.Response, float, int]:
        """A request signed for `url` (default: the reported one); also returns its request_idx."""
        auth = self.fake.sign_auth(url or self.url)
        response, took = self.post({"auth_data": auth, "payload": payload(tokens, sleep)}, float(tokens))
        return response, took, auth["request_idx"]


def total(fake: FakeAutoscaler, name: str, after: float = -1.0) -> float:
    """Sum of `name` over the status reports the fake accepted (arrived after `after`)."""
    return sum(r.body[name] for r in fake.all(STATUS) if r.accepted and r.at > after)


def wait_totals(traffic: Traffic, timeout: float = 10.0) -> None:
    """Every admitted, served and refused unit has reached the autoscaler in an accepted report."""
    fake = traffic.fake

    def settled() -> bool:
        return (total(fake, "new_load"), total(fake, "cur_perf"), total(fake, "rej_load")) == (
            traffic.admitted, traffic.served, traffic.refused)

    try:
        wait_until(settled, timeout, "report totals to match the requests sent")
    except AssertionError:
        got = (total(fake, "new_load"), total(fake, "cur_perf"), total(fake, "rej_load"))
        raise AssertionError(f"reported (new_load, cur_perf, rej_load) {got} != sent "
                             f"{(traffic.admitted, traffic.served, traffic.refused)}") from None


def delete_item(fake: FakeAutoscaler, request_idx: int, timeout: float = 5.0) -> dict[str, Any]:
    def has(body: dict[str, Any]) -> bool:
        return any(item.get("request_idx") == request_idx for item in body.get("requests", []))

    body = fake.wait_for_report(has, timeout, path=DELETE).body
    assert body["worker_id"] == int(CONTAINER_ID) and body["mtoken"] == SECRET
    return next(item for item in body["requests"] if item["request_idx"] == request_idx)


# ---------------------------------------------------------------------------------------------
# The shared worker


@dataclass
class SharedWorker:
    shepherd: Shepherd
    fake: FakeAutoscaler
    traffic: Traffic
    public_port: int
    ready_seen_at: float  # time.monotonic() when this test process saw the `-> ready` state event


@pytest.fixture(scope="module")
def worker() -> Iterator[SharedWorker]:
    fake = FakeAutoscaler().start()
    worker_port, public_port = free_port(), free_port()
    s = Shepherd(["--backend", "demo"], env=reporting_env(fake.url, public_port, worker_port), port=worker_port)
    try:
        s.wait_state("ready")
        seen = time.monotonic()
        traffic = Traffic(s, fake, f"http://127.0.0.1:{public_port}")
        yield SharedWorker(s, fake, traffic, public_port, seen)
    finally:
        s.close()
        fake.stop()


def test_every_status_field_has_its_type_and_identity(worker: SharedWorker) -> None:
    fake, s = worker.fake, worker.shepherd
    ready = fake.wait_for_report(lambda b: b["loadtime"] > 0)
    reports = fake.reports()
    assert reports, "no status report accepted"
    for body in reports:
        assert set(body) == set(FIELD_TYPES), sorted(set(body) ^ set(FIELD_TYPES))
        bad = {k: body[k] for k, kind in FIELD_TYPES.items() if not has_type(body[k], kind)}
        assert not bad, f"fields with the wrong JSON type: {bad}"
        assert body["id"] == 42 and body["mtoken"] == SECRET
        assert body["url"] == f"http://127.0.0.1:{worker.public_port}"
        assert body["cur_capacity"] == 0 and body["max_capacity"] == 0
    # while loading: no load time and no capacity; the first report goes out before ready
    first = reports[0]
    assert first["loadtime"] == 0.0 and first["max_perf"] == 0.0 and first["error_msg"] == ""
    loading = [r for r in fake.all(STATUS) if r.accepted and r.body["loadtime"] == 0.0]
    assert loading and all(r.at < ready.at for r in loading), "loadtime went back to 0 after ready"
    assert all(r.body["max_perf"] == 0.0 for r in loading)
    # once ready: both set, and they are what shepherd itself says
    status = s.status()
    assert ready.body["loadtime"] > 0 and ready.body["max_perf"] > 0
    assert ready.body["loadtime"] == pytest.approx(status["model"]["loadtime_s"])
    assert ready.body["max_perf"] == pytest.approx(status["max_perf"])
    # the token is sent to the autoscaler and nowhere else
    assert all(SECRET not in json.dumps(e) for e in s.events)


def test_readiness_is_reported_within_a_second(worker: SharedWorker) -> None:
    ready = worker.fake.wait_for_report(lambda b: b["loadtime"] > 0)
    lag = ready.at - worker.ready_seen_at
    # negative when the report beat the test's read of shepherd's log; the heartbeat is 10 s
    assert lag < 1.0, f"readiness reached the autoscaler {lag:.3f}s after the ready event"


def test_request_moves_the_load_and_lands_in_delete_requests(worker: SharedWorker) -> None:
    traffic, fake = worker.traffic, worker.fake
    sent_wall, sent = time.time(), time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(traffic.generate, 7, 1.0)
        working = fake.wait_for_report(lambda b: b["num_requests_working"] == 1, timeout=5, after=sent)
        response, took, idx = future.result(timeout=10)
    done_wall, done = time.time(), time.monotonic()
    assert response.status_code == 200 and response.json()["tokens"] == 7
    assert working.at < done, "the in-flight report came after the answer"
    assert working.body["cur_load"] == 7.0 and working.body["working_request_idxs"] == [idx]
    # finished: the load is gone
    idle = fake.wait_for_report(lambda b: b["num_requests_working"] == 0, timeout=5, after=working.at)
    assert idle.body["cur_load"] == 0.0 and idle.body["working_request_idxs"] == []
    item = delete_item(fake, idx)
    assert item["success"] is True and item["status"] == "Success"
    entered, started, completed = item["entered_queue_at"], item["work_started_at"], item["work_completed_at"]
    assert entered <= started <= completed
    assert sent_wall - 0.5 <= entered and completed <= done_wall + 0.5  # unix seconds, this clock
    assert completed - started >= 0.9  # the model slept 1 s
    wait_totals(traffic)


def test_request_signed_for_another_url_is_refused_and_reported(worker: SharedWorker) -> None:
    traffic, fake, s = worker.traffic, worker.fake, worker.shepherd
    # the url the worker reports is the one its signatures must name
    ok, _, _ = traffic.generate(2)
    assert ok.status_code == 200
    reported = fake.reports()[-1]["url"]
    assert reported == traffic.url
    before = time.monotonic()
    other = f"http://127.0.0.1:{worker.public_port + 1}"
    response, _, idx = traffic.generate(5, url=other)  # validly signed, for someone else
    assert response.status_code == 401
    # forged: our url, but the signature of another url
    forged = fake.sign_auth(other)
    forged["url"] = traffic.url
    response2, _ = traffic.post({"auth_data": forged, "payload": payload(3)}, 3.0)
    assert response2.status_code == 401 and response2.json()["error"] == "invalid signature"
    rejected = fake.wait_for_report(lambda b: b["rej_load"] > 0, timeout=5, after=before)
    assert rejected.body["rej_load"] in (5.0, 8.0)
    item = delete_item(fake, idx)
    assert item["success"] is False and item["status"] == "Rejected"
    wait_totals(traffic)
    assert total(fake, "rej_load", after=before) == 8.0
    assert s.status()["requests"]["received"] == fake.reports()[-1]["num_requests_recieved"]


def test_counters_survive_failed_reports(worker: SharedWorker) -> None:
    traffic, fake = worker.traffic, worker.fake
    wait_totals(traffic)  # nothing from earlier tests is still on its way
    n, tokens = 6, 3
    fake.set_mode("error500")
    switched = time.monotonic()
    try:
        for _ in range(n):
            response, _, _ = traffic.generate(tokens)
            assert response.status_code == 200
        # the reports of this work were refused by the autoscaler ...
        wait_until(lambda: any(r.answered == 500 and r.at > switched and r.body["new_load"] > 0
                               for r in fake.all(STATUS)), 5, "a refused report carrying the new load")
    finally:
        fake.set_mode("ok")
    # ... and nothing was lost: once it accepts again, the new load adds up to exactly the work sent
    wait_until(lambda: total(fake, "new_load", after=switched) >= n * tokens, 15,
               "the new load to be reported after the outage")
    assert total(fake, "new_load", after=switched) == n * tokens
    assert total(fake, "cur_perf", after=switched) == n * tokens
    wait_totals(traffic)


def test_slow_autoscaler_does_not_slow_requests(worker: SharedWorker) -> None:
    traffic, fake, s = worker.traffic, worker.fake, worker.shepherd
    baseline = []
    for _ in range(3):
        response, took, _ = traffic.generate(2)
        assert response.status_code == 200
        baseline.append(took)
    fake.set_mode("slow", 30.0)
    try:
        first, took, _ = traffic.generate(2)  # its arrival pokes a report that now hangs
        assert first.status_code == 200
        wait_until(lambda: fake.in_flight >= 1, 5, "a report held by the slow autoscaler")
        latencies = [took]
        for _ in range(5):
            response, took, _ = traffic.generate(2)
            assert response.status_code == 200
            latencies.append(took)
        ready_started = time.monotonic()
        ready = s.http.get("/ready")
        ready_took = time.monotonic() - ready_started
        assert fake.in_flight >= 1, "the slow report should still be held"
    finally:
        fake.set_mode("ok")
    assert ready.status_code == 200 and ready_took < 1.0
    assert max(latencies) < 1.0, f"latencies {latencies} (before the slowdown: {baseline})"
    assert max(latencies) < max(baseline) + 0.5, f"latencies {latencies} vs {baseline} before"
    assert fake.max_in_flight <= 2  # one status and one delete send at a time, never a queue


# ---------------------------------------------------------------------------------------------
# Workers of their own


@pytest.fixture
def fake() -> Iterator[FakeAutoscaler]:
    server = FakeAutoscaler().start()
    yield server
    server.stop()


def dead_address() -> str:
    """An address nobody listens on (bound, then closed: the kernel refuses connections)."""
    return f"http://127.0.0.1:{free_port()}"


def test_dead_first_address_fails_over_to_the_second(fake: FakeAutoscaler, shepherds: list[Shepherd]) -> None:
    dead = dead_address()
    port, public = free_port(), free_port()
    s = Shepherd(["--backend", "demo"], env=reporting_env(f"{dead},{fake.url}", public, port), port=port)
    shepherds.append(s)
    ready = fake.wait_for_report(lambda b: b["loadtime"] > 0, timeout=30)
    assert ready.body["id"] == 42 and ready.body["url"] == f"http://127.0.0.1:{public}"
    # the key came from the second address too: a signed request is served
    auth = fake.sign_auth(f"http://127.0.0.1:{public}")
    response = s.http.post("/generate", json={"auth_data": auth, "payload": payload(2)})
    assert response.status_code == 200
    delete_item(fake, auth["request_idx"])
    # the dead address was tried first, and its outage logged once per path rather than per report
    outages = [e for e in s.find("reporter.unreachable") if e.get("address") == dead]
    assert [e["path"] for e in outages if e["path"] == STATUS] == [STATUS]
    assert s.status()["reporter"]["last_address"] == fake.url


def test_crash_loop_ends_with_an_error_report_and_exit_1(fake: FakeAutoscaler, shepherds: list[Shepherd]) -> None:
    port, public = free_port(), free_port()
    env = reporting_env(fake.url, public, port, DEMO_CRASH_AFTER="0", MAX_FAILURES="2", RESTART_DELAY="0.05")
    s = Shepherd(["--backend", "demo"], env=env, port=port)
    shepherds.append(s)
    assert s.wait_exit() == 1
    failed = s.find("state")[-1]
    assert failed["to"] == "failed" and "gave up after 2 failures" in failed["reason"]
    # already there when the process is gone: the report was flushed before exit, not after
    errors = [b for b in fake.reports() if b["error_msg"]]
    assert errors, f"no error report; received: {[r.body for r in fake.all(STATUS)]}"
    last = errors[-1]
    assert "gave up after 2 failures" in last["error_msg"], last["error_msg"]
    assert "model server exited with code 1" in last["error_msg"], last["error_msg"]
    # and why (issue 9): the demo server's last stderr line
    assert "last stderr: demo: crashing on purpose after 0 s" in last["error_msg"], last["error_msg"]
    assert last["error_msg"] == failed["reason"]
    assert last["loadtime"] == 0.0 and last["max_perf"] == 0.0
    assert last["id"] == 42 and last["mtoken"] == SECRET


def test_port_in_use_sends_one_launch_error_and_exits_2(fake: FakeAutoscaler) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        public = free_port()
        s = Shepherd(["--backend", "demo"], env=reporting_env(fake.url, public, port), port=port)
        try:
            assert s.wait_exit() == 2
        finally:
            s.close()
    received = fake.all(STATUS)
    assert len(received) == 1, [r.body for r in received]
    body = received[0].body
    assert received[0].accepted
    assert "failed to launch" in body["error_msg"] and str(port) in body["error_msg"]
    assert set(body) == set(FIELD_TYPES)
    assert body["id"] == 42 and body["mtoken"] == SECRET and body["url"] == f"http://127.0.0.1:{public}"
    assert body["loadtime"] == 0.0 and body["max_perf"] == 0.0
    assert fake.all(DELETE) == []
    assert s.find("model.started") == []


def test_missing_tls_files_send_one_launch_error_and_exit_2(fake: FakeAutoscaler, tmp_path: Path) -> None:
    port, public = free_port(), free_port()
    cert, key = tmp_path / "missing.crt", tmp_path / "missing.key"
    # Nothing signs here (a closed port): the missing files cannot be made either (tests/test_e2e_tls_bootstrap.py).
    env = reporting_env(fake.url, public, port, USE_SSL="true", SSL_CERT=str(cert), SSL_KEY=str(key),
                        SIGN_CERT_URL=f"http://127.0.0.1:{free_port()}/sign_cert/", SIGN_CERT_BACKOFF="0.01")
    s = Shepherd(["--backend", "demo"], env=env, port=port)
    try:
        assert s.wait_exit() == 2
    finally:
        s.close()
    received = fake.all(STATUS)
    assert len(received) == 1 and received[0].accepted, [r.body for r in received]
    body = received[0].body
    assert "failed to launch" in body["error_msg"] and "could not be signed after 5 tries" in body["error_msg"]
    assert body["url"] == f"https://127.0.0.1:{public}"  # USE_SSL: the reported url is https
    assert body["id"] == 42 and body["mtoken"] == SECRET
    assert s.find("model.started") == []
