"""Keyless mode answers this machine only: a localhost ``Host``, and no foreign ``Origin``.

Binding 127.0.0.1 is not enough without keys. Any web page the user opens can POST to
127.0.0.1 (a form or ``fetch`` needs no CORS to *send*), and a page whose domain is re-bound to
127.0.0.1 (DNS rebinding) can also *read* the answers: jobs and artifacts. Such requests carry
the page's ``Host`` or ``Origin``, so refusing every non-localhost one stops both. With API keys
the guard is off: a page does not know a key.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from core.settings import Settings, get_settings

# Host header: a loopback name with any port ("[::1]" is how an IPv6 address appears in it).
LOCAL_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?", re.IGNORECASE)
# Origin header: scheme://host[:port], as browsers send it (no path, no trailing slash).
LOCAL_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?", re.IGNORECASE)
POLICY_VIOLATION = 1008  # WebSocket close code


class LocalGuard:
    """Pure ASGI middleware: in keyless mode, 403 for a foreign ``Host`` or ``Origin``.

    ``settings`` None reads the process's settings (``get_settings``) per request, so that it
    agrees with the routes' dependency.
    """

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        settings = self.settings if self.settings is not None else get_settings()
        refusal = None if settings.auth_required else self._refusal(Headers(scope=scope))
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
        else:
            code, message = refusal
            response = JSONResponse({"error": {"code": code, "message": message}}, status_code=403)
            await response(scope, receive, send)

    @staticmethod
    def _refusal(headers: Headers) -> tuple[str, str] | None:
        """The error code and message for a request from beyond this machine, else None."""
        host = headers.get("host", "")
        if not LOCAL_HOST.fullmatch(host):
            return (
                "host_not_allowed",
                f"Host {host[:100]!r} refused: without API_KEYS the service answers only "
                "localhost, 127.0.0.1 or [::1]",
            )
        origin = headers.get("origin")
        if origin is not None and not LOCAL_ORIGIN.fullmatch(origin):
            return (
                "origin_not_allowed",
                f"Origin {origin[:100]!r} refused: without API_KEYS only pages served from "
                "localhost, 127.0.0.1 or [::1] may call the service",
            )
        return None
