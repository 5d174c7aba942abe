"""Request dependencies: the database session and who is asking.

`SessionDep` opens one transaction per request and commits it when the route
function returns, before the response is sent, so a client never sees a 200
for data that was not stored. Who is asking comes from a bearer token (API
clients) or the session cookie (browsers); cookie-authenticated requests
that change state must carry the session's CSRF token.

FastAPI runs every plain `def` dependency in a worker thread, and each trip
there and back costs about as much CPU as a small query. So dependencies that
do no I/O are `async def` (they run on the event loop, no thread), and the
session dependency only goes to a thread to commit: an API request makes three
trips (who is asking, the route, the commit) where it made seven or eight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

import anyio
from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from app.audit import client_address, remember_actor
from app.config import Settings, get_settings
from app.db import get_sessionmaker
from app.models import User, UserSession
from app.ratelimit import check_api_rate
from app.security import ROLE_SCOPES, SESSION_COOKIE, csrf_matches, load_session, resolve_api_token

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def get_db() -> AsyncIterator[Session]:
    """Yields a session; commits when the route returns, rolls back on error.

    Opening a session does no I/O (it takes a pooled connection at its first query), so this runs on the
    event loop and goes to a worker thread only to commit or roll back. A route may commit before it
    returns (the labeling API's hot routes do, in their own worker thread); then there is nothing left
    to do here but close the session, which needs no thread.
    """
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        await _end_in_thread(session, False)
        raise
    if not session.in_transaction():
        # Nothing to commit (the route committed itself, or never queried): closing does no I/O.
        session.close()
        return
    await _end_in_thread(session, True)


async def _end_in_thread(session: Session, commit: bool) -> None:
    # Not through the shared thread limiter (40 threads): the transaction still holds a pooled connection and
    # its row locks, and if every thread were busy with requests waiting for a connection or for those locks,
    # the commit that frees them could never start (a deadlock broken only by the 30 s pool timeout, seen with
    # 200 labelers in bench/fault_load.py). A limiter of its own per call, as FastAPI does for the exit of sync
    # dependencies; shielded, so a client hanging up cannot skip the rollback and leak the connection.
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_end, session, commit, limiter=anyio.CapacityLimiter(1))


def _end(session: Session, commit: bool) -> None:
    """Commits (or rolls back) and closes a request's session, handing its connection back to the pool."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def _settings() -> Settings:
    # `get_settings` is cached; as an async dependency it is read without a trip to a worker thread.
    return get_settings()


SessionDep = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(_settings)]


class PageUser(NamedTuple):
    """What the page header shows of a signed-in user."""

    username: str
    role: str


class Viewer(NamedTuple):
    """Who an error page is for: the header's user and the CSRF token of its logout form."""

    user: PageUser
    csrf_token: str


@dataclass
class Principal:
    """The authenticated caller: a user, what they may do, and how they proved it."""

    user: User
    scopes: frozenset[str]
    via: str  # "session" or "token"
    session: UserSession | None = None
    token_id: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token if self.session else ""


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Authorization header must be 'Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return value.strip()


def optional_principal(request: Request, db: SessionDep, settings: SettingsDep) -> Principal | None:
    """Returns the caller if they are authenticated, else None; a bad token is a 401, too many API requests 429."""
    raw = _bearer(request)
    api = request.url.path.startswith("/api/")
    if api:  # counted before the token is looked up, so guessing tokens counts too
        check_api_rate(settings, client_address(request), None)
    if raw is not None:
        found = resolve_api_token(db, raw)
        if found is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "API token is invalid, expired or revoked",
                headers={"WWW-Authenticate": "Bearer"},
            )
        token, user = found
        if api:
            check_api_rate(settings, None, token.id)
        remember_actor(db, user, request)
        scopes = frozenset(token.scopes) & ROLE_SCOPES[user.role]
        return Principal(user=user, scopes=scopes, via="token", token_id=token.id)
    loaded = load_session(db, settings, request.cookies.get(SESSION_COOKIE))
    if loaded is None:
        return None
    session, user = loaded
    remember_actor(db, user, request)
    # The error page shows this user's navigation, even after a 403. A copy of what it reads: the request's
    # session has rolled back (expiring the ORM objects) by the time an exception handler renders the page.
    request.state.viewer = Viewer(PageUser(user.username, user.role), session.csrf_token)
    return Principal(user=user, scopes=ROLE_SCOPES[user.role], via="session", session=session)


OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]


async def _submitted_csrf(request: Request) -> str | None:
    header = request.headers.get("x-csrf-token")
    if header:
        return header
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()  # cached on the request; the route reads the same form
        value = form.get("csrf_token")
        return value if isinstance(value, str) else None
    return None


async def check_csrf(request: Request, principal: OptionalPrincipal) -> None:
    """Refuses a state-changing, cookie-authenticated request without the session's CSRF token."""
    if request.method not in UNSAFE_METHODS or principal is None or principal.via != "session":
        return
    if not csrf_matches(principal.csrf_token, await _submitted_csrf(request)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "CSRF token missing or wrong: reload the page and try again "
            "(API clients send the X-CSRF-Token header or use a bearer token)",
        )


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """Builds an API dependency: 401 when anonymous, 403 without `scope`."""

    async def dependency(principal: OptionalPrincipal, _csrf: Annotated[None, Depends(check_csrf)]) -> Principal:
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "Authentication required", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope not in principal.scopes:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"This needs the '{scope}' scope")
        return principal

    return dependency


def _here(request: Request) -> str:
    """The page asked for, with its query string, to come back to after the login."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


class PasswordChangeRequired(Exception):
    """Raised by page dependencies while the user holds a one-time password; the app sends them to change it."""


def _must_change_password(request: Request, principal: Principal) -> None:
    if principal.user.must_change_password and request.url.path != "/account/password":
        raise PasswordChangeRequired()


class LoginRequired(Exception):
    """Raised by page dependencies for anonymous visitors; the app redirects to /login."""

    def __init__(self, next_url: str):
        self.next_url = next_url


def require_role(role: str) -> Callable[..., Principal]:
    """Builds a page dependency: redirect to login when anonymous, 403 for the wrong role."""

    def dependency(
        request: Request, principal: OptionalPrincipal, _csrf: Annotated[None, Depends(check_csrf)]
    ) -> Principal:
        if principal is None or principal.via != "session":
            raise LoginRequired(_here(request))
        _must_change_password(request, principal)
        if principal.user.role != role:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"This page is for {role}s only")
        return principal

    return dependency


def require_login(
    request: Request, principal: OptionalPrincipal, _csrf: Annotated[None, Depends(check_csrf)]
) -> Principal:
    """Page dependency for any signed-in user."""
    if principal is None or principal.via != "session":
        raise LoginRequired(_here(request))
    _must_change_password(request, principal)
    return principal


AdminPage = Annotated[Principal, Depends(require_role("admin"))]
LabelerPage = Annotated[Principal, Depends(require_role("labeler"))]
AnyUserPage = Annotated[Principal, Depends(require_login)]
ExportReader = Annotated[Principal, Depends(require_scope("export:read"))]
LabelerApi = Annotated[Principal, Depends(require_scope("label"))]
AdminApi = Annotated[Principal, Depends(require_scope("admin"))]


async def identify_viewer(request: Request) -> None:
    """Finds who is signed in for the error page of a request no route took (unknown URL, wrong method).

    A route's dependencies have done it already when one ran (`request.state.viewer`); otherwise the
    session cookie is looked up in a worker thread. Any failure leaves the page without navigation.
    """
    cookie = request.cookies.get(SESSION_COOKIE)
    if hasattr(request.state, "viewer") or not cookie:
        return
    request.state.viewer = await anyio.to_thread.run_sync(_load_viewer, cookie)


def _load_viewer(cookie: str) -> Viewer | None:
    try:
        with get_sessionmaker()() as db:
            loaded = load_session(db, get_settings(), cookie)
            if loaded is None:
                return None
            session, user = loaded
            return Viewer(PageUser(user.username, user.role), session.csrf_token)
    except Exception:  # the error page must show even when the database cannot say who is asking
        return None
