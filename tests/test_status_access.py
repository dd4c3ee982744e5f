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
