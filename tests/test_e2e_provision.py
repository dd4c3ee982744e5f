"""Provisioning before the model server (issue 12): `--before` steps and Vast's `/.provisioning` marker,
end to end with the real entrypoint, real shell steps and the demo server."""

from __future__ import annotations

import signal
from pathlib import Path

from supervisor.config import load_config
from tests.harness import Shepherd, alive, wait_until

FAST = {"RESTART_DELAY": "0.05", "STOP_TIMEOUT": "5"}


def start(shepherds: list[Shepherd], tmp_path: Path, *steps: str, **env: str) -> Shepherd:
    args = ["--backend", "demo"]
    for step in steps:
        args += ["--before", step]
    s = Shepherd(args, env={**FAST, "PROVISIONING_MARKER": str(tmp_path / "no-marker"), **env})
    shepherds.append(s)
    return s


def test_steps_run_in_order_with_their_progress_in_status(shepherds: list[Shepherd], tmp_path: Path) -> None:
    go = tmp_path / "go"
    s = start(shepherds, tmp_path,
              f"echo 'downloading weights 50%' && echo one > {tmp_path / 'order'}",
              f"echo two >> {tmp_path / 'order'}; echo 'installing 3/7' >&2; while [ ! -e {go} ]; do sleep 0.02; done")
    s.wait_event(lambda e: e.get("event") == "http.listening")
    wait_until(lambda: (s.status().get("provisioning") or {}).get("step") == 2 and
               s.status()["provisioning"]["last_line"] == "installing 3/7", 30, "step 2 with its last line")
    status = s.status()
    assert status["state"] == "provisioning" and status["reason"].startswith("step 2/2: echo two")
    assert status["provisioning"]["of"] == 2 and status["provisioning"]["elapsed_s"] >= 0
    assert status["model"]["pid"] is None  # the model server waits for the steps
    assert s.http.get("/ready").status_code == 503
    go.touch()
    s.wait_state("ready")
    assert (tmp_path / "order").read_text() == "one\ntwo\n"
    lines = [(e["step"], e["stream"], e["line"]) for e in s.find("model.log") if "step" in e]
    assert (1, "stdout", "downloading weights 50%") in lines and (2, "stderr", "installing 3/7") in lines
    path = [(e["from"], e["to"]) for e in s.find("state")]
    assert path[:4] == [("starting", "provisioning"), ("provisioning", "provisioning"), ("provisioning", "loading"),
                        ("loading", "warming")]
    assert s.status()["provisioning"] is None


def test_a_failed_step_is_exit_1_with_the_step_and_its_stderr_and_no_model(
    shepherds: list[Shepherd], tmp_path: Path
) -> None:
    s = start(shepherds, tmp_path, "true", "echo 'pip: no such package' >&2; exit 3", "echo never")
    assert s.wait_exit() == 1
    failed = s.wait_state("failed")
    assert failed["reason"].startswith("provisioning step 2/3 exited with code 3: echo")
    assert "pip: no such package" in failed["reason"]
    assert s.find("model.started") == [] and not any(e.get("line") == "never" for e in s.find("model.log"))


def test_the_images_own_provisioning_marker_is_waited_for(shepherds: list[Shepherd], tmp_path: Path) -> None:
    marker = tmp_path / ".provisioning"
    marker.touch()
    s = start(shepherds, tmp_path, PROVISIONING_MARKER=str(marker))
    s.wait_state("provisioning")
    assert "waiting for" in s.status()["reason"] and s.find("model.started") == []
    marker.unlink()
    s.wait_state("ready")


def test_sigterm_during_a_step_stops_it_and_exits_0(shepherds: list[Shepherd], tmp_path: Path) -> None:
    s = start(shepherds, tmp_path, "echo started; sleep 300")
    s.wait_event(lambda e: e.get("event") == "model.log" and e.get("line") == "started")
    step = next(e["pid"] for e in s.find("provision.step"))
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    assert not alive(step)
    assert [e["to"] for e in s.find("state")][-2:] == ["draining", "stopped"]
    assert s.find("model.started") == []


def test_steps_from_the_flag_or_the_variable() -> None:
    flags = load_config(["--unsecured", "--before", "a 1", "--before", "b", "--backend", "demo"], {})
    assert flags.before_cmds == ("a 1", "b") and flags.provisioning_marker == "/.provisioning"
    env = load_config(["--unsecured", "--backend", "demo"], {"BEFORE_CMDS": "x\n\n y \n"})
    assert env.before_cmds == ("x", "y")
    assert load_config(["--unsecured", "--backend", "demo"], {}).before_cmds == ()
