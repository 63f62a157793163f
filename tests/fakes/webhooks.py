"""A webhook receiver: `POST /hooks` on 127.0.0.1, answering 200 unless a fault says otherwise,
keeping every request (headers and raw body) for the test to check."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fakes.base import Answer, Call, FakeProvider


class Receiver(FakeProvider):
    write_route = "POST /hooks"

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hooks"

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if (method, path) != ("POST", "/hooks"):
            return Answer(404)
        return Answer(200, {"received": True})

    def deliveries(self) -> list[Call]:
        return self.writes()

    def events(self) -> list[Any]:
        return [json.loads(c.body) for c in self.writes()]
