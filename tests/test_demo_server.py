"""Tests of the bundled demo model server (backends/demo_server.py), run as a real child process.

They pin what shepherd's supervisor and end-to-end tests rely on: the exact startup lines, the port
closed until the ready line, the routes, one chunk per streamed token, disconnects reaching the server,
prompt exit on SIGTERM, and each fault switch (crash, hang, ignored SIGTERM, grandchild, flood, bad UTF-8).
"""

from __future__ import annotations

import http.client
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

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "backends" / "demo_server.py"
READY = "demo: model loaded, serving on"
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
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
        child_env.update(env or {})
        # No PYTHONUNBUFFERED: the server must flush each line itself.
        child_env.pop("PYTHONUNBUFFERED", None)
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

    def _read(self, pipe: object, name: str) -> None:
        assert pipe is not None
        for line in iter(pipe.readline, b""):  # type: ignore[attr-defined]
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
        head = [sys.executable, "-m", "backends.demo_server"] if module else [sys.executable, str(SCRIPT)]
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


def ready_server(
    spawn: Callable[..., Child], *extra: str, token_interval: float = 0.001
) -> tuple[Child, str]:
    port = free_port()
    child = spawn("--port", str(port), "--load-delay", "0", "--token-interval", str(token_interval), *extra)
    child.wait_line(READY)
    return child, f"http://127.0.0.1:{port}"


# -- startup -------------------------------------------------------------------------------------


def test_startup_lines_in_order_and_port_closed_until_ready(spawn: Callable[..., Child]) -> None:
    port = free_port()
    child = spawn("--port", str(port), "--load-delay", "1.0")
    child.wait_line("loading model weights 0%")
    # Like vLLM, nothing listens while the model loads (the 1 s load leaves a wide margin).
    assert refused(port)
    assert not any(READY in line for line in child.lines())

    ready = child.wait_line(READY)
    # Bound before the line was printed: the first connection after it must succeed, no retry.
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    assert ready == f"demo: model loaded, serving on http://127.0.0.1:{port}"
    assert child.lines()[:5] == [
        f"demo: starting (pid={child.proc.pid})",
        "demo: loading model weights 0%",
        "demo: loading model weights 50%",
        "demo: loading model weights 100%",
        ready,
    ]
    child.wait_line("demo: GET /health 200")


def test_hang_never_gets_ready_and_never_opens_the_port(spawn: Callable[..., Child]) -> None:
    port = free_port()
    child = spawn("--port", str(port), "--load-delay", "0", "--hang")
    child.wait_line("loading model weights 100%")
    assert refused(port)
    assert not any(READY in line for line in child.lines())
    # Still stoppable while hung.
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(timeout=5) == 0


def test_module_invocation_reads_env_and_flag_wins(spawn: Callable[..., Child]) -> None:
    port = free_port()
    child = spawn(
        "--port",
        str(port),
        module=True,
        env={"DEMO_PORT": "1", "DEMO_LOAD_DELAY": "0", "DEMO_HOST": "127.0.0.1", "DEMO_TOKEN_INTERVAL": "0"},
    )
    assert child.wait_line(READY) == f"demo: model loaded, serving on http://127.0.0.1:{port}"


def test_port_zero_names_the_bound_port(spawn: Callable[..., Child]) -> None:
    child = spawn("--port", "0", "--load-delay", "0")
    url = child.wait_line(READY).split("serving on ", 1)[1]
    assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}


def test_port_in_use_exits_1_with_one_line(spawn: Callable[..., Child]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = spawn("--port", str(port), "--load-delay", "0")
        assert child.proc.wait(timeout=5) == 1
    assert child.wait_line("cannot listen", stream="err").startswith(f"demo: cannot listen on 127.0.0.1:{port}")
    assert not any(READY in line for line in child.lines())


def test_malformed_env_value_exits_2(spawn: Callable[..., Child]) -> None:
    child = spawn(env={"DEMO_LOAD_DELAY": "soon"})
    assert child.proc.wait(timeout=5) == 2
    assert "DEMO_LOAD_DELAY" in child.wait_line("DEMO_LOAD_DELAY", stream="err")


# -- routes --------------------------------------------------------------------------------------


def test_generate_and_errors(spawn: Callable[..., Child], client: httpx.Client) -> None:
    child, url = ready_server(spawn)
    r = client.post(f"{url}/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200
    assert r.json() == {"generated_text": "tok0 tok1 tok2 tok3", "tokens": 4, "pid": child.proc.pid}
    assert client.post(f"{url}/generate", json={"inputs": "hello"}).json()["tokens"] == 16

    bad = client.post(f"{url}/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert "error" in bad.json()
    assert client.post(f"{url}/generate", json={"inputs": 1}).status_code == 400
    assert client.get(f"{url}/nowhere").status_code == 404
    assert client.post(f"{url}/nowhere", json={}).status_code == 404

    stats = client.get(f"{url}/stats").json()
    assert stats == {"requests": 2, "in_flight": 0, "disconnects": 0, "completed": 2, "pid": child.proc.pid}
    child.wait_line("demo: POST /generate 200 tokens=4")


def test_chunked_request_body_is_accepted(spawn: Callable[..., Child], client: httpx.Client) -> None:
    _child, url = ready_server(spawn)

    def body() -> Iterator[bytes]:  # an iterator body makes httpx send Transfer-Encoding: chunked
        yield b'{"inputs": "hi", '
        yield b'"parameters": {"max_new_tokens": 2}}'

    r = client.post(f"{url}/generate", content=body())
    assert r.status_code == 200
    assert r.json()["generated_text"] == "tok0 tok1"


def test_keep_alive_connection_is_reused(spawn: Callable[..., Child]) -> None:
    _child, url = ready_server(spawn)
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        payload = json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 2}})
        conn.request("POST", "/generate_stream", body=payload)
        first = conn.getresponse()
        assert first.status == 200 and not first.will_close
        first.read()
        sock = conn.sock
        conn.request("GET", "/health")
        second = conn.getresponse()
        assert second.status == 200 and not second.will_close
        second.read()
        assert conn.sock is sock  # same TCP connection: the chunked framing ended cleanly
    finally:
        conn.close()


def test_stream_sends_one_chunk_per_token(spawn: Callable[..., Child], client: httpx.Client) -> None:
    interval = 0.02
    _child, url = ready_server(spawn, token_interval=interval)
    n = 10
    chunks: list[bytes] = []
    arrivals: list[float] = []
    payload = {"inputs": "x", "parameters": {"max_new_tokens": n}}
    with client.stream("POST", f"{url}/generate_stream", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        for chunk in r.iter_raw():
            chunks.append(chunk)
            arrivals.append(time.monotonic())
    # Each HTTP chunk is exactly one SSE event: not one buffered blob.
    assert len(chunks) == n + 1
    events = [json.loads(c.decode().removeprefix("data: ")) for c in chunks[:-1]]
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    assert events == [{"token": {"id": i, "text": f"tok{i}"}, "index": i} for i in range(n)]
    assert chunks[-1] == b"data: [DONE]\n\n"
    # Spread over time, not flushed at the end (a loose lower bound only).
    assert arrivals[n - 1] - arrivals[0] >= 0.5 * (n - 1) * interval


def test_stream_client_disconnect_reaches_the_server(
    spawn: Callable[..., Child], client: httpx.Client
) -> None:
    child, url = ready_server(spawn, token_interval=0.02)
    with client.stream(
        "POST", f"{url}/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 4000}}
    ) as r:
        received = 0
        for _chunk in r.iter_raw():
            received += 1
            if received == 3:
                break
    # Leaving the `with` closed the connection mid-stream.
    with httpx.Client(timeout=5.0) as probe:
        wait_for(lambda: probe.get(f"{url}/stats").json()["disconnects"] == 1, what="disconnect counted")
        stats = probe.get(f"{url}/stats").json()
    assert stats["in_flight"] == 0 and stats["completed"] == 0
    assert "client disconnected after" in child.wait_line("client disconnected after")


def test_generate_client_disconnect_during_wait(spawn: Callable[..., Child], client: httpx.Client) -> None:
    _child, url = ready_server(spawn)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 1, "sleep": 60}}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: client.get(f"{url}/stats").json()["in_flight"] == 1, what="request in flight")
    wait_for(lambda: client.get(f"{url}/stats").json()["disconnects"] == 1, what="disconnect counted")
    assert client.get(f"{url}/stats").json()["in_flight"] == 0


def test_health_fails_after_and_error_line(spawn: Callable[..., Child], client: httpx.Client) -> None:
    child, url = ready_server(
        spawn, "--health-fail-after", "1.0", "--error-line", "CUDA error: device-side assert"
    )
    assert client.get(f"{url}/health").status_code == 200
    assert child.wait_line("CUDA error", stream="err") == "CUDA error: device-side assert"

    def unhealthy() -> bool:
        r = client.get(f"{url}/health")
        return r.status_code == 503 and r.json() == {"status": "unhealthy"}

    wait_for(unhealthy, what="/health 503")


# -- signals and faults --------------------------------------------------------------------------


def test_sigterm_exits_promptly_with_a_stream_open(spawn: Callable[..., Child], client: httpx.Client) -> None:
    child, url = ready_server(spawn, token_interval=0.05)
    with client.stream(
        "POST", f"{url}/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 10_000}}
    ) as r:
        chunks = r.iter_raw()  # keep a reference: a collected iterator closes the stream
        next(chunks)
        started = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
    child.wait_line("demo: received SIGTERM, shutting down")


def test_sigint_exits_0(spawn: Callable[..., Child]) -> None:
    child, _url = ready_server(spawn)
    child.proc.send_signal(signal.SIGINT)
    assert child.proc.wait(timeout=5) == 0
    child.wait_line("demo: received SIGINT, shutting down")


def test_ignore_sigterm_survives_sigterm(spawn: Callable[..., Child], client: httpx.Client) -> None:
    child, url = ready_server(spawn, "--ignore-sigterm")
    child.wait_line("demo: ignoring SIGTERM")
    child.proc.send_signal(signal.SIGTERM)
    # An ignored signal is discarded by the kernel at delivery; a short bounded wait shows no exit.
    with pytest.raises(subprocess.TimeoutExpired):
        child.proc.wait(timeout=0.3)
    assert client.get(f"{url}/health").status_code == 200
    child.proc.send_signal(signal.SIGKILL)
    assert child.proc.wait(timeout=5) == -signal.SIGKILL


def test_grandchild_lives_in_another_session_and_is_left_behind(spawn: Callable[..., Child]) -> None:
    child, _url = ready_server(spawn, "--grandchild")
    grandchild_pid = int(child.wait_line("demo: grandchild pid=").rsplit("=", 1)[1])
    grandchild = psutil.Process(grandchild_pid)
    try:
        assert grandchild.ppid() == child.proc.pid
        assert os.getsid(grandchild_pid) != os.getsid(child.proc.pid)
        assert os.getpgid(grandchild_pid) != os.getpgid(child.proc.pid)

        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=5) == 0
        # The demo does not clean up after itself: that is the supervisor's job.
        assert grandchild.is_running() and grandchild.status() != psutil.STATUS_ZOMBIE
    finally:
        try:
            grandchild.kill()
        except psutil.NoSuchProcess:
            pass


def test_flood_prints_exactly_n_lines(spawn: Callable[..., Child], client: httpx.Client) -> None:
    n = 20_000
    child, url = ready_server(spawn, "--flood", str(n))
    child.wait_line(f"flood done {n}")
    flood = [line for line in child.lines() if line.startswith("flood line ")]
    assert flood == [f"flood line {i}" for i in range(n)]
    assert client.get(f"{url}/health").status_code == 200


def test_invalid_utf8_bytes_are_written_raw(spawn: Callable[..., Child]) -> None:
    child, _url = ready_server(spawn, "--invalid-utf8")
    assert b"bad bytes: \xff\xfe\xfa end\n" in child.raw["out"]


def test_crash_after_exits_1_without_traceback(spawn: Callable[..., Child]) -> None:
    child = spawn("--port", str(free_port()), "--load-delay", "0", "--crash-after", "0.2")
    assert child.proc.wait(timeout=5) == 1
    assert child.wait_line("crashing", stream="err") == "demo: crashing on purpose after 0.2 s"
    assert not any("Traceback" in line for line in child.lines("err"))


def test_parameters_out_of_bounds_are_refused(spawn: Callable[..., Child], client: httpx.Client) -> None:
    # A real server bounds generation too: no request may hold a thread for hours.
    _child, url = ready_server(spawn)
    for parameters in ({"max_new_tokens": 10**9}, {"max_new_tokens": -1}, {"sleep": 1e9}, {"sleep": -1}):
        response = client.post(f"{url}/generate", json={"inputs": "x", "parameters": parameters})
        assert response.status_code == 400, parameters
    assert client.post(f"{url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 4096}},
                       timeout=60).status_code == 200
