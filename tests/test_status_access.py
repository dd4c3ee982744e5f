"""Who may read the management surface, and what the model server is handed (SECURITY.md)."""

from __future__ import annotations

from proxy.app import StatusAccess
from supervisor.config import load_config
from supervisor.worker import model_env


def test_a_closed_listener_opens_only_to_the_exact_bearer_token() -> None:
    access = StatusAccess(open=False, token="s3cret-token")
    assert access.allows("Bearer s3cret-token") and access.allows("bearer  s3cret-token ")
    for wrong in (None, "", "Bearer", "Bearer s3cret", "Bearer s3cret-token2", "Basic s3cret-token", "s3cret-token"):
        assert not access.allows(wrong), wrong
    assert not StatusAccess(open=False, token=None).allows("Bearer ")  # no token set: nothing opens it
    assert StatusAccess(open=True).allows(None)


def test_the_master_token_is_not_passed_to_the_model_server() -> None:
    config = load_config(["--backend", "demo"], {"UNSECURED": "true", "MASTER_TOKEN": "mt-123456",
                                                "HF_TOKEN": "hf_abcdef", "PATH": "/usr/bin"})
    env = model_env(config)
    assert "MASTER_TOKEN" not in env
    assert env["HF_TOKEN"] == "hf_abcdef" and env["PATH"] == "/usr/bin"  # the model server needs those


async def test_the_limits_settings_reach_the_pieces_they_bound() -> None:
    import httpx

    from supervisor.worker import build_worker

    config = load_config(["--backend", "demo"], {
        "UNSECURED": "true", "STREAM_HEAD_TIMEOUT": "12", "STREAM_IDLE_TIMEOUT": "3", "BODY_TIMEOUT": "7",
        "MAX_BODY_BYTES_IN_FLIGHT": "99999999", "MAX_WORKLOAD": "50", "MAX_CONNECTIONS": "20",
        "MAX_CONNECTIONS_PER_IP": "5", "HEADER_TIMEOUT": "4", "ALLOW_H2C": "true"})
    async with httpx.AsyncClient() as client:
        worker = build_worker(config, client)
        limits = worker.forwarder.limits
        assert (limits.stream_head_timeout, limits.stream_idle_timeout) == (12.0, 3.0)
        settings = worker.handler.settings
        assert (settings.body_timeout, settings.max_workload) == (7.0, 50.0)
        assert worker.handler.budget.limit == 99999999
        gate = worker.gate.limits
        assert (gate.max_connections, gate.max_per_ip, gate.header_timeout, gate.allow_h2c) == (20, 5, 4.0, True)
        await worker.forwarder.aclose()
