"""Secrets in public answers (issue 8, finding 6): a model server's error line holding a token reaches
`/status` (`reason`, `model.last_error`), `/ready` (`reason`) and the autoscaler (`error_msg`) only
masked. Each piece is checked at its source (StateMachine, Lifecycle, Reporter), then all of them
wired the way `supervisor/worker.py` wires them, from a real model process's output."""

from __future__ import annotations

import base64
import json
import random
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from probes.health import HealthResult
from proxy.ledger import Ledger
from supervisor.lifecycle import Lifecycle, LifecycleSettings
from supervisor.redact import REDACTED, Redactor, redact_value
from supervisor.reporter import MAX_ERROR_MSG, DiskUsage, ReportState, Reporter, WorkerIdentity, send_error_report
from supervisor.restart import BackoffSettings, RestartPolicy
from supervisor.rules import LogRules
from supervisor.states import State, StateMachine, Transition, TransitionError

HF = "hf_" + "Qm7rT2xK9pL4vN8cZ3wB6yH1jF5dS0aGe"
BEARER = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"
API_KEY = "sk-live-4f9a8b7c6d5e"
SIGNATURE = base64.b64encode(random.Random(8).randbytes(256)).decode()  # RSA-2048 sized
SECRETS = (HF, BEARER, API_KEY, SIGNATURE)
# What a model server prints when a download or a call with the user's credentials fails.
LINE = (
    f"demo: model error: 401 from hub: HF_TOKEN={HF} headers={{'Authorization': 'Bearer {BEARER}', "
    f"'X-Api-Key': '{API_KEY}'}} sig {SIGNATURE}"
)
IDENTITY = WorkerIdentity(id=7, mtoken="mtoken-0123456789", version="test", url="")


def leaked(text: str) -> list[str]:
    """The secrets (or any 12-character piece of one) found in `text`."""
    return [s for s in SECRETS if any(s[i:i + 12] in text for i in range(0, len(s) - 11))]


def assert_masked(text: str) -> None:
    assert not leaked(text), text
    assert REDACTED in text, text  # the line did arrive: masked, not dropped


# ---------------------------------------------------------------------------------------------
# StateMachine: reasons are redacted before anyone sees them


def test_transition_reasons_are_redacted_for_readers_and_listeners() -> None:
    machine = StateMachine(lambda: 0.0, redact=Redactor().redact)
    heard: list[Transition] = []
    machine.subscribe(heard.append)
    machine.to(State.LOADING, "started pid 12")
    machine.to(State.FAILED, f"fatal line: {LINE}")
    assert_masked(machine.reason)  # what /status and /ready show
    assert_masked(heard[-1].reason)  # what the log, the ReportState and the reporter get
    assert machine.reason.startswith("fatal line: demo: model error: 401 from hub: HF_TOKEN=hf_")
    assert heard[0].reason == "started pid 12"  # ordinary reasons unchanged


def test_a_refused_transition_does_not_echo_the_secret() -> None:
    machine = StateMachine(lambda: 0.0, initial=State.STOPPED, redact=Redactor().redact)
    with pytest.raises(TransitionError) as info:
        machine.to(State.READY, f"error line: {LINE}")
    assert_masked(str(info.value))


def test_without_a_redactor_the_machine_keeps_reasons_as_given() -> None:
    machine = StateMachine(lambda: 0.0)
    machine.to(State.FAILED, f"fatal line: {LINE}")
    assert machine.reason == f"fatal line: {LINE}"


# ---------------------------------------------------------------------------------------------
# Lifecycle: last_error holds only redacted text


class NeverHealthy:
    """A health probe for a server that never comes up: the run ends by its log line."""

    async def sample(self) -> HealthResult:
        return HealthResult(False, None, "connection refused")


def lifecycle_for(
    machine: StateMachine, command: tuple[str, ...] = ("true",), redact: Callable[[str], str] | None = None,
    max_failures: int = 2,
) -> Lifecycle:
    settings = LifecycleSettings(
        command=command, model_log=None, env=None, stop_timeout=5.0, load_timeout=0.0, health_interval=1.0,
        unhealthy_timeout=0.0,
    )
    policy = RestartPolicy(BackoffSettings(initial=0.01, maximum=0.01, jitter=0.0, max_failures=max_failures))
    rules = LogRules.build(error=("demo: model error",), fatal=("demo: fatal model error",))
    return Lifecycle(settings, machine, policy, rules, NeverHealthy(), redact=redact)  # type: ignore[arg-type]


def test_last_error_uses_the_machines_redactor_by_default() -> None:
    lifecycle = lifecycle_for(StateMachine(lambda: 0.0, redact=Redactor().redact))
    lifecycle.last_error = f"error line: {LINE}"
    assert_masked(lifecycle.last_error)
    lifecycle.last_error = ""
    assert lifecycle.last_error == ""


def test_last_error_uses_its_own_redactor_when_given() -> None:
    lifecycle = lifecycle_for(StateMachine(lambda: 0.0), redact=Redactor([API_KEY]).redact)
    lifecycle.last_error = f"error line: key {API_KEY}"
    assert API_KEY not in lifecycle.last_error and REDACTED in lifecycle.last_error


async def test_a_model_error_line_reaches_reason_and_last_error_masked() -> None:
    """A real model process prints the line on every start: one restart, then the give-up."""
    machine = StateMachine(trio.current_time, redact=Redactor().redact)
    heard: list[Transition] = []
    machine.subscribe(heard.append)
    command = (sys.executable, "-c", f"import time; print({LINE!r}, flush=True); time.sleep(60)")
    lifecycle = lifecycle_for(machine, command)
    with trio.fail_after(30):
        assert await lifecycle.supervise() == 1
    assert [t.to for t in heard] == [
        State.LOADING, State.RESTARTING, State.STARTING, State.LOADING, State.FAILED,
    ]
    restarting, failed = heard[1], heard[-1]
    assert restarting.reason.startswith("error line: demo: model error") and "restart in" in restarting.reason
    assert failed.reason.startswith("gave up after 2 failures")
    for text in (restarting.reason, failed.reason, machine.reason, lifecycle.last_error):
        assert_masked(text)


# ---------------------------------------------------------------------------------------------
# Reporter: error_msg is redacted at the door, before it is cut


class Autoscaler:
    """An httpx mock transport that keeps the /worker_status/ bodies it accepts."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"ok": True})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


async def fixed_disk() -> DiskUsage:
    return DiskUsage(100.0, 40.0)


async def test_reporter_redacts_error_msg_even_from_an_unredacted_machine() -> None:
    autoscaler = Autoscaler()
    machine = StateMachine(trio.current_time)  # no redactor here: the reporter's must hold alone
    state = ReportState(machine.since)
    machine.subscribe(state.on_transition)
    ledger = Ledger()
    async with autoscaler.client() as client:
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, lambda: state.view(ledger), fixed_disk,
                            redact=Redactor().redact)
        machine.to(State.FAILED, f"fatal line: {LINE}")
        assert await reporter.flush(timeout=5)
    (body,) = autoscaler.bodies
    assert_masked(body["error_msg"])
    assert body["error_msg"].startswith("fatal line: demo: model error")


async def test_error_msg_is_redacted_before_it_is_cut() -> None:
    # A secret straddling the cut would be only partly there, and no longer recognisable.
    secret = "s3cr3t-value-abcdef"
    autoscaler = Autoscaler()
    ledger = Ledger()
    state = ReportState(0.0)
    state.on_transition(Transition(State.LOADING, State.FAILED, "y" * (MAX_ERROR_MSG - 10) + " " + secret, 1.0))
    async with autoscaler.client() as client:
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, lambda: state.view(ledger), fixed_disk,
                            redact=Redactor([secret]).redact)
        assert await reporter.flush(timeout=5)
    (body,) = autoscaler.bodies
    assert len(body["error_msg"]) == MAX_ERROR_MSG
    assert "s3cr3" not in body["error_msg"]


async def test_start_failure_report_is_redacted() -> None:
    autoscaler = Autoscaler()
    async with autoscaler.client() as client:
        assert await send_error_report(client, ["http://a"], IDENTITY, f"Worker Server failed to launch: {LINE}",
                                       disk=fixed_disk, redact=Redactor().redact)
    (body,) = autoscaler.bodies
    assert_masked(body["error_msg"])


# ---------------------------------------------------------------------------------------------
# A whole snapshot at once (belt and braces for /status)


def test_redact_value_masks_every_string_of_a_snapshot_and_keeps_types() -> None:
    snapshot = {
        "state": "failed",
        "reason": f"fatal line: {LINE}",
        "model": {"pid": None, "restarts": 2, "last_error": f"error line: {LINE}", "loadtime_s": 0.0},
        "reporter": {"addresses": [f"https://autoscaler/?api_key={API_KEY}"], "unreachable": ()},
        "ok": False,
    }
    out = redact_value(Redactor().redact, snapshot)
    assert_masked(out["reason"])
    assert_masked(out["model"]["last_error"])
    assert API_KEY not in out["reporter"]["addresses"][0]
    assert out["state"] == "failed" and out["ok"] is False and out["model"]["restarts"] == 2
    assert out["model"]["pid"] is None and out["model"]["loadtime_s"] == 0.0 and out["reporter"]["unreachable"] == ()


# ---------------------------------------------------------------------------------------------
# Everything wired as build_worker wires it: one redactor from the environment and MASTER_TOKEN


async def test_one_redactor_covers_status_ready_and_the_autoscaler() -> None:
    master = "m4ster-t0ken-0123456789"
    redactor = Redactor.from_environ({"HOME": "/root", "LANG": "C.UTF-8"}, extra=(master,))
    machine = StateMachine(trio.current_time, redact=redactor.redact)
    state = ReportState(machine.since)
    machine.subscribe(state.on_transition)
    line = f"demo: fatal model error: {LINE} token={master}"
    command = (sys.executable, "-c", f"import time; print({line!r}, flush=True); time.sleep(60)")
    lifecycle = lifecycle_for(machine, command)
    autoscaler = Autoscaler()
    ledger = Ledger()
    async with autoscaler.client() as client:
        reporter = Reporter(client, ["http://a"], IDENTITY, ledger, lambda: state.view(ledger), fixed_disk,
                            redact=redactor.redact)
        with trio.fail_after(30):
            assert await lifecycle.supervise() == 1  # a fatal line: failed at once
        assert await reporter.flush(timeout=5)
    (body,) = autoscaler.bodies
    public = {"reason": machine.reason, "last_error": lifecycle.last_error, "error_msg": body["error_msg"]}
    for name, text in public.items():
        assert_masked(text)
        assert master not in text, name
        assert "fatal line: demo: fatal model error" in text, name
