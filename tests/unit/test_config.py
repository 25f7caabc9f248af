"""Settings: design defaults, environment variables, validation and error messages."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from conveyor.config import Settings, load_settings
from conveyor.errors import ConfigError

_UNPREFIXED = ("DATABASE_URL", "REDIS_URL", "PORT", "API_KEYS", "CONCURRENCY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without any Conveyor variable."""
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_") or name.upper() in _UNPREFIXED:
            monkeypatch.delenv(name)


def test_defaults_match_the_design() -> None:
    settings = Settings()
    assert settings.port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.concurrency == 5
    assert settings.heartbeat_interval == 30.0
    assert settings.heartbeat_ttl == 90.0
    assert settings.rebalance_interval == 10.0
    assert settings.max_attempts == 3
    assert settings.api_keys == []
    assert settings.worker_types == []
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.embedded is True


def test_prefixed_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PORT", "9001")
    monkeypatch.setenv("CONVEYOR_CONCURRENCY", "12")
    monkeypatch.setenv("CONVEYOR_KEY_PREFIX", "myapp")
    monkeypatch.setenv("CONVEYOR_LOG_FORMAT", "json")
    settings = load_settings()
    assert settings.port == 9001
    assert settings.concurrency == 12
    assert settings.key_prefix == "myapp"
    assert settings.log_format == "json"


def test_unprefixed_variables_other_than_urls_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("CONCURRENCY", "77")
    settings = load_settings()
    assert settings.port == 8080
    assert settings.concurrency == 5


def test_database_and_redis_urls_without_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/app")
    monkeypatch.setenv("REDIS_URL", "redis://cache.example/0")
    settings = load_settings()
    assert settings.database_url == "postgresql://db.example/app"
    assert settings.redis_url == "redis://cache.example/0"
    assert settings.embedded is False


def test_database_and_redis_urls_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "postgresql://prefixed/app")
    monkeypatch.setenv("CONVEYOR_REDIS_URL", "redis://prefixed/0")
    settings = load_settings()
    assert settings.database_url == "postgresql://prefixed/app"
    assert settings.redis_url == "redis://prefixed/0"


def test_prefixed_url_wins_over_unprefixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://plain/app")
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "postgresql://prefixed/app")
    assert load_settings().database_url == "postgresql://prefixed/app"


def test_one_url_alone_is_not_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://only/0")
    assert load_settings().embedded is False


def test_api_keys_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_API_KEYS", " alpha, beta ,,gamma ,")
    monkeypatch.setenv("CONVEYOR_WORKER_TYPES", "webhook,thumbnail")
    settings = load_settings()
    assert settings.api_keys == ["alpha", "beta", "gamma"]
    assert settings.worker_types == ["webhook", "thumbnail"]


def test_single_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_API_KEYS", "only-one")
    assert load_settings().api_keys == ["only-one"]


def test_api_keys_accept_a_list_in_overrides() -> None:
    assert load_settings({"api_keys": ["k1", "k2"]}).api_keys == ["k1", "k2"]


def test_fractional_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HEARTBEAT_INTERVAL", "0.25")
    monkeypatch.setenv("CONVEYOR_HEARTBEAT_TTL", "0.75")
    monkeypatch.setenv("CONVEYOR_REBALANCE_INTERVAL", "2.5")
    monkeypatch.setenv("CONVEYOR_DRAIN_TIMEOUT", "1.5")
    monkeypatch.setenv("CONVEYOR_READ_BLOCK", "0.2")
    settings = load_settings()
    assert settings.heartbeat_interval == 0.25
    assert settings.heartbeat_ttl == 0.75
    assert settings.rebalance_interval == 2.5
    assert settings.drain_timeout == 1.5
    assert settings.read_block == 0.2


@pytest.mark.parametrize(("interval", "ttl"), [("30", "30"), ("30", "29.9"), ("1.5", "1.0")])
def test_heartbeat_ttl_must_exceed_interval(
    monkeypatch: pytest.MonkeyPatch, interval: str, ttl: str
) -> None:
    monkeypatch.setenv("CONVEYOR_HEARTBEAT_INTERVAL", interval)
    monkeypatch.setenv("CONVEYOR_HEARTBEAT_TTL", ttl)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "heartbeat_ttl" in message.lower()
    assert str(float(ttl)) in message
    assert str(float(interval)) in message


def test_heartbeat_ttl_just_above_interval_is_accepted() -> None:
    settings = load_settings({"heartbeat_interval": 1.0, "heartbeat_ttl": 1.01})
    assert settings.heartbeat_ttl > settings.heartbeat_interval


def test_settings_constructor_raises_validation_error() -> None:
    with pytest.raises(ValidationError):
        Settings(heartbeat_interval=10, heartbeat_ttl=5)


def test_error_names_variable_and_value_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PORT", "not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "CONVEYOR_PORT" in message
    assert "'not-a-port'" in message


def test_error_for_out_of_range_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CONCURRENCY", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "CONVEYOR_CONCURRENCY='0'" in str(info.value)


def test_error_lists_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PORT", "70000")
    monkeypatch.setenv("CONVEYOR_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "CONVEYOR_PORT='70000'" in message
    assert "CONVEYOR_LOG_LEVEL='loud'" in message


def test_error_for_bad_identifier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_SCHEMA", "Bad-Schema")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "CONVEYOR_DATABASE_SCHEMA='Bad-Schema'" in str(info.value)


def test_error_from_overrides_names_variable_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"port": 70000})
    assert "CONVEYOR_PORT=70000" in str(info.value)


def test_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PORT", "9000")
    assert load_settings({"port": 9100}).port == 9100


def test_none_overrides_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PORT", "9000")
    settings = load_settings({"port": None, "concurrency": None})
    assert settings.port == 9000
    assert settings.concurrency == 5


def test_pool_bounds_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match=r"(?i)pg_pool_min"):
        load_settings({"pg_pool_min": 5, "pg_pool_max": 2})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_sentinels_are_host_port_pairs_with_a_master_name(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_SENTINELS", "s1:26379, s2:26379,[::1]:26380")
    monkeypatch.setenv("CONVEYOR_REDIS_SENTINEL_MASTER", "main")
    monkeypatch.setenv("CONVEYOR_REDIS_SENTINEL_PASSWORD", "secret")
    settings = load_settings()
    assert settings.redis_sentinels == ["s1:26379", "s2:26379", "[::1]:26380"]
    assert settings.redis_sentinel_master == "main"
    assert settings.redis_sentinel_password is not None
    assert settings.redis_sentinel_password.get_secret_value() == "secret"
    assert settings.redis_given  # no REDIS_URL needed
    assert not settings.embedded


@pytest.mark.parametrize(("env", "message"), [
    ({"CONVEYOR_REDIS_SENTINELS": "s1"}, "CONVEYOR_REDIS_SENTINELS='s1': Value error, "
                                         "'s1' is not host:port"),
    ({"CONVEYOR_REDIS_SENTINELS": "s1:99999"}, "'s1:99999' is not host:port"),
    ({"CONVEYOR_REDIS_SENTINELS": "s1:26379"}, "needs CONVEYOR_REDIS_SENTINEL_MASTER"),
    ({"CONVEYOR_REDIS_SENTINELS": "s1:26379", "CONVEYOR_REDIS_SENTINEL_MASTER": "m",
      "CONVEYOR_REDIS_CLUSTER": "true", "REDIS_URL": "redis://n1:7000"}, "exclude each other"),
    ({"CONVEYOR_REDIS_CLUSTER": "true"}, "CONVEYOR_REDIS_CLUSTER needs CONVEYOR_REDIS_URL"),
])
def test_redis_topology_mistakes_are_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_a_cluster_is_named_by_any_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_CLUSTER", "true")
    monkeypatch.setenv("REDIS_URL", "redis://node-3:7002/0")
    settings = load_settings()
    assert settings.redis_cluster
    assert settings.redis_url == "redis://node-3:7002/0"


def test_rates_and_durations_parse_or_name_the_form() -> None:
    from conveyor.config import Rate, parse_duration, parse_rate

    assert parse_rate("100/s") == Rate(100, 1)
    assert parse_rate(" 6000 / m ") == Rate(6000, 60)
    assert str(parse_rate("20/h")) == "20/h"
    for wrong in ("0/s", "100", "100/d", "fast"):
        with pytest.raises(ValueError, match="N/s, N/m or N/h"):
            parse_rate(wrong)
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("90s") == 90
    with pytest.raises(ValueError, match="Ns, Nm, Nh or Nd"):
        parse_duration("forever")


def test_the_default_rate_limit_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor.config import Rate

    monkeypatch.setenv("CONVEYOR_API_RATE_LIMIT", "50/m")
    assert load_settings().api_rate_limit == Rate(50, 60)
    monkeypatch.setenv("CONVEYOR_API_RATE_LIMIT", "")
    assert load_settings().api_rate_limit is None
    monkeypatch.setenv("CONVEYOR_API_RATE_LIMIT", "lots")
    with pytest.raises(ConfigError, match="CONVEYOR_API_RATE_LIMIT='lots'"):
        load_settings()
