"""API keys, checked from the request's headers before anything reads its body.

FastAPI reads a route's declared body (parsing JSON in memory, spooling multipart files to
/tmp) before it runs the route's dependencies, so a key check that is only a dependency lets an
unauthenticated client stream gigabytes before its 401. ``ApiKeyAuth`` runs first instead: a
pure ASGI middleware that resolves the bearer key to a tenant from the headers alone, answers
401 without ever calling ``receive``, and leaves the tenant in ``scope["state"]``, where
``api.deps.get_tenant`` reads it. Probes, the API docs and the dashboard's page and static files
stay public: they hold no data; the dashboard's own calls to ``/v1`` send the key.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.schemas import ErrorBody, ErrorDetail
from core.settings import LOCAL_TENANT, Settings, get_settings

TENANT_STATE = "tenant"  # the key of the caller's tenant in scope["state"] (request.state)
POLICY_VIOLATION = 1008  # WebSocket close code
# A refused request's body is never read; past this much of it, the 401 closes the connection
# rather than let the server read and discard the rest to keep the connection alive.
CLOSE_AFTER_BODY_BYTES = 64 * 1024


class Unauthorized(Exception):
    """No API key, or one that is not in ``API_KEYS``: the message says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def tenant_for(settings: Settings, authorization: str | None) -> str:
    """The tenant of the bearer key in an ``Authorization`` header; ``local`` when keyless."""
    if not settings.auth_required:
        return LOCAL_TENANT
    scheme, key = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    # Compare against every key in constant time, so timing reveals nothing about valid keys.
    tenant = None
    for known_key, key_tenant in settings.api_keys.items():
        if hmac.compare_digest(known_key.encode(), key.encode()):
            tenant = key_tenant
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


def route_path(scope: Scope) -> str:
    """The request's path inside the app: without the ``root_path`` a proxy mounts it under
    (what Starlette's router matches routes against)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path + "/"):
        return path[len(root_path) :]
    return path


class ApiKeyAuth:
    """Pure ASGI middleware: the caller's tenant from its API key, before any body is read.

    Every path but ``public_paths`` and those under ``public_prefixes`` needs a key when
    ``API_KEYS`` is set; without keys (the embedded mode) every request is tenant ``local``.
    A prefix ends with "/", so that ``/ui/`` makes ``/ui/app.js`` public but not ``/uix``.
    ``settings`` None reads the process's settings (``get_settings``) per request, so that it
    agrees with the routes' dependency.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings | None = None,
        public_paths: Collection[str] = (),
        public_prefixes: Collection[str] = (),
    ) -> None:
        bare = [prefix for prefix in public_prefixes if not prefix.endswith("/")]
        if bare:
            raise ValueError(f"public prefixes must end with '/': {bare}")
        self.app = app
        self.settings = settings
        self.public_paths = frozenset(public_paths)
        self.public_prefixes = tuple(public_prefixes)

    def is_public(self, path: str) -> bool:
        return path in self.public_paths or path.startswith(self.public_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.is_public(route_path(scope)):
            await self.app(scope, receive, send)  # lifespan, probes, docs, the dashboard
            return
        settings = self.settings if self.settings is not None else get_settings()
        try:
            tenant = tenant_for(settings, Headers(scope=scope).get("authorization"))
        except Unauthorized as exc:
            await self._refuse(scope, receive, send, exc.message)
            return
        scope.setdefault("state", {})[TENANT_STATE] = tenant
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        """401 (or a closed WebSocket) without calling ``receive``: the body stays unread."""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
            return
        headers = {"WWW-Authenticate": "Bearer"}
        if _large_body_follows(Headers(scope=scope)):
            headers["Connection"] = "close"
        body = ErrorBody(error=ErrorDetail(code="unauthorized", message=message))
        response = JSONResponse(body.model_dump(), status_code=401, headers=headers)
        await response(scope, receive, send)


def _large_body_follows(headers: Headers) -> bool:
    """A chunked body (size unknown) or a declared one over ``CLOSE_AFTER_BODY_BYTES``."""
    if "transfer-encoding" in headers:
        return True
    try:
        return int(headers.get("content-length", "0")) > CLOSE_AFTER_BODY_BYTES
    except ValueError:
        return True
