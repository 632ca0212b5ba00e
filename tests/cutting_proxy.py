"""A TCP proxy on 127.0.0.1 that breaks chosen HTTP exchanges, so that a client's resume and
retry logic meets a real cut socket instead of a mock.

    with CuttingProxy(live_service.url) as proxy:
        proxy.cut_next("GET", "/v1/jobs/<id>/artifacts/", after_bytes=4096)
        client = Client(proxy.url, api_key)          # talks to the service through the proxy
        client.jobs.get(job_id).download(tmp_path)    # the first artifact request is cut
        assert proxy.cuts == 1 and proxy.requests[-1].headers["range"] == "bytes=...-"

Each client connection carries one request: the proxy sends it upstream with
``Connection: close`` (so the answer ends when the upstream closes) and relays the answer.
A rule, armed with ``cut_next`` or ``swallow_next``, applies once, to the next request whose
method matches and whose target (path and query) starts with the given prefix:

- ``cut_next(method, prefix, after_bytes)``: relay the first ``after_bytes`` bytes of the
  answer (status line and headers count), then close both connections: the client sees the
  body end early (an incomplete chunked or Content-Length body).
- ``swallow_next(method, prefix)``: forward the request, let the service answer it whole, and
  close the client's connection without a byte: the request was handled, its answer lost.

``requests`` lists every request seen (method, target, lower-cased headers) in order, and
``cuts`` counts the rules applied, so a test can show the cut happened and what came next.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class _Rule:
    method: str
    prefix: str
    after_bytes: int | None  # None: swallow the whole answer

    def matches(self, request: SeenRequest) -> bool:
        return request.method == self.method and request.target.startswith(self.prefix)


@dataclass
class CuttingProxy:
    upstream_url: str
    requests: list[SeenRequest] = field(default_factory=list)
    cuts: int = 0

    def __post_init__(self) -> None:
        upstream = urlsplit(self.upstream_url)
        self._upstream = (upstream.hostname or "127.0.0.1", upstream.port or 80)
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="cutting-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def cut_next(self, method: str, prefix: str, after_bytes: int) -> None:
        with self._lock:
            self._rules.append(_Rule(method, prefix, after_bytes))

    def swallow_next(self, method: str, prefix: str) -> None:
        with self._lock:
            self._rules.append(_Rule(method, prefix, None))

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self._listener.close()
        self._thread.join(5)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_rule(self, request: SeenRequest) -> _Rule | None:
        with self._lock:
            self.requests.append(request)
            for rule in self._rules:
                if rule.matches(request):
                    self._rules.remove(rule)
                    self.cuts += 1
                    return rule
        return None

    def _serve(self, client: socket.socket) -> None:
        # OSError: the client went away (it stopped reading a stream), or the service did.
        with client, contextlib.suppress(OSError):
            head, rest = _read_head(client)
            if head is None:
                return
            request, upstream_head = _parse_head(head)
            rule = self._take_rule(request)
            with socket.create_connection(self._upstream) as upstream:
                upstream.sendall(upstream_head + rest)
                pump = threading.Thread(target=_pump, args=(client, upstream), daemon=True)
                pump.start()  # the rest of the request body, as the client sends it
                try:
                    _relay_answer(upstream, client, rule)
                finally:
                    _shutdown(client)  # unblocks the pump's recv on the client


def _relay_answer(upstream: socket.socket, client: socket.socket, rule: _Rule | None) -> None:
    """The service's answer to the client: whole, cut after ``rule.after_bytes``, or (a
    swallow rule) read whole and dropped."""
    sent = 0
    while chunk := upstream.recv(CHUNK_BYTES):
        if rule is None:
            client.sendall(chunk)
        elif rule.after_bytes is not None:
            client.sendall(chunk[: max(0, rule.after_bytes - sent)])
            if sent + len(chunk) >= rule.after_bytes:
                return  # the cut: both connections close mid-answer
        sent += len(chunk)


def _read_head(client: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while HEAD_END not in data:
        chunk = client.recv(CHUNK_BYTES)
        if not chunk or len(data) > MAX_HEAD_BYTES:
            return None, b""
        data += chunk
    head, _, rest = data.partition(HEAD_END)
    return head, rest


def _parse_head(head: bytes) -> tuple[SeenRequest, bytes]:
    """The request as seen, and its head for upstream with ``Connection: close``."""
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = {}
    kept = [request_line]
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() in ("connection", "keep-alive"):
            continue
        headers[name.strip().lower()] = value.strip()
        kept.append(line)
    kept.append("Connection: close")
    return SeenRequest(method, target, headers), ("\r\n".join(kept)).encode("latin-1") + HEAD_END


def _pump(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):  # either side closed: the exchange is over
        while chunk := source.recv(CHUNK_BYTES):
            target.sendall(chunk)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the client may have gone already
        sock.shutdown(socket.SHUT_RDWR)
