"""Settings: app.conf keys, environment overrides and errors that name the problem."""

from __future__ import annotations

import types

import pytest
from celery import Celery

from celery_resilience import ConfigurationError
from celery_resilience.runtime import runtime
from celery_resilience.settings import SETTING_NAMES, load_settings, require_shared_backend

SERVED = (
    "(served: memory://, redis://, rediss://, unix://, sentinel://, redis+cluster://, "
    "rediss+cluster://)"
)


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


def _namespaced_app(**settings: object) -> Celery:
    """An app configured as Django projects do: ``config_from_object(..., namespace="CELERY")``."""
    source = types.SimpleNamespace(**settings)
    app = Celery("django_like", set_as_current=False)
    app.config_from_object(source, namespace="CELERY")
    return app


def test_namespaced_settings_are_read_and_errors_name_the_key_the_user_wrote() -> None:
    """CELERY_RESILIENCE_LOCK_TTL in a namespaced settings object is read, and named in errors."""
    app = _namespaced_app(CELERY_RESILIENCE_LOCK_TTL=5, CELERY_BROKER_URL="redis://h/1")
    assert load_settings(app.conf, environ={}).lock_ttl == 5.0
    bad = _namespaced_app(CELERY_RESILIENCE_LOCK_TTL="abc")
    with pytest.raises(ConfigurationError) as info:
        load_settings(bad.conf, environ={})
    assert (
        str(info.value)
        == "setting CELERY_RESILIENCE_LOCK_TTL='abc': expected a number of seconds > 0"
    )


def test_namespaced_app_without_resilience_url_names_the_key_to_set() -> None:
    """The refusal tells a Django user to set CELERY_RESILIENCE_URL."""
    app = _namespaced_app(CELERY_BROKER_URL="amqp://guest@localhost//")
    settings = load_settings(app.conf, environ={})
    with pytest.raises(ConfigurationError, match="set CELERY_RESILIENCE_URL to a redis:// URL"):
        require_shared_backend(settings, app.conf)


@pytest.mark.parametrize(
    ("conf", "setting"),
    [
        ({"resilience_url": "redis://h:6379/abc"}, "resilience_url"),
        ({"resilience_dlq_url": "rediss://h:6379/abc"}, "resilience_dlq_url"),
        ({"broker_url": "redis://h:6379/abc"}, "broker_url"),
    ],
)
def test_non_numeric_redis_database_names_the_setting(conf: dict[str, str], setting: str) -> None:
    """redis-py would silently use db 0; the URL a default came from is named too."""
    with pytest.raises(ConfigurationError) as info:
        load_settings(conf, environ={})
    assert str(info.value).startswith(f"setting {setting}=")
    assert "database 'abc' is not a number" in str(info.value)


def test_broker_url_from_celerys_environment_variable_is_the_default_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CELERY_BROKER_URL, which Celery reads itself, gives the default resilience_url."""
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://h:6379/3")
    app = Celery("env_broker", set_as_current=False)
    settings = load_settings(app.conf, environ={})
    assert settings.url == "redis://h:6379/3"
    assert settings.name_of("url") == "broker_url"


def test_only_a_defaulted_memory_backend_is_refused() -> None:
    """memory:// by default on a non-Redis broker is refused; set explicitly it passes."""
    amqp = {"broker_url": "amqp://guest:secret@rabbit//"}
    with pytest.raises(ConfigurationError) as info:
        require_shared_backend(load_settings(amqp, environ={}), amqp)
    assert str(info.value).startswith(
        "resilience_url is unset and broker_url is 'amqp://guest:**@rabbit//', not Redis"
    )
    explicit = {**amqp, "resilience_url": "memory://"}
    require_shared_backend(load_settings(explicit, environ={}), explicit)
    env = {"CELERY_RESILIENCE_URL": "memory://"}
    require_shared_backend(load_settings(amqp, environ=env), amqp)


def test_typod_scheme_names_the_setting_the_user_set_on_first_use() -> None:
    """The DLQ shares resilience_url by default, so both backends name resilience_url."""
    app = Celery("typo", set_as_current=False)
    app.conf.resilience_url = "redsi://127.0.0.1:6379/15"
    rt = runtime(app)
    for role, build in (("coordination", lambda: rt.backend), ("DLQ", lambda: rt.dlq)):
        with pytest.raises(ConfigurationError) as info:
            build()
        assert str(info.value) == (
            f"setting resilience_url='redsi://127.0.0.1:6379/15': no installed {role} backend "
            f"serves the scheme redsi:// {SERVED}"
        )
