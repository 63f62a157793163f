"""Bearer tokens per calling service, with scopes.

Tokens come from a TOML file (USAGE_AUTH_TOKENS_FILE) or a JSON object in USAGE_AUTH_TOKENS, both
shaped as `{client name: {token | token_sha256, scopes}}`. Only SHA-256 digests are kept in
memory; a presented token is hashed and compared with every digest in constant time. Token values
never appear in errors, logs or metrics: errors name the client and the key, never the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import pathlib
import tomllib
from collections.abc import Mapping
from typing import Self

import pydantic
from pydantic import Field, SecretStr

from usage.v1 import credit_pb2, customer_pb2, usage_pb2
from usage_service import settings

SCOPES = frozenset(
    {
        "usage:write",
        "usage:read",
        "entitlements:check",
        "customers:write",
        "customers:read",
        "credits:write",
        "credits:read",
    }
)
MIN_TOKEN_LENGTH = 16  # characters; shorter tokens are refused at start-up

_USAGE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
_CUSTOMERS = customer_pb2.DESCRIPTOR.services_by_name["CustomerService"].full_name
_CREDITS = credit_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name
# The scope each method needs, by its full gRPC path. Methods not listed here and not open are
# refused (a test holds this table against the services' descriptors).
SCOPE_BY_METHOD: Mapping[str, str] = {
    f"/{_USAGE}/RecordUsage": "usage:write",
    f"/{_USAGE}/BatchRecordUsage": "usage:write",
    f"/{_USAGE}/CheckEntitlement": "entitlements:check",  # with consume=true it records usage too
    f"/{_USAGE}/GetUsageSummary": "usage:read",
    f"/{_USAGE}/WatchUsage": "usage:read",
    f"/{_USAGE}/GetDecision": "usage:read",
    f"/{_CUSTOMERS}/UpsertCustomer": "customers:write",
    f"/{_CUSTOMERS}/GetCustomer": "customers:read",
    f"/{_CREDITS}/CreateGrant": "credits:write",
    f"/{_CREDITS}/VoidGrant": "credits:write",
    f"/{_CREDITS}/ListGrants": "credits:read",
}
# Services anyone may call: health checks and reflection.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class AuthConfigError(ValueError):
    """The token configuration is unusable. The message never contains a token."""


@dataclasses.dataclass(frozen=True)
class Client:
    name: str
    digest: bytes = dataclasses.field(repr=False)  # sha256 of the token
    scopes: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Tokens:
    """The configured callers. Empty: no token is asked for."""

    clients: tuple[Client, ...] = ()

    def identify(self, authorization: str | None) -> Client | None:
        """The client whose token is in an `authorization: Bearer <token>` value, or None.
        Every digest is compared, so the time taken does not tell which one matched."""
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode("utf-8", "replace")).digest()
        found: Client | None = None
        for client in self.clients:
            if hmac.compare_digest(client.digest, digest):
                found = client
        return found


class AuthSettings(settings.Group):
    tokens_file: str = Field("", validation_alias="USAGE_AUTH_TOKENS_FILE")
    tokens_json: settings.Secret = Field(SecretStr(""), validation_alias="USAGE_AUTH_TOKENS")
    # explicit opt-out of auth on a non-loopback address
    allow_unauthenticated: settings.Flag = Field(
        False, validation_alias="USAGE_ALLOW_UNAUTHENTICATED"
    )


class _Client(pydantic.BaseModel):
    """One client's entry, in the file and in the JSON alike."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)
    token: str | None = Field(None, min_length=MIN_TOKEN_LENGTH, repr=False)
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    scopes: list[str] = Field(min_length=1)

    @pydantic.field_validator("scopes")
    @classmethod
    def _known(cls, scopes: list[str]) -> list[str]:
        bad = sorted(set(scopes) - SCOPES)
        if bad:
            raise ValueError(f"unknown {bad}; known: {sorted(SCOPES)}")
        return scopes

    @pydantic.model_validator(mode="after")
    def _one_token(self) -> Self:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError("give exactly one of token, token_sha256")
        return self

    def digest(self) -> bytes:
        if self.token is not None:
            return hashlib.sha256(self.token.encode()).digest()
        return bytes.fromhex(self.token_sha256 or "")


class _TokensFile(pydantic.BaseModel):
    """USAGE_AUTH_TOKENS_FILE: `[clients.NAME]` tables."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    clients: dict[str, _Client] = {}


_CLIENTS = pydantic.TypeAdapter(dict[str, _Client])  # USAGE_AUTH_TOKENS: a JSON object
# What is wrong with a bad key of an entry, in words that never repeat its value (a token).
_REASONS = {
    "token": f"must be a string of at least {MIN_TOKEN_LENGTH} characters",
    "token_sha256": "must be 64 hex digits",
    "scopes": "must be a non-empty list of scopes",
}


def load(file: str, env_json: str) -> Tokens:
    """Tokens from the TOML file and the JSON text (either or both may be empty)."""
    clients: dict[str, Client] = {}
    if file:
        path = pathlib.Path(file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AuthConfigError(f"{path}: cannot read tokens: {type(exc).__name__}") from None
        try:
            entries = _TokensFile.model_validate(data).clients
        except pydantic.ValidationError as exc:
            raise _problem(str(path), exc, in_file=True) from None
        clients.update(_clients(entries))
    if env_json:
        try:
            table = json.loads(env_json)
        except json.JSONDecodeError:
            raise AuthConfigError("USAGE_AUTH_TOKENS: not valid JSON") from None
        try:
            entries = _CLIENTS.validate_python(table)
        except pydantic.ValidationError as exc:
            raise _problem("USAGE_AUTH_TOKENS", exc, in_file=False) from None
        for name, client in _clients(entries).items():
            if name in clients:
                raise AuthConfigError(f"USAGE_AUTH_TOKENS: client {name!r} is defined twice")
            clients[name] = client
    digests = [c.digest for c in clients.values()]
    if len(set(digests)) != len(digests):
        raise AuthConfigError("two clients share one token; give each its own")
    return Tokens(tuple(clients.values()))


def _clients(entries: Mapping[str, _Client]) -> dict[str, Client]:
    return {
        name: Client(name=name, digest=entry.digest(), scopes=frozenset(entry.scopes))
        for name, entry in entries.items()
    }


def _problem(source: str, exc: pydantic.ValidationError, in_file: bool) -> AuthConfigError:
    """The first problem, naming the client and the key, never a value."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if in_file:
        if len(loc) < 2 or loc[0] != "clients":
            return AuthConfigError(f"{source}: expected only [clients.NAME] tables")
        loc = loc[1:]
    elif not loc:
        return AuthConfigError(f"{source}: expected an object of clients")
    where = f"{source}: clients.{loc[0]}"
    own = (error.get("ctx") or {}).get("error")  # our validators' words
    if len(loc) == 1:
        return AuthConfigError(f"{where}: {own or 'expected a table'}")
    if error["type"] == "extra_forbidden":
        reason = "unknown key (expected one of scopes, token, token_sha256)"
    else:
        reason = str(own) if own else _REASONS[loc[1]]
    return AuthConfigError(f"{where}.{loc[1]}: {reason}")


def is_loopback(address: str) -> bool:
    """Whether a listen address (`host:port`) only accepts connections from this machine."""
    host = address.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(
    address: str, tokens: Tokens, mutual_tls: bool, allow_unauthenticated: bool
) -> tuple[bool, str]:
    """(refuse to start?, warning): serving without auth needs a loopback address or the
    explicit opt-out; either way it is worth a warning."""
    if tokens.clients or mutual_tls:
        return False, ""
    if is_loopback(address):
        return False, f"no authentication: serving {address} to local callers only"
    if allow_unauthenticated:
        return False, (
            f"no authentication on {address}: USAGE_ALLOW_UNAUTHENTICATED is set, so anyone "
            "who can reach this port may call every method"
        )
    return True, (
        f"refusing to serve {address} without authentication: set USAGE_AUTH_TOKENS or "
        "USAGE_AUTH_TOKENS_FILE (or USAGE_TLS_CLIENT_CA_FILE), listen on a loopback address, "
        "or set USAGE_ALLOW_UNAUTHENTICATED=true"
    )
