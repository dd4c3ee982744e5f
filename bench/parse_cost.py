"""What parsing a request body costs the event loop, and what the auth-first check saves.

    python bench/parse_cost.py [--mib 64]

For a body of base64 text (an image upload) and one of small numbers (the worst case for a JSON
parser), prints the time of `orjson.loads` per MiB, the time of the bounded `auth_data` cut
(`proxy/auth_first.py`) plus one envelope parse of it, and their ratio: how much loop time a client
with a bad signature costs with the check, against without it. orjson holds the GIL while it parses,
so this time is the event loop's, whatever thread runs it.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.auth_first import auth_data_prefix  # noqa: E402
from proxy.envelope import AUTH_MAX_BYTES, parse_envelope  # noqa: E402

AUTH = {"cost": 242.0, "endpoint": "e", "reqnum": 7, "request_idx": 9, "url": "http://203.0.113.7:41000",
        "signature": base64.b64encode(os.urandom(256)).decode()}


def best_of(runs: int, fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="body size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    bodies = {
        "base64 text": orjson.dumps({"auth_data": AUTH, "payload": {
            "image": base64.b64encode(os.urandom(size * 3 // 4)).decode()}}),
        "small numbers": orjson.dumps({"auth_data": AUTH, "payload": {"x": list(range(size // 8))}}),
    }
    print(f"{'body':<14} {'MiB':>6} {'full parse':>12} {'per MiB':>10} {'auth-first':>11} {'ratio':>9}")
    for name, body in bodies.items():
        mib = len(body) / 1024 / 1024
        full = best_of(args.runs, lambda: orjson.loads(body))

        def check() -> None:
            raw = auth_data_prefix(body, AUTH_MAX_BYTES)
            assert raw is not None
            parse_envelope(b'{"auth_data":' + raw + b',"payload":{}}', unsecured=False)

        first = best_of(args.runs * 10, check)
        print(f"{name:<14} {mib:>6.1f} {full * 1e3:>10.1f}ms {full * 1e3 / mib:>8.2f}ms "
              f"{first * 1e6:>9.1f}us {full / first:>8.0f}x")


if __name__ == "__main__":
    main()
