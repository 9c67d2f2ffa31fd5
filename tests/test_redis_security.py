"""Security of the Redis backend: ACL users, ``rediss://`` and masked passwords.

SPEC "Security": passwords in URLs are masked everywhere they are printed;
``rediss://`` and Redis ACL users work. SPEC "Bad input": a malformed URL or an
unreachable backend at worker start gets one clear error naming the setting or
backend. Everything runs against real Redis servers and real worker processes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import pytest
import redis

from celery_resilience import BackendUnavailable, ConfigurationError
from celery_resilience.backends.base import Admission
from celery_resilience.backends.redis import RedisCoordinationBackend
from celery_resilience.settings import load_settings
from tests.support.tls import TlsRedis, TlsUnsupported, tls_redis_server

SUPPORT_DIR = Path(__file__).parent / "support"

# Every command the coordination backend sends (its Lua scripts' commands are
# checked against the ACL too), and a common "everything but admin" rule set.
MINIMAL_ACL = (
    "+ping +select +evalsha +script|load +exists +get +set +incr +del +pexpire +pttl +time"
)
TYPICAL_ACL = "+@all -@dangerous"

WORKER_TIMEOUT = 30.0  # seconds a worker may take to give up on an unreachable backend


def _unavailable(reason: str) -> None:
    """Skip locally; fail under CI, where every service must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def _with_credentials(url: str, username: str, password: str) -> str:
    """Return ``url`` logging in as ``username`` with ``password`` (any old ones dropped)."""
    parts = urlsplit(url)
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{_host_port(url)}"
    return parts._replace(netloc=netloc).geturl()


def _masked(url: str, username: str) -> str:
    """The start of ``url`` as it must be printed: scheme, user, ``**`` and host."""
    return f"{urlsplit(url).scheme}://{username}:**@{_host_port(url)}"


def _exercise(backend: RedisCoordinationBackend) -> None:
    """Run every backend operation once and check each answer."""
    backend.ping()
    lock = f"upload:{secrets.token_hex(4)}"
    first = backend.admit(
        "task-1", owner="a", publish="p1", lock_key=lock, lease_ttl=30, max_crashes=3,
        record_ttl=60,
    )  # fmt: skip
    assert first.admission is Admission.ADMITTED
    assert first.fencing_token is not None
    assert backend.holds("task-1", lock, "a") is True
    contended = backend.admit(
        "task-2", owner="b", publish="p2", lock_key=lock, lease_ttl=30, max_crashes=3,
        record_ttl=60,
    )  # fmt: skip
    assert contended.admission is Admission.LOCK_CONTENDED
    assert contended.lease_remaining > 0
    assert backend.renew("task-1", lock, "a", 30) is True
    finished = backend.finish(
        "task-1", owner="a", publish="p1", lock_key=lock, succeeded=True, record_ttl=60
    )
    assert finished is True
    assert backend.release("task-1", lock, "a") is False
    again = backend.admit(
        "task-1", owner="a", publish="p1", lock_key=lock, lease_ttl=30, max_crashes=3,
        record_ttl=60,
    )  # fmt: skip
    assert again.admission is Admission.DUPLICATE


@pytest.fixture(scope="module")
def admin(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    """A client of the main test Redis that may manage ACL users."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        client.acl_whoami()
    except redis.RedisError as exc:
        client.close()
        _unavailable(f"ACL commands refused by the test Redis: {type(exc).__name__}: {exc}")
    yield client
    client.close()


AclUserFactory = Callable[[str, str], tuple[str, str]]


@pytest.fixture
def acl_user(admin: redis.Redis[bytes]) -> Iterator[AclUserFactory]:
    """Create ACL users on the main test Redis: ``(rules, keys) -> (name, password)``."""
    created: list[str] = []

    def create(rules: str, keys: str) -> tuple[str, str]:
        name, password = f"cr_test_{secrets.token_hex(4)}", secrets.token_hex(12)
        admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", keys, *rules.split())
        created.append(name)
        return name, password

    yield create
    if created:
        admin.execute_command("ACL", "DELUSER", *created)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A private TLS-only redis-server with its own CA."""
    try:
        with tls_redis_server(tmp_path_factory.mktemp("tls")) as server:
            yield server
    except TlsUnsupported as exc:
        pytest.skip(f"this machine's redis-server has no TLS support: {exc}")
    except FileNotFoundError as exc:
        _unavailable(str(exc))


def _tls_url(server: TlsRedis, credentials: str = "") -> str:
    query = urlencode(
        {"ssl_cert_reqs": "required", "ssl_ca_certs": str(server.certificates.ca_cert)}
    )
    return f"rediss://{credentials}127.0.0.1:{server.port}/0?{query}"


@pytest.mark.parametrize("rules", [MINIMAL_ACL, TYPICAL_ACL], ids=["minimal", "all-but-dangerous"])
def test_acl_user_limited_to_key_prefix_runs_every_operation(
    redis_url: str, admin: redis.Redis[bytes], acl_user: AclUserFactory, key_prefix: str, rules: str
) -> None:
    """An ACL user allowed only keys under the key prefix can admit, renew, finish, ping."""
    name, password = acl_user(rules, f"~{key_prefix}:*")
    backend = RedisCoordinationBackend(
        _with_credentials(redis_url, name, password), key_prefix=key_prefix
    )
    try:
        _exercise(backend)
    finally:
        backend.close()
    assert any(admin.scan_iter(match=f"{key_prefix}:*")), "nothing was stored under the prefix"


@pytest.mark.parametrize("rules", [MINIMAL_ACL, TYPICAL_ACL], ids=["minimal", "all-but-dangerous"])
def test_listing_held_locks_needs_scan_and_a_refusal_is_named(
    redis_url: str, acl_user: AclUserFactory, key_prefix: str, rules: str
) -> None:
    """The web page's lock list under an ACL user of the prefix: ``+@all -@dangerous``
    lists the lock; the workers' minimal rules have no ``scan``, and the error names the
    backend, the operation and the refusal, without the password."""
    name, password = acl_user(rules, f"~{key_prefix}:*")
    backend = RedisCoordinationBackend(
        _with_credentials(redis_url, name, password), key_prefix=key_prefix
    )
    try:
        backend.admit(
            "t1", owner="o", publish="p", lock_key="k1", lease_ttl=30, max_crashes=3, record_ttl=60
        )
        if rules == TYPICAL_ACL:
            assert [lock.key for lock in backend.held_locks()] == ["k1"]
        else:
            with pytest.raises(
                BackendUnavailable, match="during held locks: NoPermissionError"
            ) as e:
                backend.held_locks()
            assert password not in str(e.value)
    finally:
        backend.close()


def test_acl_user_with_wrong_password_raises_masked_backend_unavailable(
    redis_url: str, acl_user: AclUserFactory, key_prefix: str
) -> None:
    """A wrong ACL password gives BackendUnavailable naming the masked URL, never the password."""
    name, _ = acl_user(TYPICAL_ACL, f"~{key_prefix}:*")
    wrong = f"wrong-{secrets.token_hex(8)}"
    url = _with_credentials(redis_url, name, wrong)
    backend = RedisCoordinationBackend(url, key_prefix=key_prefix)
    try:
        with pytest.raises(BackendUnavailable) as info:
            backend.ping()
    finally:
        backend.close()
    message = str(info.value)
    assert "coordination backend" in message
    assert _masked(url, name) in message
    assert wrong not in "".join(traceback.format_exception(info.value))


def test_rediss_url_with_verified_certificate_runs_every_operation(
    tls_server: TlsRedis, key_prefix: str
) -> None:
    """Over rediss:// with the test CA the backend admits, renews, finishes and pings."""
    backend = RedisCoordinationBackend(_tls_url(tls_server), key_prefix=key_prefix)
    try:
        _exercise(backend)
    finally:
        backend.close()


def test_rediss_url_with_unknown_certificate_authority_raises_backend_unavailable(
    tls_server: TlsRedis,
) -> None:
    """rediss:// verifies the server certificate: one from an untrusted CA is refused."""
    backend = RedisCoordinationBackend(f"rediss://127.0.0.1:{tls_server.port}/0")
    try:
        with pytest.raises(BackendUnavailable) as info:
            backend.ping()
    finally:
        backend.close()
    message = str(info.value)
    assert f"rediss://127.0.0.1:{tls_server.port}" in message
    assert "certificate" in message.lower()


def test_rediss_url_with_acl_user_works_and_is_masked_in_repr_and_url(
    tls_server: TlsRedis, key_prefix: str
) -> None:
    """An ACL user over rediss:// works (scripts loaded afresh) and its password is masked."""
    name, password = f"cr_test_{secrets.token_hex(4)}", f"s3cret{secrets.token_hex(8)}"
    admin = tls_server.client()
    try:
        admin.execute_command(
            "ACL", "SETUSER", name, "on", f">{password}", f"~{key_prefix}:*", *MINIMAL_ACL.split()
        )
        admin.script_flush()  # a private server: make the backend load its scripts itself
        backend = RedisCoordinationBackend(_tls_url(tls_server, f"{name}:{password}@"), key_prefix)
        try:
            _exercise(backend)
        finally:
            backend.close()
        expected = f"rediss://{name}:**@127.0.0.1:{tls_server.port}"
        assert backend.url.startswith(expected)
        assert expected in repr(backend)
        assert "s3cret" not in backend.url
        assert "s3cret" not in repr(backend)
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


def test_malformed_url_setting_error_names_the_setting_without_password() -> None:
    """A non-numeric port is a ConfigurationError naming resilience_url; the password is hidden."""
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_url": "redis://:s3cret@host:notaport/0"}, environ={})
    assert "resilience_url" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_malformed_url_in_environment_error_names_the_variable_without_password() -> None:
    """A malformed CELERY_RESILIENCE_URL is a ConfigurationError naming it, password hidden."""
    environ = {"CELERY_RESILIENCE_URL": "redis://:s3cret@host:notaport/0"}
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_url": "memory://"}, environ=environ)
    message = str(info.value)
    assert "resilience_url" in message
    assert "CELERY_RESILIENCE_URL" in message
    assert "s3cret" not in message


def test_url_with_unescaped_slash_in_password_does_not_leak_it_in_the_error() -> None:
    """A password with an unescaped '/' (common in generated ones) stays out of the error."""
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_url": "redis://:s3cret/Xy+z@host:6379/0"}, environ={})
    assert "resilience_url" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_wrong_type_setting_error_names_key_value_and_expectation() -> None:
    """A wrong-type setting is a ConfigurationError naming the key, the value and the type."""
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_lock_ttl": "abc"}, environ={})
    message = str(info.value)
    assert "resilience_lock_ttl" in message
    assert "'abc'" in message
    assert "expected a number of seconds" in message


@pytest.mark.integration
def test_worker_with_unreachable_backend_exits_non_zero_printing_only_masked_urls(
    redis_url: str, acl_user: AclUserFactory, tmp_path: Path
) -> None:
    """A worker whose resilience_url is unreachable exits non-zero; no password is printed."""
    broker_user, broker_password = acl_user("+@all", "~*")
    broker_url = _with_credentials(redis_url, broker_user, broker_password)
    backend_url = f"redis://:s3cret{secrets.token_hex(4)}@127.0.0.1:1/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_RESILIENCE_")}
    env["CR_SECURITY_BROKER_URL"] = broker_url
    env["CR_SECURITY_RESILIENCE_URL"] = backend_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUPPORT_DIR), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "celery", "-A", "security_app", "worker",
        "--loglevel=DEBUG", "--concurrency=1", "--hostname", f"cr-security-{broker_user}@%h",
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    try:
        worker = subprocess.run(
            command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=WORKER_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"worker still running after {WORKER_TIMEOUT} s:\n{exc.stdout}\n{exc.stderr}")
    output = worker.stdout + worker.stderr
    assert worker.returncode != 0, output
    assert any(
        "coordination backend" in line and "redis://:**@127.0.0.1:1/0" in line
        for line in output.splitlines()
    ), output
    assert "s3cret" not in output
    assert _masked(broker_url, broker_user) in worker.stdout, worker.stdout
    assert broker_password not in output
