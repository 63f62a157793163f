"""The HTTP plumbing shared by the fakes: a threaded server on an ephemeral port, faults, calls.

A fault is consumed by the next request to its route:
- status: answer that status (with headers/body) without processing the request;
- hang: hold the request without answering (until the fake stops), nothing stored;
- drop: process and store the request, then close the connection without an answer;
- block: process and store, then hold the answer until `release()`; then drop the connection.
Anything our client must never do is recorded in `violations` (and answered with an error).
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import threading
from collections.abc import Mapping
from typing import Any

HOLD_LIMIT = 60.0  # seconds a hang / block holds a request at most


@dataclasses.dataclass
class Fault:
    kind: str  # status | hang | drop | block
    status: int = 500
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: Any = None
    route: str = ""  # "METHOD /path-prefix"; empty: the provider's write route


@dataclasses.dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int = 0  # 0: no answer sent


@dataclasses.dataclass
class Answer:
    status: int
    body: Any = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


class FakeProvider:
    write_route = ""  # "METHOD /path" faults apply to by default

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.faults: collections.deque[Fault] = collections.deque()
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.blocked = threading.Event()  # a block fault has stored its request
        self._release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def release(self) -> None:
        self._release.set()

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def writes(self) -> list[Call]:
        method, path = self.write_route.split(" ", 1)
        with self.lock:
            return [c for c in self.calls if c.method == method and c.path == path]

    # --- to implement per provider ---

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        raise NotImplementedError

    # --- plumbing ---

    def _next_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            route = fault.route or self.write_route
            want_method, _, prefix = route.partition(" ")
            if method == want_method and path.startswith(prefix):
                return self.faults.popleft()
            return None

    def _hold(self) -> None:
        self._release.wait(HOLD_LIMIT)


class _Lines:
    """A request's input that remembers the last line read: a header block that ended at the end
    of the input, not at a blank line, was cut short."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.last = b""

    def readline(self, limit: int = -1) -> bytes:
        self.last = self.raw.readline(limit)
        return self.last  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no delayed-ACK stall
    server: http.server.ThreadingHTTPServer
    rfile: Any

    def setup(self) -> None:
        super().setup()
        self.rfile = _Lines(self.rfile)

    def _arrived(self) -> bytes | None:
        """The body, or None when the request did not arrive whole: the sender died mid-request
        (killed, or its connection cut), which a real server drops unread and which is no
        violation of ours."""
        if self.rfile.last not in (b"\r\n", b"\n"):
            return None
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = self.rfile.read(length) if length else b""
        except OSError:
            return None
        return body if len(body) == length else None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        fake: FakeProvider = self.server.fake  # type: ignore[attr-defined]
        body = self._arrived()
        if body is None:
            self.close_connection = True
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        path = self.path.split("?", 1)[0]
        call = Call(method, path, headers, body)
        with fake.lock:
            fake.calls.append(call)
        fault = fake._next_fault(method, path)
        if fault and fault.kind == "status":
            return self._answer(call, Answer(fault.status, fault.body, fault.headers))
        if fault and fault.kind == "hang":
            fake._hold()
            self.close_connection = True
            return None
        answer = fake.handle(method, path, headers, body)
        if fault and fault.kind in ("drop", "block"):
            if fault.kind == "block":
                fake.blocked.set()
                fake._hold()
            self.close_connection = True
            return None
        return self._answer(call, answer)

    def _answer(self, call: Call, answer: Answer) -> None:
        data = b"" if answer.body is None else json.dumps(answer.body).encode()
        call.status = answer.status
        self.send_response(answer.status)
        content_type = "application/json"
        for name, value in answer.headers.items():
            if name.lower() == "content-type":
                content_type = value
            else:
                self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def bearer(headers: Mapping[str, str], key: str) -> bool:
    return headers.get("authorization") == f"Bearer {key}"


def parse_json(fake: FakeProvider, body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        fake.violation(f"body is not JSON: {body[:100]!r}")
        return None
