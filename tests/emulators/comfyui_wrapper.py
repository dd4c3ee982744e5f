"""An emulator of Vast's ComfyUI API wrapper (port 18288 in Vast's ComfyUI image), for the `comfyui-json`
backend's tests. The wrapper itself ships only inside Vast's image, so it cannot run here.

What it reproduces, from issue 10 and vast-ai/pyworker workers/comfyui-json (PR #85):
- its log line once its backends answer: `BACKENDS_READY: 1 backend(s) reachable, ready to serve`
  (`--fail` prints `BACKENDS_READY_TIMEOUT: ...` instead), appended to `--log` as the wrapper's
  supervisor writes /var/log/portal/api-wrapper.log;
- `GET /health` (503 until ready), `GET /queue-info` (`preprocess_queue_size`, `generation_queue_size`,
  `postprocess_queue_size`);
- `POST /generate/sync` with `{"input": {...}}`, one job at a time (a lock, as ComfyUI runs one prompt
  at a time), answered `{id, status, message, comfyui_response, output, timings}`: 200 when done, 499
  when `input.cancel` is set, 503 with Retry-After when more than `--queue-limit` jobs wait.
`GET /jobs` (emulator only) lists the request ids in the order they ran, with the most that ran at once.

Usage: python comfyui_wrapper.py --port N --log FILE [--ready-after S] [--job-seconds S] [--fail]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready-after", type=float, default=0.2)
    parser.add_argument("--job-seconds", type=float, default=0.1)
    parser.add_argument("--queue-limit", type=int, default=100)
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()

    state: dict[str, Any] = {"ready": False, "waiting": 0, "running": 0, "most": 0, "ran": []}
    lock, job = threading.Lock(), threading.Lock()

    def log(line: str) -> None:
        with open(args.log, "a", encoding="utf-8") as out:
            out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            return None

        def send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send(200 if state["ready"] else 503, {"status": "ok" if state["ready"] else "starting"})
            elif self.path == "/queue-info":
                self.send(200, {"preprocess_queue_size": 0, "generation_queue_size": state["waiting"],
                                "postprocess_queue_size": 0})
            elif self.path == "/jobs":
                self.send(200, {"ran": state["ran"], "most_at_once": state["most"]})
            else:
                self.send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path != "/generate/sync":
                self.send(404, {"detail": "Not Found"})
                return
            request = body.get("input", {})
            rid = request.get("request_id", "anonymous")
            with lock:
                if state["waiting"] >= args.queue_limit:
                    self.send(503, {"id": rid, "status": "failed", "message": "queue full"}, {"Retry-After": "5"})
                    return
                state["waiting"] += 1
            with job:
                with lock:
                    state["waiting"] -= 1
                    state["running"] += 1
                    state["most"] = max(state["most"], state["running"])
                    state["ran"].append(rid)
                started = time.time()
                time.sleep(args.job_seconds)
                with lock:
                    state["running"] -= 1
            timings = {"total_ms": round((time.time() - started) * 1000)}
            if request.get("cancel"):
                self.send(499, {"id": rid, "status": "cancelled", "message": "cancelled", "comfyui_response": {},
                                "output": [], "timings": timings})
                return
            self.send(200, {"id": rid, "status": "completed", "message": "Request completed",
                            "comfyui_response": {"status": {"status_str": "success"}},
                            "output": [{"filename": f"{rid}_00001_.png", "local_path": f"/output/{rid}.png"}],
                            "timings": timings})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(args.ready_after)
    if args.fail:
        log("BACKENDS_READY_TIMEOUT: 0 of 1 backend(s) reachable after 600s")
    else:
        state["ready"] = True
        log("BACKENDS_READY: 1 backend(s) reachable, ready to serve")
    threading.Event().wait()


if __name__ == "__main__":
    main()
