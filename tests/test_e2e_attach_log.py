"""End to end: attach mode never loses a live MODEL_LOG (issue 12).

shepherd runs the real entrypoint in attach mode; the model server (the demo server) and the
programs around it write MODEL_LOG as Vast's templates and base images do: an onstart script that is
already writing when shepherd starts, a log renamed to `.old` and recreated when the base image
(re)starts its program, a writer that still holds the renamed file. `LOAD_LINE_GRACE=0` makes the load
line the only way to `ready`, so reaching `ready` proves shepherd read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from supervisor.lifecycle import Lifecycle
from tests.harness import ROOT, Shepherd, base_env, free_port, kill_tree, wait_until

ENV = {
    "SKIP_BENCHMARK": "true", "MAX_PERF": "100000", "LOAD_LINE_GRACE": "0",
    "MODEL_ERROR_LOG_MSGS": "RuntimeError: Engine",
}
LAST_BOOT = b"demo: model loaded, serving on http://stale\nRuntimeError: Engine core died\n"


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for server in started:
        kill_tree(server.pid)


def start_server(servers: list[subprocess.Popen[bytes]], port: int, out: BinaryIO) -> subprocess.Popen[bytes]:
    """The demo model server, its output appended to `out` (as `server >> MODEL_LOG 2>&1 &` does)."""
    server = subprocess.Popen([sys.executable, "-m", "backends.demo_server", "--port", str(port)],
                              stdout=out, stderr=subprocess.STDOUT, env=base_env(DEMO_LOAD_DELAY="0.1"),
                              cwd=str(ROOT))
    servers.append(server)
    return server


def model_lines(s: Shepherd) -> list[str]:
    return [e.get("line", "") for e in s.find("model.log")]


def heard(s: Shepherd, writer: BinaryIO, text: str) -> None:
    """Write `text` lines through `writer` until shepherd shows one as a model.log event: proof that it
    follows the file this writer writes, whatever its polling phase."""
    count = 0

    def seen() -> bool:
        nonlocal count
        count += 1
        writer.write(f"{text} {count}\n".encode())
        return any(line.startswith(text) for line in model_lines(s))

    wait_until(seen, timeout=20, what=f"shepherd to show the line {text!r} written to MODEL_LOG")


def test_a_log_being_written_when_shepherd_starts_is_followed_where_it_is(
    shepherds: list[Shepherd], servers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    log = tmp_path / "model.log"
    log.write_bytes(LAST_BOOT)
    with open(log, "ab", buffering=0) as onstart:  # the onstart script, already writing its log
        onstart.write(b"onstart: downloading weights\n")
        s = Shepherd(["--backend", "demo"], env={**ENV, "MODEL_LOG": str(log)})
        shepherds.append(s)
        s.wait_state("loading")
        assert log.exists() and not (tmp_path / "model.log.old").exists(), "shepherd moved the live log"
        heard(s, onstart, "onstart: still downloading")
        start_server(servers, s.model_port, onstart)
        ready = s.wait_state("ready")
    assert ready["reason"].startswith("ready after")
    assert s.find("model.load_line_seen") and not s.find("model.load_line_missing")
    lines = model_lines(s)
    assert f"demo: model loaded, serving on http://127.0.0.1:{s.model_port}" in lines
    # History (the last boot's load and error lines, the onstart line written before the start) is
    # never taken for new output: no stale `ready`, no `failed`.
    assert not any(line.startswith(("RuntimeError", "onstart: downloading")) or "stale" in line for line in lines)
    assert [e["to"] for e in s.find("state")] == ["loading", "warming", "ready"]
    [following] = s.find("model_log.following")
    assert following["history_bytes"] >= len(LAST_BOOT) + len(b"onstart: downloading weights\n")
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0


def test_the_log_renamed_to_old_and_recreated_while_shepherd_runs(
    shepherds: list[Shepherd], servers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # Vast's base image renames /var/log/portal/<name>.log to <name>.log.old whenever its program
    # starts; the program it replaces may still write a last line to the renamed file.
    log, old = tmp_path / "model.log", tmp_path / "model.log.old"
    log.write_bytes(LAST_BOOT)
    first = open(log, "ab", buffering=0)  # noqa: SIM115 - program A, running when shepherd starts
    try:
        first.write(b"program A: starting\n")
        s = Shepherd(["--backend", "demo"], env={**ENV, "MODEL_LOG": str(log)})
        shepherds.append(s)
        s.wait_state("loading")
        assert log.exists() and not old.exists(), "shepherd moved the live log"
        heard(s, first, "program A: working")

        mark = s.mark()
        os.rename(log, old)  # the base image restarts the program
        with open(log, "ab", buffering=0) as second:
            start_server(servers, s.model_port, second)  # program B, in a new log
            first.write(b"program A: shutting down\n")  # A still holds the renamed file
            ready = s.wait_state("ready", start=mark)
    finally:
        first.close()
    assert ready["reason"].startswith("ready after")
    assert s.find("model.load_line_seen") and not s.find("model.load_line_missing")
    lines = model_lines(s)
    assert f"demo: model loaded, serving on http://127.0.0.1:{s.model_port}" in lines
    s.wait_event(lambda e: e.get("event") == "model.log" and e.get("line") == "program A: shutting down",
                 what="the last line A wrote to the renamed file")
    assert s.find("model_log.reopened")[-1]["rotations"] == 1
    assert not any("stale" in line or line.startswith("RuntimeError") for line in model_lines(s))
    assert [e["to"] for e in s.find("state")] == ["loading", "warming", "ready"]  # never `failed`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.log", "model.log.old"]  # nothing else moved
    assert s.http.get("/ready").status_code == 200
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0


@pytest.mark.skipif(
    not hasattr(Lifecycle, "on_history"),
    reason="the lifecycle does not yet pass `on_history` to tail.follow (history_load_hint), so a load line "
           "printed before shepherd started is not seen; with LOAD_LINE_GRACE > 0 it still becomes ready "
           "on its health check after the grace",
)
def test_a_server_that_loaded_before_shepherd_started_becomes_ready(
    shepherds: list[Shepherd], servers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    log = tmp_path / "model.log"
    log.write_bytes(LAST_BOOT)  # an earlier boot that ended in an error...
    with open(log, "ab", buffering=0) as out:
        model_port = free_port()
        start_server(servers, model_port, out)  # ...then this boot's server, loaded before shepherd
        wait_until(lambda: b"serving on http://127.0.0.1" in log.read_bytes(), what="the server to load")
        s = Shepherd(["--backend", "demo"], env={**ENV, "MODEL_LOG": str(log)}, model_port=model_port)
        shepherds.append(s)
        s.wait_state("ready", timeout=15)
    assert [e["to"] for e in s.find("state")] == ["loading", "warming", "ready"]
    assert not s.find("model.load_line_missing")
    s.signal(signal.SIGTERM)
    assert s.wait_exit() == 0
