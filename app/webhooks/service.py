"""Webhooks: the loop tells other systems when a batch completes, a model is registered or promoted, or a run fails.

Admins register URLs; `emit_event` writes one delivery row per subscribed
webhook inside the caller's transaction (an outbox, so an event exists only
if what it announces was committed). The worker's periodic job calls
`deliver_due`, which POSTs each due delivery as JSON signed with
HMAC-SHA256 over "<timestamp>.<body>" and, when a receiver fails, retries
with exponential backoff until MAX_ATTEMPTS, keeping the last status and
error for the admin's delivery log. Receivers check signatures with
`verify_signature` (or its few lines in any language) and deduplicate on
the event id, since a delivery may arrive more than once.

Webhooks are a server-side request an admin aims, so they reach public
addresses only (SSRF): a URL whose host is or resolves to a loopback,
private, link-local (cloud metadata), shared, multicast or reserved address
is refused when registered, and checked again at every delivery against the
address it resolves to then (DNS may change: rebinding), which is the address
connected to. Redirects are never followed. `Settings.webhook_allow_hosts`
lists hosts or networks allowed anyway (an internal receiver, the tests').
The delivery log keeps a receiver's status code and how long it took, never
its body.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import events
from app.config import get_settings
from app.errors import AppError
from app.models import WEBHOOK_EVENTS, User, Webhook, WebhookDelivery, utcnow

MAX_ATTEMPTS = 8
FIRST_RETRY = timedelta(seconds=10)
MAX_RETRY = timedelta(hours=1)
TIMEOUT_S = 10.0
# A receiver should refuse signatures older than this, so a captured request cannot be replayed later.
SIGNATURE_TOLERANCE_S = 300
SIGNATURE_HEADER = "X-InstructLoop-Signature"
TIMESTAMP_HEADER = "X-InstructLoop-Timestamp"
EVENT_HEADER = "X-InstructLoop-Event"
DELIVERY_HEADER = "X-InstructLoop-Delivery"


class WebhookError(AppError):
    """A user-caused problem with a webhook (422); `field` names what is wrong."""

    status = 422


@dataclass
class DeliveryReport:
    """What one `deliver_due` pass did."""

    delivered: int = 0
    retrying: int = 0
    failed: int = 0


def create_webhook(
    db: Session, url: str, events: list[str], created_by: User | None = None, description: str = ""
) -> Webhook:
    """Registers a URL for some events with a fresh signing secret."""
    parts = urlsplit(url)
    if "\x00" in url or "\x00" in description or parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError("url", "must be an absolute http:// or https:// URL")
    try:
        destination(url)
    except DestinationRefused as exc:
        raise WebhookError("url", str(exc)) from None
    except OSError:
        pass  # the name does not resolve yet; every delivery checks it again
    unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
    if unknown or not events:
        raise WebhookError(
            "events",
            f"choose among {', '.join(WEBHOOK_EVENTS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        )
    webhook = Webhook(
        url=url,
        events=sorted(set(events)),
        description=description[:200],
        secret="whsec_" + secrets.token_urlsafe(32),
        created_by_id=created_by.id if created_by else None,
    )
    db.add(webhook)
    db.flush()
    return webhook


# --- where a webhook may go (SSRF) ----------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationRefused(Exception):
    """A webhook URL leads to an address webhooks may not reach."""


def _not_public(address: Address) -> str | None:
    """Says why an address is refused (loopback, private, ...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"


def _allowed(host: str, address: Address, allow: tuple[str, ...]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name, not a network
    return False


def destination(url: str) -> str:
    """Resolves a webhook URL's host and returns the address to connect to; raises DestinationRefused.

    Every address the name resolves to must be public (or allowed by `Settings.webhook_allow_hosts`), since
    a client may use any of them. OSError when the name does not resolve.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allow = get_settings().webhook_allowed
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    for address in addresses:
        why = _not_public(address)
        if why is not None and not _allowed(host, address, allow):
            verb = "is" if str(address) == host.strip("[]") else "resolves to"
            raise DestinationRefused(
                f"{host} {verb} a {why} address ({address}); webhooks reach public addresses only "
                "(INSTRUCTLOOP_WEBHOOK_ALLOW_HOSTS lists exceptions)"
            )
    return str(addresses[0])


def deactivate_webhook(db: Session, webhook_id: int) -> bool:
    """Stops sending events to a webhook (its log stays); returns whether it was active."""
    webhook = db.get(Webhook, webhook_id)
    if webhook is None or not webhook.is_active:
        return False
    webhook.is_active = False
    db.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == "pending")
        .values(status="failed", last_error="webhook deactivated")
    )
    return True


@events.on(*WEBHOOK_EVENTS)
def queue_deliveries(db: Session, event: str, data: dict[str, Any]) -> None:
    """Queues each public event of the loop for the webhooks subscribed to it."""
    emit_event(db, event, data)


def emit_event(db: Session, event: str, data: dict[str, Any]) -> list[WebhookDelivery]:
    """Queues an event for every active webhook subscribed to it, in the caller's transaction."""
    if event not in WEBHOOK_EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    now = utcnow()
    payload = {"id": str(uuid.uuid4()), "event": event, "created_at": now.isoformat(), "data": data}
    deliveries = [
        WebhookDelivery(webhook_id=hook.id, event=event, event_id=payload["id"], payload=payload, next_attempt_at=now)
        for hook in db.scalars(select(Webhook).where(Webhook.is_active.is_(True)).order_by(Webhook.id))
        if event in hook.events
    ]
    db.add_all(deliveries)
    db.flush()
    return deliveries


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Returns the signature header value for a body sent at `timestamp` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, now: float | None = None) -> bool:
    """Checks a received webhook: a valid signature made within SIGNATURE_TOLERANCE_S seconds."""
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - sent) > SIGNATURE_TOLERANCE_S:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature or "")


def retry_delay(attempts: int) -> timedelta:
    """How long to wait after the n-th failed attempt: 10 s, 20 s, 40 s, ... at most an hour."""
    return min(FIRST_RETRY * 2 ** (attempts - 1), MAX_RETRY)


def deliver_due(
    db: Session, *, now: datetime | None = None, client: httpx.Client | None = None, limit: int = 100
) -> DeliveryReport:
    """POSTs every due delivery once, recording the outcome and scheduling retries; the caller commits."""
    now = now or utcnow()
    query = (
        select(WebhookDelivery, Webhook)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    )
    if db.get_bind().dialect.name == "postgresql":
        # Two workers running this job at once take different deliveries rather than sending one twice.
        query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
    report = DeliveryReport()
    own_client = client is None
    client = client or httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)
    try:
        for delivery, webhook in db.execute(query).all():
            _attempt(client, delivery, webhook, now)
            if delivery.status == "delivered":
                report.delivered += 1
            elif delivery.status == "failed":
                report.failed += 1
            else:
                report.retrying += 1
    finally:
        if own_client:
            client.close()
    db.flush()
    return report


def _attempt(client: httpx.Client, delivery: WebhookDelivery, webhook: Webhook, now: datetime) -> None:
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "InstructLoop-Webhooks/1",
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: str(delivery.id),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(webhook.secret, timestamp, body),
    }
    delivery.attempts += 1
    started = time.monotonic()
    ok = False
    delivery.last_status_code = None
    try:
        # Checked at every attempt, and the checked address is the one connected to: the name may point
        # somewhere else now than when the webhook was registered (DNS rebinding).
        address = destination(webhook.url)
        url = httpx.URL(webhook.url)
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        headers["host"] = url.netloc.decode("ascii")
        # Streamed and never read: the receiver's body is not ours to keep or show.
        with client.stream(
            "POST",
            url.copy_with(host=address),
            content=body,
            headers=headers,
            follow_redirects=False,
            extensions=extensions,
        ) as response:
            delivery.last_status_code = response.status_code
        ok = 200 <= response.status_code < 300
        delivery.last_error = None if ok else f"HTTP {response.status_code} after {_ms_since(started)} ms"
    except DestinationRefused as exc:
        delivery.last_error = f"refused: {exc}"[:500]
    except (httpx.HTTPError, OSError) as exc:
        delivery.last_error = f"{type(exc).__name__} after {_ms_since(started)} ms: {exc}"[:500]
    if ok:
        delivery.status, delivery.delivered_at = "delivered", now
    elif delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = "failed"
    else:
        delivery.next_attempt_at = now + retry_delay(delivery.attempts)


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def list_deliveries(db: Session, webhook_id: int, limit: int = 100) -> list[WebhookDelivery]:
    """Returns a webhook's most recent deliveries, newest first, for the admin's delivery log."""
    return list(
        db.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook_id)
            .order_by(WebhookDelivery.id.desc())
            .limit(limit)
        )
    )
