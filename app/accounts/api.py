"""The /api/v1 JSON API: the account, its tokens, and the routers of each stage.

Every route names the scope it needs (`label`, `export:read`, `admin`);
callers authenticate with `Authorization: Bearer <token>` or, from the
browser, the session cookie plus the X-CSRF-Token header on writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from app import audit
from app.deps import OptionalPrincipal, Principal, SessionDep, check_csrf
from app.models import ApiToken
from app.security import create_api_token, parse_scopes, revoke_api_token

router = APIRouter(prefix="/api/v1")


class MeOut(BaseModel):
    id: int
    username: str
    role: str
    scopes: list[str]
    via: str


class TokenIn(BaseModel):
    name: str = Field("", max_length=128)
    scopes: list[str] = Field(..., min_length=1, description="Any of export:read, label, admin")
    expires_at: datetime | None = None


class TokenOut(BaseModel):
    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class NewTokenOut(TokenOut):
    token: str = Field(description="The secret; shown only in this response")


def _authenticated(principal: OptionalPrincipal, _csrf: Annotated[None, Depends(check_csrf)]) -> Principal:
    if principal is None:
        raise HTTPException(401, "Authentication required", headers={"WWW-Authenticate": "Bearer"})
    return principal


Authenticated = Annotated[Principal, Depends(_authenticated)]


def _token_manager(principal: Authenticated) -> Principal:
    # A browser session manages its user's own tokens (an admin's, anyone's). An API token manages tokens only
    # with the `admin` scope: an export or labeling token that leaks must not be able to revoke, list or keep
    # alive the others. Its scopes are already cut down to its owner's role, so it never acts beyond its owner.
    if principal.via != "session" and "admin" not in principal.scopes:
        raise HTTPException(403, "Managing tokens with a token needs the 'admin' scope")
    return principal


TokenManager = Annotated[Principal, Depends(_token_manager)]


@router.get("/me", response_model=MeOut, tags=["account"])
def me(principal: Authenticated):
    """Tells who the caller is and what they may do."""
    return MeOut(
        id=principal.user.id,
        username=principal.user.username,
        role=principal.user.role,
        scopes=sorted(principal.scopes),
        via=principal.via,
    )


@router.get("/tokens", response_model=list[TokenOut], tags=["account"])
def list_tokens(db: SessionDep, principal: TokenManager):
    """Lists the caller's API tokens (never their secrets)."""
    rows = db.scalars(select(ApiToken).where(ApiToken.user_id == principal.user.id).order_by(ApiToken.id)).all()
    return [TokenOut.model_validate(row, from_attributes=True) for row in rows]


@router.post("/tokens", response_model=NewTokenOut, status_code=201, tags=["account"])
def create_token(body: TokenIn, request: Request, db: SessionDep, principal: TokenManager):
    """Creates an API token for the caller; the secret is shown once."""
    if principal.via != "session":
        raise HTTPException(403, "Create tokens from a browser session or the CLI, not with another token")
    raw, token = create_api_token(db, principal.user, parse_scopes(body.scopes), body.name, body.expires_at)
    audit.record(db, principal.user, "token.created", f"token {token.id} of {principal.user.username}", request)
    return NewTokenOut(token=raw, **TokenOut.model_validate(token, from_attributes=True).model_dump())


@router.delete("/tokens/{token_id}", status_code=204, tags=["account"])
def delete_token(token_id: int, request: Request, db: SessionDep, principal: TokenManager):
    """Revokes one of the caller's tokens (admins may revoke anyone's; with a token, one with the admin scope)."""
    owner = None if principal.is_admin and "admin" in principal.scopes else principal.user
    if not revoke_api_token(db, token_id, owner):
        raise HTTPException(404, f"No active token {token_id} of yours")
    audit.record(db, principal.user, "token.revoked", f"token {token_id}", request)
