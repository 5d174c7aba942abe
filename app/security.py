"""Credentials: password hashing, login sessions, API tokens, CSRF and the login rate limit.

Passwords are hashed with argon2. Session ids and API tokens are 256-bit
random strings: only their SHA-256 hash is stored (a fast hash is right for
high-entropy secrets; argon2 is for guessable passwords), compared in
constant time by the database's unique index lookup plus `hmac.compare_digest`.
The session cookie carries the session id signed with the secret key.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.errors import AppError
from app.models import ROLES, ApiToken, LoginFailure, User, UserSession, utcnow
from app.vocabulary import TOKEN_SCOPES

SESSION_COOKIE = "il_session"
LOGIN_CSRF_COOKIE = "il_login_csrf"
TOKEN_PREFIX = "il_"  # noqa: S105  the public prefix that marks a token, not a secret

# What each role may do; a token's scopes are cut down to its owner's role.
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "labeler": frozenset({"label"}),
    "admin": frozenset(TOKEN_SCOPES),
}

_hasher = PasswordHasher()


class CredentialError(AppError):
    """A user-caused problem with credentials (422 unless told otherwise); `field` names what is wrong."""

    status = 422


def hash_password(password: str) -> str:
    """Hashes a password with argon2id."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Checks a password against its argon2 hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# A hash to verify against when the user does not exist, so timing does not reveal usernames.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def sha256_hex(value: str) -> str:
    """Returns the SHA-256 hex digest of a secret."""
    return hashlib.sha256(value.encode()).hexdigest()


def validate_new_user(username: str, role: str, password: str) -> None:
    """Raises CredentialError when a new account's fields are unacceptable."""
    if not username or len(username) > 64 or not all(c.isalnum() or c in "._-" for c in username):
        raise CredentialError("username", "use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise CredentialError("role", f"must be one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise CredentialError("password", "must be at least 8 characters")


def create_user(db: Session, username: str, role: str, password: str) -> User:
    """Creates an account with a hashed password."""
    validate_new_user(username, role, password)
    if db.scalar(select(User.id).where(User.username == username)) is not None:
        raise CredentialError("username", f"'{username}' already exists", 409)
    user = User(username=username, role=role, password_hash=hash_password(password))
    db.add(user)
    db.flush()
    return user


def authenticate(db: Session, username: str, password: str) -> User | None:
    """Returns the active user with these credentials, or None."""
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        verify_password(_DUMMY_HASH, password)
        return None
    if not verify_password(user.password_hash, password) or not user.is_active:
        return None
    return user


# --- login rate limit -------------------------------------------------------------------------
#
# Counted in the database, so the limit holds across every web process. An attempt is written (and committed)
# before its password is checked, and only then are the attempts counted, its own included: whatever the
# interleaving, the k-th attempt to commit sees at least k, so at most `login_max_failures` are ever checked.
# (Counting first and writing after the slow password check let every concurrent attempt through.)


def claim_login_attempt(db: Session, settings: Settings, username: str, ip: str) -> LoginFailure:
    """Records a login attempt as a failure until it succeeds; the caller commits before `login_blocked`."""
    attempt = LoginFailure(username=username[:64], ip=ip[:64])
    db.add(attempt)
    cutoff = utcnow() - timedelta(seconds=settings.login_window_s * 2)
    db.execute(delete(LoginFailure).where(LoginFailure.at < cutoff))
    db.flush()
    return attempt


def login_blocked(db: Session, settings: Settings, username: str, ip: str) -> bool:
    """Tells whether the attempts within the window, the caller's claimed one included, exceed the limit."""
    since = utcnow() - timedelta(seconds=settings.login_window_s)
    # count() always yields one row; `or 0` only tells the type checker so
    by_user = db.scalar(select(func.count()).where(LoginFailure.username == username, LoginFailure.at >= since)) or 0
    by_ip = db.scalar(select(func.count()).where(LoginFailure.ip == ip, LoginFailure.at >= since)) or 0
    return by_user > settings.login_max_failures or by_ip > settings.login_max_failures * 4


def release_login_attempt(db: Session, attempt: LoginFailure) -> None:
    """Forgets a refused attempt: only checked passwords count, so hammering a locked account does not extend it."""
    db.execute(delete(LoginFailure).where(LoginFailure.id == attempt.id))


def clear_login_failures(db: Session, username: str) -> None:
    """Forgets an account's failures after a successful login."""
    db.execute(delete(LoginFailure).where(LoginFailure.username == username))


# --- sessions ---------------------------------------------------------------------------------


def _serializer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(settings.secret_key, salt="instructloop-session")


def start_session(db: Session, settings: Settings, user: User) -> tuple[str, UserSession]:
    """Creates a fresh session (a new id at every login) and returns its signed cookie value."""
    raw = secrets.token_urlsafe(32)
    session = UserSession(
        user_id=user.id,
        token_hash=sha256_hex(raw),
        csrf_token=secrets.token_urlsafe(32),
        expires_at=utcnow() + timedelta(seconds=settings.session_max_age_s),
    )
    db.add(session)
    db.flush()
    return _serializer(settings).dumps(raw), session


def load_session(db: Session, settings: Settings, cookie: str | None) -> tuple[UserSession, User] | None:
    """Returns the live session a cookie names and its user, or None."""
    if not cookie:
        return None
    try:
        raw = _serializer(settings).loads(cookie)
    except BadSignature:
        return None
    if not isinstance(raw, str):
        return None
    row = db.execute(
        select(UserSession, User)
        .join(User, User.id == UserSession.user_id)
        .where(UserSession.token_hash == sha256_hex(raw))
    ).first()
    if row is None:
        return None
    session, user = row
    if session.revoked_at is not None or _aware(session.expires_at) <= utcnow() or not user.is_active:
        return None
    return session, user


def end_session(db: Session, session: UserSession) -> None:
    """Revokes a session (logout)."""
    session.revoked_at = utcnow()


def end_user_sessions(db: Session, user_id: int, keep: UserSession | None = None) -> int:
    """Revokes every live session of a user but `keep` (the one making the change); returns how many."""
    query = update(UserSession).where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
    if keep is not None:
        query = query.where(UserSession.id != keep.id)
    return rowcount(db.execute(query.values(revoked_at=utcnow())))


def set_password(db: Session, user: User, password: str, keep: UserSession | None = None) -> None:
    """Sets a new password and ends the user's other sessions (a stolen session must not outlive the change)."""
    if len(password) < 8:
        raise CredentialError("password", "must be at least 8 characters")
    if len(password) > 1024:
        raise CredentialError("password", "must be at most 1024 characters")
    user.password_hash = hash_password(password)
    user.must_change_password = False
    end_user_sessions(db, user.id, keep)


def csrf_matches(expected: str, given: str | None) -> bool:
    """Compares a submitted CSRF token with the expected one in constant time."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def sign_login_csrf(settings: Settings, value: str) -> str:
    """Signs the double-submit CSRF token used by the login form (no session exists yet)."""
    return URLSafeSerializer(settings.secret_key, salt="instructloop-login-csrf").dumps(value)


def unsign_login_csrf(settings: Settings, cookie: str | None) -> str | None:
    """Reads the login form's CSRF cookie; None when missing or tampered with."""
    if not cookie:
        return None
    try:
        value = URLSafeSerializer(settings.secret_key, salt="instructloop-login-csrf").loads(cookie)
    except BadSignature:
        return None
    return value if isinstance(value, str) else None


# --- API tokens -------------------------------------------------------------------------------


def parse_scopes(text: str | list[str]) -> list[str]:
    """Parses a comma-separated scope list, refusing unknown scopes."""
    items = text if isinstance(text, list) else [s.strip() for s in text.split(",")]
    scopes = sorted({s for s in items if s})
    unknown = [s for s in scopes if s not in TOKEN_SCOPES]
    if unknown:
        raise CredentialError("scopes", f"unknown {', '.join(unknown)}; known: {', '.join(TOKEN_SCOPES)}")
    if not scopes:
        raise CredentialError("scopes", "give at least one of " + ", ".join(TOKEN_SCOPES))
    return scopes


def create_api_token(
    db: Session, user: User, scopes: list[str], name: str = "", expires_at: datetime | None = None
) -> tuple[str, ApiToken]:
    """Creates a token for a user; returns the plain token (shown once) and its row."""
    allowed = ROLE_SCOPES[user.role]
    beyond = [s for s in scopes if s not in allowed]
    if beyond:
        raise CredentialError("scopes", f"a {user.role} cannot hold {', '.join(beyond)}")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=name, token_hash=sha256_hex(raw), scopes=scopes, expires_at=expires_at)
    db.add(token)
    db.flush()
    return raw, token


# Built once, with the digest as a bound parameter: it runs on every API request, and constructing a
# statement and its cache key on each call is a large share of the Python CPU of running it.
_TOKEN_BY_HASH = (
    select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == bindparam("digest"))
)


def resolve_api_token(db: Session, raw: str) -> tuple[ApiToken, User] | None:
    """Returns the live token and its user for a presented bearer token, or None.

    Looked up on every request, never cached: a revoked or expired token is refused at once.
    """
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    digest = sha256_hex(raw)
    row = db.execute(_TOKEN_BY_HASH, {"digest": digest}).first()
    if row is None:
        return None
    token, user = row
    # The index lookup is by hash, so this compare is belt and braces against timing.
    if not hmac.compare_digest(token.token_hash, digest):
        return None
    now = utcnow()
    if token.revoked_at is not None or not user.is_active:
        return None
    if token.expires_at is not None and _aware(token.expires_at) <= now:
        return None
    if token.last_used_at is None or now - _aware(token.last_used_at) > timedelta(minutes=1):
        token.last_used_at = now
    return token, user


def revoke_api_token(db: Session, token_id: int, owner: User | None = None) -> bool:
    """Revokes a token (an admin's, or the owner's own); returns whether one was revoked."""
    query = select(ApiToken).where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
    if owner is not None:
        query = query.where(ApiToken.user_id == owner.id)
    token = db.scalar(query)
    if token is None:
        return False
    token.revoked_at = utcnow()
    return True


# --- spreadsheets ------------------------------------------------------------------------------

# A spreadsheet reads a cell starting with one of these as a formula (tab and CR too, per OWASP's CSV injection
# guidance: some programs strip them and then see the formula behind).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: str) -> str:
    """Prefixes a single quote to a CSV cell a spreadsheet would run as a formula (OWASP's CSV injection advice)."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_row(values: Iterable[Any]) -> str:
    """Writes one CSV row ending in a newline; text cells pass through `spreadsheet_safe`."""
    buffer = io.StringIO()
    # Written with CRLF and cut back to LF: Python 3.11's writer quotes a field holding a line-terminator
    # character, so a lone carriage return inside a text would otherwise go out unquoted and break the row.
    csv.writer(buffer, lineterminator="\r\n").writerow(
        spreadsheet_safe(value) if isinstance(value, str) else value for value in values
    )
    return buffer.getvalue()[:-2] + "\n"


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
