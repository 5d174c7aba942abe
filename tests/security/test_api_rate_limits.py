"""API rate limits (issue 17): per token and per client address, counted in Redis, 429 with Retry-After.

Off by default (every other test runs without them); this test turns them on through the settings.
"""

from __future__ import annotations

import pytest
import redis

from app.config import get_settings
from app.security import create_api_token
from tests.factories import UserFactory

LIMIT = 3
WINDOW = 600


@pytest.fixture
def limited(monkeypatch):
    monkeypatch.setenv("INSTRUCTLOOP_API_RATE_PER_TOKEN", str(LIMIT))
    monkeypatch.setenv("INSTRUCTLOOP_API_RATE_PER_ADDRESS", str(LIMIT * 3))
    monkeypatch.setenv("INSTRUCTLOOP_API_RATE_WINDOW_S", str(WINDOW))
    get_settings.cache_clear()
    store = redis.Redis.from_url(get_settings().resolved_rate_limit_url)
    for key in store.scan_iter("instructloop:rate:*"):
        store.delete(key)
    yield store
    monkeypatch.undo()
    get_settings.cache_clear()


def _until_refused(client, headers: dict, most: int) -> tuple[int, object]:
    # Counting stops at the first 429; at most two windows' worth pass if a window ends mid-test.
    for sent in range(1, most + 1):
        response = client.get("/api/v1/me", headers=headers)
        if response.status_code == 429:
            return sent, response
        assert response.status_code in (200, 401), response.text
    raise AssertionError(f"no 429 after {most} requests")


def test_a_token_past_its_limit_gets_429_with_retry_after_and_others_go_on(client, db, limited):
    user = UserFactory()
    first, _ = create_api_token(db, user, ["label"])
    second, _ = create_api_token(db, user, ["label"])
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {first}"}).status_code == 200
    sent, refused = _until_refused(client, {"authorization": f"Bearer {first}"}, 2 * LIMIT + 1)
    assert sent > LIMIT - 1
    assert 1 <= int(refused.headers["retry-after"]) <= WINDOW
    assert "token" in refused.json()["detail"]
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {second}"}).status_code == 200
    # pages are not API requests: the browser side is not counted
    assert client.get("/login").status_code == 200


def test_an_address_past_its_limit_gets_429_even_without_a_valid_token(client, db, limited):
    sent, refused = _until_refused(client, {"authorization": "Bearer il_guessed"}, 2 * LIMIT * 3 + 1)
    assert sent > LIMIT * 3 - 1
    assert 1 <= int(refused.headers["retry-after"]) <= WINDOW
    assert "address" in refused.json()["detail"]
    assert client.get("/api/v1/me").status_code == 429  # anonymous from the same address too


def test_limits_are_off_by_default(client, db):
    user = UserFactory()
    raw, _ = create_api_token(db, user, ["label"])
    settings = get_settings()
    assert (settings.api_rate_per_token, settings.api_rate_per_address) == (0, 0)
    for _ in range(20):
        assert client.get("/api/v1/me", headers={"authorization": f"Bearer {raw}"}).status_code == 200
