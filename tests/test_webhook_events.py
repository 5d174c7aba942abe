"""Webhook events are queued where they happen: batch completed, model registered/promoted, run failed."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app import runs
from app.labeling import leases, submissions
from app.models import PromptBatch, WebhookDelivery
from app.registry import versions as registry
from app.webhooks import service as webhooks
from tests.factories import AdminFactory, UserFactory
from tests.test_labeling import items_for, seed_batch

pytestmark = pytest.mark.sqlite


@pytest.fixture
def hook(db):
    return webhooks.create_webhook(
        db, "http://127.0.0.1:9/hook", list(webhooks.WEBHOOK_EVENTS), created_by=AdminFactory()
    )


def _events(db) -> list[str]:
    return [d.event for d in db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))]


def test_the_last_label_completes_the_batch_and_announces_it(db, hook):
    batch = seed_batch(db, n_prompts=2, overlap=1)
    labeler = UserFactory()
    for _ in range(2):
        assignment = leases.lease_next_task(db, labeler, "ranking")
        assert db.get(PromptBatch, batch.id).status == "labeling"
        submissions.submit_ranking(db, labeler, assignment.id, items_for(assignment))
    assert db.get(PromptBatch, batch.id).status == "completed"
    assert _events(db) == ["batch.completed"]
    assert leases.lease_next_task(db, labeler) is None


def test_model_events_and_failed_runs_are_announced(db, hook):
    version = registry.register_version(db, kind="sft", name="sft-hook", artifact_path="/x", status="training")
    registry.mark_ready(db, version.id, {"valid_loss": 1.0})  # ready, and promoted as the first SFT
    run = runs.start_run(db, "rm")
    runs.fail_run(db, run.id, "out of memory")
    runs.fail_run(db, run.id, "reported twice")  # already failed: no second event
    assert _events(db) == ["model_version.registered", "model_version.promoted", "training_run.failed"]
    failed = db.scalars(select(WebhookDelivery).where(WebhookDelivery.event == "training_run.failed")).one()
    assert failed.payload["data"]["error"] == "out of memory"


def test_admin_registers_a_webhook_and_reads_its_log(client, login, db):
    import re

    admin = AdminFactory()
    csrf = login(admin.username)
    bad = client.post("/admin/webhooks", data={"csrf_token": csrf, "url": "ftp://nope", "events": ["batch.completed"]})
    assert bad.status_code == 422 and "url" in bad.text.lower()
    created = client.post(
        "/admin/webhooks",
        data={"csrf_token": csrf, "url": "http://127.0.0.1:9/in", "events": ["batch.completed"], "description": "ci"},
    )
    assert created.status_code == 201
    secret = re.search(r'data-testid="webhook-secret">([^<]+)<', created.text).group(1)
    hook = db.scalars(select(webhooks.Webhook)).one()
    assert hook.secret == secret and hook.events == ["batch.completed"]
    webhooks.emit_event(db, "batch.completed", {"batch_id": 1})
    db.commit()
    page = client.get("/admin/webhooks")
    assert "batch.completed" in page.text and "pending" in page.text and secret not in page.text
    off = client.post(f"/admin/webhooks/{hook.id}/deactivate", data={"csrf_token": csrf}, follow_redirects=False)
    assert off.status_code == 303
    db.refresh(hook)
    assert hook.is_active is False
