"""Proxy overhead benchmark: direct vs. through shepherd vs. through Vast's own worker, alternating.

This script owns nothing the product runs. It starts a fast upstream (nginx answering `/generate`
from memory, and proxying `/generate_stream` to a tiny timed SSE server in this file), then
shepherd (`entrypoint.py --backend demo --unsecured`, attach mode) and, when the `vastai` package
can be found, Vast's worker (`vastai.serverless.server` with UNSECURED=true, driven by a small
worker script written at run time into a temp dir). In rounds, alternating the targets (their
order rotates each round), it measures:

- sequential latency over one keep-alive connection: p50 / p99 added over direct;
- req/s at 8 and at 64 connections (wrk, POST with a Vast envelope body);
- the proxy process's CPU time per request over the wrk phases (psutil user + system);
- N concurrent SSE streams x M events (fixed interval): wall time vs. direct and inter-arrival
  jitter (p99 of |gap - interval|);

and prints one table (median over rounds; added latency and SSE wall are taken against direct in
the same round) plus the shepherd/Vast ratios and the targets of the issue.

By default the proxies are pinned to the last CPU and everything else (nginx, the SSE server, wrk
and this script's clients) to the other CPUs, so a proxy has one core to itself, as in production
where a single-threaded proxy can use one core at most. `--no-pin` turns that off.

Run: `python bench/proxy.py` (about 2.5 minutes) or `python bench/proxy.py --quick` (about 1 minute).
Needs `nginx` and `wrk` on PATH (`apt-get install -y nginx wrk`). Vast's worker: `vastai` importable
by this interpreter, or `--vast-python PATH` / `VAST_PYTHON` naming another venv's python (see
bench/README.md). `--profile DIR` also samples shepherd with py-spy under load and prints its hot
spots.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOAD_LINE = "demo: model loaded, serving on 127.0.0.1"

# The body every target gets: a Vast envelope (unsecured, so the signature is not checked). Direct
# (nginx) ignores it; shepherd parses it and forwards the payload; Vast's worker does the same.
PAYLOAD = {"inputs": "alpha bravo charlie delta echo foxtrot golf hotel india juliet " * 3,
           "parameters": {"max_new_tokens": 32}}
BODY = json.dumps({
    "auth_data": {"cost": "32", "endpoint": "bench", "reqnum": 1, "request_idx": 1,
                  "signature": "x", "url": "http://127.0.0.1/"},
    "payload": PAYLOAD,
}, separators=(",", ":")).encode()

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /generate {{ return 200 '{{"generated_text":"ok"}}'; }}
        location = /health {{ return 200 '{{"status":"ok"}}'; }}
        location = /generate_stream {{
            proxy_pass http://127.0.0.1:{sse_port};
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
        # Vast's worker reports to REPORT_ADDR (/worker_status/, /delete_requests/, /pubkey/).
        location / {{ return 200 '{{}}'; }}
    }}
}}
"""

# Written at run time into a temp dir and run by the vastai interpreter: a minimal worker for the
# same two routes, configured the way Vast's examples do (parallel requests, log-line readiness).
VAST_WORKER = """\
import json, os
from vastai.serverless.server.worker import (
    BenchmarkConfig, HandlerConfig, LogActionConfig, Worker, WorkerConfig)

payload = json.loads(os.environ["BENCH_PAYLOAD"])
Worker(WorkerConfig(
    model_server_url="http://127.0.0.1",
    model_server_port=int(os.environ["BENCH_UPSTREAM_PORT"]),
    model_log_file=os.environ["BENCH_MODEL_LOG"],
    model_healthcheck_url="/health",
    handlers=[
        HandlerConfig(route="/generate", allow_parallel_requests=True, max_queue_time=None,
                      benchmark_config=BenchmarkConfig(dataset=[payload], runs=1, concurrency=1)),
        HandlerConfig(route="/generate_stream", allow_parallel_requests=True, max_queue_time=None),
    ],
    log_action_config=LogActionConfig(on_load=["model loaded, serving on"]),
)).run()
"""


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 response parsing (incremental: content-length, chunked, or until close).


class ResponseParser:
    """Feed bytes; `feed` returns the body bytes decoded so far. `done` once the body is complete."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.head_done = False
        self.done = False
        self.mode = ""  # "length", "chunked", "close"
        self.left = 0  # bytes left in the body (length) or in the current chunk (chunked)
        self.need_crlf = False
        self.close = False  # the server said `Connection: close`

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return b""
            lines = bytes(self.buf[:end]).split(b"\r\n")
            del self.buf[:end + 4]
            self.status = int(lines[0].split(b" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            self.head_done = True
            self.close = b"close" in headers.get(b"connection", b"")
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self.mode = "chunked"
            elif b"content-length" in headers:
                self.mode, self.left = "length", int(headers[b"content-length"])
                self.done = self.left == 0
            else:
                self.mode = "close"
        if self.mode == "length":
            out = bytes(self.buf[:self.left])
            del self.buf[:self.left]
            self.left -= len(out)
            self.done = self.left == 0
            return out
        if self.mode == "close":
            out = bytes(self.buf)
            self.buf.clear()
            return out
        return self._dechunk()

    def _dechunk(self) -> bytes:
        out: list[bytes] = []
        buf = self.buf
        while not self.done:
            if self.left:
                piece = bytes(buf[:self.left])
                del buf[:self.left]
                self.left -= len(piece)
                out.append(piece)
                if self.left:
                    break
                self.need_crlf = True
            if self.need_crlf:
                if len(buf) < 2:
                    break
                del buf[:2]
                self.need_crlf = False
            eol = buf.find(b"\r\n")
            if eol < 0:
                break
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            del buf[:eol + 2]
            if size == 0:
                self.done = True  # trailers, if any, are ignored (none of these servers send them)
            self.left = size
        return b"".join(out)


def request_bytes(path: str, port: int, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ---------------------------------------------------------------------------------------------
# The timed SSE upstream (run as `--serve-sse PORT` in a child process).


def serve_sse(port: int, events: int, interval: float) -> None:
    """Every `interval` one tick writes the next event to every open stream (one write each); a
    stream closes after `events` events. Close-delimited HTTP/1.1 (nginx re-frames it)."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Connection: close\r\n\r\n")
    event = b'data: {"token":{"id":42,"text":" ok","logprob":-0.1,"special":false},"generated_text":null}\n\n'
    streams: dict[asyncio.Transport, int] = {}

    class Stream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            if self.buf is None:
                return
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = re.search(rb"(?i)content-length:\s*(\d+)", self.buf[:end])
            if len(self.buf) - end - 4 < (int(m.group(1)) if m else 0):
                return
            self.buf = None
            self.transport.write(head)
            streams[self.transport] = 0

        def connection_lost(self, exc: Exception | None) -> None:
            streams.pop(self.transport, None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Stream, "127.0.0.1", port, backlog=1024)
        next_tick = loop.time()

        def tick() -> None:
            nonlocal next_tick
            for transport in list(streams):
                transport.write(event)
                streams[transport] += 1
                if streams[transport] >= events:
                    del streams[transport]
                    transport.close()
            next_tick += interval
            loop.call_at(next_tick, tick)

        loop.call_at(next_tick, tick)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Clients.


def sequential(port: int, path: str, n: int) -> list[float]:
    """`n` requests one after the other on a keep-alive connection; seconds each. A server that
    closes the connection after a response (`Connection: close`, e.g. hypercorn's
    keep_alive_max_requests) gets a new one, outside the timing."""
    req = request_bytes(path, port, BODY)
    out = []
    sock = None
    try:
        for _ in range(n):
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = ResponseParser()
            t0 = time.perf_counter()
            sock.sendall(req)
            while not parser.done:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError(f"port {port}: connection closed mid-response")
                parser.feed(data)
            out.append(time.perf_counter() - t0)
            if parser.status != 200:
                raise RuntimeError(f"port {port}: status {parser.status}")
            if parser.close:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    return out


@dataclass
class SSEResult:
    wall: float
    gaps: list[float]
    events: list[int]
    statuses: list[int]


async def _sse(port: int, streams: int) -> SSEResult:
    loop = asyncio.get_running_loop()
    req = request_bytes("/generate_stream", port, BODY)

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = ResponseParser()
            self.times: list[float] = []
            self.tail = b""
            self.finished = loop.create_future()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            now = time.perf_counter()
            body = self.tail + self.parser.feed(data)
            self.times.extend([now] * body.count(b"\n\n"))
            self.tail = body[-1:]
            if self.parser.done and not self.finished.done():
                self.finished.set_result(now)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.finished.done():
                self.finished.set_result(time.perf_counter())

    clients = []
    for _ in range(streams):
        _, client = await loop.create_connection(Client, "127.0.0.1", port)
        clients.append(client)
    start = time.perf_counter()
    for client in clients:
        client.transport.write(req)
    ends = await asyncio.wait_for(asyncio.gather(*(c.finished for c in clients)), timeout=120)
    gaps = []
    for client in clients:
        gaps.extend(b - a for a, b in zip(client.times, client.times[1:]))
    return SSEResult(max(ends) - start, gaps, [len(c.times) for c in clients], [c.parser.status for c in clients])


def sse(port: int, streams: int) -> SSEResult:
    return asyncio.run(_sse(port, streams))


@dataclass
class WrkResult:
    rps: float
    requests: int
    bad: int  # non-2xx responses plus socket errors


def wrk(port: int, conns: int, seconds: float, script: Path) -> WrkResult:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
         f"http://127.0.0.1:{port}/generate"],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        bad += sum(int(x) for x in errors.groups())
    return WrkResult(rps, requests, bad)


# ---------------------------------------------------------------------------------------------
# Processes.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what}: not ready after {timeout} s\n{tail}")


def http_status(port: int, method: str, path: str, body: bytes = b"") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        parser = ResponseParser()
        while not parser.head_done:
            data = sock.recv(65536)
            if not data:
                return 0
            parser.feed(data)
        return parser.status


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], log: Path, cpus: set[int] | None = None, **kw) -> subprocess.Popen:
        handle = open(log, "wb")
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        proc = subprocess.Popen(list(args), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=preexec, start_new_session=True, **kw)
        handle.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: only what it started
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None  # the proxy process whose CPU is measured

    def cpu(self) -> float:
        import psutil

        if self.proc is None:
            return 0.0
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system


def find_vast_python(arg: str | None) -> str | None:
    candidates = [c for c in (arg, os.environ.get("VAST_PYTHON"), sys.executable) if c]
    for python in candidates:
        ok = subprocess.run([python, "-c", "import vastai.serverless.server.worker"],
                            capture_output=True).returncode == 0
        if ok:
            return python
    return None


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class Samples:
    seq_p50: list[float] = field(default_factory=list)
    seq_p99: list[float] = field(default_factory=list)
    rps8: list[float] = field(default_factory=list)
    rps64: list[float] = field(default_factory=list)
    cpu8: list[float] = field(default_factory=list)  # CPU ms per request, per round
    cpu64: list[float] = field(default_factory=list)
    cpu_all: list[float] = field(default_factory=list)  # both wrk phases of a round together
    sse_wall: list[float] = field(default_factory=list)
    sse_jitter: list[float] = field(default_factory=list)
    bad: int = 0


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer rounds, shorter phases")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 2)")
    ap.add_argument("--seconds", type=int, help="seconds per wrk phase (default 5, quick 2)")
    ap.add_argument("--seq", type=int, help="sequential requests per target per round (default 1500, quick 300)")
    ap.add_argument("--sse-streams", type=int, default=64)
    ap.add_argument("--sse-events", type=int, default=200)
    ap.add_argument("--sse-interval-ms", type=float, default=5.0)
    ap.add_argument("--vast-python", help="python with `vastai` installed (else VAST_PYTHON, else this one)")
    ap.add_argument("--no-vast", action="store_true", help="skip Vast's worker")
    ap.add_argument("--no-pin", action="store_true", help="do not pin proxies and load to separate CPUs")
    ap.add_argument("--access-log", choices=("info", "debug", "off"), default="info",
                    help="shepherd's ACCESS_LOG (default info, as in production)")
    ap.add_argument("--profile", metavar="DIR",
                    help="afterwards, sample a fresh shepherd with py-spy under wrk -c8 and -c64 and print hot spots")
    ap.add_argument("--shepherd-b", metavar="ENTRYPOINT",
                    help="also run another shepherd (e.g. a git worktree's entrypoint.py) as target `shepherd-b`")
    ap.add_argument("--serve-sse", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve_sse:
        serve_sse(args.serve_sse, args.sse_events, args.sse_interval_ms / 1000)
        return 0
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (2 if args.quick else 5)
    nseq = args.seq or (300 if args.quick else 1500)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: `{tool}` not found (apt-get install -y nginx wrk)", file=sys.stderr)
            return 2
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"

    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = load_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        proxy_cpus, load_cpus = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, load_cpus)  # nginx, the SSE server and wrk inherit it

    vast_python = None if args.no_vast else find_vast_python(args.vast_python)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="shepherd-bench-"))
    try:
        return _run(args, procs, tmp, nginx_bin, vast_python, proxy_cpus, load_cpus, rounds, seconds, nseq)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, procs: Processes, tmp: Path, nginx_bin: str, vast_python: str | None,
         proxy_cpus: set[int] | None, load_cpus: set[int] | None, rounds: int, seconds: float, nseq: int) -> int:
    started = time.monotonic()
    load_before = os.getloadavg()
    up, sse_port = free_port(), free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=up, sse_port=sse_port))
    script = tmp / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{BODY.decode()}]]\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    procs.start([sys.executable, __file__, "--serve-sse", str(sse_port), "--sse-events", str(args.sse_events),
                 "--sse-interval-ms", str(args.sse_interval_ms)], tmp / "sse.log")
    nginx = procs.start([nginx_bin, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], tmp / "nginx.log")
    wait_until(lambda: http_status(up, "GET", "/health") == 200, "nginx", 10, nginx, tmp / "nginx-error.log")
    wait_until(lambda: socket.create_connection(("127.0.0.1", sse_port), timeout=1).close() is None, "sse", 10)

    targets = [Target("direct", up)]

    targets.append(_start_shepherd(procs, tmp, "shepherd", str(REPO / "entrypoint.py"), up, args.access_log,
                                   proxy_cpus))
    if args.shepherd_b:
        targets.append(_start_shepherd(procs, tmp, "shepherd-b", args.shepherd_b, up, args.access_log, proxy_cpus))

    vast_note = "Vast's worker: skipped (--no-vast)" if args.no_vast else ""
    if vast_python:
        port, http_port = free_port(), free_port()
        vdir = tmp / "vast"
        vdir.mkdir()
        (vdir / "worker.py").write_text(VAST_WORKER)
        (vdir / "model.log").write_text(LOAD_LINE + "\n")  # Vast's tail reads the file from its start
        venv = dict(os.environ, WORKER_PORT=str(port), WORKER_HTTP_PORT=str(http_port), UNSECURED="true",
                    CONTAINER_ID="1", REPORT_ADDR=f"http://127.0.0.1:{up}", PUBLIC_IPADDR="127.0.0.1",
                    MASTER_TOKEN="bench", USE_SSL="false", **{f"VAST_TCP_PORT_{port}": str(port)},
                    BENCH_UPSTREAM_PORT=str(up), BENCH_MODEL_LOG=str(vdir / "model.log"),
                    BENCH_PAYLOAD=json.dumps(PAYLOAD))
        vast = procs.start([vast_python, str(vdir / "worker.py")], tmp / "vast.log", proxy_cpus, cwd=vdir, env=venv)
        wait_until(lambda: http_status(port, "POST", "/generate", BODY) == 200, "vast worker", 60, vast,
                   tmp / "vast.log")
        targets.append(Target("vast", port, vast))
        vast_note = f"Vast's worker: vastai {_vast_version(vast_python)} ({vast_python})"
    elif not args.no_vast:
        vast_note = ("Vast's worker: n/a (`vastai` not importable; pip install vastai into a venv and pass "
                     "--vast-python or VAST_PYTHON)")

    # Warm-up: pools filled, code paths hot.
    for t in targets:
        sequential(t.port, "/generate", 200)
        wrk(t.port, 64, 1, script)
        sse(t.port, 8)

    interval = args.sse_interval_ms / 1000
    samples = {t.name: Samples() for t in targets}
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for t in order:
            lat = sequential(t.port, "/generate", nseq)
            samples[t.name].seq_p50.append(pct(lat, 0.50))
            samples[t.name].seq_p99.append(pct(lat, 0.99))
        spent = {t.name: [0.0, 0] for t in targets}  # CPU seconds, requests over both wrk phases
        for conns in (8, 64):
            for t in order:
                cpu0 = t.cpu()
                res = wrk(t.port, conns, seconds, script)
                cpu = t.cpu() - cpu0
                s = samples[t.name]
                (s.rps8 if conns == 8 else s.rps64).append(res.rps)
                (s.cpu8 if conns == 8 else s.cpu64).append(cpu * 1000 / max(res.requests, 1))
                spent[t.name][0] += cpu
                spent[t.name][1] += res.requests
                s.bad += res.bad
        for t in targets:
            samples[t.name].cpu_all.append(spent[t.name][0] * 1000 / max(spent[t.name][1], 1))
        for t in order:
            res = sse(t.port, args.sse_streams)
            s = samples[t.name]
            s.sse_wall.append(res.wall)
            s.sse_jitter.append(pct([abs(g - interval) for g in res.gaps], 0.99) if res.gaps else float("nan"))
            s.bad += sum(1 for e in res.events if e != args.sse_events) + sum(1 for st in res.statuses if st != 200)
        print(f"round {r + 1}/{rounds} done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    _report(args, targets, samples, rounds, seconds, nseq, proxy_cpus, load_cpus, vast_note, load_before,
            time.monotonic() - started)

    if args.profile:
        for t in targets:
            if t.proc is not None:
                procs.stop(t.proc)
        fresh = _start_shepherd(procs, tmp, "shepherd-profiled", str(REPO / "entrypoint.py"), up, args.access_log,
                                proxy_cpus)
        sequential(fresh.port, "/generate", 200)
        _profile(Path(args.profile), fresh, script, 10.0)
    return 0


def _start_shepherd(procs: Processes, tmp: Path, name: str, entry: str, upstream: int, access_log: str,
                    cpus: set[int] | None) -> Target:
    """shepherd in attach mode on the demo backend's routes. Its log is set aside at start, so the
    load line is written once it listens; ready once `/ready` answers 200."""
    port = free_port()
    model_log = tmp / f"{name}-model.log"
    log = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("REPORT_ADDR", "CONTAINER_ID", "MODEL_CMD")}
    env["ACCESS_LOG"] = access_log
    proc = procs.start(
        [sys.executable, entry, "--backend", "demo", "--unsecured",
         "--model-server-url", f"http://127.0.0.1:{upstream}", "--model-log", str(model_log),
         "--host", "127.0.0.1", "--port", str(port), "--skip-benchmark", "--max-perf", "1000000"],
        log, cpus, cwd=Path(entry).resolve().parent, env=env,
    )
    wait_until(lambda: http_status(port, "GET", "/health") == 200, name, 30, proc, log)
    with open(model_log, "a") as f:
        f.write(LOAD_LINE + "\n")
    wait_until(lambda: http_status(port, "GET", "/ready") == 200, f"{name} ready", 30, proc, log)
    return Target(name, port, proc)


def _vast_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vastai'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _report(args, targets, samples, rounds, seconds, nseq, proxy_cpus, load_cpus, vast_note, load_before,
            took) -> None:
    med = statistics.median
    d = samples["direct"]
    rows = []
    summary: dict[str, dict[str, float | None]] = {}
    for t in targets:
        s = samples[t.name]
        direct = t.name == "direct"
        # per round: target minus direct of the same round, then the median over rounds
        p50 = None if direct else med(a - b for a, b in zip(s.seq_p50, d.seq_p50)) * 1000
        p99 = None if direct else med(a - b for a, b in zip(s.seq_p99, d.seq_p99)) * 1000
        cpu = None if direct else med(s.cpu_all)
        cpu8 = None if direct else med(s.cpu8)
        cpu64 = None if direct else med(s.cpu64)
        wall = med(a / b for a, b in zip(s.sse_wall, d.sse_wall))
        summary[t.name] = dict(p50=p50, p99=p99, rps8=med(s.rps8), rps64=med(s.rps64), cpu=cpu, cpu8=cpu8,
                               cpu64=cpu64, wall=wall, jitter=med(s.sse_jitter) * 1000)
        x = summary[t.name]
        rows.append([
            t.name,
            f"{med(s.seq_p50) * 1000:.3f}",
            fmt(p50, "+.3f"), fmt(p99, "+.3f"),
            f"{x['rps8']:,.0f}", f"{x['rps64']:,.0f}",
            "-" if direct else f"{cpu:.3f} ({cpu8:.3f}/{cpu64:.3f})",
            f"{wall:.3f}x ({med(s.sse_wall):.2f} s)",
            f"{x['jitter']:.2f}",
            str(s.bad),
        ])
    header = ["target", "p50 ms", "p50 added ms", "p99 added ms", "req/s @8", "req/s @64",
              "CPU ms/req (@8/@64)", "SSE wall vs direct", "SSE jitter p99 ms", "errors"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print()
    print(f"shepherd proxy bench: {rounds} rounds alternating {', '.join(t.name for t in targets)}; "
          f"sequential {nseq} req/target/round; wrk -t1 {seconds:g} s @8 and @64 connections; "
          f"SSE {args.sse_streams} streams x {args.sse_events} events every {args.sse_interval_ms:g} ms; "
          f"shepherd ACCESS_LOG={args.access_log}")
    pin = (f"proxies pinned to CPU {sorted(proxy_cpus)}, upstream + load generators to CPU {sorted(load_cpus)}"
           if proxy_cpus else "not pinned")
    print(f"machine: {os.cpu_count()} CPUs, {pin}; load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}; took {took:.0f} s")
    print(vast_note)
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()
    va = summary.get("vast")
    for name in (t.name for t in targets if t.name.startswith("shepherd")):
        sh = summary[name]
        if va:
            print(f"{name} / Vast (>= 1.0: {name} at least as good):")
            print(f"  req/s @8: {sh['rps8'] / va['rps8']:.2f}    req/s @64: {sh['rps64'] / va['rps64']:.2f}    "
                  f"CPU per request (Vast / {name}): {va['cpu'] / sh['cpu']:.2f} "
                  f"(@8 {va['cpu8'] / sh['cpu8']:.2f}, @64 {va['cpu64'] / sh['cpu64']:.2f})")
            print(f"  added p50 (Vast / {name}): {va['p50'] / sh['p50']:.2f}    "
                  f"SSE wall (Vast / {name}): {va['wall'] / sh['wall']:.2f}")
        checks = [("added p50 <= 1 ms", sh["p50"] <= 1.0), ("SSE wall <= 1.05x direct", sh["wall"] <= 1.05)]
        if va:
            checks += [("req/s @8 >= Vast", sh["rps8"] >= va["rps8"]),
                       ("req/s @64 >= Vast", sh["rps64"] >= va["rps64"]),
                       ("CPU/req <= Vast", sh["cpu"] <= va["cpu"])]
        print(f"{name} targets: " + ", ".join(f"{what}: {'PASS' if ok else 'FAIL'}" for what, ok in checks))
    print(json.dumps({"summary": summary}, default=lambda v: None), file=sys.stderr)


def _group(frame: str) -> str:
    """The package (or shepherd module) a py-spy frame `func (path:line)` belongs to."""
    path = frame.rpartition("(")[2].rpartition(":")[0]
    for mine in ("proxy/", "supervisor/", "backends/", "probes/"):
        if path.startswith(mine):
            return path
    head = path.split("/")[0]
    return head if head.isidentifier() and "/" in path else (head or "?")


def _profile(out: Path, target: Target, script: Path, seconds: float) -> None:
    """py-spy under wrk at 8 and at 64 connections: collapsed stacks, and the top frames by own
    samples, by total samples, and own samples by package."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    for conns in (8, 64):
        raw = out / f"shepherd-c{conns}.collapsed"
        # Blocking sampling (py-spy pauses the process for each sample): slower under load, but whole
        # stacks; --nonblocking gives torn coroutine stacks under this much churn.
        rec = subprocess.Popen([spy, "record", "--pid", str(target.proc.pid), "--rate", "200",
                                "--duration", str(int(seconds)), "--format", "raw", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        res = wrk(target.port, conns, seconds - 2, script)
        rec.wait()
        own: collections.Counter[str] = collections.Counter()
        total: collections.Counter[str] = collections.Counter()
        groups: collections.Counter[str] = collections.Counter()
        samples = 0
        for text in raw.read_text().splitlines():
            stack, _, count = text.rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            if "WorkerThread._work" in frames[-1] or frames[-1].startswith(("Condition.wait", "Lock.acquire")):
                continue  # trio's idle worker thread (the log follower's): py-spy counts its wait as busy
            samples += n
            own[frames[-1]] += n
            groups[_group(frames[-1])] += n
            for func in {f.rpartition(":")[0] + ")" for f in frames}:  # per function, lines merged
                total[func] += n
        samples = max(samples, 1)
        print(f"\nprofile @{conns} connections ({res.rps:,.0f} req/s while sampled): {samples} samples of "
              f"shepherd (pid {target.proc.pid}); collapsed stacks in {raw} (flamegraph.pl / speedscope)")
        print("  own samples by package:  " + ", ".join(
            f"{name} {100 * n / samples:.1f}%" for name, n in groups.most_common(14)))
        print("  top own:")
        for frame, n in own.most_common(20):
            print(f"    {100 * n / samples:5.1f}%  {frame}")
        print("  top total, per function (shepherd, hypercorn, httpcore, h11, structlog):")
        shown = 0
        for frame, n in total.most_common(400):
            if any(k in frame for k in ("proxy/", "hypercorn/", "httpcore/", "h11/", "structlog/", "supervisor/")):
                print(f"    {100 * n / samples:5.1f}%  {frame}")
                shown += 1
                if shown == 40:
                    break


if __name__ == "__main__":
    sys.exit(main())
