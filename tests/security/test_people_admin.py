"""Admins manage people from the web and the API: add, change role, reset password, deactivate (issues 17, 20).

A change that takes access away ends the user's other sessions; a deactivated user can neither log in nor use
a token, their open leases go back to the pool and their labels stay.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.labeling import leases, submissions
from app.models import Assignment, Ranking, User, UserSession
from app.security import create_api_token
from tests.factories import PASSWORD, AdminFactory, UserFactory
from tests.test_labeling import items_for, seed_batch


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _second_client(app) -> TestClient:
    return TestClient(app, base_url="http://testserver")


def _log_in(client: TestClient, username: str, password: str = PASSWORD) -> int:
    form = client.get("/login")
    response = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": _csrf(form.text)},
        follow_redirects=False,
    )
    return response.status_code


def _admin_csrf(client, login, admin) -> str:
    login(admin.username)
    return _csrf(client.get("/admin/users").text)


def test_the_users_page_is_for_admins_and_every_form_needs_csrf(client, db, login):
    labeler = UserFactory()
    admin = AdminFactory()
    login(labeler.username)
    assert client.get("/admin/users").status_code == 403
    csrf = _admin_csrf(client, login, admin)
    page = client.get("/admin/users")
    assert page.status_code == 200
    assert f'data-testid="user-{labeler.username}"' in page.text
    for path, data in [
        ("/admin/users", {"username": "newbie", "role": "labeler"}),
        (f"/admin/users/{labeler.id}/role", {"role": "admin"}),
        (f"/admin/users/{labeler.id}/password", {"password": "another password"}),
        (f"/admin/users/{labeler.id}/active", {"active": "false"}),
    ]:
        assert client.post(path, data=data).status_code == 403, path
        assert client.post(path, data=data | {"csrf_token": "wrong"}).status_code == 403, path
    db.refresh(labeler)
    assert (labeler.role, labeler.is_active) == ("labeler", True)
    assert db.scalar(select(User).where(User.username == "newbie")) is None
    assert csrf


def test_adding_a_user_with_a_generated_password_shows_it_once_and_it_logs_in(client, app, db, login):
    admin = AdminFactory()
    csrf = _admin_csrf(client, login, admin)
    answer = client.post("/admin/users", data={"username": "newbie", "role": "labeler", "csrf_token": csrf})
    assert answer.status_code == 201
    generated = re.search(r'data-testid="generated-password">([^<]+)<', answer.text).group(1)
    assert generated not in client.get("/admin/users").text  # shown once
    with _second_client(app) as other:
        assert _log_in(other, "newbie", generated) == 303
        # a one-time password: every page asks for a new one first
        assert other.get("/label", follow_redirects=False).headers["location"] == "/account/password"
        form = other.get("/account/password")
        assert 'data-testid="must-change"' in form.text
        mine = {"current_password": generated, "new_password": "my own secret", "confirm_password": "my own secret"}
        assert other.post("/account/password", data=mine | {"csrf_token": _csrf(form.text)}).status_code == 200
        assert other.get("/label").status_code == 200
    user = db.scalar(select(User).where(User.username == "newbie"))
    assert user.role == "labeler" and user.last_login_at is not None
    assert "never" not in client.get("/admin/users").text.split('data-testid="user-newbie"')[1].split("</tr>")[0]
    # a bad field is a 4xx naming it, the page shown again
    bad = client.post("/admin/users", data={"username": "x y", "role": "labeler", "csrf_token": csrf})
    assert bad.status_code == 422 and "username" in bad.text
    bad = client.post("/admin/users", data={"username": "ok", "role": "root", "csrf_token": csrf})
    assert bad.status_code == 422 and "role" in bad.text
    taken = client.post("/admin/users", data={"username": "newbie", "role": "admin", "csrf_token": csrf})
    assert taken.status_code == 409


def test_deactivation_ends_sessions_and_tokens_returns_leases_and_keeps_labels(client, app, db, login):
    admin = AdminFactory()
    seed_batch(db, n_prompts=2)
    labeler, other = UserFactory(), UserFactory()
    done = leases.lease_next_task(db, labeler)
    submissions.submit_ranking(db, labeler, done.id, items_for(done))
    open_lease = leases.lease_next_task(db, labeler)
    assert leases.lease_next_task(db, other) is None  # the only slot left is leased
    raw, _ = create_api_token(db, labeler, ["label"])
    db.commit()
    with _second_client(app) as theirs:
        assert _log_in(theirs, labeler.username) == 303
        assert theirs.get("/label").status_code == 200
        assert theirs.get("/api/v1/me", headers={"authorization": f"Bearer {raw}"}).status_code == 200

        csrf = _admin_csrf(client, login, admin)
        answer = client.post(f"/admin/users/{labeler.id}/active", data={"active": "false", "csrf_token": csrf})
        assert answer.status_code == 200 and "deactivated" in answer.text

        assert theirs.get("/label", follow_redirects=False).status_code == 303  # back to the login
        assert theirs.get("/api/v1/me", headers={"authorization": f"Bearer {raw}"}).status_code == 401
        assert _log_in(theirs, labeler.username) == 401
    assert db.get(Assignment, open_lease.id).state == "expired"
    assert leases.lease_next_task(db, other).task_id == open_lease.task_id  # back in the pool
    assert db.scalar(select(Ranking).where(Ranking.assignment_id == done.id)) is not None  # labels stay
    assert all(
        s.revoked_at is not None for s in db.scalars(select(UserSession).where(UserSession.user_id == labeler.id))
    )

    # reactivated: a new login works; the old sessions stay ended
    client.post(f"/admin/users/{labeler.id}/active", data={"active": "true", "csrf_token": csrf})
    with _second_client(app) as theirs:
        assert _log_in(theirs, labeler.username) == 303


def test_role_change_and_password_reset_end_the_users_sessions(client, app, db, login):
    admin = AdminFactory()
    target = UserFactory()
    db.commit()
    csrf = _admin_csrf(client, login, admin)
    with _second_client(app) as theirs:
        assert _log_in(theirs, target.username) == 303
        client.post(f"/admin/users/{target.id}/password", data={"password": "brand new secret", "csrf_token": csrf})
        assert theirs.get("/label", follow_redirects=False).status_code == 303
        assert _log_in(theirs, target.username) == 401
        assert _log_in(theirs, target.username, "brand new secret") == 303
        answer = client.post(f"/admin/users/{target.id}/role", data={"role": "admin", "csrf_token": csrf})
        assert answer.status_code == 200 and "now admin" in answer.text
        assert theirs.get("/admin", follow_redirects=False).status_code == 303  # ended, not promoted in place

    # an admin resetting their own password keeps this session and ends their others
    with _second_client(app) as elsewhere:
        assert _log_in(elsewhere, admin.username) == 303
        mine = client.post(f"/admin/users/{admin.id}/password", data={"password": "my new secret!", "csrf_token": csrf})
        assert mine.status_code == 200
        assert client.get("/admin/users").status_code == 200
        assert elsewhere.get("/admin", follow_redirects=False).status_code == 303
    # but cannot lock themselves out
    assert (
        client.post(f"/admin/users/{admin.id}/active", data={"active": "false", "csrf_token": csrf}).status_code == 409
    )
    assert client.post(f"/admin/users/{admin.id}/role", data={"role": "labeler", "csrf_token": csrf}).status_code == 409
    assert client.post("/admin/users/999999/role", data={"role": "admin", "csrf_token": csrf}).status_code == 404


def test_the_users_api_needs_the_admin_scope_and_does_the_same(client, db, auth):
    labeler = UserFactory()
    raw, _ = create_api_token(db, labeler, ["label"])
    assert client.get("/api/v1/users", headers={"authorization": f"Bearer {raw}"}).status_code == 403
    assert client.get("/api/v1/users").status_code == 401

    listed = client.get("/api/v1/users", headers=auth).json()
    assert labeler.username in {u["username"] for u in listed}
    made = client.post("/api/v1/users", json={"username": "apiuser", "role": "labeler"}, headers=auth)
    assert made.status_code == 201 and len(made.json()["password"]) >= 16
    uid = made.json()["id"]
    bad = client.post("/api/v1/users", json={"username": "apiuser2", "role": "owner"}, headers=auth)
    assert bad.status_code == 422 and "role" in bad.text

    assert client.patch(f"/api/v1/users/{uid}", json={"role": "admin"}, headers=auth).json()["role"] == "admin"
    off = client.patch(f"/api/v1/users/{labeler.id}", json={"is_active": False}, headers=auth)
    assert off.status_code == 200 and off.json()["is_active"] is False
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {raw}"}).status_code == 401
    reset = client.post(f"/api/v1/users/{uid}/password", json={}, headers=auth)
    assert reset.status_code == 200 and reset.json()["password"]
    short = client.post(f"/api/v1/users/{uid}/password", json={"password": "short"}, headers=auth)
    assert short.status_code == 422 and "password" in short.text
    assert client.patch("/api/v1/users/999999", json={"role": "admin"}, headers=auth).status_code == 404


def test_an_admin_onboards_then_deactivates_a_labeler_in_chromium(live_server, committed_session, chromium):
    from app.security import hash_password

    committed_session.add(User(username="chrome-boss", role="admin", password_hash=hash_password(PASSWORD)))
    committed_session.commit()
    boss = chromium.new_context().new_page()
    boss.goto(f"{live_server}/login?next=/admin/users")
    boss.fill("input[name=username]", "chrome-boss")
    boss.fill("input[name=password]", PASSWORD)
    boss.click("button[type=submit]")
    boss.wait_for_url("**/admin/users")

    form = boss.locator("[data-testid=add-user-form]")
    form.locator("input[name=username]").fill("chrome-newbie")
    form.locator("button[type=submit]").click()
    boss.wait_for_selector("[data-testid=generated-password]")
    password = boss.locator("[data-testid=generated-password]").inner_text().strip()
    assert len(password) >= 16

    newbie = chromium.new_context().new_page()
    newbie.goto(f"{live_server}/login")
    newbie.fill("input[name=username]", "chrome-newbie")
    newbie.fill("input[name=password]", password)
    newbie.click("button[type=submit]")
    newbie.wait_for_url("**/account/password")  # a one-time password is replaced first
    newbie.fill("input[name=current_password]", password)
    newbie.fill("input[name=new_password]", "chosen by me")
    newbie.fill("input[name=confirm_password]", "chosen by me")
    newbie.click("[data-testid=password-form] button[type=submit]")
    newbie.wait_for_selector("[data-testid=flash]")
    newbie.goto(f"{live_server}/label")
    newbie.wait_for_url("**/label")

    boss.goto(f"{live_server}/admin/users")
    row = boss.locator("[data-testid=user-chrome-newbie]")
    assert "never" not in row.locator("td").nth(3).inner_text()  # last login shown
    row.get_by_role("button", name="Deactivate").click()
    boss.wait_for_selector("[data-testid=flash]")
    assert "deactivated" in boss.locator("[data-testid=flash]").inner_text()
    assert "deactivated" in boss.locator("[data-testid=user-chrome-newbie] td").nth(2).inner_text()

    newbie.reload()
    newbie.wait_for_url("**/login**")
    newbie.context.close()
    boss.context.close()


def test_a_user_changes_their_own_password_and_their_other_sessions_end(client, app, db, login):
    labeler = UserFactory()
    db.commit()
    csrf = login(labeler.username)
    form = client.get("/account/password")
    assert form.status_code == 200 and 'name="current_password"' in form.text
    data = {"current_password": PASSWORD, "new_password": "a fresh secret", "confirm_password": "a fresh secret"}
    assert client.post("/account/password", data=data).status_code == 403  # no CSRF
    with _second_client(app) as elsewhere:
        assert _log_in(elsewhere, labeler.username) == 303
        wrong = client.post("/account/password", data=data | {"current_password": "nope", "csrf_token": csrf})
        assert wrong.status_code == 422 and "current_password" in wrong.text
        mismatch = client.post("/account/password", data=data | {"confirm_password": "other", "csrf_token": csrf})
        assert mismatch.status_code == 422 and "confirm_password" in mismatch.text
        short = client.post(
            "/account/password",
            data={
                "current_password": PASSWORD,
                "new_password": "short",
                "confirm_password": "short",
                "csrf_token": csrf,
            },
        )
        assert short.status_code == 422 and "password" in short.text
        assert elsewhere.get("/label").status_code == 200  # nothing changed yet

        done = client.post("/account/password", data=data | {"csrf_token": csrf})
        assert done.status_code == 200 and "other sessions have ended" in done.text
        assert client.get("/label").status_code == 200  # this session stays
        assert elsewhere.get("/label", follow_redirects=False).status_code == 303  # the other one ended
        assert _log_in(elsewhere, labeler.username) == 401
        assert _log_in(elsewhere, labeler.username, "a fresh secret") == 303
    assert client.get("/account/password", follow_redirects=False).status_code == 200
