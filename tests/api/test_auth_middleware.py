"""api/auth.py: every route but the public ones answers an unauthenticated client before it
reads the body, over a real socket to a real uvicorn server.

The client declares a 1 GiB body and sends it slowly, a little at a time, waiting after each
piece for an answer. An API that parsed the body before checking the key (FastAPI does so for a
declared body) would wait for all of it; ours answers 401 from the headers alone.
"""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.main import create_app
from core import engines
from core.db import session_factory
from core.settings import Settings
from tests.core.test_engines import config_with_targets
from tests.factories import make_job
from tests.utils import SettingsFactory, served_by_uvicorn

KEY = "key-of-the-auth-test-tenant-0001"  # 32 characters: the shortest allowed
GiB = 1024**3
PIECE_BYTES = 512  # sent at a time, slowly
WAIT_S = 0.5  # for an answer after each piece; plenty for a server that needs no body
MOST_SENT_BYTES = 4 * 1024  # "a few KiB": a server still silent by then is reading the body
PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect"}
PUBLIC_PATHS |= {"/openapi.json", "/redoc", "/"}  # "/": the dashboard page (api/dashboard.py)
BOUNDARY = "sqakd-test-boundary"
CONTENT_TYPES = ("application/json", f"multipart/form-data; boundary={BOUNDARY}")
# How each body starts, so that a server that parses it keeps reading (a file, a JSON string).
BODY_STARTS = {
    CONTENT_TYPES[0]: b'{"target": "',
    CONTENT_TYPES[1]: (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="engine"; filename="e.plan"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode(),
}


class BodyCounter:
    """Test instrument around the whole app: counts the body bytes it pulls from ``receive``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.body_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            self.body_bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@dataclass
class Served:
    app: FastAPI
    settings: Settings
    counter: BodyCounter
    port: int


@pytest.fixture
def served(make_settings: SettingsFactory) -> Iterator[Served]:
    """The real app with an API key, served by uvicorn on a free port."""
    settings = make_settings(api_keys={KEY: "acme"})
    app = create_app(settings, sweeper=False)
    counter = BodyCounter(app)
    with served_by_uvicorn(counter) as port:
        yield Served(app, settings, counter, port)


@dataclass
class Answer:
    status: int
    head: str
    body: bytes
    sent_bytes: int  # of the body, before the answer came


def read_answer(sock: socket.socket) -> tuple[str, bytes]:
    """The response's head and body (by its Content-Length), read to the end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert length, head
    while len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return head.decode("latin-1"), body


def slow_gigabyte(port: int, method: str, path: str, headers: dict[str, str]) -> Answer:
    """Declare a 1 GiB body (of the headers' Content-Type: a file part, or a JSON string) and
    send PIECE_BYTES of it at a time, each after WAIT_S without an answer."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {GiB}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    body_start = BODY_STARTS[headers["Content-Type"]]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        while not select.select([sock], [], [], WAIT_S)[0]:
            assert sent < MOST_SENT_BYTES, f"{method} {path}: no answer after {sent} body bytes"
            piece = (body_start[sent:] + b"x" * PIECE_BYTES)[:PIECE_BYTES]
            sock.sendall(piece)
            sent += PIECE_BYTES
        head, body = read_answer(sock)
    return Answer(int(head.split(" ", 2)[1]), head, body, sent)


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route in the app's table, included routers' routes included."""
    return [
        (method, context.path)
        for context in iter_route_contexts(app.routes)
        if context.path is not None
        for method in sorted(context.methods or {"GET"})  # a Mount answers GET
        if method != "HEAD"
    ]


def protected_routes(app: FastAPI) -> list[tuple[str, str]]:
    """The route table but the public paths, with path parameters filled in."""
    return [
        (method, re.sub(r"\{[^}]+\}", "some-id", path))
        for method, path in route_table(app)
        if path not in PUBLIC_PATHS
    ]


def test_the_public_paths_are_the_probes_and_the_docs(served: Served) -> None:
    assert {path for _, path in route_table(served.app)} >= PUBLIC_PATHS


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key", f"Basic {KEY}"])
@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_every_route_answers_401_before_reading_the_body(
    served: Served, authorization: str | None, content_type: str
) -> None:
    routes = protected_routes(served.app)
    assert ("POST", "/v1/engine-builds/some-id/result") in routes  # FastAPI parsed its form
    assert ("POST", "/v1/engine-builds/claim") in routes  # ... and this JSON
    assert ("POST", "/v1/jobs") in routes
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization
    most_sent = 0
    for method, path in routes:
        answer = slow_gigabyte(served.port, method, path, headers)
        assert answer.status == 401, (method, path, answer.head, answer.body)
        assert b'"code":"unauthorized"' in answer.body, answer.body
        assert re.search(r"(?im)^www-authenticate: Bearer", answer.head)
        # The rest of the declared gigabyte is not read to keep the connection alive.
        assert re.search(r"(?im)^connection: close", answer.head)
        most_sent = max(most_sent, answer.sent_bytes)
    assert most_sent <= MOST_SENT_BYTES
    assert served.counter.body_bytes == 0  # the app never pulled a byte of any body
    print(f"{len(routes)} routes: 401 after at most {most_sent} body bytes sent")


def test_a_wrong_lease_token_is_refused_before_the_body(served: Served) -> None:
    """The engine result of a build another builder holds: 409 from the key and the token
    alone, with nothing read of the declared gigabyte."""
    with session_factory(served.settings)() as session:
        job = make_job(
            session, tenant="acme", status="succeeded", config=config_with_targets("jetson-nano")
        )
        (build,) = engines.create_builds(session, job)
        assert engines.claim_build(session, build.id, "agent:the-claimant") is not None
    headers = {
        "Authorization": f"Bearer {KEY}",
        "X-Lease-Token": "not-the-claimants-token",
        "Content-Type": CONTENT_TYPES[1],
    }
    answer = slow_gigabyte(served.port, "POST", f"/v1/engine-builds/{build.id}/result", headers)
    assert answer.status == 409, answer.body
    assert b'"code":"engine_build_not_claimed"' in answer.body
    assert answer.sent_bytes <= MOST_SENT_BYTES and served.counter.body_bytes == 0


def test_a_valid_key_still_reaches_the_route(served: Served) -> None:
    """Through the same socket path: the key passes, and the route reads its body (here a
    JSON claim, which answers 204: nothing waits for the target)."""
    body = b'{"target": "jetson-nano"}'
    request = (
        f"POST /v1/engine-builds/claim HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(request)
        status_line = sock.recv(65536).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 204 No Content", status_line
    assert served.counter.body_bytes == len(body)


def test_probes_and_docs_need_no_key(served: Served) -> None:
    for path in ("/healthz", "/metrics", "/openapi.json", "/docs", "/redoc"):
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            status_line = sock.recv(65536).split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 200 OK", (path, status_line)
