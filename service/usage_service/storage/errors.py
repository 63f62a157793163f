"""The one place asyncpg's failures become the domain's errors."""

from __future__ import annotations

import asyncio

import asyncpg

from usage_service.domain.errors import ConcurrencyConflict, DatabaseUnavailable, ValueOutOfRange

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InterfaceError,
    # A connection cut mid-transaction (pg_terminate_backend, a restart) can leave asyncpg's
    # protocol in a state it reports this way; the transaction did not commit, so: retry.
    asyncpg.exceptions.InternalClientError,
)


def translate(exc: BaseException) -> BaseException:
    """`exc` as a domain error when it is a storage failure the domain names; else `exc`."""
    if isinstance(exc, asyncpg.exceptions.NumericValueOutOfRangeError):
        return ValueOutOfRange(str(exc))
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):
        return ConcurrencyConflict(str(exc))
    if isinstance(exc, _UNAVAILABLE):
        return DatabaseUnavailable(repr(exc))
    return exc
