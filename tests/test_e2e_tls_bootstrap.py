"""TLS like Vast's start script (issue 12): no certificate on disk, so shepherd makes a key and a CSR and
has a signer sign it, then serves HTTPS with it. The signer here is a local fake with a test CA (the
real one is console.vast.ai's sign_cert); Vast's own client library then talks TLS to shepherd."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.fake_autoscaler import STATUS, FakeAutoscaler
from tests.harness import Shepherd, free_port

CONTAINER_ID = "42"


class FakeSigner:
    """console.vast.ai's sign_cert, with a CA made here: signs the CSR for the worker's IP."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.requests: list[tuple[str, dict[str, list[str]], str, bytes]] = []
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shepherd test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        signer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urlsplit(self.path)
                signer.requests.append((url.path, parse_qs(url.query), self.headers.get("Content-Type", ""), body))
                if signer.fail:
                    answer, status = b"signing is down", 500
                else:
                    answer, status = signer.sign(body), 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v0/sign_cert/"

    def sign(self, csr_pem: bytes) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.ca_cert.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def trusting_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=self.ca_cert.public_bytes(serialization.Encoding.PEM).decode())
        return context

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeAutoscaler]:
    autoscaler = FakeAutoscaler().start()
    yield autoscaler
    autoscaler.stop()


def tls_env(fake: FakeAutoscaler, signer: FakeSigner, tmp_path: Path, port: int, public: int) -> dict[str, str]:
    return {
        "REPORT_ADDR": fake.url, "CONTAINER_ID": CONTAINER_ID, "PUBLIC_IPADDR": "127.0.0.1",
        f"VAST_TCP_PORT_{port}": str(public), "UNSECURED": "true",
        "SSL_CERT": str(tmp_path / "instance.crt"), "SSL_KEY": str(tmp_path / "instance.key"),
        "SIGN_CERT_URL": signer.url, "SIGN_CERT_BACKOFF": "0.01",
    }


def test_a_worker_reporting_to_vast_gets_its_certificate_signed_and_serves_https(
    fake: FakeAutoscaler, tmp_path: Path
) -> None:
    signer = FakeSigner()
    port, public = free_port(), free_port()
    s = Shepherd(["--backend", "demo"], env={**tls_env(fake, signer, tmp_path, port, public), "USE_SSL": "true"},
                 port=port)
    try:
        s.wait_state("ready")
        [(path, query, content_type, body)] = signer.requests
        assert path == "/api/v0/sign_cert/" and query == {"instance_id": [CONTAINER_ID]}
        assert content_type == "application/octet-stream"
        csr = x509.load_pem_x509_csr(body)
        assert csr.subject.rfc4514_string() == "CN=pyworker.vast.ai,ST=CA,C=US"
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("0.0.0.0")]
        assert stat.S_IMODE((tmp_path / "instance.key").stat().st_mode) == 0o600
        with httpx.Client(verify=signer.trusting_context(), trust_env=False) as client:
            answer = client.get(f"https://127.0.0.1:{port}/ready")
        assert answer.status_code == 200
        reports = [r.body for r in fake.all(STATUS)]
        assert reports and all(r["url"] == f"https://127.0.0.1:{public}" for r in reports)
    finally:
        s.close()
        signer.close()


def test_tls_is_vasts_default_when_reporting_and_a_signer_that_fails_is_exit_2_with_one_report(
    fake: FakeAutoscaler, tmp_path: Path
) -> None:
    signer = FakeSigner(fail=True)
    port, public = free_port(), free_port()
    env: dict[str, str | None] = {**tls_env(fake, signer, tmp_path, port, public), "USE_SSL": None}  # unset
    s = Shepherd(["--backend", "demo"], env=env, port=port)
    try:
        assert s.wait_exit() == 2
    finally:
        s.close()
        signer.close()
    assert len(signer.requests) == 5  # Vast's 5 tries
    [error] = [e for e in s.find("config.error") if e["setting"] == "USE_SSL"]
    assert "could not be signed after 5 tries (HTTP 500)" in error["error"]
    [report] = [r.body for r in fake.all(STATUS)]
    assert "failed to launch" in report["error_msg"] and "HTTP 500" in report["error_msg"]
    assert s.find("model.started") == []
    assert not (tmp_path / "instance.crt").exists()


def test_vasts_client_talks_tls_to_a_worker_with_a_signed_certificate(tmp_path: Path) -> None:
    pytest.importorskip("vastai")
    import asyncio

    from vastai.serverless.client import CoroutineServerless, Endpoint

    signer = FakeSigner()
    port = free_port()
    fake = FakeAutoscaler(worker_url=f"https://127.0.0.1:{port}").start()

    class TrustingTestCA(CoroutineServerless):
        """The client trusts Vast's root CA, which it downloads; here, the test CA instead."""

        async def get_ssl_context(self) -> ssl.SSLContext:
            return signer.trusting_context()

    async def request() -> dict[str, Any]:
        async with TrustingTestCA(api_key="k", autoscaler_url=fake.url, max_poll_interval=0.5) as client:
            endpoint = Endpoint(client, "tls", 1, "k")
            payload = {"inputs": "over tls", "parameters": {"max_new_tokens": 3}}
            return await asyncio.wait_for(endpoint.request("/generate", payload, cost=3, retry=False), 30)

    env = {**tls_env(fake, signer, tmp_path, port, port), "UNSECURED": "false", "USE_SSL": "true"}
    s = Shepherd(["--backend", "demo"], env=env, port=port)
    try:
        s.wait_state("ready")
        result = asyncio.run(request())
        assert result["ok"] is True and result["status"] == 200, result
        assert result["url"] == f"https://127.0.0.1:{port}" and result["response"]["tokens"] == 3
        assert [e["status"] for e in s.find("access")] == [200]
    finally:
        s.close()
        fake.stop()
        signer.close()
