"""Who may talk to the server: checks on every request's Host and Origin headers, before any route runs.

A server on 127.0.0.1 without a key is still reachable from every web page the user opens: the browser sends
the page's requests to localhost. Two headers tell those requests apart. ``Origin`` names the page that sent
a request (browsers add it to every cross-origin request, and no API client sends it), so a request with an
Origin is refused unless that origin was allowed. ``Host`` names the server the browser thinks it talks to:
with DNS rebinding a page's own name resolves to 127.0.0.1, and its requests carry that name, so only IP
addresses, ``localhost`` and the names given with ``--allowed-hosts`` are served (rebinding needs a name, an IP
address cannot be rebound). Allowed origins get CORS headers, so their pages can read the answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from msn.serve.protocol import error_body

ANY = "*"


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets, case or a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:].partition("]")[0]
    name, sep, port = header.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        header = name
    return header.rstrip(".")


def host_allowed(name: str, allowed: Iterable[str]) -> bool:
    """An IP address, ``localhost`` (or a name under it, RFC 6761), or a name in ``allowed``."""
    allowed = {host_name(a) for a in allowed}
    if ANY in allowed or name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_key(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class Guard:
    """ASGI middleware: refuse a foreign Host or Origin (403, OpenAI's error JSON); CORS for allowed origins."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()):
        self.app = app
        self.hosts = tuple(allowed_hosts)
        self.origins = {origin_key(o) for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await Response(status_code=204, headers=self.cors(origin, preflight=True))(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.cors(origin).items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def refusal(self, headers: dict[str, str]) -> Response | None:
        host = headers.get("host")
        if host is not None and not host_allowed(host_name(host), self.hosts):
            name = host_name(host)
            return _forbidden(f"Host {name!r} is not served: this server answers requests addressed to localhost or "
                              f"an IP address (a web page could otherwise reach it through DNS rebinding); behind a "
                              f"proxy or under another name, start msn serve with --allowed-hosts {name}",
                              "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and ANY not in self.origins and origin_key(origin) not in self.origins:
            return _forbidden(f"requests from web pages are refused (Origin: {origin}): a page the user opens must "
                              "not drive this server; to allow one page, start msn serve with --allowed-origins "
                              f"{origin}", "origin_not_allowed")
        return None

    @staticmethod
    def cors(origin: str, preflight: bool = False) -> dict[str, str]:
        out = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            out.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                        "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600"})
        return out


def _forbidden(message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=403)
