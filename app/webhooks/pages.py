"""Admin pages for webhooks: register a URL for events, see the signing secret once, read the delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from app import audit
from app.deps import AdminPage, SessionDep
from app.errors import AppError, renders_on_error
from app.models import WEBHOOK_EVENTS, Webhook
from app.templating import render
from app.webhooks import service as webhooks

router = APIRouter(include_in_schema=False)


def _page(request: Request, principal, db, status_code: int = 200, **context):
    hooks = db.scalars(select(Webhook).order_by(Webhook.id.desc())).all()
    logs = {hook.id: webhooks.list_deliveries(db, hook.id, limit=20) for hook in hooks}
    return render(
        request,
        "webhooks/webhooks.html",
        principal,
        status_code=status_code,
        hooks=hooks,
        logs=logs,
        events=WEBHOOK_EVENTS,
        **context,
    )


@router.get("/admin/webhooks")
def webhooks_page(request: Request, principal: AdminPage, db: SessionDep):
    """Lists webhooks with their recent deliveries."""
    return _page(request, principal, db)


def _create_again(exc: AppError, request: Request, principal, db, url: str, events: list[str], description: str, **_):
    return _page(
        request,
        principal,
        db,
        status_code=exc.status,
        error=str(exc),
        form={"url": url, "description": description, "events": events},
    )


@router.post("/admin/webhooks")
@renders_on_error(_create_again)
def create_webhook_form(
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    url: Annotated[str, Form(max_length=2000)],
    events: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI form default
    description: Annotated[str, Form(max_length=200)] = "",
):
    """Registers a webhook and shows its signing secret once."""
    hook = webhooks.create_webhook(db, url, events, principal.user, description)
    audit.record(db, principal.user, "webhook.created", f"webhook {hook.id} {hook.url}", request)
    return _page(request, principal, db, status_code=201, created=hook)


@router.post("/admin/webhooks/{webhook_id}/deactivate")
def deactivate_webhook_form(webhook_id: int, request: Request, principal: AdminPage, db: SessionDep):
    """Stops sending events to a webhook; its log stays."""
    if not webhooks.deactivate_webhook(db, webhook_id):
        raise HTTPException(404, f"No active webhook {webhook_id}")
    audit.record(db, principal.user, "webhook.deactivated", f"webhook {webhook_id}", request)
    return RedirectResponse("/admin/webhooks", status_code=303)
