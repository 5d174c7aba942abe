"""The web process: HTML pages for labelers and admins, the /api/v1 JSON API, and /docs.

`create_app` wires routers, security headers, the request-size limit and
the error handlers of `app.errors`, which turn every user-caused problem
into a clear 4xx (JSON of one shape for the API, a page for browsers). The
web never imports torch or the worker package; it hands work to the worker
through `app.outbox`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import exc as sa_exc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors, loop
from app.accounts import admin_api as accounts_admin_api
from app.accounts import admin_pages as accounts_admin_pages
from app.accounts import api as accounts_api
from app.accounts import pages as accounts_pages
from app.collection import api as collection_api
from app.collection import pages as collection_pages
from app.collection import writing_routes
from app.config import get_settings
from app.db import max_connections
from app.deps import LoginRequired, PasswordChangeRequired, identify_viewer
from app.errors import NotFound, error_body
from app.export import api as export_api
from app.labeling import api as labeling_api
from app.labeling import pages as labeling_pages
from app.quality import evaluation_routes
from app.quality import routes as quality_routes
from app.registry import api as registry_api
from app.registry import pages as registry_pages
from app.training import api as training_api
from app.training import pages as training_pages
from app.vocabulary import MAX_ID
from app.webhooks import api as webhooks_api
from app.webhooks import pages as webhooks_pages

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    # No inline script anywhere: every script is a static file, so injected markup cannot run.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
# Swagger UI needs its CDN-free inline bootstrap; /docs gets a looser policy of its own.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """Adds the security headers to every response (plain ASGI: no per-request task like BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, hsts: bool = False):
        self.app = app
        extra = {"strict-transport-security": "max-age=31536000"} if hsts else {}
        self.headers = [(k.encode(), v.encode()) for k, v in (SECURITY_HEADERS | extra).items()]
        self.docs_headers = [(k, DOCS_CSP.encode() if k == b"content-security-policy" else v) for k, v in self.headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = self.docs_headers if scope["path"] == "/docs" else self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name, value) for name, value in headers if name not in present
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Refuses request bodies over the configured size with a 413, streamed or not."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(self.max_bytes)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class AdmissionMiddleware:
    """Lets at most `limit` requests into the app at once; the rest wait here, on the event loop.

    A request takes a pooled database connection at its first query (who is asking) and keeps it until
    the commit, while its dependencies and route hop between worker threads (40 of them, shared). With
    more requests inside than connections, threads block waiting for a connection while the requests
    that hold connections wait for a thread to finish in: a deadlock that only the pool's 30 s timeout
    breaks (seen with 200 simulated labelers, bench/fault_load.py). Admitting no more requests than the
    pool has connections makes that impossible; a waiting request costs a coroutine, not a thread.
    """

    def __init__(self, app: ASGIApp, limit: int):
        import anyio

        self.app = app
        self.slots = anyio.Semaphore(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        async with self.slots:
            await self.app(scope, receive, send)


def _too_large(limit: int) -> Response:
    return JSONResponse(error_body(413, f"Request body is larger than the limit of {limit} bytes"), status_code=413)


# Database trouble a client should wait out and retry: the server is restarting or unreachable (OperationalError,
# InterfaceError), the pool has no free connection within its timeout, or a serialization failure or deadlock
# (also OperationalError). Answered 503 with Retry-After instead of 500, so clients know to send the same request
# again; labeling requests are idempotent per assignment, so a retry never doubles a label.
RETRY_AFTER_S = 2
TRANSIENT_DB_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


async def path_ids_in_range(request: Request) -> None:
    """Answers 404 for a path id no row can have, before the database sees it.

    Routes take ids as Python ints of any size; PostgreSQL would refuse one beyond
    64 bits with an error, and that would be a 500 instead of "not found". (Async:
    it does no I/O, so it runs on the event loop instead of a worker thread.)
    """
    for name, value in request.path_params.items():
        if not name.endswith("_id"):
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            continue  # not a number: the route's own validation answers 422
        if abs(number) > MAX_ID:
            raise NotFound(name, f"no such id {value}")


def create_app() -> FastAPI:
    """Builds the web application."""
    loop.wire()
    settings = get_settings()
    app = FastAPI(
        title="InstructLoop",
        version="0.1.0",
        description="Collect demonstrations and rankings, export them, and retrain SFT, RM and PPO.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
        dependencies=[Depends(path_ids_in_range)],
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # The stages in the order data walks through them, each with its pages and its API.
    for module in (
        accounts_pages,
        accounts_api,
        accounts_admin_pages,
        accounts_admin_api,
        collection_pages,
        collection_api,
        writing_routes,
        labeling_pages,
        labeling_api,
        quality_routes,
        evaluation_routes,
        export_api,
        training_pages,
        training_api,
        registry_pages,
        registry_api,
        webhooks_pages,
        webhooks_api,
    ):
        app.include_router(module.router)

    app.add_middleware(AdmissionMiddleware, limit=max_connections())
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: even a 413 from the body limit carries the headers.
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.secure_cookies)

    errors.install(app, identify=identify_viewer)

    @app.exception_handler(PasswordChangeRequired)
    async def password_change_required(request: Request, exc: PasswordChangeRequired):
        return RedirectResponse("/account/password", status_code=303)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='/')}", status_code=303)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        """The icon browsers ask for on every page that names none (the API docs, JSON answers)."""
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")

    async def database_unavailable(request: Request, exc: Exception):
        log.warning(
            "database unavailable during %s %s, answered 503: %s",
            request.method,
            request.url.path,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return errors.http_error_response(
            request,
            HTTPException(
                503,
                "The database is unavailable for a moment; please retry in a few seconds.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ),
        )

    for error in TRANSIENT_DB_ERRORS:
        app.add_exception_handler(error, database_unavailable)

    return app
