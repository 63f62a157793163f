"""Settings, read once from the environment at the edge and passed inward as plain values."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_DATA_DIR = ".data"  # embedded PostgreSQL lives in DATA_DIR/postgres
DEFAULT_DRAIN_INTERVAL = 2.0  # seconds
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds for in-flight calls to finish on SIGTERM
DEFAULT_POOL_SIZE = 10  # database connections per process


class ConfigError(ValueError):
    """An environment variable has an unusable value."""


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str  # empty: start an embedded PostgreSQL under data_dir
    data_dir: pathlib.Path
    grpc_address: str
    plans_file: str  # empty: the packaged default_plans.toml
    drain_interval: float
    shutdown_grace: float
    pool_size: int
    environ: Mapping[str, str]  # kept for the provider settings

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            data_dir=pathlib.Path(env.get("USAGE_DATA_DIR") or DEFAULT_DATA_DIR),
            grpc_address=env.get("USAGE_GRPC_ADDRESS") or DEFAULT_GRPC_ADDRESS,
            plans_file=env.get("USAGE_PLANS_FILE", ""),
            drain_interval=_number(env, "USAGE_DRAIN_INTERVAL_SECONDS", DEFAULT_DRAIN_INTERVAL),
            shutdown_grace=_number(env, "USAGE_SHUTDOWN_GRACE_SECONDS", DEFAULT_SHUTDOWN_GRACE),
            pool_size=int(_number(env, "USAGE_DB_POOL_SIZE", DEFAULT_POOL_SIZE)),
            environ=env,
        )


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name}: must be > 0, not {text}")
    return value
