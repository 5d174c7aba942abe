"""The web admits no more requests at once than its database pool has connections (app.main.AdmissionMiddleware)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anyio

from app.db import get_engine, max_connections
from app.main import AdmissionMiddleware, create_app


def test_no_more_requests_run_at_once_than_the_limit_and_the_rest_wait_their_turn():
    inside = peak = finished = 0

    async def app(scope, receive, send):
        nonlocal inside, peak, finished
        inside += 1
        peak = max(peak, inside)
        await anyio.sleep(0.01)
        inside -= 1
        finished += 1

    admitted = AdmissionMiddleware(app, limit=3)

    async def main():
        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(admitted, {"type": "http"}, None, None)

    # In a thread of its own: other tests (Playwright's sync API) may hold an event loop in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, main).result()
    assert (peak, finished) == (3, 20)


def test_the_limit_is_the_pool_capacity():
    engine = get_engine()
    assert max_connections() == engine.pool.size() + engine.pool._max_overflow
    limits = [m.kwargs["limit"] for m in create_app().user_middleware if m.cls is AdmissionMiddleware]
    assert limits == [max_connections()]


def test_a_database_outage_is_answered_503_with_retry_after_in_json_and_html():
    from fastapi.testclient import TestClient
    from sqlalchemy import exc as sa_exc

    app = create_app()

    @app.get("/api/v1/_outage")
    @app.get("/_outage")
    def outage():
        raise sa_exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    client = TestClient(app, raise_server_exceptions=False)
    api = client.get("/api/v1/_outage", headers={"Accept": "application/json"})
    assert api.status_code == 503 and api.headers["Retry-After"] == "2"
    assert "retry" in api.json()["detail"]
    page = client.get("/_outage", headers={"Accept": "text/html"})
    assert page.status_code == 503 and page.headers["Retry-After"] == "2"
    assert "text/html" in page.headers["content-type"] and "retry in a few seconds" in page.text
