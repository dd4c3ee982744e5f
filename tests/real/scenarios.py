"""The checks every real model server goes through under shepherd, written once.

Each takes a running `Shepherd` (tests/harness.py) in front of a real server and asserts what issue 9
asks of it: completions, a stream and chat through shepherd; the server's own queue in `/status` and
`/metrics`; `kill -9` with requests in flight and arriving, every one answered 200 after the restart;
SIGTERM with exit 0 and no process left. Waits are for conditions with deadlines; the only timed
pauses space out the arrivals after a kill, which is the scenario itself.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import httpx
import psutil

from tests.harness import Shepherd, alive, wait_until

# Real servers on 2 busy cores: vLLM loads in 30-60 s, more with the suite's other work.
READY_TIMEOUT = 300.0
REQUEST_TIMEOUT = 240.0


def client(s: Shepherd) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=REQUEST_TIMEOUT, trust_env=False)


def completion(s: Shepherd, model: str | None, max_tokens: int = 8) -> dict[str, Any]:
    # ignore_eos: random weights may draw the end token at any step; the length must be what was asked.
    body: dict[str, Any] = {"prompt": "hello world, tell me a story", "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True}
    if model:
        body["model"] = model
    with client(s) as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion" and data["usage"]["completion_tokens"] >= 1, data
    return data


def serves_completion_stream_and_chat(s: Shepherd, model: str | None) -> None:
    completion(s, model)
    body: dict[str, Any] = {"prompt": "once upon a time", "max_tokens": 12, "stream": True, "temperature": 0}
    if model:
        body["model"] = model
    chunks: list[dict[str, Any]] = []
    with client(s) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
            if line == "data: [DONE]":
                break
        else:
            raise AssertionError("the stream ended without [DONE]")
    assert len(chunks) >= 2 and all(c["object"] == "text_completion" for c in chunks)
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    if model:
        chat["model"] = model
    with client(s) as http:
        response = http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)


def shows_the_model_queue(s: Shepherd, model: str | None, busy_tokens: int) -> None:
    """While requests run in the server, /status and /metrics show them from its own metrics."""
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                completion(s, model, max_tokens=busy_tokens)
            except (AssertionError, httpx.HTTPError):
                return

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        # A sample in the estimate: read, fresh, and scraped since `ready` (not the benchmark's queue).
        queue = wait_until(
            lambda: (lambda q: q if q and q["in_estimate"] and (q["running"] or 0) + (q["waiting"] or 0) >= 1
                     else None)(s.status()["model_queue"]),
            120, "the model server's own queue to show a running request",
        )
        assert queue["ok"] and queue["note"] == "" and queue["age_s"] < 5 * 0.5, queue
        text = s.http.get("/metrics", headers={"authorization": f"Bearer {s.master_token}"}).text
        running = [line for line in text.splitlines() if line.startswith("shepherd_model_requests_running")]
        assert running and float(running[0].split()[-1]) >= 0.0, running
        assert any(line.startswith("shepherd_model_queue_age_seconds") for line in text.splitlines())
    finally:
        done.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT)


def kill_9_with_requests_in_flight_and_arriving(s: Shepherd, model: str | None, busy_tokens: int) -> None:
    """Two requests in the server when it is killed, three sent 0.05, 0.3 and 1.0 s after: all 200."""
    old = s.model_pid()
    mark = s.mark()
    results: dict[str, int | str] = {}

    def send(name: str, tokens: int) -> None:
        try:
            results[name] = completion(s, model, max_tokens=tokens)["usage"]["completion_tokens"] and 200
        except (AssertionError, httpx.HTTPError) as exc:
            results[name] = f"{type(exc).__name__}: {exc}"[:300]

    in_flight = [threading.Thread(target=send, args=(f"in-flight-{i}", busy_tokens), daemon=True) for i in range(2)]
    for thread in in_flight:
        thread.start()
    wait_until(lambda: s.status()["requests"]["running"] >= 2, 60, "two requests at the model server")
    # Sent, so taken by the server; given a moment to be read there, which is what makes them "in flight".
    wait_until(lambda: (lambda q: q and (q["running"] or 0) >= 1)(s.status()["model_queue"]), 60,
               "the server to say it is running them")
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    arriving = []
    for delay in (0.05, 0.3, 1.0):
        time.sleep(max(0.0, killed + delay - time.monotonic()))
        thread = threading.Thread(target=send, args=(f"after-{delay}s", 4), daemon=True)
        thread.start()
        arriving.append(thread)
    for thread in in_flight + arriving:
        thread.join(REQUEST_TIMEOUT + 10)
    assert not any(t.is_alive() for t in in_flight + arriving), "a request hung"
    assert results == {name: 200 for name in results} and len(results) == 5, results
    s.wait_state("ready", timeout=READY_TIMEOUT, start=mark)
    assert s.model_pid() != old and not alive(old)
    states = [(e["from"], e["to"]) for e in s.find("state")][-5:]
    assert states[0] == ("ready", "restarting") and states[-1] == ("warming", "ready"), states
    assert s.find("proxy.internal_error") == []


def sigterm_exits_0_and_leaves_nothing(s: Shepherd) -> None:
    tree = [p.pid for p in s.tree()]
    assert tree, "no model server process under shepherd"
    s.signal(signal.SIGTERM)
    assert s.wait_exit(120) == 0
    wait_until(lambda: not any(alive(pid) for pid in tree), 30, "every process of the tree to be gone")
    leftovers = [p for p in psutil.process_iter(["pid", "ppid"]) if p.info["pid"] in tree]
    assert not [p for p in leftovers if alive(p.pid)]
