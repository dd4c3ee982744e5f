"""Tests of the TGI emulator (tests/emulators/tgi.py), run as a real child process.

They pin what shepherd's tgi backend and end-to-end tests rely on: TGI v3.3.7's JSON log lines in the
real order, the router's `Connected` line with v3.3.7's fields (`"target":"text_generation_router::server"`,
the module path that a substring of TGI 2.0's line does not match) printed before the port listens,
TGI's routes and SSE event shape, /metrics in-flight gauge, the launcher's shutdown on SIGTERM, and the
real failure endings (`Error: ShardCannotStart`, ...).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "emulators" / "tgi.py"
# The router's line as v3.3.7 prints it (router/src/server.rs:2302, tracing JSON, event flattened).
CONNECTED = '"message":"Connected","target":"text_generation_router::server"'
MODEL = "org/tiny-model"
DEADLINE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE_S, what: str = "condition") -> None:
    """Poll until `condition()` holds; fail the test at the deadline (never a sleep-to-pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


class Child:
    """A child process in its own session whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_")}
        child_env.pop("PYTHONUNBUFFERED", None)  # the emulator must flush each line itself
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.raw: dict[str, list[bytes]] = {"out": [], "err": []}
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: Any, name: str) -> None:
        for line in iter(pipe.readline, b""):
            with self._cond:
                self.raw[name].append(line)
                self._cond.notify_all()

    def lines(self, stream: str = "out") -> list[str]:
        with self._cond:
            return [b.decode("utf-8", "replace").rstrip("\n") for b in self.raw[stream]]

    def wait_line(self, needle: str, stream: str = "out", timeout: float = DEADLINE_S) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.raw[stream]:
                    text = line.decode("utf-8", "replace").rstrip("\n")
                    if needle in text:
                        return text
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {stream} line with {needle!r}; got {self.lines(stream)}")
                self._cond.wait(remaining)

    def finish(self, timeout: float = 5.0) -> int:
        """Wait for exit and for both pipes to be read to the end."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return code

    def kill(self) -> None:
        """SIGKILL the child, its process group, and every descendant (other sessions too)."""
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in descendants:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=2)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(*args: str, env: dict[str, str] | None = None, module: bool = False) -> Child:
        head = [sys.executable, "-m", "tests.emulators.tgi"] if module else [sys.executable, str(SCRIPT)]
        child = Child([*head, *args], env)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def launch(spawn: Callable[..., Child], port: int, env: dict[str, str] | None = None, **kw: Any) -> Child:
    return spawn(
        "--model-id", MODEL, "--port", str(port), "--hostname", "127.0.0.1", "--json-output",
        "--num-shard", "1",  # an unknown launcher flag, accepted and ignored like the real ones
        env=env, **kw,
    )


def ready_tgi(spawn: Callable[..., Child], token_interval: float = 0.001) -> tuple[Child, str]:
    port = free_port()
    child = launch(spawn, port, {"TGI_LOAD_DELAY": "0", "TGI_TOKEN_INTERVAL": str(token_interval)})
    child.wait_line(CONNECTED)
    url = f"http://127.0.0.1:{port}"
    # Connected precedes listening, as in real TGI: probe /health like a supervisor must.
    wait_for(lambda: not refused(port), what="TGI listening")
    return child, url


def message(record: dict[str, Any]) -> str:
    """The launcher nests the message under `fields`; the router flattens it."""
    return str(record.get("fields", {}).get("message", record.get("message")))


# -- startup -------------------------------------------------------------------------------------


def test_startup_json_lines_in_order_connected_before_listening(
    spawn: Callable[..., Child], client: httpx.Client
) -> None:
    port = free_port()
    child = launch(spawn, port, {"TGI_LOAD_DELAY": "0.5", "TGI_LISTEN_DELAY": "1.0"}, module=True)
    child.wait_line("Starting shard")
    assert refused(port)  # the shard is still loading (0.3 s of margin)

    connected = child.wait_line(CONNECTED)
    assert refused(port)  # Connected is logged before the listener (1 s of margin)

    records = [json.loads(line) for line in child.lines()]
    assert all(r["level"] == "INFO" and r["timestamp"].endswith("Z") for r in records)
    messages = [message(r) for r in records]
    expected = [
        'Args {\n    model_id: "org/tiny-model",\n',  # `{:#?}`: one field a line
        "Using attention flashinfer - Prefix caching true",
        "Default `max_batch_prefill_tokens` to 4096",
        "Using default cuda graphs [1, 2, 4, 8, 16, 32]",
        f"Starting check and download process for {MODEL}",
        "Download file: ",
        f"Successfully downloaded weights for {MODEL}",
        "Starting shard",
        "Waiting for shard to be ready...",
        "Shard ready in ",
        "Starting Webserver",
        "Warming up model",
        "Connected",
    ]
    positions = [next(i for i, m in enumerate(messages) if m.startswith(e)) for e in expected]
    assert positions == sorted(positions), messages
    assert messages[-1] == "Connected"

    by_message = {message(r): r for r in records}
    assert by_message["Starting shard"]["span"] == {"rank": 0, "name": "shard-manager"}
    assert by_message["Starting shard"]["target"] == "text_generation_launcher"
    # The router flattens its event fields and logs file and line; the target is the module path.
    record = json.loads(connected)
    assert {k: v for k, v in record.items() if k != "timestamp"} == {
        "level": "INFO",
        "message": "Connected",
        "target": "text_generation_router::server",
        "filename": "router/src/server.rs",
        "line_number": 2302,
    }
    assert list(record) == ["timestamp", "level", "message", "target", "filename", "line_number"]  # tracing's order
    warming = by_message["Warming up model"]
    assert (warming["target"], warming["filename"]) == ("text_generation_router_v3", "backends/v3/src/lib.rs")
    first = child.lines()[0]
    assert first.startswith('{"timestamp":"')
    assert '"level":"INFO","fields":{"message":"Args {\\n    model_id: \\"org/tiny-model\\",\\n' in first

    def healthy() -> bool:
        try:
            r = client.get(f"http://127.0.0.1:{port}/health")
        except httpx.ConnectError:
            return False
        return r.status_code == 200 and r.content == b""

    wait_for(healthy, what="/health 200")


def test_plain_text_logs_without_json_output(spawn: Callable[..., Child]) -> None:
    port = free_port()
    child = spawn("--port", str(port), "--hostname", "127.0.0.1", env={"TGI_LOAD_DELAY": "0"})
    line = child.wait_line("Connected")
    assert line.endswith(" INFO text_generation_router::server: router/src/server.rs:2302: Connected")
    assert not line.startswith("{")
    shard = child.wait_line("Starting shard")
    assert "INFO shard-manager: text_generation_launcher: Starting shard rank=0" in shard


# -- routes --------------------------------------------------------------------------------------


def test_info_generate_and_validation(spawn: Callable[..., Child], client: httpx.Client) -> None:
    child, url = ready_tgi(spawn)
    info = client.get(f"{url}/info").json()
    assert info["model_id"] == MODEL and info["max_total_tokens"] == 4096

    r = client.post(f"{url}/generate", json={"inputs": "hi there", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    assert r.json() == {"generated_text": "tok0 tok1 tok2"}
    assert r.headers["x-generated-tokens"] == "3"
    assert r.headers["x-prompt-tokens"] == "2"
    default = client.post(f"{url}/generate", json={"inputs": "hi"}).json()
    assert default["generated_text"].split() == [f"tok{i}" for i in range(20)]  # documented default: 20
    detailed = client.post(
        f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "details": True}}
    )
    assert detailed.json()["details"]["finish_reason"] == "length"
    assert detailed.json()["details"]["generated_tokens"] == 2

    missing = client.post(f"{url}/generate", json={"parameters": {"max_new_tokens": 3}})
    assert missing.status_code == 422
    assert missing.json()["error_type"] == "validation"
    assert "inputs" in missing.json()["error"]
    zero = client.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert zero.status_code == 422
    assert client.post(f"{url}/generate", content=b"{nope").status_code == 400
    assert client.get(f"{url}/nowhere").status_code == 404

    child.wait_line('"message":"Success","target":"text_generation_router::server"')
    metrics = client.get(f"{url}/metrics").text
    assert "tgi_queue_size 0" in metrics
    assert "tgi_batch_current_size 0" in metrics
    assert "tgi_request_count 6" in metrics
    assert "tgi_request_success 3" in metrics
    assert 'tgi_request_failure{err="validation"} 3' in metrics


def test_compat_route_picks_stream_by_flag(spawn: Callable[..., Child], client: httpx.Client) -> None:
    _child, url = ready_tgi(spawn)
    plain = client.post(f"{url}/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert plain.json() == {"generated_text": "tok0 tok1"}
    streamed = client.post(
        f"{url}/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}, "stream": True}
    )
    assert streamed.headers["content-type"] == "text/event-stream"
    assert streamed.text.count("data:{") == 2


def test_stream_event_shape_one_chunk_per_token(spawn: Callable[..., Child], client: httpx.Client) -> None:
    interval = 0.02
    _child, url = ready_tgi(spawn, token_interval=interval)
    n = 5
    chunks: list[bytes] = []
    arrivals: list[float] = []
    payload = {"inputs": "x", "parameters": {"max_new_tokens": n}}
    with client.stream("POST", f"{url}/generate_stream", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        for chunk in r.iter_raw():
            chunks.append(chunk)
            arrivals.append(time.monotonic())
    assert len(chunks) == n  # one HTTP chunk per token; TGI sends no [DONE] on this route
    assert all(c.startswith(b"data:{") and c.endswith(b"\n\n") for c in chunks)  # no space after data:
    events = [json.loads(c[len(b"data:"):]) for c in chunks]
    assert [e["index"] for e in events] == list(range(1, n + 1))
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    full = "".join(e["token"]["text"] for e in events)
    assert events[-1]["generated_text"] == full == "tok0 tok1 tok2 tok3 tok4"
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": n, "seed": None}
    assert arrivals[-1] - arrivals[0] >= 0.5 * (n - 1) * interval  # spread out, not one blob


def test_metrics_count_in_flight_and_disconnect_frees_the_slot(
    spawn: Callable[..., Child], client: httpx.Client
) -> None:
    _child, url = ready_tgi(spawn, token_interval=0.02)

    def gauge(name: str) -> float:
        for line in client.get(f"{url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} missing")

    with httpx.Client(timeout=5.0) as streamer:
        with streamer.stream(
            "POST", f"{url}/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 4000}}
        ) as r:
            chunks = r.iter_raw()  # keep a reference: a collected iterator closes the stream
            next(chunks)
            assert gauge("tgi_batch_current_size") == 1
            assert gauge("tgi_batch_current_max_tokens") == 4000
    wait_for(lambda: gauge("tgi_batch_current_size") == 0, what="in-flight gauge back to 0")


# -- shutdown and failures -----------------------------------------------------------------------


def test_sigterm_prints_launcher_shutdown_and_exits_0(spawn: Callable[..., Child]) -> None:
    child, _url = ready_tgi(spawn)
    started = time.monotonic()
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 0
    assert time.monotonic() - started < 2.0
    messages = [message(json.loads(line)) for line in child.lines()]
    tail = messages[messages.index("Connected") + 1 :]
    assert [m for m in tail if m != "signal received, starting graceful shutdown"] == [
        "Terminating webserver",
        "Waiting for webserver to gracefully shutdown",
        "webserver terminated",
        "Shutting down shards",
        "Terminating shard",
        "Waiting for shard to gracefully shutdown",
        "shard terminated",
    ]


@pytest.mark.parametrize("failure", ["DownloadError", "ShardCannotStart", "WebserverFailed"])
def test_failures_end_like_the_real_launcher(spawn: Callable[..., Child], failure: str) -> None:
    child = launch(spawn, free_port(), {"TGI_LOAD_DELAY": "0", "TGI_FAIL": failure})
    assert child.finish() == 1
    assert child.lines("err")[-1] == f"Error: {failure}"
    records = [json.loads(line) for line in child.lines()]
    assert any(r["level"] == "ERROR" for r in records)
    assert not any(CONNECTED in line for line in child.lines())


def test_port_in_use_is_a_webserver_failure(spawn: Callable[..., Child]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = launch(spawn, port, {"TGI_LOAD_DELAY": "0"})
        assert child.finish() == 1
    assert child.lines("err")[-1] == "Error: WebserverFailed"
    # v3.3.7's router (router/src/server.rs:2325), then the launcher's reaction.
    bind = json.loads(child.wait_line("Failed to bind to"))
    assert bind["message"] == f"Failed to bind to 127.0.0.1:{port}: Address already in use (os error 98)"
    assert (bind["level"], bind["line_number"]) == ("ERROR", 2325)
    assert "Webserver Crashed" in child.wait_line("Webserver Crashed")


def test_bad_fail_switch_exits_2(spawn: Callable[..., Child]) -> None:
    child = launch(spawn, free_port(), {"TGI_FAIL": "Nope"})
    assert child.finish() == 2
    assert "TGI_FAIL" in child.lines("err")[-1]
