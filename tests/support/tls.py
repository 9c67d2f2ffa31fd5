"""A throwaway TLS-only ``redis-server`` with a freshly made CA, for ``rediss://`` tests.

Certificates are made with the ``openssl`` command line (EC P-256, so it takes
milliseconds) and carry the extensions Python 3.13's strict X.509 verification
requires (key identifiers, basic constraints, key usage).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.workers import free_port

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""

# What a redis-server built without TLS prints when asked for a TLS port:
# 6.x/7.0 do not know the tls-* directives; 7.2+ know them but cannot listen.
_NO_TLS_SIGNS = ("bad directive", "connection type tls", "(tls), aborting")


class TlsUnsupported(Exception):
    """The ``redis-server`` binary was built without TLS support."""


@dataclass(frozen=True)
class Certificates:
    """Paths of a test CA and a server certificate it signed for 127.0.0.1."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class TlsRedis:
    """A running TLS-only Redis server (no plaintext port)."""

    port: int
    certificates: Certificates
    log: Path

    def client(self) -> redis.Redis[bytes]:
        """Return an admin client (the default user) that verifies the server certificate."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.certificates.ca_cert),
            ssl_cert_reqs="required",
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=30
    )


def make_certificates(directory: Path) -> Certificates:
    """Create a self-signed CA and a server certificate for 127.0.0.1 in ``directory``."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=celery-resilience test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS)
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    return Certificates(directory / "ca.crt", directory / "server.crt", directory / "server.key")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_until_ready(server: TlsRedis, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = server.client()
    try:
        while True:
            if process.poll() is not None:
                return  # the caller reads the log
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"TLS redis-server on port {server.port} did not answer within "
                        f"{timeout} s; its log:\n{server.log.read_text()}"
                    ) from None
                time.sleep(0.02)
    finally:
        client.close()


@contextmanager
def tls_redis_server(directory: Path, *, attempts: int = 3) -> Iterator[TlsRedis]:
    """Run a TLS-only ``redis-server`` in ``directory`` until the block ends.

    Raises :class:`TlsUnsupported` when the binary has no TLS support and
    ``FileNotFoundError`` when ``redis-server`` or ``openssl`` is not installed.
    """
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        raise FileNotFoundError("redis-server and openssl are needed for the TLS tests")
    certificates = make_certificates(directory)
    for attempt in range(attempts):
        server = TlsRedis(free_port(), certificates, directory / f"redis-{attempt}.log")
        command = [
            binary,
            "--bind", "127.0.0.1",
            "--port", "0",
            "--tls-port", str(server.port),
            "--tls-cert-file", str(certificates.server_cert),
            "--tls-key-file", str(certificates.server_key),
            "--tls-ca-cert-file", str(certificates.ca_cert),
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ]  # fmt: skip
        with server.log.open("wb") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait_until_ready(server, process, timeout=10.0)
            if process.poll() is None:
                yield server
                return
            output = server.log.read_text(errors="replace")
            if any(sign in output.lower() for sign in _NO_TLS_SIGNS):
                raise TlsUnsupported(f"{binary} cannot serve TLS: {output.strip()[-300:]}")
            if "address already in use" not in output.lower():
                raise RuntimeError(f"TLS redis-server exited early; its log:\n{output}")
            # Another process took the free port before redis-server bound it: retry.
        finally:
            _stop(process)
    raise RuntimeError(f"TLS redis-server found no free port in {attempts} attempts")
