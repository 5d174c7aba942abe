"""Finding 3: webhook SSRF with reflection.

An admin could point a webhook at loopback or a private address, and the
delivery log showed the response body back. Webhooks now reach public
addresses only unless INSTRUCTLOOP_WEBHOOK_ALLOW_HOSTS lists the host, the
resolved address is checked again at every delivery (DNS rebinding), no
redirect is followed, and the log keeps a status and a time, never a body.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.config import get_settings
from app.models import Webhook, WebhookDelivery
from app.security import create_api_token
from app.webhooks import service as webhooks
from tests.factories import AdminFactory

SECRET_BODY = b"internal-only: db password hunter2"


class Server:
    """A server on 127.0.0.1 answering every POST with `status`, `body` and `headers`; it counts requests."""

    def __init__(self, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None):
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.hits += 1
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(**kwargs) -> Server:
        made.append(Server(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def allow(monkeypatch):
    """Sets INSTRUCTLOOP_WEBHOOK_ALLOW_HOSTS for the test (the suite's default allows 127.0.0.1)."""

    def set_to(value: str) -> None:
        monkeypatch.setenv("INSTRUCTLOOP_WEBHOOK_ALLOW_HOSTS", value)
        get_settings.cache_clear()

    yield set_to
    monkeypatch.undo()
    get_settings.cache_clear()


INTERNAL = [
    "http://127.0.0.1:9/hook",
    "http://localhost/hook",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://10.0.0.7/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://100.100.100.200/",  # shared address space (a metadata service lives there too)
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fe80::1]/hook",
    "http://0.0.0.0/hook",
    "http://2130706433/hook",  # 127.0.0.1 written as one number
    "http://0x7f.1/hook",
]


def test_internal_addresses_are_refused_when_registered(client, db, allow):
    allow("")
    token, _ = create_api_token(db, AdminFactory(), ["admin"])
    db.commit()
    for url in INTERNAL:
        response = client.post(
            "/api/v1/webhooks",
            json={"url": url, "events": ["batch.completed"]},
            headers={"authorization": f"Bearer {token}"},
        )
        assert response.status_code == 422, (url, response.status_code)
        assert response.json()["field"] == "url", url
    assert db.query(Webhook).count() == 0


def test_delivery_checks_the_address_again(db, servers, allow):
    """A webhook registered while its host was allowed (or while its name pointed elsewhere) is not sent."""
    inside = servers(status=204)
    allow("127.0.0.1")
    hook = webhooks.create_webhook(db, f"http://127.0.0.1:{inside.port}/hook", ["batch.completed"])
    allow("")  # the same check a name that now resolves to loopback meets at delivery time
    (delivery,) = webhooks.emit_event(db, "batch.completed", {"batch_id": 1})
    report = webhooks.deliver_due(db)
    assert inside.hits == 0 and report.delivered == 0
    assert delivery.status == "pending" and delivery.last_error.startswith("refused: 127.0.0.1 is a loopback")
    assert hook.is_active


def test_a_name_is_checked_by_what_it_resolves_to(db, servers, allow):
    inside = servers(status=204)
    allow("127.0.0.1/32")  # an address allowed, not the name: 'localhost' resolves to it, so it may pass
    webhooks.create_webhook(db, f"http://localhost:{inside.port}/hook", ["batch.completed"])
    webhooks.emit_event(db, "batch.completed", {"batch_id": 1})
    assert webhooks.deliver_due(db).delivered == 1 and inside.hits == 1
    allow("")
    with pytest.raises(webhooks.WebhookError) as refused:
        webhooks.create_webhook(db, f"http://localhost:{inside.port}/hook", ["batch.completed"])
    assert refused.value.field == "url" and "resolves to a loopback address" in refused.value.message


def test_bodies_are_never_shown_and_redirects_never_followed(client, db, servers, allow):
    elsewhere = servers(status=204)
    talkative = servers(status=500, body=SECRET_BODY)
    redirecting = servers(status=307, headers={"location": f"http://localhost:{elsewhere.port}/"})
    allow("127.0.0.1")
    admin = AdminFactory()
    token, _ = create_api_token(db, admin, ["admin"])
    hooks = [
        webhooks.create_webhook(db, f"http://127.0.0.1:{server.port}/hook", ["batch.completed"])
        for server in (talkative, redirecting)
    ]
    webhooks.emit_event(db, "batch.completed", {"batch_id": 1})
    webhooks.deliver_due(db)
    db.commit()
    assert talkative.hits == 1 and redirecting.hits == 1 and elsewhere.hits == 0
    shown = []
    for hook in hooks:
        log = client.get(f"/api/v1/webhooks/{hook.id}/deliveries", headers={"authorization": f"Bearer {token}"})
        shown.append(log.text)
        (entry,) = log.json()
        assert entry["last_status_code"] in (500, 307)
        assert entry["last_error"].startswith(f"HTTP {entry['last_status_code']} after ")
        assert entry["last_error"].endswith(" ms")
    assert not any(SECRET_BODY.decode() in text for text in shown)
    stored = [d.last_error for d in db.query(WebhookDelivery).all()]
    assert not any("hunter2" in (error or "") for error in stored)
