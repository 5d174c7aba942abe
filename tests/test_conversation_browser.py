"""The labeling pages show a conversation prompt whole, in headless Chromium: every turn under its role, its
content as inert text, at a desktop width and at a phone's 390 px."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.models import Prompt, User
from app.security import hash_password
from tests.factories import PASSWORD
from tests.test_labeling import seed_batch
from tests.test_labeling_browser import log_in, open_next

pytestmark = [pytest.mark.browser, pytest.mark.slow]

HOSTILE = [
    {"role": "user", "content": "<script>window.pwned = 1</script>What is <b>2 + 2</b>?"},
    {"role": "assistant", "content": '<img src=x onerror="window.pwned = 2">4 &amp; done'},
    {"role": "user", "content": "And <i>doubled</i>?\n  keep   spacing"},
]


@pytest.mark.parametrize("width", [1280, 390])
@pytest.mark.parametrize("kind", ["demonstration", "ranking"])
def test_a_conversation_shows_every_turn_with_its_role_as_text(chromium, live_server, committed_session, width, kind):
    batch = seed_batch(committed_session, n_prompts=1, rankings=kind == "ranking", demonstrations=kind != "ranking")
    prompt = committed_session.scalar(select(Prompt).where(Prompt.batch_id == batch.id))
    prompt.messages, prompt.text = HOSTILE, HOSTILE[-1]["content"]
    committed_session.add(User(username="cora", role="labeler", password_hash=hash_password(PASSWORD)))
    committed_session.commit()

    context = chromium.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        log_in(page, live_server, "cora")
        open_next(page, live_server, kind)
        turns = page.get_by_test_id("turn")
        assert turns.count() == 3
        assert page.get_by_test_id("turn-role").all_inner_texts() == ["User", "Assistant", "User"]
        assert [turns.nth(i).get_attribute("data-role") for i in range(3)] == ["user", "assistant", "user"]
        shown = [turns.nth(i).locator("pre").inner_text() for i in range(3)]
        assert shown == [m["content"] for m in HOSTILE]  # escaped: the markup is shown as typed
        assert page.get_by_test_id("prompt").inner_text() == HOSTILE[-1]["content"]
        conversation = page.get_by_test_id("conversation")
        assert conversation.locator("script, b, i, img").count() == 0
        assert page.evaluate("window.pwned") is None
        # The history comes before the outputs or the answer box, and fits the viewport.
        box = conversation.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
        after = page.get_by_test_id("output-card" if kind == "ranking" else "demonstration-text").first.bounding_box()
        assert after is not None and after["y"] > box["y"] + box["height"] - 1
        if width == 390:
            role = page.get_by_test_id("turn-role").first.bounding_box()
            content = turns.first.locator("pre").bounding_box()
            assert role and content and content["y"] >= role["y"] + role["height"] - 1  # stacked, not squeezed
        assert not errors
    finally:
        context.close()
