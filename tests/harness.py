"""End-to-end harness: runs the real `entrypoint.py` as a child process and reads its JSON log.

Every wait is for a condition with a deadline (never a bare sleep), and every process the test
started, with all its descendants, is killed at cleanup even when the test failed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "entrypoint.py"
DEFAULT_TIMEOUT = 30.0
# shepherd runs in a scratch directory: its benchmark cache (shared by the session's tests, so most
# starts skip the benchmark) and anything else it writes stay out of the checkout.
WORKDIR = Path(tempfile.mkdtemp(prefix="shepherd-e2e-"))

Event = dict[str, Any]


TEST_MASTER_TOKEN = "test-master-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "MODEL_", "REPORT_", "CONTAINER_"))}
    env.update({"LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


class Shepherd:
    """One shepherd process. `events` holds its parsed JSON log lines, in order."""

    def __init__(self, args: Iterable[str] = (), env: Mapping[str, str | None] | None = None, port: int | None = None,
                 model_port: int | None = None, nofile: int | None = None) -> None:
        self.port = port or free_port()
        self.model_port = model_port or free_port()
        full_env = base_env(
            WORKER_PORT=str(self.port), WORKER_HOST="127.0.0.1",
            MODEL_SERVER_URL=f"http://127.0.0.1:{self.model_port}", UNSECURED="true",
            DEMO_LOAD_DELAY="0.2", HEALTH_INTERVAL="0.5",
            # Plain HTTP unless a test asks for TLS: reporting to Vast turns it on by default.
            USE_SSL="false",
            # In secured mode /status needs it on the public port (SECURITY.md); `status()` sends it.
            MASTER_TOKEN=TEST_MASTER_TOKEN,
        )
        full_env.update(env or {})
        full_env = {k: v for k, v in full_env.items() if v is not None}  # None: leave the variable unset
        self.master_token = full_env.get("MASTER_TOKEN", "")

        def limit_descriptors() -> None:  # the soft *and* hard limit, so shepherd cannot raise it
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, str(ENTRYPOINT), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=str(WORKDIR), start_new_session=True,
            preexec_fn=limit_descriptors if nofile is not None else None,
        )
        self.events: list[Event] = []
        self.raw_stdout: list[bytes] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._known_pids: set[int] = set()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10.0, trust_env=False)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "non-json", "raw": raw.decode("utf-8", "replace")}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode("utf-8", "replace"))

    # -- waiting

    def wait_event(self, predicate: Callable[[Event], bool], timeout: float = DEFAULT_TIMEOUT,
                   what: str = "event", start: int = 0) -> Event:
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and index >= len(self.events)):
                    if self.proc.poll() is not None:
                        # the reader may still be catching up with the last lines
                        self._cond.wait(0.2)
                        if index < len(self.events):
                            continue
                    tail = "\n".join(json.dumps(e)[:300] for e in self.events[-15:])
                    raise AssertionError(f"no {what} within {timeout}s (exit={self.proc.poll()}); last events:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    def wait_state(self, state: str, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> Event:
        return self.wait_event(lambda e: e.get("event") == "state" and e.get("to") == state, timeout,
                               f"state {state}", start)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def find(self, name: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def status(self) -> dict[str, Any]:
        return self.http.get("/status", headers={"authorization": f"Bearer {self.master_token}"}).json()

    def model_pid(self) -> int:
        pid = self.status()["model"]["pid"]
        assert pid, "no model pid"
        self._known_pids.add(pid)
        return pid

    # -- stopping

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tail = "\n".join(json.dumps(e)[:300] for e in self.events[-15:])
            raise AssertionError(f"shepherd did not exit within {timeout}s; last events:\n{tail}") from None

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        for pid in self._known_pids:
            kill_tree(pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
