"""The settings: one object read from the environment, every variable under its documented
name and default; a bad value is one line that names the variable; secrets stay out of reprs."""

from __future__ import annotations

import pathlib

import pytest

from usage_service import domain
from usage_service.drain.loop import DrainSettings
from usage_service.providers.config import STRIPE_METER_EVENTS, ProviderSettings
from usage_service.settings import ConfigError, environment

# Every variable the service reads. Renaming one breaks deployments: add, never rename.
VARIABLES = {
    "DATABASE_URL",
    "USAGE_DATA_DIR",
    "USAGE_DB_POOL_SIZE",
    "USAGE_READ_MODEL",
    "USAGE_READ_MODEL_ENTRIES",
    "USAGE_READ_MODEL_MAX_LAG_SECONDS",
    "USAGE_GRPC_ADDRESS",
    "USAGE_PLANS_FILE",
    "USAGE_SHUTDOWN_GRACE_SECONDS",
    "USAGE_MAX_IN_FLIGHT",
    "USAGE_MAX_MESSAGE_BYTES",
    "USAGE_REUSE_PORT",
    "USAGE_METRICS_ADDRESS",
    "USAGE_METRICS_REFRESH_SECONDS",
    "USAGE_WATCH_RESUME_SECONDS",
    "USAGE_LOG_FORMAT",
    "USAGE_LOG_LEVEL",
    "USAGE_TRACING",
    "USAGE_HEALTH_CA_FILE",
    "USAGE_HEALTH_SERVER_NAME",
    "USAGE_TLS_CERT_FILE",
    "USAGE_TLS_KEY_FILE",
    "USAGE_TLS_CLIENT_CA_FILE",
    "USAGE_AUTH_TOKENS",
    "USAGE_AUTH_TOKENS_FILE",
    "USAGE_ALLOW_UNAUTHENTICATED",
    "USAGE_KEEP_DENIALS",
    "USAGE_DRAIN_INTERVAL_SECONDS",
    "USAGE_DRAIN_LEASE_SECONDS",
    "USAGE_DRAIN_CLAIM_EVENTS",
    "USAGE_DRAIN_BACKOFF_BASE_SECONDS",
    "USAGE_DRAIN_BACKOFF_CAP_SECONDS",
    "USAGE_DRAIN_CONCURRENCY",
    "STRIPE_API_KEY",
    "STRIPE_API_BASE",
    "STRIPE_METER_EVENT_STREAM",
    "LEMONSQUEEZY_API_KEY",
    "LEMONSQUEEZY_API_BASE",
    "LEMONSQUEEZY_SETTLE_SECONDS",
    "POLAR_ACCESS_TOKEN",
    "POLAR_API_BASE",
    "DODO_PAYMENTS_API_KEY",
    "DODO_PAYMENTS_API_BASE",
    "CREEM_API_KEY",
    "CREEM_API_BASE",
    "USAGE_PROVIDER_TIMEOUT_SECONDS",
    "USAGE_RECONCILE_INTERVAL_SECONDS",
    "USAGE_RECONCILE_SETTLE_SECONDS",
    "USAGE_ALERTS_INTERVAL_SECONDS",
    "USAGE_WEBHOOK_URL",
    "USAGE_WEBHOOK_SECRET",
    "USAGE_WEBHOOK_TIMEOUT_SECONDS",
    "USAGE_WEBHOOK_BACKOFF_BASE_SECONDS",
    "USAGE_WEBHOOK_BACKOFF_CAP_SECONDS",
}
SECRET = "sk_test_secret_value_0123456789"


def test_every_variable_keeps_its_name() -> None:
    names = environment.names()
    assert len(names) == len(set(names))
    assert set(names) == VARIABLES


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)  # as a suite run against a server sets
    s = environment.Settings.from_env({})
    assert (s.grpc_address, s.plans_file, s.metrics_address) == ("127.0.0.1:50051", "", "")
    assert (s.shutdown_grace, s.max_in_flight, s.max_message_bytes) == (10.0, 512, 4194304)
    assert (s.log_format, s.log_level, s.tracing, s.reuse_port) == ("json", "INFO", "", False)
    assert s.metrics_refresh == 5.0
    db = s.database
    assert (db.url, db.data_dir, db.pool_size) == ("", pathlib.Path(".data"), 10)
    assert s.drain == DrainSettings(
        interval=2.0, lease=120.0, claim=1000, backoff_base=1.0, backoff_cap=300.0, concurrency=8
    )
    assert s.providers.configured() == ()
    assert s.providers.endpoint(domain.Provider.STRIPE).base_url == "https://api.stripe.com"
    assert (s.providers.http_timeout, s.providers.lemon_squeezy_settle) == (15.0, 30.0)
    assert s.providers.stripe_meter_events_base == STRIPE_METER_EVENTS
    assert s.providers.stripe_meter_event_stream is False
    assert (s.reconcile.interval, s.reconcile.settle) == (0.0, 600.0)
    assert not s.tls.enabled and not s.auth.allow_unauthenticated
    assert not s.decisions.keep_denials


def test_values_reach_their_groups() -> None:
    s = environment.Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@db/x",
            "USAGE_DB_POOL_SIZE": "3",
            "USAGE_DRAIN_LEASE_SECONDS": "7.5",
            "USAGE_DRAIN_CONCURRENCY": "2",
            "POLAR_ACCESS_TOKEN": " polar_token ",
            "POLAR_API_BASE": "http://127.0.0.1:9/",
            "STRIPE_API_BASE": "http://127.0.0.1:8/",
            "USAGE_RECONCILE_INTERVAL_SECONDS": "0",
            "USAGE_RECONCILE_SETTLE_SECONDS": "0.5",
            "USAGE_LOG_LEVEL": "debug",
            "USAGE_ALLOW_UNAUTHENTICATED": "Yes",
            "USAGE_KEEP_DENIALS": "true",
            "USAGE_METRICS_ADDRESS": "[::]:0",
            "USAGE_GRPC_ADDRESS": "",  # empty: as if unset
        }
    )
    assert (s.database.url, s.database.pool_size) == ("postgresql://u@db/x", 3)
    assert (s.drain.lease, s.drain.concurrency, s.drain.interval) == (7.5, 2, 2.0)
    assert s.providers.configured() == (domain.Provider.POLAR,)
    polar = s.providers.endpoint(domain.Provider.POLAR)
    assert (polar.api_key, polar.base_url) == ("polar_token", "http://127.0.0.1:9")
    assert s.providers.stripe_meter_events_base == "http://127.0.0.1:8"
    assert (s.reconcile.interval, s.reconcile.settle) == (0.0, 0.5)
    assert (s.log_level, s.auth.allow_unauthenticated) == ("DEBUG", True)
    assert s.decisions.keep_denials
    assert (s.metrics_address, s.grpc_address) == ("[::]:0", "127.0.0.1:50051")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("USAGE_DRAIN_LEASE_SECONDS", "abc", "USAGE_DRAIN_LEASE_SECONDS: 'abc' is not a number"),
        ("USAGE_MAX_IN_FLIGHT", "0.5", "USAGE_MAX_IN_FLIGHT: must be a whole number, not 0.5"),
        ("USAGE_DRAIN_CLAIM_EVENTS", "2.5", "USAGE_DRAIN_CLAIM_EVENTS: must be a whole number"),
        ("USAGE_DB_POOL_SIZE", "0", "USAGE_DB_POOL_SIZE: must be a finite number > 0, not 0"),
        ("USAGE_SHUTDOWN_GRACE_SECONDS", "nan", "USAGE_SHUTDOWN_GRACE_SECONDS: must be a finite"),
        ("USAGE_METRICS_ADDRESS", "no-port", "USAGE_METRICS_ADDRESS: 'no-port' is not host:port"),
        ("USAGE_GRPC_ADDRESS", "h:70000", "USAGE_GRPC_ADDRESS: 'h:70000' is not host:port"),
        ("USAGE_LOG_FORMAT", "xml", "USAGE_LOG_FORMAT: 'xml' is not one of json, text"),
        ("USAGE_TRACING", "jaeger", "USAGE_TRACING: 'jaeger' is not one of otlp"),
        ("USAGE_ALLOW_UNAUTHENTICATED", "maybe", "USAGE_ALLOW_UNAUTHENTICATED: 'maybe'"),
        ("USAGE_KEEP_DENIALS", "sometimes", "USAGE_KEEP_DENIALS: 'sometimes' is not one of"),
        ("LEMONSQUEEZY_SETTLE_SECONDS", "-1", "LEMONSQUEEZY_SETTLE_SECONDS: must be a finite"),
        ("USAGE_PROVIDER_TIMEOUT_SECONDS", "soon", "USAGE_PROVIDER_TIMEOUT_SECONDS: 'soon'"),
        ("USAGE_RECONCILE_INTERVAL_SECONDS", "-5", "USAGE_RECONCILE_INTERVAL_SECONDS: must be"),
        ("USAGE_RECONCILE_SETTLE_SECONDS", "0", "USAGE_RECONCILE_SETTLE_SECONDS: must be"),
        ("USAGE_TLS_CERT_FILE", "/c.pem", "USAGE_TLS_CERT_FILE and USAGE_TLS_KEY_FILE go together"),
        ("USAGE_TLS_CLIENT_CA_FILE", "/ca.pem", "USAGE_TLS_CLIENT_CA_FILE needs USAGE_TLS_CERT"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        environment.Settings.from_env({variable: value})
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_the_process_environment_reads_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load` (pydantic-settings, from os.environ) and `from_env` (a mapping) agree."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = {
        "USAGE_DRAIN_LEASE_SECONDS": "9",
        "STRIPE_API_KEY": SECRET,
        "USAGE_LOG_FORMAT": "TEXT",
        "USAGE_RECONCILE_INTERVAL_SECONDS": "60",
        "USAGE_DATA_DIR": "",
        "lease": "1",  # a lower-case name is not a setting
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loaded = environment.load()
    assert loaded == environment.Settings.from_env(env)
    assert (loaded.drain.lease, loaded.log_format, loaded.reconcile.interval) == (9, "text", 60)
    monkeypatch.setenv("USAGE_DRAIN_LEASE_SECONDS", "abc")
    with pytest.raises(ConfigError, match=r"^USAGE_DRAIN_LEASE_SECONDS: 'abc' is not a number$"):
        environment.load()


def test_secrets_stay_out_of_reprs() -> None:
    s = environment.Settings.from_env(
        {
            "DATABASE_URL": f"postgresql://u:{SECRET}@db/x",
            "STRIPE_API_KEY": SECRET,
            "USAGE_AUTH_TOKENS": f'{{"a": {{"token": "{SECRET}", "scopes": ["usage:read"]}}}}',
        }
    )
    shown = repr(s) + str(s) + repr(s.providers.endpoint(domain.Provider.STRIPE))
    assert SECRET not in shown
    assert s.providers.endpoint(domain.Provider.STRIPE).api_key == SECRET


def test_groups_read_a_mapping_and_are_built_by_name() -> None:
    assert ProviderSettings.from_env({"CREEM_API_KEY": "k"}).configured() == (
        domain.Provider.CREEM,
    )
    assert ProviderSettings.key_variable("polar") == "POLAR_ACCESS_TOKEN"
    assert DrainSettings(lease=5.0).lease == 5.0
    with pytest.raises(ConfigError, match=r"^USAGE_DRAIN_CONCURRENCY: "):
        DrainSettings.from_env({"USAGE_DRAIN_CONCURRENCY": "many"})
