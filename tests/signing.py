"""Signing `auth_data` the way the Vast system does, for tests (vast-protocol.md §1.3).

Built from the protocol reference, not from `proxy/signature.py`, so that a test signing with this
module checks shepherd's message formats instead of repeating them. RSASSA-PKCS1-v1_5 over SHA-256
of the UTF-8 message; the signature travels base64-encoded in `auth_data.signature`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_public_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(public_pem(key))
    return path


def message(fmt: str, auth: dict[str, Any]) -> bytes:
    """The exact text the Vast system signs for `auth` (without its signature) in format `fmt`."""
    if fmt == "url":  # vast-sdk >= 0.4.2, current vast-cli
        return json.dumps({"url": auth["url"]}, indent=4, sort_keys=True).encode()
    if fmt == "sorted":  # 2025 pyworker: every field but the signature and __request_id
        fields = {k: v for k, v in auth.items() if k not in ("signature", "__request_id")}
        return json.dumps(fields, indent=4, sort_keys=True).encode()
    if fmt == "legacy":  # 2023-2024 pyworker: the dataclass fields in their declared order
        fields = {k: auth[k] for k in ("cost", "endpoint", "reqnum", "url")}
        return json.dumps(fields, indent=4).encode()
    raise ValueError(f"unknown format {fmt!r}")


def sign(key: rsa.RSAPrivateKey, text: bytes) -> str:
    return base64.b64encode(key.sign(text, padding.PKCS1v15(), hashes.SHA256())).decode()


def signed_auth(key: rsa.RSAPrivateKey, fmt: str, *, url: str, reqnum: int, cost: Any = 242.0,
                endpoint: str = "test-endpoint", request_idx: int | None = None,
                request_id: str | None = "req-abc") -> dict[str, Any]:
    """An `auth_data` object as `/route/` returns it, signed over `fmt`'s message."""
    auth: dict[str, Any] = {"cost": cost, "endpoint": endpoint, "reqnum": reqnum, "url": url}
    auth["request_idx"] = reqnum if request_idx is None else request_idx
    if request_id is not None:
        auth["__request_id"] = request_id
    auth["signature"] = sign(key, message(fmt, auth))
    return auth
