"""Finding 4: token scope on the token routes.

A token holding only `export:read`, made by an admin, could list and revoke
every user's tokens. Managing tokens with a token needs the `admin` scope, and
a token never acts beyond the user who owns it.
"""

from __future__ import annotations

from app.models import ApiToken
from app.security import create_api_token
from tests.factories import AdminFactory, UserFactory


def bearer(raw: str) -> dict[str, str]:
    return {"authorization": f"Bearer {raw}"}


def test_an_export_token_cannot_revoke_or_list_tokens(client, db):
    admin, labeler = AdminFactory(), UserFactory()
    reader, _ = create_api_token(db, admin, ["export:read"])
    victim_raw, victim = create_api_token(db, labeler, ["label"])
    _, own = create_api_token(db, admin, ["admin"])
    db.commit()

    refused = client.delete(f"/api/v1/tokens/{victim.id}", headers=bearer(reader))
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    assert client.delete(f"/api/v1/tokens/{own.id}", headers=bearer(reader)).status_code == 403
    assert client.get("/api/v1/tokens", headers=bearer(reader)).status_code == 403
    db.expire_all()
    assert db.get(ApiToken, victim.id).revoked_at is None and db.get(ApiToken, own.id).revoked_at is None
    assert client.get("/api/v1/me", headers=bearer(victim_raw)).status_code == 200
    # /me stays open to every token: it only tells the caller who they are.
    assert client.get("/api/v1/me", headers=bearer(reader)).json()["scopes"] == ["export:read"]


def test_a_label_token_cannot_manage_tokens_even_its_own(client, db):
    labeler = UserFactory()
    raw, token = create_api_token(db, labeler, ["label"])
    db.commit()
    assert client.get("/api/v1/tokens", headers=bearer(raw)).status_code == 403
    assert client.delete(f"/api/v1/tokens/{token.id}", headers=bearer(raw)).status_code == 403
    db.expire_all()
    assert db.get(ApiToken, token.id).revoked_at is None


def test_an_admin_token_acts_as_its_owner(client, db):
    admin, labeler = AdminFactory(), UserFactory()
    manager, _ = create_api_token(db, admin, ["admin"])
    victim_raw, victim = create_api_token(db, labeler, ["label"])
    db.commit()
    assert client.delete(f"/api/v1/tokens/{victim.id}", headers=bearer(manager)).status_code == 204
    assert client.get("/api/v1/me", headers=bearer(victim_raw)).status_code == 401
    # The owner loses the admin role: the token's admin scope goes with it, at once.
    admin.role = "labeler"
    other_raw, other = create_api_token(db, UserFactory(), ["label"])
    db.commit()
    assert client.delete(f"/api/v1/tokens/{other.id}", headers=bearer(manager)).status_code == 403
    assert client.get("/api/v1/me", headers=bearer(other_raw)).status_code == 200
