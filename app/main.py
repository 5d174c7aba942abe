"""The web process: HTML pages for labelers and admins, the /api/v1 JSON API, and /docs.

`create_app` wires routers, security headers, the request-size limit and
error handlers that turn every user-caused problem into a clear 4xx (JSON
for the API, a page for browsers). The web never imports torch or the
worker package; it hands work to the worker through `app.jobs`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import get_settings
from app.deps import LoginRequired
from app.routes import admin, api, batches_api, export, labeling, labeling_api, pages
from app.templating import templates

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


def _too_large(limit: int) -> Response:
    return JSONResponse(
        {"detail": f"Request body is larger than the limit of {limit} bytes"}, status_code=413
    )


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def _field_errors(exc: RequestValidationError) -> list[dict]:
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path", "header", "form")]
        errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid value")})
    return errors


def create_app() -> FastAPI:
    """Builds the web application."""
    settings = get_settings()
    app = FastAPI(
        title="InstructLoop",
        version="0.1.0",
        description="Collect demonstrations and rankings, export them, and retrain SFT, RM and PPO.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (pages, labeling, admin, api, labeling_api, batches_api, export):
        app.include_router(module.router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path == "/docs":
            response.headers["content-security-policy"] = DOCS_CSP
        if settings.secure_cookies:
            response.headers.setdefault("strict-transport-security", "max-age=31536000")
        return response

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={exc.next_url}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = _field_errors(exc)
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        if _wants_html(request):
            return templates.TemplateResponse(
                request, "error.html", {"status": 422, "message": summary, "user": None}, status_code=422
            )
        return JSONResponse({"detail": summary, "errors": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if _wants_html(request) and exc.status_code >= 400:
            return templates.TemplateResponse(
                request,
                "error.html",
                {"status": exc.status_code, "message": exc.detail, "user": None},
                status_code=exc.status_code,
                headers=exc.headers,
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return app
