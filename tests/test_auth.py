"""Accounts and access: login, sessions, CSRF, the login rate limit and API tokens."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from app.models import ApiToken, UserSession
from app.security import SESSION_COOKIE, create_api_token, hash_password, verify_password
from tests.factories import PASSWORD, AdminFactory, UserFactory

pytestmark = pytest.mark.sqlite


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_password_is_stored_hashed_with_argon2(db):
    hashed = hash_password("s3cret-password")
    assert hashed.startswith("$argon2id$") and "s3cret" not in hashed
    assert verify_password(hashed, "s3cret-password")
    assert not verify_password(hashed, "wrong-password")


def test_labeler_logs_in_and_lands_on_labeler_home(client, login):
    user = UserFactory()
    login(user.username)
    page = client.get("/label")
    assert page.status_code == 200
    assert 'data-testid="labeler-home"' in page.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/label"


def test_admin_lands_on_dashboard(client, login):
    admin = AdminFactory()
    login(admin.username)
    assert 'data-testid="admin-home"' in client.get("/admin").text


def test_session_cookie_flags_and_rotation(client, db):
    user = UserFactory()
    cookies = []
    for _ in range(2):
        client.cookies.clear()
        form = client.get("/login")
        response = client.post(
            "/login",
            data={"username": user.username, "password": PASSWORD, "csrf_token": _csrf(form.text)},
            follow_redirects=False,
        )
        session_part = next(c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE))
        assert "HttpOnly" in session_part and "SameSite=lax" in session_part
        cookies.append(client.cookies.get(SESSION_COOKIE))
        assert cookies[-1] and session_part.startswith(f"{SESSION_COOKIE}={cookies[-1]};")
    assert cookies[0] != cookies[1]  # a new session id at every login
    assert len(db.scalars(select(UserSession).where(UserSession.user_id == user.id)).all()) == 2


def test_wrong_password_is_a_clear_401(client):
    user = UserFactory()
    form = client.get("/login")
    response = client.post(
        "/login", data={"username": user.username, "password": "nope-nope", "csrf_token": _csrf(form.text)}
    )
    assert response.status_code == 401
    assert "Wrong username or password" in response.text


def test_login_is_rate_limited_per_account(client):
    user = UserFactory()
    statuses = []
    for _ in range(7):
        form = client.get("/login")
        statuses.append(
            client.post(
                "/login", data={"username": user.username, "password": "bad-password", "csrf_token": _csrf(form.text)}
            ).status_code
        )
    assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429]
    form = client.get("/login")
    blocked = client.post(
        "/login", data={"username": user.username, "password": PASSWORD, "csrf_token": _csrf(form.text)}
    )
    assert blocked.status_code == 429 and "Too many failed attempts" in blocked.text


def test_login_form_without_csrf_is_refused(client):
    user = UserFactory()
    client.get("/login")
    response = client.post("/login", data={"username": user.username, "password": PASSWORD})
    assert response.status_code == 403


def test_logout_requires_csrf_and_ends_the_session(client, login):
    user = UserFactory()
    csrf = login(user.username)
    assert client.post("/logout", follow_redirects=False).status_code == 403
    response = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert client.get("/label", follow_redirects=False).status_code == 303


def test_stolen_cookie_is_dead_after_logout(client, login):
    user = UserFactory()
    csrf = login(user.username)
    cookie = client.cookies.get(SESSION_COOKIE)
    client.post("/logout", data={"csrf_token": csrf})
    client.cookies.set(SESSION_COOKIE, cookie)
    assert client.get("/label", follow_redirects=False).status_code == 303


def test_tampered_cookie_is_anonymous(client):
    client.cookies.set(SESSION_COOKIE, "not-a-signed-value")
    assert client.get("/api/v1/me").status_code == 401


def test_open_redirect_after_login_is_refused(client):
    user = UserFactory()
    form = client.get("/login?next=//evil.example")
    response = client.post(
        "/login",
        data={
            "username": user.username,
            "password": PASSWORD,
            "csrf_token": _csrf(form.text),
            "next": "https://evil.example/",
        },
        follow_redirects=False,
    )
    assert response.headers["location"] == "/label"


def test_api_token_is_stored_hashed_and_works_as_bearer(client, db):
    admin = AdminFactory()
    raw, token = create_api_token(db, admin, ["export:read"], "ci")
    assert raw not in token.token_hash and len(token.token_hash) == 64
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"})
    assert me.status_code == 200
    assert me.json() == {
        "id": admin.id,
        "username": admin.username,
        "role": "admin",
        "scopes": ["export:read"],
        "via": "token",
    }


def test_malformed_and_revoked_tokens_are_401(client, db):
    user = UserFactory()
    raw, token = create_api_token(db, user, ["label"])
    for header in ("Bearer", "Basic abc", "Bearer il_garbage", "Bearer " + "x" * 300):
        response = client.get("/api/v1/me", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["detail"]
    token_row = db.get(ApiToken, token.id)
    from app.models import utcnow

    token_row.revoked_at = utcnow()
    db.flush()
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 401


def test_labeler_cannot_mint_admin_scopes(db):
    from app.security import CredentialError

    user = UserFactory()
    with pytest.raises(CredentialError, match="cannot hold admin"):
        create_api_token(db, user, ["admin"])


def test_token_create_list_revoke_through_api(client, db, login):
    admin = AdminFactory()
    csrf = login(admin.username)
    no_csrf = client.post("/api/v1/tokens", json={"scopes": ["export:read"]})
    assert no_csrf.status_code == 403
    created = client.post(
        "/api/v1/tokens", json={"name": "export", "scopes": ["export:read"]}, headers={"X-CSRF-Token": csrf}
    )
    assert created.status_code == 201
    secret, token_id = created.json()["token"], created.json()["id"]
    assert secret.startswith("il_") and created.json()["scopes"] == ["export:read"]
    listed = client.get("/api/v1/tokens").json()
    assert [(t["id"], t["name"], t["revoked_at"]) for t in listed] == [(token_id, "export", None)]
    assert "token" not in listed[0]
    bad_scope = client.post("/api/v1/tokens", json={"scopes": ["root"]}, headers={"X-CSRF-Token": csrf})
    assert bad_scope.status_code == 422 and "scopes" in bad_scope.json()["detail"]
    bearer = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/me", headers=bearer).json()["via"] == "token"

    # Revoking: not without CSRF, not someone else's token (unless an admin), then for good.
    assert client.delete(f"/api/v1/tokens/{token_id}").status_code == 403
    other_raw, other = create_api_token(db, UserFactory(), ["label"], "theirs")
    db.commit()
    revoked = client.delete(f"/api/v1/tokens/{token_id}", headers={"X-CSRF-Token": csrf})
    assert revoked.status_code == 204 and revoked.content == b""
    listed = client.get("/api/v1/tokens").json()
    assert [t["id"] for t in listed] == [token_id] and listed[0]["revoked_at"] is not None
    again = client.delete(f"/api/v1/tokens/{token_id}", headers={"X-CSRF-Token": csrf})
    assert again.status_code == 404 and str(token_id) in again.json()["detail"]
    client.cookies.clear()
    refused = client.get("/api/v1/me", headers=bearer)
    assert refused.status_code == 401 and refused.json()["detail"]
    # A labeler cannot revoke another user's token; it keeps working.
    labeler = UserFactory()
    labeler_csrf = login(labeler.username)
    assert client.delete(f"/api/v1/tokens/{other.id}", headers={"X-CSRF-Token": labeler_csrf}).status_code == 404
    client.cookies.clear()
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {other_raw}"}).status_code == 200


def test_bad_form_field_is_a_clear_422(client):
    form = client.get("/login")
    response = client.post("/login", data={"password": "x", "csrf_token": _csrf(form.text)})
    assert response.status_code == 422
    assert "username" in response.json()["detail"]


def test_oversized_body_is_413(client):
    from app.config import get_settings

    big = b"x" * (get_settings().max_body_bytes + 1)
    response = client.post("/api/v1/tokens", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["detail"]


def test_security_headers_are_set(client):
    response = client.get("/login")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
