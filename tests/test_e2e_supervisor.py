"""End to end: the real entrypoint supervising the real demo server (and attach mode on a real log)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT, TEST_MASTER_TOKEN, Shepherd, alive, base_env, free_port, kill_tree, wait_until

FAST = {"RESTART_DELAY": "0.05", "RESTART_MAX_DELAY": "0.2", "STOP_TIMEOUT": "5"}


def start(shepherds: list[Shepherd], *args: str, **env: str) -> Shepherd:
    s = Shepherd(["--backend", "demo", *args], env={**FAST, **env})
    shepherds.append(s)
    return s


def test_reaches_ready_and_serves_status_routes(shepherds: list[Shepherd]) -> None:
    s = start(shepherds)
    s.wait_state("ready")
    assert s.http.get("/ping").text == "pong"
    assert s.http.get("/health").status_code == 200
    ready = s.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["state"] == "ready"
    status = s.status()
    assert status["state"] == "ready" and status["mode"] == "supervised" and status["backend"] == "demo"
    assert psutil.Process(status["model"]["pid"]).ppid() == s.proc.pid
    # the model's own lines are JSON events with their stream
    line = s.wait_event(lambda e: e.get("event") == "model.log" and "model loaded" in e.get("line", ""))
    assert line["stream"] == "stdout" and line["logger"] == "model"
    # every transition on the way was one state event
    path = [(e["from"], e["to"]) for e in s.find("state")]
    assert path == [("starting", "loading"), ("loading", "warming"), ("warming", "ready")]


def test_ready_is_503_while_loading(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_HANG="1")
    s.wait_state("loading")
    response = s.http.get("/ready")
    assert response.status_code == 503
    assert response.json()["state"] == "loading" and response.headers["Retry-After"]


def test_kill_9_restarts_with_a_new_pid(shepherds: list[Shepherd]) -> None:
    s = start(shepherds)
    s.wait_state("ready")
    old = s.model_pid()
    mark = s.mark()
    os.kill(old, signal.SIGKILL)
    restarting = s.wait_state("restarting", start=mark)
    assert "code -9" in restarting["reason"]
    s.wait_state("ready", start=mark)
    new = s.model_pid()
    assert new != old and not alive(old)
    assert s.status()["model"]["restarts"] == 1


def test_sighup_restarts_gracefully(shepherds: list[Shepherd]) -> None:
    s = start(shepherds)
    s.wait_state("ready")
    old = s.model_pid()
    mark = s.mark()
    s.signal(signal.SIGHUP)
    s.wait_state("ready", start=mark)
    assert s.model_pid() != old
    stopped = s.wait_event(lambda e: e.get("event") == "model.stopped" and e.get("pid") == old)
    assert stopped["graceful"] is True and stopped["outcome"] == "hup"


def test_child_ignoring_sigterm_is_killed_after_the_grace(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_IGNORE_SIGTERM="1", STOP_TIMEOUT="1")
    s.wait_state("ready")
    pid = s.model_pid()
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    expired = s.find("stop.grace_expired")
    assert expired and expired[0]["pid"] == pid
    killed = s.find("stop.killed")
    assert killed and pid in [p["pid"] for p in killed[0]["processes"]]
    assert not alive(pid)


def test_grandchild_in_its_own_session_is_gone_after_stop(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_GRANDCHILD="1")
    event = s.wait_event(lambda e: "grandchild pid=" in e.get("line", ""))
    grandchild = int(re.search(r"pid=(\d+)", event["line"]).group(1))
    try:
        s.wait_state("ready")
        assert os.getsid(grandchild) != os.getsid(s.model_pid())
        s.signal(signal.SIGTERM)
        assert s.wait_exit() == 0
        assert not alive(grandchild)
        killed = s.find("stop.killed")
        assert grandchild in [p["pid"] for p in killed[0]["processes"]]
        assert s.find("stop.left_behind") == []
    finally:
        kill_tree(grandchild)


def test_crash_loop_gives_up_with_exit_1(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_CRASH_AFTER="0")
    assert s.wait_exit() == 1
    restarts = [e for e in s.find("state") if e["to"] == "restarting"]
    assert len(restarts) == 4  # the fifth failure gives up instead
    failed = s.find("state")[-1]
    assert failed["to"] == "failed" and "5 failures" in failed["reason"]
    assert s.find("shepherd.exit")[0]["exit_code"] == 1


def test_fatal_line_gives_up_at_once(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_ERROR_LINE="demo: fatal model error: CUDA out of memory")
    assert s.wait_exit() == 1
    failed = s.find("state")[-1]
    assert failed["to"] == "failed" and "CUDA out of memory" in failed["reason"]


def test_error_line_restarts_with_the_line_as_reason(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_ERROR_LINE="demo: model error: shard 0 died")
    restarting = s.wait_state("restarting")
    assert "demo: model error: shard 0 died" in restarting["reason"]


def test_the_exit_reason_quotes_the_last_stderr_lines_masked(shepherds: list[Shepherd]) -> None:
    # Issue 9: "exited with code 1" alone tells an operator nothing; the end of its stderr does.
    script = (
        "echo 'server: starting'; "
        "echo 'Traceback (most recent call last):' >&2; "
        "echo '  File \"server.py\", line 12, in load' >&2; "
        f"echo 'auth failed with token {TEST_MASTER_TOKEN}' >&2; "
        "echo 'OSError: model file /models/tiny.gguf not found' >&2; "
        "exit 1"
    )
    # A long restart delay keeps it in `restarting`, where /status shows the reason.
    s = Shepherd(["--backend", "demo", "--", "sh", "-c", script],
                 env={**FAST, "RESTART_DELAY": "60", "RESTART_MAX_DELAY": "60"})
    shepherds.append(s)
    restarting = s.wait_state("restarting")
    expected = ("model server exited with code 1; last stderr: Traceback (most recent call last): | "
                '  File "server.py", line 12, in load | auth failed with token ')
    assert restarting["reason"].startswith(expected), restarting["reason"]
    assert " | OSError: model file /models/tiny.gguf not found; restart in " in restarting["reason"]
    assert "server: starting" not in restarting["reason"]  # stdout is not quoted
    status = s.status()
    assert status["state"] == "restarting" and status["reason"] == restarting["reason"]
    assert status["model"]["last_error"].startswith(expected)
    assert status["model"]["last_error"].endswith("OSError: model file /models/tiny.gguf not found")
    for text in (restarting["reason"], status["reason"], status["model"]["last_error"]):
        assert TEST_MASTER_TOKEN not in text and "…[redacted]" in text
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0


def test_a_load_line_that_never_comes_gives_way_to_a_healthy_server(shepherds: list[Shepherd]) -> None:
    # Issue 9: a server that prints no such line (or another one) is not left `loading` for good.
    s = start(shepherds, MODEL_LOAD_LOG_MSG="never printed", LOAD_LINE_GRACE="0.5")
    s.wait_state("ready")
    [warning] = s.find("model.load_line_missing")
    assert warning["level"] == "warning" and warning["patterns"] == ["never printed"]
    states = s.find("state")
    assert [(e["from"], e["to"]) for e in states] == [("starting", "loading"), ("loading", "warming"),
                                                      ("warming", "ready")]
    assert states[1]["reason"] == "health check passed; no load line within 0.5s"
    with s._cond:
        names = [e.get("event") for e in s.events]
    assert names.index("model.load_line_missing") < names.index("state", names.index("state") + 1)
    assert s.http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_sigterm_exits_0_and_leaves_no_process(shepherds: list[Shepherd]) -> None:
    s = start(shepherds)
    s.wait_state("ready")
    tree = s.tree()
    assert tree, "the model server should be running under shepherd"
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    assert [p.pid for p in tree if alive(p.pid)] == []
    states = [e["to"] for e in s.find("state")]
    assert states[-2:] == ["draining", "stopped"]


def test_flood_does_not_stall_and_every_line_is_accounted_for(shepherds: list[Shepherd]) -> None:
    n = 100_000
    s = start(shepherds, DEMO_FLOOD=str(n))
    s.wait_event(lambda e: e.get("line") == f"flood done {n}", timeout=120, what="end of flood")
    flood = [e["line"] for e in s.find("model.log") if e.get("line", "").startswith("flood line ")]
    assert len(flood) == n
    assert flood[0] == "flood line 0" and flood[-1] == f"flood line {n - 1}"
    # the child was never stalled: it still answers at once
    s.wait_state("ready")
    assert s.http.get("/ready").status_code == 200


def test_invalid_utf8_is_replaced_not_fatal(shepherds: list[Shepherd]) -> None:
    s = start(shepherds, DEMO_INVALID_UTF8="1")
    event = s.wait_event(lambda e: e.get("line", "").startswith("bad bytes:"))
    assert "\ufffd" in event["line"] and event["line"].endswith("end")
    s.wait_state("ready")


def test_port_in_use_is_exit_2() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        s = Shepherd(["--backend", "demo"], port=port)
        try:
            assert s.wait_exit() == 2
            error = s.find("config.error")[0]
            assert error["setting"] == "WORKER_PORT" and str(port) in error["error"]
            assert s.find("model.started") == []  # nothing spawned before the port was bound
        finally:
            s.close()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORKER_PORT": "abc"}, "WORKER_PORT (--port): expected an integer from 1 to 65535, got 'abc'"),
        ({"BACKEND": "nope"}, "BACKEND (--backend): expected one of"),
        ({"STOP_TIMEOUT": "-3"}, "STOP_TIMEOUT (--stop-timeout): expected a number of seconds >= 0"),
        ({"BACKEND": "generic"}, "no default command"),
    ],
)
def test_configuration_errors_exit_2_with_one_line(env: dict[str, str], needle: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py")], env=base_env(**env), capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert result.stdout == ""


def test_subreaper_reaps_orphans_of_the_model(shepherds: list[Shepherd]) -> None:
    # The shell leaves an orphan (a sleep whose parent subshell is gone) and then becomes the server.
    model_port = free_port()
    script = (
        "(sleep 0.3 & echo orphan=$!); "
        f"exec {sys.executable} -m backends.demo_server --host 127.0.0.1 --port {model_port}"
    )
    s = Shepherd(["--backend", "demo", "--", "sh", "-c", script], env=FAST, model_port=model_port)
    shepherds.append(s)
    event = s.wait_event(lambda e: e.get("line", "").startswith("orphan="))
    orphan = int(event["line"].split("=")[1])
    reaped = s.wait_event(lambda e: e.get("event") == "reaper.reaped" and e.get("pid") == orphan)
    assert reaped["exit_code"] == 0
    assert not psutil.pid_exists(orphan) or not alive(orphan)
    s.wait_state("ready")
    assert s.model_pid() != orphan  # trio's own child was not stolen: it is alive and supervised


def test_attach_mode_follows_a_late_and_rotated_log(shepherds: list[Shepherd], tmp_path: Path) -> None:
    log = tmp_path / "model.log"
    log.write_text("demo: model loaded, serving on http://stale\n")  # from the last boot
    model_port = free_port()
    s = Shepherd(
        ["--backend", "demo"],
        env={"MODEL_LOG": str(log), "MODEL_ERROR_LOG_MSGS": "RuntimeError: Engine"},
        model_port=model_port,
    )
    shepherds.append(s)
    s.wait_state("loading")
    assert log.exists() and not (tmp_path / "model.log.old").exists()  # the last boot's log stays where it is
    assert s.status()["state"] == "loading" and s.status()["mode"] == "attach"

    # the server starts later and creates the log
    env = base_env(DEMO_LOAD_DELAY="0.1")
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "backends.demo_server", "--port", str(model_port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    try:
        s.wait_state("ready")
        # rotation by rename: the follower must switch to the new file
        os.rename(log, tmp_path / "model.log.1")
        mark = s.mark()
        log.write_text("RuntimeError: Engine core died\n")
        failed = s.wait_state("failed", start=mark)
        assert s.find("model_log.reopened")[-1]["rotations"] == 1
        assert "RuntimeError: Engine core died" in failed["reason"]
        # truncation, then the server announces itself again: recovery, not a sticky error
        log.write_text("")
        s.wait_event(lambda e: e.get("event") == "model_log.reopened" and e["truncations"] == 1, start=mark)
        with open(log, "a") as f:
            f.write("demo: model loaded, serving on http://again\n")
        s.wait_state("loading", start=mark)
        s.wait_state("ready", start=mark)
        assert s.http.get("/ready").status_code == 200
    finally:
        server.kill()
        server.wait()
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0


def test_a_server_that_answers_the_benchmark_with_errors_is_served_unmeasured_not_restarted(
    shepherds: list[Shepherd], tmp_path: Path
) -> None:
    """Issue 9: an answer from a live server is never a crash. The demo server behind `--backend
    generic` answers the OpenAI benchmark route 404: a restart would load the same server and get the
    same 404, so shepherd goes `ready` with no measured capacity and says why."""
    port = free_port()
    s = Shepherd(["--backend", "generic", "--", sys.executable, str(ROOT / "backends" / "demo_server.py"),
                  "--port", str(port)], model_port=port,
                 env={**FAST, "BENCHMARK_CACHE": str(tmp_path / "benchmark.json"), "BENCHMARK_RUNS": "2"})
    shepherds.append(s)
    s.wait_state("ready")
    status = s.status()
    assert status["capacity_source"] == "unmeasured" and status["max_perf"] == 0
    assert "HTTP 404" in status["capacity_error"] and "no round was served whole" in status["capacity_error"]
    assert status["model"]["restarts"] == 0 and len(s.find("model.started")) == 1
    warning = s.find("benchmark.unmeasured")
    assert len(warning) == 1 and "MAX_PERF" in warning[0]["why"]
    assert not (tmp_path / "benchmark.json").exists()  # nothing measured, nothing cached


NO_HEALTH_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "m"}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/completions":
            self._send(200, {"object": "text_completion", "choices": [{"text": "ok"}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_server_with_no_load_line_and_no_health_route_still_becomes_ready(
    shepherds: list[Shepherd], tmp_path: Path
) -> None:
    """Issue 9: llama-cpp-python's server under `--backend llamacpp` prints no `model loaded` and answers
    /health 404; it stayed `loading` for good. Now /v1/models stands in for the health path and the
    load line is waited for LOAD_LINE_GRACE, each with a warning that names what was missing."""
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(NO_HEALTH_SERVER)
    s = Shepherd(["--backend", "llamacpp", "--", sys.executable, str(script), str(port)], model_port=port,
                 env={**FAST, "LOAD_LINE_GRACE": "1", "BENCHMARK_CACHE": str(tmp_path / "b.json"),
                      "BENCHMARK_RUNS": "1", "BENCHMARK_CONCURRENCY": "2"})
    shepherds.append(s)
    s.wait_state("ready")
    [fallback] = s.find("health.fallback")
    assert fallback["fallback"].endswith("/v1/models") and fallback["health"].endswith("/health")
    assert len(s.find("model.load_line_missing")) == 1
    assert s.status()["capacity_source"] == "benchmark"
    assert s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("watchdog", [True, False], ids=["watchdog", "control-without-it"])
def test_sigkill_of_shepherd_takes_the_whole_model_tree_with_it(shepherds: list[Shepherd], watchdog: bool) -> None:
    """Issue 12: the OOM killer's SIGKILL gives shepherd no chance to stop the model server. Its
    watchdog (supervisor/guard.py) sees shepherd's end as EOF and kills the tree, the grandchild in a
    session of its own included. The control kills the watchdog first: the tree then lives on, so it
    is the watchdog that kills it, not some side effect of shepherd's death."""
    s = start(shepherds, DEMO_GRANDCHILD="1")
    s.wait_state("ready")
    tree = [p.pid for p in s.tree()]
    guard = [p for p in s.tree() if "supervisor.guard" in " ".join(p.cmdline())]
    grandchild = next(int(e["line"].rsplit("=", 1)[1]) for e in s.find("model.log") if "grandchild pid=" in e["line"])
    assert len(guard) == 1 and s.model_pid() in tree and grandchild in tree
    model = s.model_pid()
    try:
        if not watchdog:
            os.kill(guard[0].pid, signal.SIGKILL)
            wait_until(lambda: not alive(guard[0].pid), 10, "the watchdog to be gone")
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)
        if watchdog:
            wait_until(lambda: not any(alive(pid) for pid in tree), 10, "the model tree and the watchdog to be gone")
        else:
            deadline = time.monotonic() + 2.0  # watched for a while: nothing else kills it
            while time.monotonic() < deadline:
                assert alive(model) and alive(grandchild)
                time.sleep(0.05)
    finally:
        kill_tree(model)
        kill_tree(grandchild)


def test_a_clean_stop_leaves_the_watchdog_nothing_to_kill(shepherds: list[Shepherd]) -> None:
    s = start(shepherds)
    s.wait_state("ready")
    [guard] = [p.pid for p in s.tree() if "supervisor.guard" in " ".join(p.cmdline())]
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    assert not alive(guard)
    stopped = s.find("model.stopped")
    assert len(stopped) == 1 and stopped[0]["graceful"] is True  # stopped by shepherd, not by the watchdog


def test_supervised_output_is_copied_to_model_log_and_rotated(shepherds: list[Shepherd], tmp_path: Path) -> None:
    """Issue 12: Vast's portal shows /var/log/portal/*.log; in supervised mode MODEL_LOG gets the server's
    output, rotated to MODEL_LOG.1 past MODEL_LOG_MAX_BYTES (each file stays under it, one backup)."""
    log = tmp_path / "model.log"
    port = free_port()
    s = Shepherd(["--backend", "demo", "--before", "echo provisioning step says hi", "--", sys.executable,
                  str(ROOT / "backends" / "demo_server.py"), "--port", str(port)], model_port=port,
                 env={**FAST, "DEMO_FLOOD": "2000", "MODEL_LOG": str(log), "MODEL_LOG_MAX_BYTES": "16384",
                      "PROVISIONING_MARKER": str(tmp_path / "none")})
    shepherds.append(s)
    s.wait_event(lambda e: e.get("line") == "flood done 2000", timeout=60)
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    rotated = log.with_name("model.log.1")
    assert log.stat().st_size <= 16384 and 0 < rotated.stat().st_size <= 16384
    text = rotated.read_text() + log.read_text()
    assert "flood done 2000" in text  # the last lines made it, written before the exit
    assert not log.with_name("model.log.2").exists()
    assert s.find("model.started")  # it ran supervised: MODEL_LOG did not switch it to attach mode
