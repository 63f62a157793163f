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
from typing import Any

from usage.v1 import customer_pb2, usage_pb2

SCOPES = frozenset(
    {"usage:write", "usage:read", "entitlements:check", "customers:write", "customers:read"}
)
MIN_TOKEN_LENGTH = 16  # characters; shorter tokens are refused at start-up

_USAGE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
_CUSTOMERS = customer_pb2.DESCRIPTOR.services_by_name["CustomerService"].full_name
# The scope each method needs, by its full gRPC path. Methods not listed here and not open are
# refused (a test holds this table against the services' descriptors).
SCOPE_BY_METHOD: Mapping[str, str] = {
    f"/{_USAGE}/RecordUsage": "usage:write",
    f"/{_USAGE}/BatchRecordUsage": "usage:write",
    f"/{_USAGE}/CheckEntitlement": "entitlements:check",  # with consume=true it records usage too
    f"/{_USAGE}/GetUsageSummary": "usage:read",
    f"/{_CUSTOMERS}/UpsertCustomer": "customers:write",
    f"/{_CUSTOMERS}/GetCustomer": "customers:read",
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


def load(file: str, env_json: str) -> Tokens:
    """Tokens from the TOML file and the JSON text (either or both may be empty)."""
    clients: dict[str, Client] = {}
    if file:
        path = pathlib.Path(file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AuthConfigError(f"{path}: cannot read tokens: {type(exc).__name__}") from None
        table = data.get("clients", {})
        if not isinstance(table, dict) or set(data) - {"clients"}:
            raise AuthConfigError(f"{path}: expected only [clients.NAME] tables")
        clients.update(_parse(str(path), table))
    if env_json:
        try:
            table = json.loads(env_json)
        except json.JSONDecodeError:
            raise AuthConfigError("USAGE_AUTH_TOKENS: not valid JSON") from None
        if not isinstance(table, dict):
            raise AuthConfigError("USAGE_AUTH_TOKENS: expected an object of clients")
        for name, client in _parse("USAGE_AUTH_TOKENS", table).items():
            if name in clients:
                raise AuthConfigError(f"USAGE_AUTH_TOKENS: client {name!r} is defined twice")
            clients[name] = client
    digests = [c.digest for c in clients.values()]
    if len(set(digests)) != len(digests):
        raise AuthConfigError("two clients share one token; give each its own")
    return Tokens(tuple(clients.values()))


def _parse(source: str, table: Mapping[str, Any]) -> dict[str, Client]:
    out: dict[str, Client] = {}
    for name, entry in table.items():
        where = f"{source}: clients.{name}"
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where}: expected a table")
        unknown = set(entry) - {"token", "token_sha256", "scopes"}
        if unknown:
            raise AuthConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if ("token" in entry) == ("token_sha256" in entry):
            raise AuthConfigError(f"{where}: give exactly one of token, token_sha256")
        if "token" in entry:
            token = entry["token"]
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise AuthConfigError(
                    f"{where}.token: must be a string of at least {MIN_TOKEN_LENGTH} characters"
                )
            digest = hashlib.sha256(token.encode()).digest()
        else:
            try:
                digest = bytes.fromhex(entry["token_sha256"])
            except (TypeError, ValueError):
                digest = b""
            if len(digest) != 32:
                raise AuthConfigError(f"{where}.token_sha256: must be 64 hex digits")
        scopes = entry.get("scopes")
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) for s in scopes)
        ):
            raise AuthConfigError(f"{where}.scopes: must be a non-empty list of scopes")
        bad = sorted(set(scopes) - SCOPES)
        if bad:
            raise AuthConfigError(f"{where}.scopes: unknown {bad}; known: {sorted(SCOPES)}")
        out[name] = Client(name=name, digest=digest, scopes=frozenset(scopes))
    return out


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
