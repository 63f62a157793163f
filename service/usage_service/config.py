"""Settings, read once from the environment at the edge and passed inward as plain values."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping

from usage_service.tls import TlsFiles

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_DATA_DIR = ".data"  # embedded PostgreSQL lives in DATA_DIR/postgres
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds for in-flight calls to finish on SIGTERM
DEFAULT_POOL_SIZE = 10  # database connections per process
DEFAULT_MAX_IN_FLIGHT = 512  # usage.v1 calls served at once per process; more: RESOURCE_EXHAUSTED
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # largest request or response
LOG_FORMATS = ("json", "text")
TRUE = ("1", "true", "yes", "on")


class ConfigError(ValueError):
    """An environment variable has an unusable value, or names something that cannot be used
    (a database that cannot be reached, a port already taken). The message names the variable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str  # empty: start an embedded PostgreSQL under data_dir
    data_dir: pathlib.Path
    grpc_address: str
    plans_file: str  # empty: the packaged default_plans.toml
    shutdown_grace: float
    pool_size: int
    environ: Mapping[str, str] = dataclasses.field(repr=False)  # provider settings (and keys)
    metrics_address: str = ""  # empty: no metrics endpoint
    tls: TlsFiles = dataclasses.field(default_factory=TlsFiles)
    auth_tokens_file: str = ""
    auth_tokens_json: str = dataclasses.field(default="", repr=False)
    allow_unauthenticated: bool = False  # explicit opt-out of auth on a non-loopback address
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_format: str = "json"
    log_level: str = "INFO"
    tracing: str = ""  # "otlp": OpenTelemetry traces (needs the `otel` extra)
    reuse_port: bool = False  # SO_REUSEPORT: set by `serve --workers` for its workers only

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            data_dir=pathlib.Path(env.get("USAGE_DATA_DIR") or DEFAULT_DATA_DIR),
            grpc_address=address(env, "USAGE_GRPC_ADDRESS", DEFAULT_GRPC_ADDRESS),
            plans_file=env.get("USAGE_PLANS_FILE", ""),
            shutdown_grace=positive_number(
                env, "USAGE_SHUTDOWN_GRACE_SECONDS", DEFAULT_SHUTDOWN_GRACE
            ),
            pool_size=positive_int(env, "USAGE_DB_POOL_SIZE", DEFAULT_POOL_SIZE),
            environ=env,
            metrics_address=address(env, "USAGE_METRICS_ADDRESS", ""),
            tls=TlsFiles(
                cert_file=env.get("USAGE_TLS_CERT_FILE", ""),
                key_file=env.get("USAGE_TLS_KEY_FILE", ""),
                client_ca_file=env.get("USAGE_TLS_CLIENT_CA_FILE", ""),
            ),
            auth_tokens_file=env.get("USAGE_AUTH_TOKENS_FILE", ""),
            auth_tokens_json=env.get("USAGE_AUTH_TOKENS", ""),
            allow_unauthenticated=env.get("USAGE_ALLOW_UNAUTHENTICATED", "").lower() in TRUE,
            max_in_flight=positive_int(env, "USAGE_MAX_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT),
            max_message_bytes=positive_int(
                env, "USAGE_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
            log_format=_choice(env, "USAGE_LOG_FORMAT", LOG_FORMATS),
            log_level=_choice(env, "USAGE_LOG_LEVEL", ("INFO", "DEBUG", "WARNING", "ERROR")),
            tracing=_choice(env, "USAGE_TRACING", ("", "otlp")),
            reuse_port=env.get("USAGE_REUSE_PORT", "") == "1",
        )


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    text = env.get(name, "")
    if not text:
        return allowed[0]
    for value in allowed:
        if text.lower() == value.lower():
            return value
    raise ConfigError(f"{name}: {text!r} is not one of {', '.join(a for a in allowed if a)}")


def positive_number(env: Mapping[str, str], name: str, default: float) -> float:
    """A number > 0 from the environment, or `default` when the variable is unset or empty."""
    text = env.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be a finite number > 0, not {text}")
    return value


def positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number > 0 from the environment, or `default` when unset or empty."""
    value = positive_number(env, name, default)
    if value != int(value):
        raise ConfigError(f"{name}: must be a whole number, not {env[name]}")
    return int(value)


def address(env: Mapping[str, str], name: str, default: str) -> str:
    """A `host:port` listen address from the environment (port 0: any free port)."""
    text = env.get(name) or default
    if not text:
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name}: {text!r} is not host:port")
    return text
