"""Browser pages shared by both roles: login, logout, and each role's home page.

Every page checks its role through a dependency, every form carries the
session's CSRF token (the login form a signed double-submit cookie, since no
session exists yet), and the login is rate-limited per account and per IP.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from app import audit
from app.accounts import dashboard
from app.deps import AdminPage, AnyUserPage, LabelerPage, OptionalPrincipal, Principal, SessionDep, SettingsDep
from app.errors import AppError, Forbidden, Invalid, RateLimited, Unauthorized, renders_on_error
from app.models import utcnow
from app.security import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    authenticate,
    claim_login_attempt,
    clear_login_failures,
    csrf_matches,
    end_session,
    login_blocked,
    release_login_attempt,
    set_password,
    sign_login_csrf,
    start_session,
    unsign_login_csrf,
    verify_password,
)
from app.templating import render, templates

router = APIRouter(include_in_schema=False)


def _safe_next(next_url: str | None) -> str:
    # Only same-site paths (with their query string): an attacker-supplied absolute URL would make login an
    # open redirect. Browsers drop tabs and newlines from URLs and read "\\" as "/", so "/\t/evil" and
    # "/\\evil" would become "//evil", another site: no whitespace or control character, no backslash.
    if not next_url or not next_url.startswith("/") or next_url.startswith("//") or "\\" in next_url:
        return "/"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in next_url):
        return "/"
    parts = urlsplit(next_url)
    return next_url if not parts.scheme and not parts.netloc else "/"


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/healthz")
def healthz(db: SessionDep) -> dict:
    """Reports that the web process and its database answer."""
    from sqlalchemy import text

    db.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/")
def home(principal: OptionalPrincipal):
    """Sends each visitor to the home page of their role, or to the login page."""
    if principal is None or principal.via != "session":
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse("/admin" if principal.is_admin else "/label", status_code=303)


def _login_page(
    request: Request, settings, *, error: str = "", username: str = "", next_url: str = "/", status: int = 200
):
    token = secrets.token_urlsafe(32)
    response = templates.TemplateResponse(
        request,
        "accounts/login.html",
        {"user": None, "csrf_token": token, "error": error, "username": username, "next": _safe_next(next_url)},
        status_code=status,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        sign_login_csrf(settings, token),
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        max_age=3600,
    )
    return response


@router.get("/login")
def login_form(request: Request, settings: SettingsDep, next: str = "/"):
    """Shows the login form."""
    return _login_page(request, settings, next_url=next)


def _login_again(exc: AppError, request: Request, settings, username: str, next: str, **_):
    return _login_page(request, settings, error=exc.message, username=username, next_url=next, status=exc.status)


@router.post("/login")
@renders_on_error(_login_again)
def login(
    request: Request,
    db: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
):
    """Checks credentials, starts a fresh session and redirects to where the user was going."""
    expected = unsign_login_csrf(settings, request.cookies.get(LOGIN_CSRF_COOKIE))
    if expected is None or not csrf_matches(expected, csrf_token):
        raise Forbidden(None, "The form expired; please try again.")
    ip = _client_ip(request)
    attempt = claim_login_attempt(db, settings, username, ip)
    db.commit()  # visible to every web process before this one counts: see app.security's rate limit
    if login_blocked(db, settings, username, ip):
        release_login_attempt(db, attempt)
        minutes = settings.login_window_s // 60
        raise RateLimited(None, f"Too many failed attempts; wait {minutes} minutes and try again.")
    user = authenticate(db, username, password)
    if user is None:
        raise Unauthorized(None, "Wrong username or password.")  # the claimed attempt stays, as a failure
    clear_login_failures(db, username)
    user.last_login_at = utcnow()
    cookie, _ = start_session(db, settings, user)
    target = _safe_next(next)
    if target == "/":
        target = "/admin" if user.role == "admin" else "/label"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        max_age=settings.session_max_age_s,
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
def logout(principal: AnyUserPage, db: SessionDep):
    """Ends the session and returns to the login page."""
    if principal.session is None:
        raise HTTPException(400, "Not logged in with a browser session")
    db.add(principal.session)
    end_session(db, principal.session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.get("/label")
def labeler_home(request: Request, principal: LabelerPage, db: SessionDep):
    """The labeler's home: available tasks by kind and what they did today."""
    summary = dashboard.labeler_summary(db, principal.user)
    return render(request, "accounts/labeler_home.html", principal, summary=summary)


@router.get("/admin")
def admin_home(request: Request, principal: AdminPage, db: SessionDep):
    """The admin's dashboard: batches, labeling progress, runs and models at a glance."""
    summary = dashboard.admin_summary(db)
    return render(request, "accounts/admin_home.html", principal, summary=summary)


def _password_page(request: Request, principal: Principal, status: int = 200, **context: Any) -> Response:
    context.setdefault("user_must_change", principal.user.must_change_password)
    return render(request, "accounts/password.html", principal, status_code=status, **context)


@router.get("/account/password")
def password_form(request: Request, principal: AnyUserPage) -> Response:
    """Shows the form to change one's own password."""
    return _password_page(request, principal)


def _password_again(exc: AppError, request: Request, principal: Principal, **_: Any) -> Response:
    return _password_page(request, principal, status=exc.status, error=str(exc))


@router.post("/account/password")
@renders_on_error(_password_again)
def change_password(
    request: Request,
    principal: AnyUserPage,
    db: SessionDep,
    current_password: Annotated[str, Form(max_length=1024)],
    new_password: Annotated[str, Form(max_length=1024)],
    confirm_password: Annotated[str, Form(max_length=1024)],
) -> Response:
    """Changes one's own password after checking the current one; every other session of the user ends."""
    user = principal.user
    db.add(user)
    if not verify_password(user.password_hash, current_password):
        raise Invalid("current_password", "is not your current password")
    if new_password != confirm_password:
        raise Invalid("confirm_password", "does not match the new password")
    set_password(db, user, new_password, keep=principal.session)
    audit.record(db, user, "user.password_changed", f"user {user.id} {user.username}", request)
    return _password_page(request, principal, flash="Password changed; your other sessions have ended.")
