"""End to end with Vast's own client library: `vastai`'s serverless client -> fake `/route/` -> shepherd.

The client (asyncio + aiohttp) asks the fake autoscaler's `/route/` for a worker, gets shepherd's url
and a url-only signature, and POSTs the envelope it builds itself to shepherd, which runs secured
with the fake's key. This is the wire compatibility that matters: the real client's envelope, query
string and headers, not ones the tests build.

Offline: the client downloads Vast's root CA from console.vast.ai when it opens its session. Every
url here is plain http, so `get_ssl_context` (public, and what the client itself calls) is
overridden to return a default context without downloading anything.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vastai")

from vastai.serverless.client import CoroutineServerless, Endpoint  # noqa: E402

from tests.fake_autoscaler import DELETE, STATUS, FakeAutoscaler  # noqa: E402
from tests.harness import Shepherd, free_port, wait_until  # noqa: E402

API_KEY = "vast-endpoint-key-e2e"
ENDPOINT = "shepherd-e2e"


class OfflineServerless(CoroutineServerless):
    """The client without its download of Vast's root CA (no network in tests; no TLS here)."""

    async def get_ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context()


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Shepherd, FakeAutoscaler]]:
    port = free_port()
    worker_url = f"http://127.0.0.1:{port}"
    fake = FakeAutoscaler(worker_url=worker_url).start()
    env = {
        "REPORT_ADDR": fake.url, "CONTAINER_ID": "7", "MASTER_TOKEN": "client-e2e-token",
        "PUBLIC_IPADDR": "127.0.0.1", f"VAST_TCP_PORT_{port}": str(port), "UNSECURED": "false",
    }
    s = Shepherd(["--backend", "demo"], env=env, port=port)
    try:
        s.wait_state("ready")
        yield s, fake
    finally:
        s.close()
        fake.stop()


async def client_request(fake: FakeAutoscaler, payload: dict[str, Any], cost: int) -> dict[str, Any]:
    async with OfflineServerless(api_key=API_KEY, autoscaler_url=fake.url, max_poll_interval=0.5) as client:
        endpoint = Endpoint(client, ENDPOINT, 1, API_KEY)
        return await asyncio.wait_for(endpoint.request("/generate", payload, cost=cost, retry=False), 30)


def test_vast_client_request_is_routed_served_and_reported(setup: tuple[Shepherd, FakeAutoscaler]) -> None:
    s, fake = setup
    sent = time.monotonic()
    payload = {"inputs": "hello from vastai", "parameters": {"max_new_tokens": 5, "sleep": 0.3}}
    result = asyncio.run(client_request(fake, payload, cost=5))

    # the model's answer, through shepherd
    assert result["ok"] is True and result["status"] == 200, result
    answer = result["response"]
    assert answer["tokens"] == 5 and answer["generated_text"] == "tok0 tok1 tok2 tok3 tok4"
    assert result["url"] == f"http://127.0.0.1:{s.port}"

    # the client asked the autoscaler first, as it does against run.vast.ai
    assert len(fake.route_calls) == 1
    route = fake.route_calls[0]
    assert route["endpoint"] == ENDPOINT and route["api_key"] == API_KEY and route["cost"] == 5
    request_idx = result["request_idx"]
    assert isinstance(request_idx, int) and request_idx > 0
    assert result["auth_data"]["request_idx"] == request_idx

    # shepherd's ledger saw it: the finished request reaches /delete_requests/ under the fake's index
    done = fake.wait_for_report(
        lambda b: any(i["request_idx"] == request_idx for i in b["requests"]), timeout=5, path=DELETE)
    assert done.body["worker_id"] == 7 and done.body["mtoken"] == "client-e2e-token"
    item = next(i for i in done.body["requests"] if i["request_idx"] == request_idx)
    assert item["success"] is True and item["status"] == "Success"
    assert item["entered_queue_at"] <= item["work_started_at"] <= item["work_completed_at"]
    # ... and the status reports: it was in flight under that index, its workload is the route's
    # formula (max_new_tokens), and it was counted as received and served
    fake.wait_for_report(lambda b: request_idx in b["working_request_idxs"], timeout=5, after=sent)
    wait_until(lambda: sum(r.body["new_load"] for r in fake.all(STATUS) if r.accepted and r.at > sent) >= 5,
               5, "the request's load in a status report")
    reports = [r.body for r in fake.all(STATUS) if r.accepted and r.at > sent]
    assert sum(b["new_load"] for b in reports) == 5.0
    wait_until(lambda: sum(r.body["cur_perf"] for r in fake.all(STATUS) if r.accepted and r.at > sent) >= 5,
               5, "the request's served work in a status report")
    assert all(b["url"] == result["url"] for b in reports)  # the url the client was routed to
    assert s.status()["requests"]["received"] == 1

    # the endpoint's API key, sent by the client in a header and the query string, stays with shepherd
    access = [e for e in s.find("access") if e.get("request_idx") == request_idx]
    assert len(access) == 1 and access[0]["status"] == 200
    assert all(API_KEY not in str(e) for e in s.events)
