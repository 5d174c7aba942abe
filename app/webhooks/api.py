"""The webhooks API for admins: register URLs for the loop's events, deactivate them, read the delivery log.

Webhooks tell other systems when a batch completes, a model version is
registered or promoted, or a run fails (`app.webhooks.service`); the admin
pages (`app.webhooks.pages`) show the same log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from app import audit
from app.deps import AdminApi, SessionDep
from app.models import WEBHOOK_EVENTS, Webhook
from app.webhooks import service as webhooks

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])


class WebhookIn(BaseModel):
    url: str = Field(..., max_length=2000, description="Where events are POSTed (http or https).")
    events: list[str] = Field(..., min_length=1, description="Any of " + ", ".join(WEBHOOK_EVENTS))
    description: str = Field("", max_length=200)


class WebhookOut(BaseModel):
    id: int
    url: str
    description: str
    events: list[str]
    is_active: bool
    created_at: datetime


class NewWebhookOut(WebhookOut):
    secret: str = Field(description="The HMAC-SHA256 signing key; verify X-InstructLoop-Signature with it")


class DeliveryOut(BaseModel):
    id: int
    event: str
    event_id: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@router.get("", response_model=list[WebhookOut])
def list_webhooks(db: SessionDep, principal: AdminApi):
    """Lists the registered webhooks (without their secrets)."""
    hooks = db.scalars(select(Webhook).order_by(Webhook.id))
    return [WebhookOut.model_validate(hook, from_attributes=True) for hook in hooks]


@router.post("", response_model=NewWebhookOut, status_code=201)
def create_webhook(body: WebhookIn, request: Request, db: SessionDep, principal: AdminApi):
    """Registers a URL for events; the signing secret is in the response."""
    hook = webhooks.create_webhook(db, body.url, body.events, principal.user, body.description)
    audit.record(db, principal.user, "webhook.created", f"webhook {hook.id} {hook.url}", request)
    return NewWebhookOut.model_validate(hook, from_attributes=True)


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: int, request: Request, db: SessionDep, principal: AdminApi):
    """Deactivates a webhook: no more events; its delivery log stays."""
    if not webhooks.deactivate_webhook(db, webhook_id):
        raise HTTPException(404, f"No active webhook {webhook_id}")
    audit.record(db, principal.user, "webhook.deactivated", f"webhook {webhook_id}", request)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryOut])
def webhook_deliveries(
    webhook_id: int, db: SessionDep, principal: AdminApi, limit: Annotated[int, Query(ge=1, le=1000)] = 100
):
    """The delivery log of a webhook, newest first: status, attempts, last HTTP status and error."""
    if db.get(Webhook, webhook_id) is None:
        raise HTTPException(404, f"No webhook {webhook_id}")
    return [
        DeliveryOut.model_validate(d, from_attributes=True) for d in webhooks.list_deliveries(db, webhook_id, limit)
    ]
