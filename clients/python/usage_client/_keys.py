"""Deterministic idempotency keys derived from the caller's own identifiers."""

from __future__ import annotations

import hashlib
import re
import uuid

KEY_VERSION = "usage-client/idempotency-key/v1"  # part of every hash: changing it changes all keys
MAX_LABEL = 64  # characters of the first part kept readable in front of the hash
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

Part = str | int | uuid.UUID


def _text(part: Part) -> str:
    if isinstance(part, bool) or not isinstance(part, str | int | uuid.UUID):
        raise TypeError(f"idempotency key parts are str, int or UUID, not {type(part).__name__}")
    return str(part)


def idempotency_key(*parts: Part) -> str:
    """A stable key for one billable thing, named by the caller's own ids.

    The same parts always give the same key (in any process, on any machine, in any version of
    this client), so a retry after a crash or a redeploy is recognised as the same event:

        idempotency_key("invoice", order_id, line_no)  # 'invoice:3f9a...' (at most 129 chars)

    Parts are compared by their text (7 and "7" give the same key); the boundaries between parts
    count ("a:b", "c" differs from "a", "b:c"). The first part, made safe, stays readable in front
    of a SHA-256 of all of them, which keeps the key well under the service's 255-character limit.
    """
    if not parts:
        raise ValueError("idempotency_key needs at least one part")
    texts = [_text(p) for p in parts]
    digest = hashlib.sha256(KEY_VERSION.encode())
    for text in texts:
        raw = text.encode("utf-8")
        digest.update(b"%d:" % len(raw))
        digest.update(raw)
    label = _UNSAFE.sub("_", texts[0])[:MAX_LABEL] or "_"
    return f"{label}:{digest.hexdigest()}"
