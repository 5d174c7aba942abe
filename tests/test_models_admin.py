"""The registry and training-run admin: API and pages for model versions (lineage, promote, rollback, retire)
and training runs (list, start by hand, cancel, live progress), role checks, and one page in Chromium."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app import runs as run_service
from app.models import ModelVersion, TrainingRun, User, utcnow
from app.security import create_api_token, hash_password
from tests.factories import PASSWORD, ModelVersionFactory, UserFactory
from tests.html_text import text
from tests.test_run_readiness import ready_for_every_run


@pytest.fixture
def admin_csrf(db, admin, login):
    return login(admin.username)


def make_run(db, kind="sft", status="running", **fields) -> TrainingRun:
    run = TrainingRun(kind=kind, status=status, **fields)
    db.add(run)
    db.flush()
    return run


def lineage_tree(db) -> dict[str, ModelVersion]:
    """base → sft → rm, and a policy trained from the SFT model against the RM."""
    base = ModelVersionFactory(
        name="base-1",
        kind="base",
        status="promoted",
        promoted_at=utcnow(),
        metrics={"final_held_out_loss": 2.5, "parameters": 1_200_000},
    )
    sft = ModelVersionFactory(
        name="sft-run1",
        kind="sft",
        parent_id=base.id,
        lineage={"base": base.id},
        data_snapshot={"counts": {"train": 40, "valid": 8}, "max_ids": {"demonstration": 48}},
        metrics={
            "valid_loss": 1.25,
            "train_loss": 1.1,
            "train_loss_curve": [2.0, 1.5, 1.1],
            "valid_loss_curve": [1.9, 1.4, 1.25],
            "epochs_run": 3,
        },
    )
    rm = ModelVersionFactory(
        name="rm-run2",
        kind="rm",
        parent_id=sft.id,
        lineage={"backbone": sft.id},
        metrics={"valid_accuracy": 0.71, "valid_loss": 0.6},
    )
    policy = ModelVersionFactory(
        name="policy-run3",
        kind="policy",
        parent_id=sft.id,
        lineage={"sft": sft.id, "rm": rm.id},
        data_snapshot={"counts": {"prompts": 90}},
        metrics={
            "eval": {"reward": 0.62, "kl": 1.5},
            "kl_curve": [0.0, 0.8, 1.5],
            "log": [{"reward": 0.3, "kl": 0.0}, {"reward": 0.5, "kl": 0.8}, {"reward": 0.62, "kl": 1.5}],
        },
    )
    return {"base": base, "sft": sft, "rm": rm, "policy": policy}


def promoted_names(db, kind: str) -> list[str]:
    db.expire_all()
    query = select(ModelVersion.name).where(ModelVersion.kind == kind, ModelVersion.status == "promoted")
    return db.scalars(query).all()


# --- who may ---------------------------------------------------------------------------------------

API_CALLS = [
    ("get", "/api/v1/models"),
    ("get", "/api/v1/models/1"),
    ("post", "/api/v1/models/1/promote"),
    ("post", "/api/v1/models/1/retire"),
    ("post", "/api/v1/models/rollback?kind=policy"),
    ("get", "/api/v1/runs"),
    ("get", "/api/v1/runs/1"),
    ("get", "/api/v1/runs/schedule"),
    ("post", "/api/v1/runs"),
    ("post", "/api/v1/runs/1/cancel"),
]
PAGES = ["/admin/models", "/admin/models/1", "/admin/runs", "/admin/runs/1"]


def test_api_needs_the_admin_scope(client, db, admin, login):
    ModelVersionFactory(id=1)
    make_run(db, id=1)
    for method, path in API_CALLS:
        assert getattr(client, method)(path).status_code == 401, path
    reader, _ = create_api_token(db, admin, ["export:read", "label"])
    for method, path in API_CALLS:
        response = getattr(client, method)(path, headers={"authorization": f"Bearer {reader}"})
        assert response.status_code == 403 and "admin" in response.json()["detail"], path
    labeler = UserFactory()
    csrf = login(labeler.username)
    for method, path in API_CALLS:
        assert getattr(client, method)(path, headers={"x-csrf-token": csrf}).status_code == 403, path


def test_pages_need_an_admin(client, db, admin, login):
    ModelVersionFactory(id=1)
    make_run(db, id=1)
    for path in PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == f"/login?next={path}", path
    labeler = UserFactory()
    csrf = login(labeler.username)
    for path in PAGES:
        assert client.get(path).status_code == 403, path
    client.post("/logout", data={"csrf_token": csrf})
    login(admin.username)
    shown = {path: client.get(path) for path in PAGES}
    assert all(response.status_code == 200 for response in shown.values())
    assert text(shown["/admin/models"].text, "models-title") == "Model versions"
    assert text(shown["/admin/models/1"].text, "model-name").startswith(db.get(ModelVersion, 1).name)
    assert text(shown["/admin/runs"].text, "runs-title") == "Training runs"
    assert f"Run 1: {db.get(TrainingRun, 1).kind}" in shown["/admin/runs/1"].text


# --- model versions: API ------------------------------------------------------------------------


def test_lists_and_shows_versions_with_lineage(client, db, auth):
    tree = lineage_tree(db)
    listed = client.get("/api/v1/models", headers=auth).json()
    assert [m["name"] for m in listed] == ["policy-run3", "rm-run2", "sft-run1", "base-1"]
    assert client.get("/api/v1/models?kind=sft", headers=auth).json()[0]["key_metrics"] == {
        "valid_loss": 1.25,
        "train_loss": 1.1,
    }
    assert [m["name"] for m in client.get("/api/v1/models?status=promoted", headers=auth).json()] == ["base-1"]
    bad = client.get("/api/v1/models?kind=critic", headers=auth)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "kind"

    policy = client.get(f"/api/v1/models/{tree['policy'].id}", headers=auth).json()
    assert [p["name"] for p in policy["parents"]] == ["sft-run1", "base-1"]
    assert {role: v["name"] for role, v in policy["lineage_versions"].items()} == {"sft": "sft-run1", "rm": "rm-run2"}
    assert policy["lineage"] == {"sft": tree["sft"].id, "rm": tree["rm"].id}
    assert policy["key_metrics"] == {"eval.reward": 0.62, "eval.kl": 1.5}
    assert policy["metrics"]["kl_curve"] == [0.0, 0.8, 1.5] and policy["data_snapshot"] == {"counts": {"prompts": 90}}
    sft = client.get(f"/api/v1/models/{tree['sft'].id}", headers=auth).json()
    assert [c["name"] for c in sft["children"]] == ["rm-run2", "policy-run3"]
    assert sft["data_snapshot"]["max_ids"] == {"demonstration": 48}
    assert client.get("/api/v1/models/999999", headers=auth).status_code == 404


@pytest.mark.sqlite
def test_promote_keeps_one_per_kind_and_rollback_walks_back(client, db, auth):
    v1, v2, v3 = (ModelVersionFactory(name=f"policy-{i}", kind="policy") for i in (1, 2, 3))
    other = ModelVersionFactory(name="sft-a", kind="sft", status="promoted", promoted_at=utcnow())
    none_yet = client.post("/api/v1/models/rollback?kind=policy", headers=auth)
    assert none_yet.status_code == 409 and "no earlier promoted policy" in none_yet.json()["detail"]

    for version in (v1, v2, v3):
        response = client.post(f"/api/v1/models/{version.id}/promote", headers=auth)
        assert response.status_code == 200 and response.json()["status"] == "promoted"
        assert promoted_names(db, "policy") == [version.name]
    assert promoted_names(db, "sft") == [other.name]  # other kinds are untouched
    again = client.post(f"/api/v1/models/{v3.id}/promote", headers=auth)
    assert again.status_code == 200 and promoted_names(db, "policy") == ["policy-3"]

    back = client.post("/api/v1/models/rollback?kind=policy", headers=auth)
    assert back.status_code == 200 and back.json()["name"] == "policy-2"
    assert promoted_names(db, "policy") == ["policy-2"]
    db.refresh(v3)
    assert v3.status == "ready"
    assert client.post("/api/v1/models/rollback?kind=policy", headers=auth).json()["name"] == "policy-1"
    assert client.post("/api/v1/models/rollback?kind=policy", headers=auth).status_code == 409
    assert promoted_names(db, "policy") == ["policy-1"]

    # A new promotion, then a rollback: back to the one promoted before it, not to one rolled away from.
    client.post(f"/api/v1/models/{v3.id}/promote", headers=auth)
    assert client.post("/api/v1/models/rollback?kind=policy", headers=auth).json()["name"] == "policy-1"
    bad_kind = client.post("/api/v1/models/rollback?kind=critic", headers=auth)
    assert bad_kind.status_code == 422 and bad_kind.json()["errors"][0]["field"] == "kind"


def test_only_ready_versions_are_promoted_or_retired(client, db, auth):
    training = ModelVersionFactory(kind="policy", status="training")
    failed = ModelVersionFactory(kind="policy", status="failed")
    for version in (training, failed):
        response = client.post(f"/api/v1/models/{version.id}/promote", headers=auth)
        assert response.status_code == 409 and response.json()["detail"].startswith("status:")
    ready = ModelVersionFactory(kind="policy")
    current = ModelVersionFactory(kind="policy", status="promoted", promoted_at=utcnow())
    refused = client.post(f"/api/v1/models/{current.id}/retire", headers=auth)
    assert refused.status_code == 409 and "promote another" in refused.json()["detail"]
    retired = client.post(f"/api/v1/models/{ready.id}/retire", headers=auth)
    assert retired.status_code == 200 and retired.json()["status"] == "retired"
    assert client.post(f"/api/v1/models/{ready.id}/promote", headers=auth).status_code == 409
    assert promoted_names(db, "policy") == [current.name]


# --- training runs: API --------------------------------------------------------------------------


def test_lists_and_shows_runs(client, db, auth):
    old = make_run(
        db,
        kind="sft",
        status="failed",
        error="RuntimeError: boom",
        traceback="Traceback ...\nboom",
        attempts=2,
        finished_at=utcnow(),
    )
    live = make_run(
        db,
        kind="rm",
        status="running",
        progress=0.4,
        message="step 4/10",
        attempts=1,
        metrics={"curve": [{"step": 2, "loss": 0.7}, {"step": 4, "loss": 0.6}]},
    )
    make_run(db, kind="sample", status="succeeded", progress=1.0)
    listed = client.get("/api/v1/runs", headers=auth).json()
    assert [r["id"] for r in listed] == sorted((r["id"] for r in listed), reverse=True) and len(listed) == 3
    assert [r["id"] for r in client.get("/api/v1/runs?kind=rm", headers=auth).json()] == [live.id]
    assert [r["id"] for r in client.get("/api/v1/runs?status=failed", headers=auth).json()] == [old.id]
    assert len(client.get("/api/v1/runs?limit=2", headers=auth).json()) == 2

    shown = client.get(f"/api/v1/runs/{live.id}", headers=auth).json()
    assert (shown["status"], shown["progress"], shown["message"]) == ("running", 0.4, "step 4/10")
    assert shown["metrics"]["curve"][-1] == {"step": 4, "loss": 0.6}
    failed = client.get(f"/api/v1/runs/{old.id}", headers=auth).json()
    assert (failed["error"], failed["traceback"]) == ("RuntimeError: boom", "Traceback ...\nboom")
    assert failed["attempts"] == 2
    assert failed["finished_at"] is not None
    assert client.get("/api/v1/runs/999999", headers=auth).status_code == 404


@pytest.mark.sqlite
def test_start_run_by_hand_refuses_a_second_and_bad_fields(client, db, auth, admin):
    ready_for_every_run(db)
    started = client.post(
        "/api/v1/runs", json={"kind": "sft", "params": {"epochs": 2, "learning_rate": 1e-3}}, headers=auth
    )
    assert started.status_code == 201, started.text
    body = started.json()
    assert (body["kind"], body["status"], body["params"]) == ("sft", "queued", {"epochs": 2, "learning_rate": 1e-3})
    assert body["triggered_by"] == f"admin:{admin.username}"
    second = client.post("/api/v1/runs", json={"kind": "sft"}, headers=auth)
    assert second.status_code == 409 and "already queued or running" in second.json()["detail"]
    for kind, params in (("ppo", {"adaptive_kl": True}), ("dpo", {"loss": "listwise"}), ("pretrain", {"steps": 10})):
        assert client.post("/api/v1/runs", json={"kind": kind, "params": params}, headers=auth).status_code == 201
    assert client.post("/api/v1/runs", json={"kind": "pretrain"}, headers=auth).status_code == 409

    for body, field in [
        ({"kind": "rloo"}, "kind"),
        ({"kind": "sample"}, "kind"),
        ({}, "kind"),
        ({"kind": "rm", "params": [1]}, "params"),
        ({"kind": "rm", "colour": "red"}, "colour"),
    ]:
        response = client.post("/api/v1/runs", json=body, headers=auth)
        assert response.status_code == 422, body
        assert [e["field"] for e in response.json()["errors"]] == [field], response.json()
    for params, field in [
        ({"lerning_rate": 0.1}, "params.lerning_rate"),
        ({"epochs": "two"}, "params.epochs"),
        ({"epochs": 1.5}, "params.epochs"),
        ({"device": 3}, "params.device"),
    ]:
        response = client.post("/api/v1/runs", json={"kind": "rm", "params": params}, headers=auth)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:"), response.json()
    assert db.scalar(select(func.count()).select_from(TrainingRun).where(TrainingRun.kind == "rm")) == 0
    rm_params = client.get("/api/v1/runs/params", headers=auth).json()["rm"]
    assert rm_params["learning_rate"]["type"] == "float" and rm_params["epochs"]["default"] == 1


@pytest.mark.sqlite
def test_cancel_stops_the_worker_and_fails_its_model(client, db, auth):
    queued = make_run(db, kind="rm", status="queued")
    cancelled = client.post(f"/api/v1/runs/{queued.id}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None and not run_service.claim_run(db, queued.id)

    running = make_run(db, kind="sft", status="running", worker=run_service.worker_name(), heartbeat_at=utcnow())
    producing = ModelVersionFactory(kind="sft", status="training", training_run_id=running.id)
    assert run_service.heartbeat(db, running.id, 0.3, "step 3/10")  # still ours before the cancel
    assert client.post(f"/api/v1/runs/{running.id}/cancel", headers=auth).status_code == 200
    assert not run_service.heartbeat(db, running.id, 0.4, "step 4/10")  # the worker sees it and stops
    db.expire_all()
    assert db.get(TrainingRun, running.id).status == "cancelled"
    assert db.get(ModelVersion, producing.id).status == "failed"
    again = client.post(f"/api/v1/runs/{running.id}/cancel", headers=auth)
    assert again.status_code == 409 and "is cancelled" in again.json()["detail"]
    # A cancelled SFT run no longer blocks a new one.
    ready_for_every_run(db)
    assert client.post("/api/v1/runs", json={"kind": "sft"}, headers=auth).status_code == 201


def test_schedule_says_what_beat_would_start(client, db, auth, admin_csrf):
    sft = ModelVersionFactory(kind="sft", data_snapshot={"max_ids": {"demonstration": 0}})
    ModelVersionFactory(kind="rm", parent_id=sft.id)
    schedule = client.get("/api/v1/runs/schedule", headers=auth).json()
    assert (schedule["due"], schedule["active"], schedule["next"]) == (["ppo"], [], "ppo")
    assert re.search(r'data-testid="schedule-next">ppo<', client.get("/admin/runs").text)
    make_run(db, kind="sft", status="running")
    schedule = client.get("/api/v1/runs/schedule", headers=auth).json()
    assert (schedule["active"], schedule["next"]) == (["sft"], None)
    assert "Waiting for the active sft run" in client.get("/admin/runs").text


# --- pages ---------------------------------------------------------------------------------------


def test_models_pages_show_lineage_metrics_and_curves(client, db, admin_csrf):
    tree = lineage_tree(db)
    listing = client.get("/admin/models").text
    for kind, name in (("policy", "policy-run3"), ("rm", "rm-run2"), ("sft", "sft-run1"), ("base", "base-1")):
        section = listing.split(f'data-testid="models-{kind}"')[1].split("</section>")[0]
        assert name in section
    assert "0.62" in listing and "0.71" in listing and "1.25" in listing  # reward, accuracy, loss
    assert f'data-testid="promote-{tree["policy"].id}"' in listing
    assert f'data-testid="promote-{tree["base"].id}"' not in listing  # already promoted

    page = client.get(f"/admin/models/{tree['policy'].id}").text
    chain = page.split('data-testid="lineage-chain"')[1].split("</p>")[0]
    assert chain.index("base-1") < chain.index("sft-run1") < chain.index("policy-run3")
    assert f'href="/admin/models/{tree["rm"].id}">rm-run2' in page  # the lineage's named RM links to it
    assert "eval.reward" in page and "prompts" in page
    assert 'data-testid="chart-reward"' in page and 'data-testid="chart-kl"' in page
    sft_page = client.get(f"/admin/models/{tree['sft'].id}").text
    assert 'data-testid="chart-valid_loss"' in sft_page and 'data-testid="chart-train_loss"' in sft_page
    assert "counts.train" in sft_page and "<polyline" in sft_page


def test_promote_and_rollback_forms(client, db, admin_csrf):
    first = ModelVersionFactory(name="p-first", kind="policy", status="promoted", promoted_at=utcnow() - timedelta(1))
    second = ModelVersionFactory(name="p-second", kind="policy")
    assert client.post(f"/admin/models/{second.id}/promote").status_code == 403  # no CSRF token
    response = client.post(
        f"/admin/models/{second.id}/promote", data={"csrf_token": admin_csrf}, follow_redirects=False
    )
    assert response.status_code == 303 and response.headers["location"] == "/admin/models"
    assert promoted_names(db, "policy") == ["p-second"]
    assert 'data-testid="rollback-policy">Roll back to p-first' in client.get("/admin/models").text
    response = client.post(
        "/admin/models/rollback", data={"csrf_token": admin_csrf, "kind": "policy"}, follow_redirects=False
    )
    assert response.status_code == 303 and promoted_names(db, "policy") == ["p-first"]
    refused = client.post("/admin/models/rollback", data={"csrf_token": admin_csrf, "kind": "policy"})
    assert refused.status_code == 409 and "no earlier promoted policy" in refused.text
    back = client.post(
        f"/admin/models/{second.id}/promote",
        data={"csrf_token": admin_csrf, "next": f"/admin/models/{second.id}"},
        follow_redirects=False,
    )
    assert back.headers["location"] == f"/admin/models/{second.id}"
    evil = client.post(
        f"/admin/models/{first.id}/promote",
        data={"csrf_token": admin_csrf, "next": "https://evil.example"},
        follow_redirects=False,
    )
    assert evil.headers["location"] == "/admin/models"
    retired = client.post(f"/admin/models/{second.id}/retire", data={"csrf_token": admin_csrf}, follow_redirects=False)
    assert retired.status_code == 303
    db.expire_all()
    assert db.get(ModelVersion, second.id).status == "retired"


def test_runs_pages_start_show_and_cancel(client, db, admin_csrf):
    ready_for_every_run(db)
    response = client.post(
        "/admin/runs", data={"csrf_token": admin_csrf, "kind": "rm", "params": '{"epochs": 2}'}, follow_redirects=False
    )
    assert response.status_code == 303
    run = db.scalar(select(TrainingRun).where(TrainingRun.kind == "rm"))
    assert response.headers["location"] == f"/admin/runs/{run.id}" and run.params == {"epochs": 2}
    conflict = client.post("/admin/runs", data={"csrf_token": admin_csrf, "kind": "rm", "params": ""})
    assert conflict.status_code == 409 and "already queued or running" in conflict.text
    for params, message in [
        ("{epochs: 2}", "params: not valid JSON"),
        ("[1]", "params: must be a JSON object"),
        ('{"epoch": 2}', "params.epoch: sft has no such setting"),
    ]:
        bad = client.post("/admin/runs", data={"csrf_token": admin_csrf, "kind": "sft", "params": params})
        assert bad.status_code == 422 and message in bad.text, bad.text
        assert "</textarea>" in bad.text and params.replace('"', "&#34;") in bad.text  # the form keeps what was typed
    listing = client.get("/admin/runs").text
    assert f'data-run-id="{run.id}"' in listing and 'src="/static/training/runs.js"' in listing

    run.status, run.progress, run.message = "running", 0.25, "step 5/20"
    run.metrics = {"curve": [{"step": s, "loss": 2.0 / s, "lr": 0.001} for s in range(1, 6)]}
    db.flush()
    page = client.get(f"/admin/runs/{run.id}").text
    assert 'data-testid="run-percent">25%' in page and "step 5/20" in page
    assert 'data-testid="chart-loss"' in page and 'data-testid="chart-lr"' not in page
    assert 'data-testid="cancel-run"' in page
    response = client.post(f"/admin/runs/{run.id}/cancel", data={"csrf_token": admin_csrf}, follow_redirects=False)
    assert response.status_code == 303
    page = client.get(f"/admin/runs/{run.id}").text
    assert 'data-testid="run-status">cancelled' in page and 'data-testid="cancel-run"' not in page
    refused = client.post(f"/admin/runs/{run.id}/cancel", data={"csrf_token": admin_csrf})
    assert refused.status_code == 409 and "only a queued or running run can be cancelled" in refused.text

    failed = make_run(
        db,
        kind="ppo",
        status="failed",
        error="RuntimeError: PPO needs an SFT model",
        traceback="Traceback (most recent call last):\n  <b>File</b>",
    )
    page = client.get(f"/admin/runs/{failed.id}").text
    assert text(page, "run-reason") == "PPO needs an SFT model."  # the reason in words, the traceback folded
    assert "&lt;b&gt;File&lt;/b&gt;</pre></details>" in page  # escaped


@pytest.mark.slow
@pytest.mark.browser
def test_run_page_progress_updates_without_reload(live_server, committed_session, page):
    from playwright.sync_api import expect

    db = committed_session
    db.add(User(username="runs-admin", role="admin", password_hash=hash_password(PASSWORD)))
    run = TrainingRun(
        kind="sft",
        status="running",
        progress=0.1,
        message="step 10/100",
        heartbeat_at=utcnow(),
        metrics={"curve": [{"step": 10, "loss": 2.0}]},
    )
    db.add(run)
    db.commit()
    page.goto(f"{live_server}/login?next=/admin/runs")
    page.fill("input[name=username]", "runs-admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin/runs")
    page.evaluate("window.notReloaded = true")
    run.progress, run.message = 0.3, "step 30/100"
    db.commit()
    row = f"[data-testid=run-row-{run.id}]"
    expect(page.locator(f"{row} [data-field=percent]")).to_have_text("30%", timeout=15000)  # polled every 2 s
    assert page.locator(f"{row} [data-field=message]").inner_text() == "step 30/100"
    assert page.evaluate("window.notReloaded") is True

    page.click(f"{row} a")
    page.wait_for_url(f"**/admin/runs/{run.id}")
    assert page.locator("[data-testid=run-percent]").inner_text() == "30%"
    page.evaluate("window.notReloaded = true")
    run.progress, run.message = 0.6, "step 60/100"
    run.metrics = {"curve": [{"step": 10, "loss": 2.0}, {"step": 60, "loss": 1.25}]}
    db.commit()
    expect(page.locator("[data-testid=run-percent]")).to_have_text("60%", timeout=15000)
    assert page.locator("[data-testid=run-message]").inner_text() == "step 60/100"
    assert page.locator("[data-testid=run-progress]").evaluate("el => el.value") == pytest.approx(0.6)
    assert "1.25" in page.locator("[data-testid=live-metrics]").inner_text()
    assert page.evaluate("window.notReloaded") is True

    # When the run finishes the page reloads once, for the final curves.
    run.status, run.progress, run.finished_at = "succeeded", 1.0, utcnow()
    run.metrics = {"train_loss": 1.2, "train_loss_curve": [2.0, 1.5, 1.2]}
    db.commit()
    expect(page.locator("[data-testid=chart-train_loss]")).to_be_visible(timeout=15000)
    assert page.locator("[data-testid=run-status]").inner_text() == "succeeded"
    assert page.evaluate("window.notReloaded") is None
    assert page.locator("[data-testid=cancel-run]").count() == 0
