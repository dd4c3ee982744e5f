"""End to end (issue 8, finding 6): the real entrypoint, whose model server prints a fatal line holding
credentials, tells the autoscaler why it failed with the credentials masked.

This checks the wiring in `supervisor/worker.py` (one Redactor for the StateMachine, the Lifecycle and
the Reporter); tests/test_public_redaction.py checks each piece alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from supervisor.redact import REDACTED
from tests.fake_autoscaler import STATUS, FakeAutoscaler
from tests.harness import Shepherd, free_port

HF = "hf_" + "Qm7rT2xK9pL4vN8cZ3wB6yH1jF5dS0aGe"
BEARER = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"
API_KEY = "sk-live-4f9a8b7c6d5e"
MASTER = "mtoken-e2e-redaction-s3cret"
LINE = (
    f"demo: fatal model error: 401 from hub HF_TOKEN={HF} Authorization: Bearer {BEARER} "
    f"X-Api-Key: {API_KEY} master={MASTER}"
)


@pytest.fixture
def fake() -> Iterator[FakeAutoscaler]:
    server = FakeAutoscaler().start()
    yield server
    server.stop()


def test_fatal_line_reaches_the_autoscaler_masked(fake: FakeAutoscaler, shepherds: list[Shepherd]) -> None:
    port, public = free_port(), free_port()
    env = {
        "REPORT_ADDR": fake.url, "CONTAINER_ID": "42", "MASTER_TOKEN": MASTER,
        "PUBLIC_IPADDR": "127.0.0.1", f"VAST_TCP_PORT_{port}": str(public), "UNSECURED": "false",
        "STOP_TIMEOUT": "5", "DEMO_ERROR_LINE": LINE,
    }
    s = Shepherd(["--backend", "demo"], env=env, port=port)
    shepherds.append(s)
    assert s.wait_exit() == 1
    errors = [r.body["error_msg"] for r in fake.all(STATUS) if r.body.get("error_msg")]
    assert errors, f"no error report; received: {[r.body for r in fake.all(STATUS)]}"
    error_msg = errors[-1]
    assert "demo: fatal model error: 401 from hub" in error_msg  # the reason is there...
    assert REDACTED in error_msg
    for secret in (HF, BEARER, API_KEY, MASTER):  # ...its credentials are not
        assert secret not in error_msg
        assert secret[6:18] not in error_msg
