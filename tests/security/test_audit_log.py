"""The audit log (issue 17): who did what, to which target, when and from which address; a page and an API.

Admin actions recorded: batch changes and imports, promotions, runs started or cancelled, users and tokens
changed, webhooks, exports. Entries are written in the action's transaction, so a refused action leaves none.
"""

from __future__ import annotations

import re

from sqlalchemy import select

from app.models import AuditEntry, TrainingRun
from app.security import create_api_token
from tests.factories import AdminFactory, ModelVersionFactory, UserFactory

JSONL = b'{"text": "What is 2 + 2?", "source_user_id": "u1"}\n{"text": "Explain gravity", "source_user_id": "u2"}\n'


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _actions(db) -> list[str]:
    return list(db.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))


def test_admin_actions_through_the_api_are_recorded_with_actor_target_and_address(client, db, admin, auth):
    base = ModelVersionFactory(kind="base", status="ready")
    made = client.post("/api/v1/batches", json={"name": "audited", "guidelines": "Rank."}, headers=auth)
    assert made.status_code == 201, made.text
    batch_id = made.json()["id"]
    assert client.patch(f"/api/v1/batches/{batch_id}", json={"priority": 3}, headers=auth).status_code == 200
    imported = client.post(
        f"/api/v1/batches/{batch_id}/prompts",
        files={"file": ("p.jsonl", JSONL, "application/x-ndjson")},
        headers=auth,
    )
    assert imported.status_code == 201, imported.text
    assert client.post(f"/api/v1/models/{base.id}/promote", headers=auth).status_code == 200
    assert client.post(f"/api/v1/batches/{batch_id}/start", headers=auth).status_code == 200
    run = db.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch_id))
    assert client.post(f"/api/v1/runs/{run.id}/cancel", headers=auth).status_code == 200
    # a refused cancel (the run has finished) writes nothing
    assert client.post(f"/api/v1/runs/{run.id}/cancel", headers=auth).status_code == 409
    made = client.post("/api/v1/users", json={"username": "audited-user"}, headers=auth)
    assert (
        client.patch(f"/api/v1/users/{made.json()['id']}", json={"is_active": False}, headers=auth).status_code == 200
    )
    exporter, _ = create_api_token(db, admin, ["export:read"])
    exported = client.get("/api/v1/export/demonstrations?format=csv", headers={"authorization": f"Bearer {exporter}"})
    assert exported.status_code == 200

    assert _actions(db) == [
        "batch.created",
        "batch.changed",
        "batch.imported",
        "model.promoted",
        "run.started",
        "batch.started",
        "run.cancelled",
        "user.created",
        "user.deactivated",
        "export.demonstrations",
    ]
    entries = db.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert {(e.actor_id, e.actor, e.ip) for e in entries} == {(admin.id, admin.username, "testclient")}
    assert entries[0].target == f"batch {batch_id} audited"
    assert entries[2].details == {"stored": 2, "replaced": 0}
    assert entries[6].target == f"run {run.id}"
    assert entries[-1].details["format"] == "csv"


def test_the_audit_api_lists_newest_first_filters_and_needs_admin(client, db, admin, auth):
    labeler = UserFactory()
    reader, _ = create_api_token(db, admin, ["export:read"])
    labeler_token, _ = create_api_token(db, labeler, ["label"])
    for name in ("one", "two"):
        client.post("/api/v1/users", json={"username": f"audit-{name}"}, headers=auth)
    client.patch(f"/api/v1/users/{labeler.id}", json={"role": "admin"}, headers=auth)

    listed = client.get("/api/v1/audit", headers=auth).json()
    assert [e["action"] for e in listed] == ["user.role_changed", "user.created", "user.created"]
    assert listed[0]["details"] == {"old": "labeler", "new": "admin"}
    assert [e["target"].split()[-1] for e in client.get("/api/v1/audit?action=user.created", headers=auth).json()] == [
        "audit-two",
        "audit-one",
    ]
    assert len(client.get("/api/v1/audit?action=user.", headers=auth).json()) == 3
    older = client.get(f"/api/v1/audit?before_id={listed[0]['id']}&limit=1", headers=auth).json()
    assert [e["id"] for e in older] == [listed[1]["id"]]
    assert client.get("/api/v1/audit?limit=0", headers=auth).status_code == 422
    assert client.get("/api/v1/audit", headers={"authorization": f"Bearer {reader}"}).status_code == 403
    assert client.get("/api/v1/audit", headers={"authorization": f"Bearer {labeler_token}"}).status_code == 403
    assert client.get("/api/v1/audit").status_code == 401


def test_the_audit_page_shows_page_actions_newest_first_and_filters(client, db, login):
    admin, labeler = AdminFactory(), UserFactory()
    login(labeler.username)
    assert client.get("/admin/audit").status_code == 403
    login(admin.username)
    csrf = _csrf(client.get("/admin/tokens").text)
    client.post("/admin/tokens", data={"scopes": ["export:read"], "name": "n", "csrf_token": csrf})
    token_id = db.scalar(select(AuditEntry.target).where(AuditEntry.action == "token.created")).split()[1]
    client.post(f"/admin/tokens/{token_id}/revoke", data={"csrf_token": csrf})
    client.post(f"/admin/users/{labeler.id}/password", data={"csrf_token": csrf})
    client.post(
        "/admin/webhooks", data={"url": "https://93.184.216.34/hook", "events": ["batch.completed"], "csrf_token": csrf}
    )

    page = client.get("/admin/audit").text.split('data-testid="audit-table"')[1]
    order = [
        page.index(action) for action in ("webhook.created", "user.password_reset", "token.revoked", "token.created")
    ]
    assert order == sorted(order)  # newest first
    assert f"user {labeler.id} {labeler.username}" in page and admin.username in page and "testclient" in page
    filtered = client.get("/admin/audit?action=token.revoked").text.split('data-testid="audit-table"')[1]
    assert "token.revoked" in filtered and "token.created" not in filtered and "webhook.created" not in filtered


def test_evaluations_started_and_cancelled_are_recorded(client, db, admin, auth):
    from tests.test_evaluations import held_out_batch, two_models

    held_out_batch(db, n=3)
    a, b = two_models(db)
    created = client.post(
        "/api/v1/evaluations", headers=auth, json={"model_a_id": a.id, "model_b_id": b.id, "n_prompts": 2}
    )
    assert created.status_code == 201, created.text
    evaluation_id = created.json()["id"]
    assert client.post(f"/api/v1/evaluations/{evaluation_id}/cancel", headers=auth).status_code == 200
    assert client.post(f"/api/v1/evaluations/{evaluation_id}/cancel", headers=auth).status_code == 409
    entries = db.scalars(select(AuditEntry).where(AuditEntry.action.startswith("evaluation."))).all()
    assert [(e.action, e.target) for e in entries] == [
        ("evaluation.started", f"evaluation {evaluation_id}"),
        ("evaluation.cancelled", f"evaluation {evaluation_id}"),
    ]
    assert entries[0].details == {"model_a_id": a.id, "model_b_id": b.id}
    assert "run.started" in _actions(db)  # its sampling run, started by the same admin
