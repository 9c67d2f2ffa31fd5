"""TLS to the data nodes of a Sentinel URL: a TLS-only primary and replica (replicating
over TLS), three plaintext sentinels that monitor them over TLS, and the backends'
``connection_kwargs`` = ``{"ssl": True, "ssl_ca_certs": ...}``."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from celery_resilience.backends.base import Admission
from celery_resilience.errors import BackendUnavailable
from celery_resilience.testing import backend_for, dlq_backend_for
from tests.support import workers
from tests.support.services import unavailable
from tests.support.tls import Certificates, make_certificates

MASTER = "resilience-tls"
ADMIT = {"publish": "p", "lease_ttl": 30.0, "max_crashes": 3, "record_ttl": 60.0}


@dataclass(frozen=True)
class TlsSentinels:
    url: str
    certificates: Certificates


def _tls(certificates: Certificates) -> list[str]:
    return [
        "--tls-cert-file", str(certificates.server_cert),
        "--tls-key-file", str(certificates.server_key),
        "--tls-ca-cert-file", str(certificates.ca_cert),
        "--tls-auth-clients", "no", "--tls-replication", "yes",
    ]  # fmt: skip


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``redis-server *args`` (a config file first, for a sentinel), logging to ``log``."""
    return subprocess.Popen(
        ["redis-server", *args, "--logfile", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _sentinel_sees_the_replica(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        state = client.sentinel_master(MASTER)
        return int(state["num-slaves"]) == 1 and "s_down" not in state["flags"]
    except (redis.RedisError, KeyError):
        return False
    finally:
        client.close()


@pytest.fixture
def tls_sentinels(tmp_path: Path) -> Iterator[TlsSentinels]:
    try:
        certificates = make_certificates(tmp_path)
    except FileNotFoundError:
        unavailable("openssl is needed for the TLS tests", "topology")
    primary, replica = workers.free_port(), workers.free_port()
    processes = []
    try:
        base = ["--port", "0", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        base += [*_tls(certificates), "--dir", str(tmp_path)]
        processes.append(_start([*base, "--tls-port", str(primary)], tmp_path / "p.log"))
        processes.append(
            _start(
                [*base, "--tls-port", str(replica), "--replicaof", "127.0.0.1", str(primary)],
                tmp_path / "r.log",
            )
        )
        sentinels = [workers.free_port() for _ in range(3)]
        tls = _tls(certificates)
        outbound = "".join(
            f"{k.lstrip('-')} {v}\n" for k, v in zip(tls[::2], tls[1::2], strict=True)
        )
        for port in sentinels:  # plaintext themselves, TLS to the nodes they monitor
            config = tmp_path / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n{outbound}"
            )
            log = tmp_path / f"sentinel-{port}.log"
            processes.append(_start([str(config), "--sentinel"], log))
        workers.wait_until(
            lambda: all(_sentinel_sees_the_replica(port) for port in sentinels),
            "the sentinels to see the TLS primary and its replica",
            lambda: "\n".join(workers.tail(p, 20) for p in tmp_path.glob("*.log")),
            30,
        )
        url = ";".join(f"sentinel://127.0.0.1:{port}" for port in sentinels)
        yield TlsSentinels(url, certificates)
    finally:
        for process in processes:
            process.kill()
            process.wait(10)


def test_the_data_nodes_are_reached_over_tls(tls_sentinels: TlsSentinels) -> None:
    ca = str(tls_sentinels.certificates.ca_cert)
    options = {"master_name": MASTER, "connection_kwargs": {"ssl": True, "ssl_ca_certs": ca}}
    prefix = f"crtest:{uuid.uuid4().hex[:8]}"
    backend = backend_for(tls_sentinels.url, prefix, transport_options=options)
    dlq = dlq_backend_for(tls_sentinels.url, prefix, transport_options=options)
    plain = backend_for(tls_sentinels.url, prefix, transport_options={"master_name": MASTER})
    try:
        assert backend.admit("t1", owner="a", lock_key="k", **ADMIT).admission is Admission.ADMITTED
        assert dlq.count() == 0
        with pytest.raises(BackendUnavailable, match="coordination backend sentinel://"):
            plain.ping()  # the same URL without TLS: the TLS-only primary refuses it
    finally:
        for closing in (backend, dlq, plain):
            closing.close()
