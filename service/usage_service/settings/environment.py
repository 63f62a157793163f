"""The settings of a usage-service process: every environment variable it reads, in one
object, checked by `load` before anything starts.

The groups are declared by the layers that use them (storage, api, tls, the drain, the
providers, the reconciliation); the rest belongs to the process itself. Variables keep their
flat names (USAGE_DRAIN_LEASE_SECONDS, STRIPE_API_KEY, ...): each group picks its own from the
environment. The README's Configuration section lists them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

import pydantic
import pydantic_settings
from pydantic import Field

from usage_service import settings
from usage_service.alerts.background import AlertSettings
from usage_service.api.auth import AuthSettings
from usage_service.api.server import DEFAULT_MAX_IN_FLIGHT, MAX_MESSAGE_BYTES
from usage_service.api.usage_api import DecisionSettings
from usage_service.drain.loop import DrainSettings
from usage_service.providers.config import ProviderSettings
from usage_service.reconcile.background import ReconcileSettings
from usage_service.storage.database import DatabaseSettings
from usage_service.storage.readmodel import ReadModelSettings
from usage_service.tls import TlsFiles

DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds for in-flight calls to finish on SIGTERM
DEFAULT_METRICS_REFRESH = 5.0  # seconds between reads of the database gauges
DEFAULT_WATCH_RESUME = 7 * 24 * 3600.0  # seconds a WatchUsage stream can resume without a snapshot
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("INFO", "DEBUG", "WARNING", "ERROR")
TRACING = ("", "otlp")


class Settings(pydantic_settings.BaseSettings):
    model_config = pydantic_settings.SettingsConfigDict(
        frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    grpc_address: settings.Address = Field(
        DEFAULT_GRPC_ADDRESS, validation_alias="USAGE_GRPC_ADDRESS"
    )
    plans_file: str = Field(  # empty: the packaged default_plans.toml
        "", validation_alias="USAGE_PLANS_FILE"
    )
    shutdown_grace: settings.Seconds = Field(
        DEFAULT_SHUTDOWN_GRACE, validation_alias="USAGE_SHUTDOWN_GRACE_SECONDS"
    )
    max_in_flight: settings.Count = Field(
        DEFAULT_MAX_IN_FLIGHT, validation_alias="USAGE_MAX_IN_FLIGHT"
    )
    max_message_bytes: settings.Count = Field(
        MAX_MESSAGE_BYTES, validation_alias="USAGE_MAX_MESSAGE_BYTES"
    )
    # SO_REUSEPORT: set by `serve --workers` for its workers only
    reuse_port: settings.Flag = Field(False, validation_alias="USAGE_REUSE_PORT")
    metrics_address: settings.Address = Field(  # empty: no metrics endpoint
        "", validation_alias="USAGE_METRICS_ADDRESS"
    )
    metrics_refresh: settings.Seconds = Field(
        DEFAULT_METRICS_REFRESH, validation_alias="USAGE_METRICS_REFRESH_SECONDS"
    )
    watch_resume: settings.Seconds = Field(
        DEFAULT_WATCH_RESUME, validation_alias="USAGE_WATCH_RESUME_SECONDS"
    )
    log_format: Annotated[str, settings.one_of(*LOG_FORMATS)] = Field(
        LOG_FORMATS[0], validation_alias="USAGE_LOG_FORMAT"
    )
    log_level: Annotated[str, settings.one_of(*LOG_LEVELS)] = Field(
        LOG_LEVELS[0], validation_alias="USAGE_LOG_LEVEL"
    )
    tracing: Annotated[str, settings.one_of(*TRACING)] = Field(  # otlp: OpenTelemetry traces
        "", validation_alias="USAGE_TRACING"
    )
    # what `usage-service health` trusts (default: the server's own chain) and expects as the
    # server's name (default: the address)
    health_ca_file: str = Field("", validation_alias="USAGE_HEALTH_CA_FILE")
    health_server_name: str = Field("", validation_alias="USAGE_HEALTH_SERVER_NAME")

    database: DatabaseSettings = DatabaseSettings()
    read_model: ReadModelSettings = ReadModelSettings()
    tls: TlsFiles = TlsFiles()
    auth: AuthSettings = AuthSettings()
    decisions: DecisionSettings = DecisionSettings()
    drain: DrainSettings = DrainSettings()
    providers: ProviderSettings = ProviderSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    alerts: AlertSettings = AlertSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        """Values given by name, then the process environment; no .env or secrets files."""
        return init_settings, _Environment(settings_cls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """The settings read from `environ` rather than the process environment."""
        try:
            return cls.model_validate(settings.variables(cls, environ))
        except pydantic.ValidationError as exc:
            raise settings.config_error(exc) from None


class _Environment(pydantic_settings.PydanticBaseSettingsSource):
    """The process environment, flat: the top level and each group pick their own variables
    by name, so every group is handed the whole environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        return settings.variables(self.settings_cls, os.environ)


def names() -> list[str]:
    """Every environment variable the settings read, in the order they are declared."""
    out: list[str] = []

    def walk(model: type[pydantic.BaseModel]) -> None:
        for field in model.model_fields.values():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, settings.Group):
                walk(kind)
            elif isinstance(field.validation_alias, str):
                out.append(field.validation_alias)

    walk(Settings)
    return out


def load() -> Settings:
    """Every setting, read from the process environment and checked; a bad value raises
    ConfigError naming its variable."""
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise settings.config_error(exc) from None
