"""Settings: read once from the environment at the edge, checked before anything starts, and
passed inward as plain, frozen values.

Each layer declares the group of settings it needs next to its defaults (the drain's
`DrainSettings`, the providers' `ProviderSettings`, ...) on `Group`, one field per environment
variable, the variable being the field's alias. `settings.environment` gathers the groups into
the one `Settings` object of the process. A bad value is a `ConfigError` whose one-line message
starts with the variable's name, e.g. `USAGE_DRAIN_LEASE_SECONDS: 'abc' is not a number`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Self

import pydantic
from pydantic_core import ErrorDetails

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
_VARIABLE = re.compile(r"[A-Z][A-Z0-9_]*")


class ConfigError(ValueError):
    """An environment variable has an unusable value, or names something that cannot be used
    (a database that cannot be reached, a port already taken). The message names the variable."""


class Group(pydantic.BaseModel):
    """A group of settings, each read from the environment variable named by its alias, and
    also built by field name (`DrainSettings(lease=5.0)`) in tests and tools."""

    model_config = pydantic.ConfigDict(
        frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        """This group read from `environ` rather than the process environment."""
        try:
            return cls.model_validate(variables(cls, environ))
        except pydantic.ValidationError as exc:
            raise config_error(exc) from None


def variables(model: type[pydantic.BaseModel], environ: Mapping[str, str]) -> dict[str, Any]:
    """The input `model` validates: the environment's variables (an empty one counts as unset,
    a lower-case name is not a setting), and for each nested group, the same again."""
    env: dict[str, Any] = {k: v for k, v in environ.items() if v and k == k.upper()}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Group):
            env[name] = variables(kind, environ)
    return env


def config_error(exc: pydantic.ValidationError) -> ConfigError:
    """The first problem of a ValidationError as one line: the variable, then what is wrong."""
    error = exc.errors()[0]
    named = [part for part in error["loc"] if isinstance(part, str) and _VARIABLE.fullmatch(part)]
    reason = describe(error)
    return ConfigError(f"{named[-1]}: {reason}" if named else reason)


def describe(error: ErrorDetails) -> str:
    """One validation error in words: our validators' own message, else pydantic's. Neither
    repeats the rejected value unless the validator chose to (secrets never are)."""
    context = error.get("ctx") or {}
    if isinstance(context.get("error"), ValueError):
        return str(context["error"])
    if error["type"] == "missing":
        return "is missing"
    return error["msg"]


# --- value types: each parses the environment's text and says what is wrong with it ---


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _positive(value: object) -> float:
    number = _number(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a finite number > 0, not {value}")
    return number


def _positive_whole(value: object) -> int:
    number = _positive(value)
    if number != int(number):
        raise ValueError(f"must be a whole number, not {value}")
    return int(number)


def _off_or_positive(value: object) -> float:
    """0 (off) or a number > 0."""
    return 0.0 if str(value).strip() == "0" else _positive(value)


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ValueError(f"{value!r} is not one of true, false")


def _address(value: object) -> str:
    """A `host:port` listen address (port 0: any free port); empty: none."""
    text = str(value)
    host, _, port = text.rpartition(":")
    if text and (not host or not port.isdigit() or int(port) > 65535):
        raise ValueError(f"{text!r} is not host:port")
    return text


def one_of(*allowed: str) -> pydantic.BeforeValidator:
    """A choice among `allowed`, matched without regard to case, as spelt in `allowed`."""

    def choose(value: object) -> str:
        for choice in allowed:
            if str(value).lower() == choice.lower():
                return choice
        raise ValueError(f"{value!r} is not one of {', '.join(a for a in allowed if a)}")

    return pydantic.BeforeValidator(choose)


def _stripped(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


Seconds = Annotated[float, pydantic.BeforeValidator(_positive)]  # > 0, finite
SecondsOrOff = Annotated[float, pydantic.BeforeValidator(_off_or_positive)]  # 0: off
Count = Annotated[int, pydantic.BeforeValidator(_positive_whole)]  # a whole number > 0
Flag = Annotated[bool, pydantic.BeforeValidator(_flag)]
Address = Annotated[str, pydantic.BeforeValidator(_address)]
Secret = Annotated[pydantic.SecretStr, pydantic.BeforeValidator(_stripped)]

__all__ = [
    "Address",
    "ConfigError",
    "Count",
    "Flag",
    "Group",
    "Seconds",
    "SecondsOrOff",
    "Secret",
    "config_error",
    "describe",
    "one_of",
    "variables",
]
