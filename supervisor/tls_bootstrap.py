"""The worker's TLS certificate, obtained as Vast's start script does it, when none is on disk.

With `USE_SSL` and no `SSL_CERT`/`SSL_KEY` files, Vast's `start_server.sh` makes an RSA 2048 key and a
CSR (`/C=US/ST=CA/CN=pyworker.vast.ai/`, SAN `IP:0.0.0.0`), POSTs the CSR (PEM, as
`application/octet-stream`) to `https://console.vast.ai/api/v0/sign_cert/?instance_id=$CONTAINER_ID`
and saves the answer as the certificate, with 5 tries and exponential back-off. This module does the
same with `cryptography` (no `openssl` subprocess): the key is written 0600 before any request is made,
the answer must be a PEM certificate for that key, and the URL is a setting (`SIGN_CERT_URL`) so that
tests sign with a CA of their own. The key generation (~0.1 s of CPU) and the file writes run in a
thread.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from supervisor.logs import get_logger

MAX_ANSWER_BYTES = 64 * 1024  # a certificate chain is a few KiB


class CertificateError(Exception):
    """No certificate could be obtained; the message says why (for the log and the error report)."""


@dataclass(frozen=True)
class SignSettings:
    url: str  # the signing endpoint; `?instance_id=` is added
    instance_id: str
    tries: int = 5
    first_delay_s: float = 2.0  # then 4, 8, 16 s, as Vast's script
    timeout_s: float = 30.0


def make_key_and_csr() -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) with the subject and SAN of Vast's start script."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "pyworker.vast.ai"),
        ]))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("0.0.0.0"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def check_certificate(answer: bytes, key_pem: bytes) -> None:
    """The answer is a PEM certificate (chain first) for our key. Raises CertificateError."""
    try:
        cert = x509.load_pem_x509_certificate(answer)
    except ValueError as exc:
        raise CertificateError(f"the answer is not a PEM certificate ({exc})") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertificateError("the certificate is not for the key that was sent")


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Written whole or not at all (a temporary file in the same folder, then a rename), with `mode`
    from the start: the key is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def obtain_certificate(client: httpx.AsyncClient, cert: Path, key: Path, settings: SignSettings) -> None:
    """Make a key and CSR, have the CSR signed, write both files. Raises CertificateError."""
    log = get_logger("supervisor.tls")
    key_pem, csr_pem = await trio.to_thread.run_sync(make_key_and_csr)
    try:
        await trio.to_thread.run_sync(write_private, key, key_pem)
    except OSError as exc:
        raise CertificateError(f"cannot write the key {key}: {exc}") from None
    delay, error = settings.first_delay_s, ""
    for attempt in range(1, settings.tries + 1):
        try:
            response = await client.post(
                settings.url, params={"instance_id": settings.instance_id}, content=csr_pem,
                headers={"content-type": "application/octet-stream"}, timeout=settings.timeout_s,
            )
            answer = response.content[:MAX_ANSWER_BYTES + 1]
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
            elif len(answer) > MAX_ANSWER_BYTES:
                error = "the answer is over 64 KiB"
            else:
                check_certificate(answer, key_pem)
                await trio.to_thread.run_sync(write_private, cert, answer, 0o644)
                log.info("tls.certificate", path=str(cert), attempt=attempt)
                return
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except CertificateError as exc:
            error = str(exc)
        except OSError as exc:
            raise CertificateError(f"cannot write the certificate {cert}: {exc}") from None
        log.warning("tls.sign_failed", attempt=attempt, of=settings.tries, error=error)
        if attempt < settings.tries:
            await trio.sleep(delay)
            delay *= 2
    raise CertificateError(f"the certificate could not be signed after {settings.tries} tries ({error})")
