"""Settings: app.conf keys, environment overrides and errors that name the problem."""

from __future__ import annotations

import pytest

from celery_resilience import ConfigurationError
from celery_resilience.settings import SETTING_NAMES, load_settings


def test_defaults_without_any_setting_use_memory_and_spec_values() -> None:
    """With nothing set and a non-Redis broker, defaults are the documented ones."""
    s = load_settings({"broker_url": "amqp://guest@localhost//"}, environ={})
    assert s.url == s.dlq_url == "memory://"
    assert s.url_is_default
    assert (s.key_prefix, s.max_retries, s.max_crashes, s.lock_ttl) == (
        "celery_resilience",
        10,
        3,
        30.0,
    )
    assert s.dlq_retention == 7 * 86400
    assert s.dlq_max_entries == 10_000
    assert s.prometheus_port is None


def test_redis_broker_url_is_the_default_backend() -> None:
    """An unset resilience_url falls back to a redis:// broker URL."""
    s = load_settings({"broker_url": "redis://:pw@h:6379/2"}, environ={})
    assert s.url == "redis://:pw@h:6379/2"
    assert s.dlq_url == s.url


def test_environment_overrides_app_conf() -> None:
    """CELERY_RESILIENCE_* wins over the app.conf key and is converted to its type."""
    conf = {"resilience_lock_ttl": 10, "resilience_max_crashes": 5}
    env = {"CELERY_RESILIENCE_LOCK_TTL": "2.5", "CELERY_RESILIENCE_VISIBILITY_HEARTBEAT": "off"}
    s = load_settings(conf, environ=env)
    assert s.lock_ttl == 2.5
    assert s.max_crashes == 5
    assert s.visibility_heartbeat is False


def test_dlq_url_can_differ_from_url() -> None:
    """resilience_dlq_url sets the DLQ backend alone."""
    s = load_settings(
        {"resilience_url": "redis://a/1", "resilience_dlq_url": "redis://b/2"}, environ={}
    )
    assert (s.url, s.dlq_url) == ("redis://a/1", "redis://b/2")


@pytest.mark.parametrize(
    ("conf", "env", "expected"),
    [
        (
            {"resilience_lock_ttl": "abc"},
            {},
            r"resilience_lock_ttl='abc': expected a number of seconds > 0",
        ),
        (
            {"resilience_max_retries": -1},
            {},
            r"resilience_max_retries=-1: expected an integer >= 0",
        ),
        (
            {"resilience_max_crashes": True},
            {},
            r"resilience_max_crashes=True: expected an integer >= 1",
        ),
        (
            {"resilience_prometheus_port": 70000},
            {},
            r"resilience_prometheus_port=70000: expected a TCP port",
        ),
        (
            {},
            {"CELERY_RESILIENCE_MAX_RETRIES": "ten"},
            r"resilience_max_retries \(from environment variable "
            r"CELERY_RESILIENCE_MAX_RETRIES\)='ten'",
        ),
        ({"resilience_visibility_heartbeat": "maybe"}, {}, r"expected true or false"),
    ],
)
def test_wrong_type_names_key_value_and_expectation(
    conf: dict[str, object], env: dict[str, str], expected: str
) -> None:
    """A bad value is one ConfigurationError naming the key, the value and what was expected."""
    with pytest.raises(ConfigurationError, match=expected):
        load_settings(conf, environ=env)


def test_malformed_url_fails_with_the_setting_name_and_masked_password() -> None:
    """A URL without a scheme is refused, and its password is not echoed."""
    with pytest.raises(ConfigurationError, match="resilience_url") as info:
        load_settings({"resilience_url": "localhost:6379"}, environ={})
    assert "expected a URL" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        load_settings({"resilience_dlq_url": "redis://:hunter2@h:port/0"}, environ={})
    assert "resilience_dlq_url" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_every_setting_in_the_spec_table_is_known() -> None:
    """The settings the SPEC lists are all read."""
    spec = {
        "resilience_url",
        "resilience_dlq_url",
        "resilience_key_prefix",
        "resilience_max_retries",
        "resilience_max_crashes",
        "resilience_lock_ttl",
        "resilience_dlq_retention",
        "resilience_dlq_max_entries",
        "resilience_visibility_heartbeat",
        "resilience_prometheus_port",
    }
    assert spec <= set(SETTING_NAMES)
