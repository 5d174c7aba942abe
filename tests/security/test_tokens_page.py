"""API tokens from the web: create with scopes and an expiry (shown once), list with last use, revoke (issue 20).

Token auth refuses an expired token with a 401 and records its last use at most once a minute.
"""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select

from app.models import ApiToken, utcnow
from tests.factories import AdminFactory, UserFactory


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_tokens_page_creates_shows_once_lists_last_use_and_revokes(client, db, login):
    admin, labeler = AdminFactory(), UserFactory()
    login(labeler.username)
    assert client.get("/admin/tokens").status_code == 403
    login(admin.username)
    csrf = _csrf(client.get("/admin/tokens").text)
    assert client.post("/admin/tokens", data={"scopes": "export:read"}).status_code == 403  # no CSRF

    made = client.post(
        "/admin/tokens",
        data={"scopes": ["export:read"], "name": "nightly export", "expires_days": "30", "csrf_token": csrf},
    )
    assert made.status_code == 201
    raw = re.search(r'data-testid="token-secret">([^<]+)<', made.text).group(1)
    token = db.scalar(select(ApiToken).where(ApiToken.name == "nightly export"))
    assert token.scopes == ["export:read"] and token.user_id == admin.id
    assert timedelta(days=29) < token.expires_at - utcnow() <= timedelta(days=30)
    listing = client.get("/admin/tokens").text
    assert raw not in listing  # shown once
    row = listing.split(f'data-testid="token-{token.id}"')[1].split("</tr>")[0]
    assert "never" in row.split("</td>")[6]  # not used yet

    client.cookies.clear()
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {raw}"}).status_code == 200
    db.refresh(token)
    assert token.last_used_at is not None
    login(admin.username)
    row = client.get("/admin/tokens").text.split(f'data-testid="token-{token.id}"')[1].split("</tr>")[0]
    assert token.last_used_at.strftime("%Y-%m-%d %H:%M") in row

    csrf = _csrf(client.get("/admin/tokens").text)
    assert client.post(f"/admin/tokens/{token.id}/revoke", data={"csrf_token": csrf}).status_code == 200
    client.cookies.clear()
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {raw}"}).status_code == 401


def test_tokens_page_refuses_bad_fields_naming_them(client, db, login):
    admin, labeler = AdminFactory(), UserFactory()
    login(admin.username)
    csrf = _csrf(client.get("/admin/tokens").text)
    for data, field in [
        ({"scopes": ["admin"], "expires_days": "0"}, "expires_days"),
        ({"scopes": ["admin"], "expires_days": "soon"}, "expires_days"),
        ({}, "scopes"),
        ({"scopes": ["root"]}, "scopes"),
        ({"scopes": ["admin"], "owner_id": str(labeler.id)}, "scopes"),  # a labeler cannot hold admin
        ({"scopes": ["label"], "owner_id": "987654"}, "owner_id"),
    ]:
        answer = client.post("/admin/tokens", data=data | {"csrf_token": csrf})
        assert 400 <= answer.status_code < 500 and field in answer.text, (data, answer.status_code)
    # a token for a labeler, made by the admin, is theirs and holds only what a labeler may
    made = client.post("/admin/tokens", data={"scopes": ["label"], "owner_id": str(labeler.id), "csrf_token": csrf})
    assert made.status_code == 201
    assert db.scalar(select(ApiToken.user_id).where(ApiToken.scopes == ["label"])) == labeler.id
    assert client.post("/admin/tokens/987654/revoke", data={"csrf_token": csrf}).status_code == 404


def test_expired_tokens_get_401_and_last_use_is_written_at_most_once_a_minute(client, db, auth):
    made = client.post(
        "/api/v1/tokens",
        json={"scopes": ["label"], "expires_at": (utcnow() + timedelta(hours=1)).isoformat()},
        headers=auth,
    )
    # creating tokens takes a browser session: the admin token may not mint more
    assert made.status_code == 403
    from app.security import create_api_token

    user = UserFactory()
    raw, token = create_api_token(db, user, ["label"], "short-lived", utcnow() + timedelta(hours=1))
    headers = {"authorization": f"Bearer {raw}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    db.refresh(token)
    first = token.last_used_at
    assert first is not None
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    db.refresh(token)
    assert token.last_used_at == first  # within the minute: no write
    token.last_used_at = first - timedelta(minutes=2)
    db.flush()
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    db.refresh(token)
    assert token.last_used_at > first - timedelta(minutes=2)

    token.expires_at = utcnow() - timedelta(seconds=1)
    db.flush()
    expired = client.get("/api/v1/me", headers=headers)
    assert expired.status_code == 401 and "expired" in expired.text
