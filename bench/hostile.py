"""Hostile clients against a real shepherd, while a well-behaved client measures what it gets.

This script starts its own shepherd (`entrypoint.py --backend demo`, secured: a locally generated
RSA key in a temp dir as PUBLIC_KEY_FILE, and PUBLIC_IPADDR + VAST_TCP_PORT_<port> so the url check
is on; `--skip-benchmark --max-perf` so it reaches `ready` at once), waits for `GET /ready` == 200,
and then:

1. **before**: a well-behaved client alone for `--baseline` seconds: signed requests to `/generate`
   (built as tests/signing.py builds them), a few in parallel, the latency of each; a prober sends
   `GET /ping` every 50 ms on its own connection (its worst latency is the event loop's worst stall as
   seen from outside); psutil samples shepherd's RSS and open fds every 0.2 s.
2. **during**: the same measurements for `--duration` seconds while these attacks run concurrently,
   each bounded in count and time (see the functions `attack_*` below): deep `auth_data`, deeply
   nested payloads, huge `cost` / `max_new_tokens`, slowloris heads and trickled heads plus one burst
   of connections up to near shepherd's fd soft limit, large and stalled uploads, replays
   (reqnum 2**63, other base64 spellings of a signature), hop-by-hop / query / Forwarded header
   tricks, cleartext HTTP/2 (h2c upgrade and prior knowledge), and `/status` + `/metrics` scraping.
3. **stop**: SIGTERM while the attacker still holds its connections; the exit code (expect 0).

It prints a table: well-behaved p50/p99 before vs during (aim: within 2x), the errors it saw by
status, the worst `/ping`, shepherd's peak RSS and fds, the exit code after SIGTERM (or "shepherd
died: exit code X" when an attack killed it), processes shepherd left behind, and what each attack
sent and got back. `--json` prints the same as JSON.

Who attacks whom: every connection goes to 127.0.0.1 (shepherd's port) and nowhere else. The
attacker's connections leave from another loopback source address (127.0.0.2 by default,
`--attacker-addrs`), so that a per-address connection cap can tell it from the well-behaved client
(127.0.0.1), as it could on a real network. The attacker model: anyone who can reach the port, and
for some attacks (marked "captured") anyone holding one valid url-format `auth_data` for this worker,
for example any customer of the endpoint: a url-only signature is valid for every request to it.

The well-behaved client and the prober run in a separate process, so the attacker's own event loop
(sending 57 MiB bodies, holding 1,500 sockets) never delays their measurements. By default shepherd
(and its model server) is pinned to the last CPU and this script to the others, as in
bench/proxy.py (`--no-pin` turns that off).

Run (about baseline + duration + up to 90 s for the shutdown):

    python bench/hostile.py                                  # 10 s baseline, 60 s of attacks
    python bench/hostile.py --duration 15 --baseline 5 --connections 200     # a quick look
    python bench/hostile.py --json --keep-logs               # JSON results; keep shepherd's log
    python bench/hostile.py --entrypoint /tmp/other/entrypoint.py            # another checkout

Needs only the project's dependencies and test extras (`pip install -e '.[test]'`). The whole run
stops by itself; shepherd's process tree and the temp dir are cleaned up even on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import ipaddress
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.signing: requests are signed as the tests sign them

from tests.signing import new_key, signed_auth, write_public_key  # noqa: E402

TARGET = "127.0.0.1"  # the only address this script ever connects to
PUBLIC_IP = "203.0.113.7"  # TEST-NET-3: only a string inside the signed url, never contacted
PUBLIC_PORT = 40123
MIB = 1024 * 1024
REQNUM_START = 1_000_000
PING_INTERVAL = 0.05
PING_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# Seconds in-flight well-behaved requests may still take once the attack ends: long enough to see
# the true latency of a request caught in a stall of several seconds, short enough to stay bounded.
GRACE = 10.0
WELL_PAYLOAD = {"inputs": "alpha bravo charlie delta echo foxtrot", "parameters": {"max_new_tokens": 8}}


# ------------------------------------------------------------------------------------------ options

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of attacks (default 60)")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds of the well-behaved client alone (10)")
    p.add_argument("--port", type=int, default=0, help="shepherd's port (default: a free one)")
    p.add_argument("--connections", type=int, default=300,
                   help="slowloris connections: a head with Content-Length and never the body (300)")
    p.add_argument("--trickle", type=int, default=20, help="connections trickling a head 1 byte/s (20)")
    p.add_argument("--burst", type=int, default=1100,
                   help="connections opened and held at once halfway through the attack, to push "
                        "shepherd past its fd soft limit (1100; 0 = off)")
    p.add_argument("--shepherd-nofile", type=int, default=1024,
                   help="shepherd's RLIMIT_NOFILE soft limit (the hard one is left as is); 1024 is the "
                        "common default (0 = inherit this script's)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs shepherd")
    p.add_argument("--entrypoint", type=Path, default=ROOT / "entrypoint.py", help="shepherd's entrypoint.py")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with shepherd's log")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--client-concurrency", type=int, default=2, help="well-behaved requests in parallel (2)")
    p.add_argument("--client-timeout", type=float, default=30.0, help="well-behaved request timeout, s (30)")
    p.add_argument("--sign-format", choices=("url", "sorted", "legacy"), default="url",
                   help="message the well-behaved client signs (url: what Vast signs today)")
    p.add_argument("--replay-window", type=int, default=10_000, help="shepherd's REPLAY_WINDOW (10000)")
    p.add_argument("--attacker-addrs", default="127.0.0.2,127.0.0.3",
                   help="comma-separated loopback source addresses of the attacker: connections held "
                        "open (slowloris, burst, stalled uploads) leave from all but the last, requests "
                        "from the last; one address: everything from it (127.0.0.2,127.0.0.3)")
    p.add_argument("--deep-auth-kb", type=int, default=300, help="size of the deep auth_data list body, KB (300)")
    p.add_argument("--uploads", type=int, default=4, help="concurrent ~57 MiB uploads with bad signatures (4)")
    p.add_argument("--upload-rounds", type=int, default=3, help="uploads each of those sends in turn (3)")
    p.add_argument("--stalled-uploads", type=int, default=5, help="60 MiB uploads stopped halfway (5)")
    p.add_argument("--scrape-rate", type=float, default=100.0, help="/status + /metrics requests per second (100)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for /ready (60)")
    p.add_argument("--exit-timeout", type=float, default=90.0, help="seconds to wait for the exit after SIGTERM (90)")
    p.add_argument("--no-pin", action="store_true", help="do not pin shepherd to the last CPU")
    args = p.parse_args(argv)
    addrs = [a.strip() for a in args.attacker_addrs.split(",") if a.strip()]
    for addr in addrs:
        if not ipaddress.ip_address(addr).is_loopback:
            p.error(f"--attacker-addrs: {addr} is not a loopback address")
    args.attacker_addrs = addrs
    if args.duration <= 0 or args.baseline <= 0:
        p.error("--duration and --baseline must be > 0")
    return args


# ------------------------------------------------------------------------------------------ results

@dataclass
class Results:
    """Everything the report prints; filled as the run goes, so an interrupted run still reports."""

    settings: dict[str, Any] = field(default_factory=dict)
    started: bool = False
    start_error: str | None = None
    requests: list[tuple[float, float, str]] = field(default_factory=list)  # (start, seconds, label)
    pings: list[tuple[float, float, str]] = field(default_factory=list)
    measure_error: str | None = None
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, rss bytes, fds)
    t_attack: float | None = None
    t_end: float | None = None
    died_at: float | None = None  # shepherd exited by itself (before SIGTERM)
    exit_code: int | None = None
    exit_after_sigterm_s: float | None = None
    sigterm_at: float | None = None
    exit_note: str = ""
    last_error: str = ""
    left_behind: list[str] = field(default_factory=list)
    sent: collections.Counter = field(default_factory=collections.Counter)
    outcomes: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(
        collections.Counter))
    held: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(
        collections.Counter))
    held_close_s: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    not_run: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    load_before: float = 0.0
    load_after: float = 0.0


# ------------------------------------------------------------------------------------------ shepherd

@dataclass
class Shepherd:
    proc: subprocess.Popen
    port: int
    url: str  # the url the autoscaler would sign for this worker
    tmp: Path
    log: Path
    known: dict[int, float] = field(default_factory=dict)  # descendant pid -> create_time, for cleanup


def trio_time(monotonic: float) -> float:
    """`time.monotonic()` (shared by both processes) to trio's clock, which has its own offset."""
    return trio.current_time() + (monotonic - time.monotonic())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((TARGET, 0))
        return sock.getsockname()[1]


def start_shepherd(args: argparse.Namespace, tmp: Path, key_file: Path) -> Shepherd:
    port = args.port or free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEMO_", "MODEL_", "REPORT_", "CONTAINER_", "VAST_TCP_PORT_"))}
    env.update({
        "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "WORKER_HOST": TARGET, "WORKER_PORT": str(port),
        "MODEL_SERVER_URL": f"http://{TARGET}:{free_port()}", "DEMO_LOAD_DELAY": "0.2",
        "PUBLIC_KEY_FILE": str(key_file), "PUBLIC_IPADDR": PUBLIC_IP, f"VAST_TCP_PORT_{port}": str(PUBLIC_PORT),
        "REPLAY_WINDOW": str(args.replay_window), "BENCHMARK_CACHE": str(tmp / "benchmark.json"),
        "MASTER_TOKEN": base64.urlsafe_b64encode(os.urandom(24)).decode(),  # never given to the attacker
    })
    pin = None if args.no_pin or (os.cpu_count() or 1) < 2 else {(os.cpu_count() or 1) - 1}

    def before_exec() -> None:  # runs in the child: shepherd's own limits, not this script's
        if args.shepherd_nofile:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.shepherd_nofile, hard), hard))
        if pin:
            os.sched_setaffinity(0, pin)

    log = tmp / "shepherd.log"
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block shepherd's logging
        proc = subprocess.Popen(
            [args.python, str(args.entrypoint), "--backend", "demo", "--skip-benchmark", "--max-perf", "1000"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp), start_new_session=True,
            preexec_fn=before_exec)
    if pin:
        others = set(range(os.cpu_count() or 1)) - pin
        os.sched_setaffinity(0, others)  # this script and the measuring process it spawns
    return Shepherd(proc, port, f"http://{PUBLIC_IP}:{PUBLIC_PORT}", tmp, log)


def wait_ready(shep: Shepherd, timeout: float) -> None:
    """Until GET /ready answers 200; raises RuntimeError when shepherd exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=f"http://{TARGET}:{shep.port}", timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if shep.proc.poll() is not None:
                raise RuntimeError(f"shepherd exited with code {shep.proc.returncode} before ready: "
                                   f"{last_log_error(shep.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/ready").status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"shepherd not ready within {timeout:.0f} s: {last_log_error(shep.log)}")


def last_log_error(log: Path, limit: int = 400) -> str:
    """The last error-looking line of shepherd's log (a traceback's last line, or an error event)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip() and not line.startswith(" "):
                return line.strip()[:limit]
            continue
        if isinstance(event, dict) and event.get("level") in ("error", "critical", "exception"):
            detail = event.get("exception") or event.get("reason") or event.get("error") or ""
            text = f"{event.get('event')}: {detail}" if detail else str(event.get("event"))
            return text.strip().splitlines()[-1][:limit] if "\n" in text else text[:limit]
    return lines[-1][:limit] if lines else ""


def track_descendants(shep: Shepherd) -> None:
    """Remember shepherd's descendants: if shepherd dies, its orphans are no longer its children."""
    try:
        for child in psutil.Process(shep.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                shep.known.setdefault(child.pid, child.create_time())
    except psutil.Error:
        pass


def leftovers(shep: Shepherd) -> list[psutil.Process]:
    alive = []
    for pid, created in shep.known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def kill_everything(shep: Shepherd) -> None:
    """shepherd, its process group, its descendants and any orphan it left: nothing survives the run."""
    track_descendants(shep)
    procs = leftovers(shep)
    if shep.proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(shep.proc.pid))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(shep.proc.pid, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        shep.proc.wait(5)


# --------------------------------------------------------------------- the well-behaved client

def measurer_main(cfg: dict[str, Any], reqnum: Any, cmd: Any, out: Any, stop: Any) -> None:
    """Entry point of the measuring process: the well-behaved client and the /ping prober."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops this process
    out.put({"ready": True})
    go = cmd.get(timeout=120)
    if go is None:
        return
    cfg.update(go)
    try:
        result = trio.run(_measure, cfg, reqnum, stop)
    except BaseException as exc:  # noqa: BLE001 - reported, not raised: the parent must still print
        result = {"error": f"{type(exc).__name__}: {exc}", "requests": [], "pings": []}
    out.put(result)


def _next_reqnum(reqnum: Any) -> int:
    with reqnum.get_lock():
        reqnum.value += 1
        return reqnum.value


async def _measure(cfg: dict[str, Any], reqnum: Any, stop: Any) -> dict[str, Any]:
    key = serialization.load_pem_private_key(cfg["key_pem"], password=None)
    requests: list[tuple[float, float, str]] = []
    pings: list[tuple[float, float, str]] = []
    t_end: float = cfg["t_end"]
    base = f"http://{TARGET}:{cfg['port']}"

    def running() -> bool:
        return time.monotonic() < t_end and not stop.is_set()

    async def timed(record: list, call: Callable[[], Awaitable[httpx.Response]]) -> None:
        started, label = time.monotonic(), "unfinished"  # stays so if cancelled at the end
        try:
            response = await call()
            label = str(response.status_code)
        except httpx.TimeoutException:
            label = "timeout"
        except httpx.HTTPError as exc:
            label = type(exc).__name__
        finally:
            record.append((started, time.monotonic() - started, label))
        if not label.startswith("2"):
            await trio.sleep(0.05)  # a refused connection fails at once: no hot loop

    async def client_worker(client: httpx.AsyncClient) -> None:
        while running():
            auth = signed_auth(key, cfg["sign_format"], url=cfg["url"], reqnum=_next_reqnum(reqnum))
            body = json.dumps({"auth_data": auth, "payload": WELL_PAYLOAD})
            await timed(requests, lambda: client.post(
                "/generate", content=body, headers={"content-type": "application/json"}))

    async def prober(client: httpx.AsyncClient) -> None:
        while running():
            next_at = trio.current_time() + PING_INTERVAL
            await timed(pings, lambda: client.get("/ping"))
            await trio.sleep_until(next_at)

    async def stop_watch(scope: trio.CancelScope) -> None:
        while not stop.is_set() and time.monotonic() < t_end:
            await trio.sleep(0.1)
        scope.deadline = min(scope.deadline, trio.current_time() + GRACE)

    limits = httpx.Limits(max_connections=cfg["concurrency"], max_keepalive_connections=cfg["concurrency"])
    async with httpx.AsyncClient(base_url=base, timeout=cfg["timeout"], limits=limits, trust_env=False) as client, \
            httpx.AsyncClient(base_url=base, timeout=PING_TIMEOUT, trust_env=False) as ping_client:
        with trio.CancelScope(deadline=trio_time(t_end + GRACE)) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_watch, scope)
                nursery.start_soon(prober, ping_client)
                for _ in range(cfg["concurrency"]):
                    nursery.start_soon(client_worker, client)
    return {"requests": requests, "pings": pings}


# ------------------------------------------------------------------------------------------ attacker

@dataclass
class Attack:
    """What the attacks share: where to connect, the counters, and the nursery holding connections."""

    args: argparse.Namespace
    shep: Shepherd
    res: Results
    key: Any
    reqnum: Any
    holders: trio.Nursery | None = None
    dead: bool = False
    _src: int = 0

    @property
    def running(self) -> bool:
        return not self.dead

    def src(self, holding: bool) -> str:
        """Held connections and requests leave from different addresses, so that a per-address
        connection cap filled by the first does not shield shepherd from the second."""
        addrs = self.args.attacker_addrs
        if not holding:
            return addrs[-1]
        self._src += 1
        pool = addrs[:-1] or addrs
        return pool[self._src % len(pool)]

    def sent(self, name: str) -> None:
        self.res.sent[name] += 1

    def outcome(self, name: str, label: str) -> None:
        self.res.outcomes[name][label] += 1

    def captured(self, **overrides: Any) -> dict[str, Any]:
        """A valid url-format auth_data for this worker (what any customer of the endpoint holds),
        with a fresh reqnum, so that it does not move the replay window by itself."""
        auth = signed_auth(self.key, "url", url=self.shep.url, reqnum=_next_reqnum(self.reqnum))
        auth.update(overrides)
        return auth

    def head(self, method: str, path: str, length: int | None = None, extra: str = "") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {TARGET}:{self.shep.port}"]
        if length is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {length}"]
        return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def garbage_signature() -> str:
    return base64.b64encode(os.urandom(256)).decode()  # looks like a 2048-bit RSA signature


def garbage_auth(url: str, **overrides: Any) -> dict[str, Any]:
    auth = {"cost": 8, "endpoint": "e", "reqnum": random.randrange(1, 2**31), "request_idx": 1,
            "signature": garbage_signature(), "url": url}
    auth.update(overrides)
    return auth


async def connect(atk: Attack, holding: bool = False) -> trio.SocketStream:
    with trio.fail_after(CONNECT_TIMEOUT):
        return await trio.open_tcp_stream(TARGET, atk.shep.port, local_address=atk.src(holding))


def error_label(exc: BaseException) -> str:
    """A short name for a socket error: trio wraps the errno of a failed connect in a cause."""
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return error_label(exc.exceptions[0])
    if exc.__cause__ is not None:
        return error_label(exc.__cause__)
    if isinstance(exc, trio.BrokenResourceError):
        return "reset"
    return type(exc).__name__


async def read_answer(stream: trio.SocketStream, timeout: float) -> str:
    """The status code of the answer on `stream`, or what happened instead ("closed", "no answer")."""
    buf = b""
    with trio.move_on_after(timeout):
        try:
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return status_of(buf) if buf else "closed"
                buf += chunk
        except trio.BrokenResourceError:
            return status_of(buf) if buf else "reset"
        return status_of(buf)
    return status_of(buf) if buf else f"no answer in {timeout:.0f} s"


def status_of(buf: bytes) -> str:
    if buf.startswith(b"HTTP/"):
        parts = buf.split(b" ", 2)
        return parts[1].decode("ascii", "replace") if len(parts) > 1 else "bad status line"
    if len(buf) >= 9 and buf[3] == 0x04:  # an HTTP/2 SETTINGS frame: the server spoke HTTP/2
        return "HTTP/2 SETTINGS"
    return f"other: {buf[:20]!r}"


async def exchange(atk: Attack, name: str, data: bytes | memoryview, timeout: float = 30.0) -> str:
    """One request on a fresh connection: send `data`, read the status; counted under `name` when
    it starts (an action caught in a stall still counts), its outcome when it ends."""
    atk.sent(name)
    label = "no answer before the attack ended"
    try:
        stream = await connect(atk)
    except (OSError, trio.TooSlowError) as exc:
        atk.outcome(name, f"connect: {error_label(exc)}")
        await trio.sleep(0.1)  # refused at once: do not spin
        return "refused"
    try:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            pass  # shepherd may answer (413, 401) and close before the body is all sent: read it
        label = await read_answer(stream, timeout)
    finally:
        atk.outcome(name, label)
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return label


def hold(atk: Attack, name: str, stream: trio.SocketStream) -> None:
    """Keep `stream` open until the run ends (through SIGTERM), noting whether shepherd closes it."""
    assert atk.holders is not None
    atk.holders.start_soon(_hold, atk, name, stream)


async def _hold(atk: Attack, name: str, stream: trio.SocketStream) -> None:
    opened, label = time.monotonic(), "still open at the end"
    try:
        chunk = await stream.receive_some(4096)
        label = f"answered {status_of(chunk)}" if chunk else "closed by shepherd"
    except (trio.BrokenResourceError, OSError):
        label = "reset by shepherd"
    finally:
        note_close(atk, name, label, opened)
        with trio.CancelScope(shield=True):
            await stream.aclose()


def note_close(atk: Attack, name: str, label: str, opened: float) -> None:
    """How a held connection ended; a close before SIGTERM is a timeout or a cap doing its job,
    one after it is shepherd shutting down."""
    if not label.startswith("still"):
        sigterm = atk.res.sigterm_at
        if sigterm is not None and time.monotonic() >= sigterm:
            label += " after SIGTERM"
        elif atk.shep.proc.poll() is not None:  # the kernel closed them as shepherd exited
            label = "closed as shepherd died"
        else:
            atk.res.held_close_s[name].append(time.monotonic() - opened)
    atk.res.held[name][label] += 1


async def open_and_hold(atk: Attack, name: str, data: bytes | memoryview, limiter: trio.CapacityLimiter) -> None:
    async with limiter:
        if not atk.running:
            return
        atk.sent(name)
        try:
            stream = await connect(atk, holding=True)
        except (OSError, trio.TooSlowError) as exc:
            atk.outcome(name, f"connect: {error_label(exc)}")
            return
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            try:  # refused before all was sent: shepherd's answer may be waiting
                atk.outcome(name, f"refused while sending: {await read_answer(stream, 1.0)}")
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            return
        except BaseException:
            atk.outcome(name, "still sending when the attack ended")
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        atk.outcome(name, "sent, held open")
        hold(atk, name, stream)


def body(auth_json: str, payload_json: str) -> bytes:
    # Built as text: orjson (shepherd's parser) reads nesting up to 1024, but no serialiser here
    # writes what these attacks need (json.dumps recurses, orjson stops at 254 levels).
    return f'{{"auth_data": {auth_json}, "payload": {payload_json}}}'.encode()


def auth_with(auth: dict[str, Any], extra_key: str, extra_json: str) -> str:
    return json.dumps(auth)[:-1] + f', "{extra_key}": {extra_json}}}'


# Each attack: a small async function, bounded in count, that stops when the attack scope ends.

async def attack_deep_auth(atk: Attack) -> None:
    """auth_data with a list nested ~850 deep (many elements at the bottom), a key nested 1000 deep,
    and 50,000 keys; the right url and a garbage signature. One at a time."""
    n = max(1, atk.args.deep_auth_kb * 1024 // 2)
    payload = json.dumps(WELL_PAYLOAD)
    shapes = {
        "deep list 850": "[" * 850 + "0," * (n - 1) + "0" + "]" * 850,
        "key 1000 deep": '{"k": ' * 1000 + "0" + "}" * 1000,
        "50k keys": "{" + ", ".join(f'"k{i}": {i}' for i in range(50_000)) + "}",
    }
    bodies = {name: body(auth_with(garbage_auth(atk.shep.url), "x", doc), payload) for name, doc in shapes.items()}
    for i in range(200):
        if not atk.running:
            return
        name, data = list(bodies.items())[i % len(bodies)]
        await exchange(atk, f"deep auth_data: {name}", atk.head("POST", "/generate", len(data)) + data, 60.0)


async def attack_deep_payload(atk: Attack) -> None:
    """Payloads nested 256-1024 deep (orjson parses them, cannot write them back) with
    max_new_tokens 1e300, with a captured signature, and with a garbage one."""
    for i in range(120):
        if not atk.running:
            return
        depth = random.randint(256, 1024) - 2  # the envelope and the payload object are 2 levels
        payload = '{"inputs": "hi", "parameters": {"max_new_tokens": 1e300}, "x": ' + "[" * depth + "]" * depth + "}"
        captured = i % 2 == 0
        auth = atk.captured() if captured else garbage_auth(atk.shep.url)
        data = body(json.dumps(auth), payload)
        name = "deep payload (captured sig)" if captured else "deep payload (garbage sig)"
        await exchange(atk, name, atk.head("POST", "/generate", len(data)) + data, 30.0)
        await trio.sleep(0.5)


async def attack_cost(atk: Attack) -> None:
    """auth_data.cost and max_new_tokens of 1e15 and 1e300, with the right url and a garbage
    signature, with a captured (valid, url-only) signature, and unsecured-shaped (no auth_data)."""
    for i in range(300):
        if not atk.running:
            return
        huge = (1e15, 1e300)[i % 2]
        variant = (i // 2) % 4
        payload = dict(WELL_PAYLOAD)
        if variant == 0:
            name, data = "cost huge (garbage sig)", json.dumps(
                {"auth_data": garbage_auth(atk.shep.url, cost=huge), "payload": payload})
        elif variant == 1:
            name, data = "cost huge (captured sig)", json.dumps(
                {"auth_data": atk.captured(cost=huge), "payload": payload})
        elif variant == 2:
            payload["parameters"] = {"max_new_tokens": huge}
            name, data = "max_new_tokens huge (captured sig)", json.dumps(
                {"auth_data": atk.captured(), "payload": payload})
        else:
            payload["parameters"] = {"max_new_tokens": huge}
            name, data = "unsecured-shaped, huge", json.dumps(payload)
        raw = data.encode()
        await exchange(atk, name, atk.head("POST", "/generate", len(raw)) + raw, 30.0)
        await trio.sleep(0.25)


async def attack_slowloris(atk: Attack) -> None:
    """`--connections` heads with Content-Length and never the body, held to the end of the run."""
    head = atk.head("POST", "/generate", 1000)
    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as nursery:
        for _ in range(atk.args.connections):
            nursery.start_soon(open_and_hold, atk, "slowloris: head, no body", head, limiter)
            await trio.sleep(0.005)  # ~200 connections/s: a slow attacker, not a connect flood


async def attack_trickle(atk: Attack) -> None:
    """`--trickle` connections sending a request head one byte per second (never complete in time)."""
    head = atk.head("GET", "/ping", extra="X-Padding: " + "p" * 200 + "\r\n")

    name = "slowloris: head 1 byte/s"

    async def one() -> None:
        atk.sent(name)
        try:
            stream = await connect(atk, holding=True)
        except (OSError, trio.TooSlowError) as exc:
            atk.outcome(name, f"connect: {error_label(exc)}")
            return
        atk.outcome(name, "connected")
        opened, label = time.monotonic(), "still sending at the end"
        try:
            for i in range(len(head)):
                await stream.send_all(head[i:i + 1])
                # The one-second pause is also the window in which shepherd's answer or close shows.
                with trio.move_on_after(1.0):
                    chunk = await stream.receive_some(4096)
                    label = f"answered {status_of(chunk)}" if chunk else "closed by shepherd"
                    break
        except (trio.BrokenResourceError, OSError):
            label = "reset by shepherd"
        finally:
            note_close(atk, name, label, opened)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(atk.args.trickle):
            nursery.start_soon(one)


async def attack_fd_burst(atk: Attack) -> None:
    """Halfway through, open `--burst` connections as fast as possible (a partial head each) and hold
    them: with a 1024 soft limit that is more fds than shepherd may have. It waits so that a death
    from fd exhaustion does not hide what the other attacks do."""
    if atk.args.burst <= 0:
        atk.res.not_run.setdefault("fd burst", "off (--burst 0)")
        return
    await trio.sleep(atk.args.duration / 2)
    head = atk.head("GET", "/ping")[:-2]  # no final blank line: the head never ends
    limiter = trio.CapacityLimiter(100)
    async with trio.open_nursery() as nursery:
        for _ in range(atk.args.burst):
            nursery.start_soon(open_and_hold, atk, "fd burst: held connections", head, limiter)


async def attack_uploads(atk: Attack) -> None:
    """`--uploads` concurrent ~57 MiB bodies with bad signatures (each `--upload-rounds` times), and
    `--stalled-uploads` 60 MiB uploads that send half the body, then stop (held to the end)."""
    prefix = json.dumps({"auth_data": garbage_auth(atk.shep.url), "payload": {"inputs": ""}})[:-3].encode()
    big = prefix + b"a" * (57 * MIB - len(prefix) - 3) + b'"}}'
    request = atk.head("POST", "/generate", len(big)) + big  # one copy, shared by every upload
    stalled = atk.head("POST", "/generate", 60 * MIB) + big[:30 * MIB]
    limiter = trio.CapacityLimiter(atk.args.stalled_uploads or 1)

    async def uploader() -> None:
        for _ in range(atk.args.upload_rounds):
            if not atk.running:
                return
            await exchange(atk, "upload 57 MiB, bad signature", memoryview(request), 60.0)

    async with trio.open_nursery() as nursery:
        for _ in range(atk.args.stalled_uploads):
            nursery.start_soon(open_and_hold, atk, "upload 60 MiB, stalled halfway", memoryview(stalled), limiter)
        for _ in range(atk.args.uploads):
            nursery.start_soon(uploader)


def respellings(signature: str) -> list[str]:
    """Other base64 spellings that decode (non-strict, as base64.b64decode does) to the same bytes:
    the unused low bits of the last character, and a line break inside."""
    raw = base64.b64decode(signature)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stripped = signature.rstrip("=")
    pad = signature[len(stripped):]
    unused = {1: 4, 2: 2}.get(len(raw) % 3, 0)  # bits of the last character that carry no data
    variants = []
    last = alphabet.index(stripped[-1])
    for low in range(1, 2 ** unused):
        variants.append(stripped[:-1] + alphabet[last ^ low] + pad)
    variants.append(signature[:64] + "\n" + signature[64:])
    return [v for v in variants if v != signature and base64.b64decode(v) == raw]


async def attack_replay(atk: Attack) -> None:
    """A captured request replayed as is and with other base64 spellings of its signature; then
    reqnum=2**63, with a garbage signature and with a captured (url-only: reqnum unsigned) one."""
    for _ in range(40):
        if not atk.running:
            return
        auth = atk.captured()
        original = json.dumps({"auth_data": auth, "payload": WELL_PAYLOAD}).encode()
        await exchange(atk, "replay: the captured request, once", atk.head("POST", "/generate", len(original))
                       + original)
        copies = [original] + [json.dumps({"auth_data": {**auth, "signature": sig}, "payload": WELL_PAYLOAD}).encode()
                               for sig in respellings(auth["signature"])]
        for i, data in enumerate(copies):
            name = "replay: same bytes" if i == 0 else "replay: signature respelled"
            await exchange(atk, name, atk.head("POST", "/generate", len(data)) + data)
        for name, far in (("reqnum 2**63 (garbage sig)", garbage_auth(atk.shep.url, reqnum=2**63, request_idx=2**63)),
                          ("reqnum 2**63 (captured sig)", {**atk.captured(), "reqnum": 2**63, "request_idx": 2**63})):
            data = json.dumps({"auth_data": far, "payload": WELL_PAYLOAD}).encode()
            await exchange(atk, f"replay: {name}", atk.head("POST", "/generate", len(data)) + data)
        await trio.sleep(2.0)


async def attack_headers(atk: Attack) -> None:
    """Valid (captured) requests with hop-by-hop headers named in Connection, the endpoint key in
    the query in other spellings, and Forwarded / X-Forwarded-For spoofing. Only the status is seen
    here: whether shepherd stripped them is for the tests, which watch the upstream side."""
    tricks = {
        "hop-by-hop named in Connection": ("/generate", "Connection: close, X-Shepherd-Hop, Keep-Alive\r\n"
                                           "X-Shepherd-Hop: secret\r\nKeep-Alive: timeout=600\r\nTE: trailers\r\n"
                                           "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"),
        "API_KEY / api%5Fkey in query": ("/generate?API_KEY=x&api%5Fkey=y&Api_Key=z", "Connection: close\r\n"),
        "Forwarded / X-Forwarded-For spoof": ("/generate", "Connection: close\r\n"
                                              "Forwarded: for=203.0.113.9;proto=https;host=evil.example\r\n"
                                              "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
                                              "X-Forwarded-Host: evil.example\r\nX-Real-IP: 203.0.113.9\r\n"),
    }
    for i in range(300):
        if not atk.running:
            return
        name, (path, extra) = list(tricks.items())[i % len(tricks)]
        data = json.dumps({"auth_data": atk.captured(), "payload": WELL_PAYLOAD}).encode()
        await exchange(atk, f"headers: {name}", atk.head("POST", path, len(data), extra) + data)
        await trio.sleep(0.3)


async def attack_h2c(atk: Attack) -> None:
    """Cleartext HTTP/2: an `Upgrade: h2c` request, and the prior-knowledge preface. 101 or a
    SETTINGS frame back means shepherd spoke HTTP/2 to an unauthenticated client."""
    upgrade = atk.head("GET", "/ping", extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                             "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
    for i in range(2 * int(atk.args.duration) + 2):
        if not atk.running:
            return
        if i % 2 == 0:
            await exchange(atk, "h2c: Upgrade request", upgrade, 5.0)
        else:
            await exchange(atk, "h2c: prior-knowledge preface", preface, 5.0)
        await trio.sleep(1.0)


async def attack_scrape(atk: Attack) -> None:
    """GET /status and /metrics without credentials at `--scrape-rate` per second, keep-alive."""
    interval = 2.0 / max(atk.args.scrape_rate, 0.1)  # two tasks share the rate
    limit = int(atk.args.scrape_rate * atk.args.duration) + 1

    async def scraper(path: str) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=atk.src(holding=False), retries=0)
        async with httpx.AsyncClient(base_url=f"http://{TARGET}:{atk.shep.port}", transport=transport,
                                     timeout=10.0, trust_env=False) as client:
            for _ in range(limit // 2):
                if not atk.running:
                    return
                next_at = trio.current_time() + interval
                atk.sent(f"scrape: GET {path}")
                try:
                    response = await client.get(path)
                    atk.outcome(f"scrape: GET {path}", str(response.status_code))
                except httpx.HTTPError as exc:
                    atk.outcome(f"scrape: GET {path}", type(exc).__name__)
                    await trio.sleep(0.1)
                await trio.sleep_until(next_at)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(scraper, "/status")
        nursery.start_soon(scraper, "/metrics")


ATTACKS: dict[str, Callable[[Attack], Awaitable[None]]] = {
    "deep auth_data": attack_deep_auth,
    "deep payload": attack_deep_payload,
    "huge cost / max_new_tokens": attack_cost,
    "slowloris": attack_slowloris,
    "slowloris trickle": attack_trickle,
    "fd burst": attack_fd_burst,
    "large uploads": attack_uploads,
    "replay": attack_replay,
    "header tricks": attack_headers,
    "cleartext HTTP/2": attack_h2c,
    "status scraping": attack_scrape,
}


async def guarded(atk: Attack, name: str, fn: Callable[[Attack], Awaitable[None]]) -> None:
    """Run one attack; its failure is reported, and never stops the others."""
    try:
        await fn(atk)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        atk.res.not_run[name] = f"failed: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ the run

async def sample(atk: Attack, scope_box: list[trio.CancelScope]) -> None:
    """Every 0.2 s: shepherd's RSS and fds; every second its descendants. When shepherd exits by
    itself, note it and cancel the attacks (nothing left to attack, and no hot loops on refusals)."""
    shep, res = atk.shep, atk.res
    proc = None
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(shep.proc.pid)
    tick = 0
    while True:
        if shep.proc.poll() is not None:
            if note_death(atk):
                for scope in scope_box:
                    scope.cancel()
            return
        try:
            if proc is not None:
                res.samples.append((time.monotonic(), proc.memory_info().rss, proc.num_fds()))
        except psutil.Error:
            pass
        if tick % 5 == 0:
            track_descendants(shep)
        tick += 1
        await trio.sleep(0.2)


def note_death(atk: Attack) -> bool:
    """Record that shepherd exited by itself (before any SIGTERM); True the first time."""
    res = atk.res
    if atk.dead or res.sigterm_at is not None or atk.shep.proc.poll() is None:
        return False
    res.died_at, res.exit_code, atk.dead = time.monotonic(), atk.shep.proc.returncode, True
    return True


async def stop_shepherd(atk: Attack) -> None:
    """SIGTERM while the attacker still holds its connections; wait for the exit (bounded)."""
    shep, res = atk.shep, atk.res
    if shep.proc.poll() is not None:
        note_death(atk)  # it may have died after the sampler last looked
        return
    sent = res.sigterm_at = time.monotonic()
    res.exit_after_sigterm_s = 0.0  # marks "SIGTERM sent" for the sampler
    shep.proc.send_signal(signal.SIGTERM)
    while shep.proc.poll() is None and time.monotonic() - sent < atk.args.exit_timeout:
        await trio.sleep(0.1)
    if shep.proc.poll() is None:
        res.exit_note = f"no exit within {atk.args.exit_timeout:.0f} s of SIGTERM: killed"
        kill_everything(shep)
    else:
        res.exit_code = shep.proc.returncode
        res.exit_after_sigterm_s = time.monotonic() - sent


async def run_attacks(atk: Attack, cmd: Any, out: Any, stop: Any) -> None:
    res, args = atk.res, atk.args
    res.t_attack = time.monotonic() + args.baseline
    res.t_end = res.t_attack + args.duration
    cmd.put({"t_attack": res.t_attack, "t_end": res.t_end})
    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as background:
        background.start_soon(sample, atk, scopes)
        with trio.CancelScope() as before:
            scopes.append(before)
            await trio.sleep_until(trio_time(res.t_attack))
        async with trio.open_nursery() as holders:
            atk.holders = holders
            with trio.CancelScope(deadline=trio_time(res.t_end)) as attacking:
                scopes.append(attacking)
                if atk.dead:
                    attacking.cancel()
                async with trio.open_nursery() as attacks:
                    for name, fn in ATTACKS.items():
                        attacks.start_soon(guarded, atk, name, fn)
            stop.set()  # the measuring process stops too (it would at t_end anyway)
            result = await trio.to_thread.run_sync(_get_result, out, args.client_timeout + GRACE + 10,
                                                   abandon_on_cancel=True)
            res.requests, res.pings = result.get("requests", []), result.get("pings", [])
            res.measure_error = result.get("error")
            await stop_shepherd(atk)
            holders.cancel_scope.cancel()
        background.cancel_scope.cancel()


def _get_result(out: Any, timeout: float) -> dict[str, Any]:
    try:
        return out.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty, or the process died
        return {"error": f"the measuring process sent no result within {timeout:.0f} s"}


def raise_nofile(args: argparse.Namespace, res: Results) -> None:
    """This script's soft fd limit up to the hard limit: it holds ~1,500 connections at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = args.connections + args.trickle + args.burst + args.stalled_uploads + args.uploads + 200
    if hard < needed:
        fit = max(0, hard - (needed - args.burst))
        res.notes.append(f"fd burst cut from {args.burst} to {fit}: this script's hard fd limit is {hard}")
        res.not_run.setdefault("fd burst", f"only {fit} of {args.burst} connections (hard fd limit {hard})")
        args.burst = fit


def describe_code(entrypoint: Path) -> str:
    """The git commit of shepherd's checkout, read without touching the index."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    where = ["git", "-C", str(entrypoint.parent)]
    try:
        rev = subprocess.run([*where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             env=env, timeout=10).stdout.strip()
        if not rev:
            return "not a git checkout"
        dirty = subprocess.run([*where, "diff", "--quiet", "HEAD"], capture_output=True, env=env, timeout=30)
        return f"git {rev}" + (" + uncommitted changes" if dirty.returncode else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = Results(load_before=os.getloadavg()[0])
    raise_nofile(args, res)
    tmp = Path(tempfile.mkdtemp(prefix="shepherd-hostile-"))
    shep: Shepherd | None = None
    measurer = None
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state of this one's loop
    cmd, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    try:
        key = new_key()
        key_file = write_public_key(key, tmp / "autoscaler-public.pem")
        shep = start_shepherd(args, tmp, key_file)
        res.settings = {
            "code": f"{args.entrypoint} ({describe_code(args.entrypoint)})", "port": shep.port,
            "signed_url": shep.url, "replay_window": args.replay_window, "duration_s": args.duration,
            "baseline_s": args.baseline, "connections": args.connections, "trickle": args.trickle,
            "burst": args.burst, "shepherd_nofile_soft": args.shepherd_nofile or "inherited",
            "attacker_addrs": args.attacker_addrs, "cpus": os.cpu_count(),
            "pinned": not args.no_pin and (os.cpu_count() or 1) >= 2, "log": str(shep.log),
        }
        info(f"shepherd pid {shep.proc.pid} on {TARGET}:{shep.port}, waiting for /ready")
        wait_ready(shep, args.ready_timeout)
        res.started = True
        reqnum = ctx.Value("q", REQNUM_START)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        cfg = {"port": shep.port, "url": shep.url, "key_pem": key_pem, "sign_format": args.sign_format,
               "concurrency": args.client_concurrency, "timeout": args.client_timeout}
        measurer = ctx.Process(target=measurer_main, args=(cfg, reqnum, cmd, out, stop), daemon=True)
        measurer.start()
        if not out.get(timeout=60).get("ready"):
            raise RuntimeError("the measuring process did not start")
        info(f"ready; {args.baseline:.0f} s baseline, then {args.duration:.0f} s of attacks")
        atk = Attack(args, shep, res, key, reqnum)
        trio.run(run_attacks, atk, cmd, out, stop)
    except RuntimeError as exc:
        res.start_error = str(exc)
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C (maybe inside an exception group): report
        if not _is_interrupt(exc):
            raise
        res.interrupted = True
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            cmd.put(None)  # a measurer still waiting for "go" returns
        if measurer is not None:
            if res.interrupted and not res.requests:  # what it measured until Ctrl-C, if it comes fast
                partial = _get_result(out, 3.0)
                res.requests, res.pings = partial.get("requests", []), partial.get("pings", [])
            measurer.join(3)
            if measurer.is_alive():
                measurer.kill()
        if shep is not None:
            track_descendants(shep)
            if shep.proc.poll() is None:
                res.exit_note = res.exit_note or "still running at the end of the run: killed"
            else:  # it exited by itself or on SIGTERM: anything of its tree still alive was left behind
                res.left_behind = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in leftovers(shep) if _safe(p)]
            res.last_error = last_log_error(shep.log) if res.died_at or res.exit_code else ""
            kill_everything(shep)
        res.load_after = os.getloadavg()[0]
        if args.keep_logs:
            res.notes.append(f"shepherd's log kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report = summarise(res)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if res.start_error else 0


def _safe(proc: psutil.Process) -> bool:
    try:
        proc.cmdline()
        return True
    except psutil.Error:
        return False


def _is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_interrupt(e) for e in exc.exceptions)
    return False


def info(text: str) -> None:
    print(f"[hostile] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ report

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def phase_of(res: Results, t: float) -> str:
    assert res.t_attack is not None and res.t_end is not None
    if res.died_at is not None and t >= res.died_at:
        return "dead"  # failures against a dead process say nothing more; counted apart
    return "before" if t < res.t_attack else ("during" if t < res.t_end + GRACE else "after")


def summarise(res: Results) -> dict[str, Any]:
    """The numbers the table shows, as one JSON-able dict."""
    out: dict[str, Any] = {"settings": res.settings, "started": res.started, "start_error": res.start_error,
                           "interrupted": res.interrupted, "notes": res.notes,
                           "load_average": {"before": res.load_before, "after": res.load_after}}
    if res.t_attack is None:
        return out
    phases: dict[str, dict[str, Any]] = {}
    for phase in ("before", "during"):
        reqs = [r for r in res.requests if phase_of(res, r[0]) == phase]
        ok = [lat for _, lat, label in reqs if label.startswith("2")]
        # Latency is the time to an answer of any kind: a request caught in a stall that ends in a
        # 500, a timeout or no answer by the end is exactly what a p99 must not leave out. Fast
        # failures are judged by the share served instead.
        timed = [lat for _, lat, _ in reqs]
        pings = [r for r in res.pings if phase_of(res, r[0]) == phase]
        ping_ok = [lat for _, lat, label in pings if label == "200"]
        samples = [s for s in res.samples if phase_of(res, s[0]) == phase]
        phases[phase] = {
            "requests": len(reqs), "ok": len(ok),
            "p50_ms": ms(percentile(timed, 50)), "p99_ms": ms(percentile(timed, 99)),
            "max_ms": ms(max(timed, default=None)),
            "errors": dict(collections.Counter(label for _, _, label in reqs if not label.startswith("2"))),
            "ping_count": len(pings), "ping_p99_ms": ms(percentile(ping_ok, 99)),
            "ping_worst_ms": ms(max((lat for _, lat, _ in pings), default=None)),
            "ping_errors": dict(collections.Counter(label for _, _, label in pings if label != "200")),
            "peak_rss_mib": round(max((s[1] for s in samples), default=0) / MIB, 1) or None,
            "peak_fds": max((s[2] for s in samples), default=None),
        }
    out["phases"] = phases
    dead = [r for r in res.requests if phase_of(res, r[0]) == "dead"]
    out["requests_after_death"] = {"count": len(dead),
                                   "outcomes": dict(collections.Counter(label for _, _, label in dead))}
    b, d = phases["before"], phases["during"]
    out["ratios"] = {k: ratio(d[k], b[k]) for k in ("p50_ms", "p99_ms", "ping_worst_ms", "peak_rss_mib", "peak_fds")}
    if res.died_at is not None:
        exit_text = (f"shepherd died: exit code {res.exit_code}, "
                     f"{res.died_at - res.t_attack:+.1f} s from the start of the attack")
    elif res.exit_after_sigterm_s is not None and res.exit_code is not None:
        exit_text = f"exit code {res.exit_code} {res.exit_after_sigterm_s:.1f} s after SIGTERM"
    else:
        exit_text = res.exit_note or "unknown"
    if res.exit_code is not None and res.exit_code < 0:  # Popen's way of saying "killed by a signal"
        exit_text += f" (killed by {signal.Signals(-res.exit_code).name}: no handler was running)"
    out["exit"] = {"code": res.exit_code, "died_during_run": res.died_at is not None,
                   "seconds_after_sigterm": round(res.exit_after_sigterm_s, 1) if res.exit_after_sigterm_s else None,
                   "text": exit_text, "note": res.exit_note, "last_error": res.last_error,
                   "left_behind": res.left_behind}
    out["attacks"] = {name: {"sent": res.sent[name], "outcomes": dict(res.outcomes.get(name, {}))}
                      for name in sorted(set(res.sent) | set(res.outcomes))}
    out["held"] = {name: {"outcomes": {k: v for k, v in counts.items() if v},
                          "median_close_s": round(statistics.median(res.held_close_s[name]), 1)
                          if res.held_close_s.get(name) else None}
                   for name, counts in res.held.items()}
    not_run = dict(res.not_run)
    for name in ATTACKS:
        if name not in not_run and not _attack_sent(res, name):
            not_run[name] = "sent nothing" + (" (shepherd died first)" if res.died_at else "")
    out["not_run"] = not_run
    if res.measure_error:
        out["measure_error"] = res.measure_error
    p99 = out["ratios"]["p99_ms"]
    served = d["ok"] / d["requests"] if d["requests"] else 0.0
    out["verdict"] = {
        # A p99 over the few requests that were served says nothing when most failed.
        "p99_within_2x": p99 is not None and p99 <= 2.0 and served >= 0.99,
        "served_99pct": served >= 0.99,
        "exit_0_after_sigterm": res.died_at is None and res.exit_code == 0,
        "nothing_left_behind": not res.left_behind,
    }
    return out


_ATTACK_PREFIX = {
    "deep auth_data": "deep auth_data", "deep payload": "deep payload", "huge cost / max_new_tokens": ("cost",
    "max_new_tokens", "unsecured"), "slowloris": "slowloris: head, no body", "slowloris trickle":
    "slowloris: head 1 byte/s", "fd burst": "fd burst", "large uploads": "upload", "replay": "replay",
    "header tricks": "headers", "cleartext HTTP/2": "h2c", "status scraping": "scrape",
}


def _attack_sent(res: Results, attack: str) -> bool:
    prefixes = _ATTACK_PREFIX[attack]
    return any(count and name.startswith(prefixes) for name, count in res.sent.items())


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def ratio(during: float | None, before: float | None) -> float | None:
    return None if not during or not before else round(during / before, 2)


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = ["shepherd under hostile clients (bench/hostile.py)"]
    if s:
        lines.append(f"code: {s['code']}; backend demo, secured, url check on ({s['signed_url']}), "
                     f"REPLAY_WINDOW={s['replay_window']}, shepherd fd soft limit {s['shepherd_nofile_soft']}")
        lines.append(f"run: {s['baseline_s']:g} s baseline, {s['duration_s']:g} s attack; {s['connections']} slowloris "
                     f"+ {s['trickle']} trickle connections, burst of {s['burst']} at half time; attacker from "
                     f"{', '.join(s['attacker_addrs'])}; {s['cpus']} CPUs"
                     f"{', shepherd pinned to the last' if s['pinned'] else ''}; load average "
                     f"{r['load_average']['before']:.2f} -> {r['load_average']['after']:.2f}")
    if r.get("start_error"):
        lines.append(f"COULD NOT RUN: {r['start_error']}")
    if r.get("interrupted"):
        lines.append("INTERRUPTED (Ctrl-C): partial results")
    if "phases" not in r:
        return "\n".join(lines + r["notes"])
    b, d, q = r["phases"]["before"], r["phases"]["during"], r["ratios"]

    def fmt(v: Any) -> str:
        return "-" if v is None or v == {} else (f"{v:,}" if isinstance(v, (int, float)) else str(v))

    def errs(e: dict) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(e.items(), key=lambda kv: -kv[1])) or "none"

    rows = [
        ("well-behaved p50 ms (*)", b["p50_ms"], d["p50_ms"], q["p50_ms"]),
        ("well-behaved p99 ms", b["p99_ms"], d["p99_ms"], q["p99_ms"]),
        ("well-behaved max ms", b["max_ms"], d["max_ms"], None),
        ("well-behaved ok / sent", f"{b['ok']}/{b['requests']}", f"{d['ok']}/{d['requests']}", None),
        ("well-behaved errors", errs(b["errors"]), errs(d["errors"]), None),
        ("/ping worst ms (loop stall)", b["ping_worst_ms"], d["ping_worst_ms"], q["ping_worst_ms"]),
        ("/ping p99 ms", b["ping_p99_ms"], d["ping_p99_ms"], None),
        ("/ping errors", errs(b["ping_errors"]), errs(d["ping_errors"]), None),
        ("shepherd peak RSS MiB", b["peak_rss_mib"], d["peak_rss_mib"], q["peak_rss_mib"]),
        ("shepherd peak open fds", b["peak_fds"], d["peak_fds"], q["peak_fds"]),
    ]
    lines += ["", table(["measure", "before", "during", "during/before"],
                        [(n, fmt(x), fmt(y), "-" if z is None else f"{z:g}x") for n, x, y, z in rows]),
              "(*) time to an answer of any status; a timeout, or no answer by the end, counts at its "
              "elapsed time (a lower bound)"]
    e = r["exit"]
    if r["requests_after_death"]["count"]:
        lines.append(f"well-behaved requests after shepherd died (not in the table): "
                     f"{errs(r['requests_after_death']['outcomes'])}")
    note = f" ({e['note']})" if e["note"] and e["note"] not in e["text"] else ""
    lines += ["", f"shepherd exit: {e['text']}{note}"]
    if e["last_error"]:
        lines.append(f"  last error in its log: {e['last_error']}")
    left = ", ".join(e["left_behind"]) + " (killed)" if e["left_behind"] else "none"
    lines.append(f"  processes left behind: {left}")
    attack_rows = [(name, str(a["sent"]), errs(a["outcomes"])) for name, a in r["attacks"].items()]
    lines += ["", table(["attack action", "sent", "answers (status or what happened)"], attack_rows)]
    if r["held"]:
        held_rows = [(name, errs(h["outcomes"]), fmt(h["median_close_s"])) for name, h in r["held"].items()]
        lines += ["", table(["held connections", "at the end", "median s to close"], held_rows)]
    if r["not_run"]:
        lines += ["", "attacks that could not run (fully):"]
        lines += [f"  - {name}: {why}" for name, why in r["not_run"].items()]
    if r.get("measure_error"):
        lines.append(f"well-behaved client failed: {r['measure_error']}")
    v, names = r["verdict"], {"p99_within_2x": "p99 within 2x (and >= 99% served)",
                                  "served_99pct": ">= 99% of well-behaved requests served (2xx)",
                                  "exit_0_after_sigterm": "exit 0 after SIGTERM",
                                  "nothing_left_behind": "no process left behind"}
    lines += ["", "verdict: " + "; ".join(f"{names.get(k, k)}: {'PASS' if ok else 'FAIL'}" for k, ok in v.items())]
    lines += r["notes"]
    return "\n".join(lines)


def table(header: list[str], rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells: tuple | list) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


if __name__ == "__main__":
    sys.exit(main())
