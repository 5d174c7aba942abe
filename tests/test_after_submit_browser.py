"""After a submit, in headless Chromium: the next page confirms what was sent, and the browser's Back button
shows the submitted task, read-only, never another task that could be mistaken for it."""

from __future__ import annotations

import re

import pytest

from tests.test_labeling import seed_batch
from tests.test_labeling_browser import labeler as labeler  # the fixture, shared
from tests.test_labeling_browser import log_in, open_next, wait_for_another

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_back_after_a_ranking_shows_the_submitted_ranking(page, live_server, committed_session, labeler):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    seed_batch(committed_session, n_prompts=2, k=4, prompt_texts=["First prompt", "Second prompt"])
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    first = open_next(page, live_server, "ranking")
    first_prompt = page.get_by_test_id("prompt").inner_text()
    for key in ("2", "3", "1", "7", "1", "6", "3", "2", "Enter"):
        page.keyboard.press(key)
    second = wait_for_another(page, first)
    assert page.get_by_test_id("prompt").inner_text() != first_prompt

    notice = page.get_by_test_id("just-submitted")
    assert notice.inner_text().startswith("Ranking submitted")
    assert notice.get_by_role("link").get_attribute("href") == f"/label/assignments/{first}"

    page.go_back()
    page.wait_for_url(re.compile(rf".*/label/assignments/{first}$"))
    page.get_by_test_id("submitted-page").wait_for()
    assert page.get_by_test_id("prompt").inner_text() == first_prompt
    assert page.get_by_test_id("submitted-A").inner_text() == "rank 2 · score 3"
    assert page.get_by_test_id("submitted-B").inner_text() == "rank 1 · score 7"
    assert page.get_by_test_id("submitted-D").inner_text() == "rank 3 · score 2"
    assert page.get_by_test_id("submit").count() == 0 and page.locator("input, textarea").count() <= 1  # logout csrf
    assert page.get_by_role("link", name="Take the next task").get_attribute("href") == "/label/next?kind=ranking"
    page.get_by_role("link", name="Take the next task").click()
    page.wait_for_url(re.compile(rf".*/label/assignments/{second}$"))  # the held task, not a new one
    assert not errors


def test_back_after_a_demonstration_shows_the_submitted_text(page, live_server, committed_session, labeler):
    seed_batch(committed_session, n_prompts=2, rankings=False, demonstrations=True, prompt_texts=["Say hi", "Say bye"])
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    first = open_next(page, live_server, "demonstration")
    page.get_by_test_id("demonstration-text").fill("Hi there.")
    page.get_by_test_id("submit").click()
    wait_for_another(page, first)
    assert page.get_by_test_id("just-submitted").inner_text().startswith("Demonstration submitted")

    page.go_back()
    page.wait_for_url(re.compile(rf".*/label/assignments/{first}$"))
    page.get_by_test_id("submitted-page").wait_for()
    assert page.get_by_test_id("prompt").inner_text() == "Say hi"
    assert page.get_by_test_id("submitted-text").inner_text() == "Hi there."
    assert page.get_by_test_id("demonstration-text").count() == 0
