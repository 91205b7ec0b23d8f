"""Pure ASGI middleware (no body buffering): Host and Origin checks, the bearer token, security headers."""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers

from .context import error
from .routes.web import WEB_FILES

# The page and its assets hold no data, and a browser must load them before it can ask for the token.
OPEN_PATHS = frozenset({"/healthz", *WEB_FILES})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-frame-options", b"DENY"),
]


class Guard:
    def __init__(self, app, token: str | None, allowed_hosts: frozenset[str] | None):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    def _token_ok(self, scope, headers: Headers) -> bool:
        given = ""
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        else:
            # <video src>, a download link or /docs cannot send a header; a query parameter can.
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _refusal(self, scope, headers: Headers):
        """The error response for a request this server must not answer, else None."""
        host = headers.get("host", "")
        if self.allowed_hosts is not None:
            # A loopback server without a token must not answer pages that reached it by DNS rebinding.
            name = urlsplit("//" + host).hostname or ""
            if name not in self.allowed_hosts:
                return error(400, f"host {host!r} is not allowed; use http://127.0.0.1 or localhost")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            # Another site's page may POST a form here (no CORS preflight for multipart); refuse it.
            if origin is not None and urlsplit(origin).netloc != host:
                return error(403, f"cross-origin request from {origin} refused")
        needs_token = self.token is not None and scope["path"] not in OPEN_PATHS
        if needs_token and not self._token_ok(scope, headers):
            return error(
                401,
                "this server needs a token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response = self._refusal(scope, Headers(scope=scope))
        if response is not None:
            return await response(scope, receive, send)

        # Not on /docs: Swagger UI comes from a CDN with inline script, which this policy would block.
        extra = SECURITY_HEADERS + (PAGE_HEADERS if scope["path"] in WEB_FILES else [])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
