"""The ranking page at keyboard speed and on any screen, in headless Chromium: K outputs ranked in at most
2K + 2 keystrokes from page load, ranking by tapping on a 390 px phone, and no page that scrolls sideways."""

from __future__ import annotations

import pytest

from tests.test_labeling import seed_batch
from tests.test_labeling_browser import fresh, log_in, open_next, ranks_by_letter
from tests.test_labeling_browser import labeler as labeler  # the fixture, shared

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1280, "height": 800}


@pytest.fixture
def screen_page(chromium, request):
    """A page in a fresh context of the parametrised viewport (touch on the phone)."""
    viewport = request.param
    context = chromium.new_context(viewport=viewport, has_touch=viewport["width"] < 600)
    page = context.new_page()
    page.set_default_timeout(15000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()


def no_sideways_scroll(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")


@pytest.mark.parametrize("screen_page", [PHONE, LAPTOP], ids=["390x844", "1280x800"], indirect=True)
def test_rank_four_outputs_in_at_most_2k_plus_2_keystrokes(screen_page, live_server, committed_session, labeler):
    page = screen_page
    seed_batch(committed_session, n_prompts=1, k=4)
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    assignment_id = open_next(page, live_server, "ranking")

    # Focus starts on the first output, not on <body> or the navigation.
    assert page.evaluate("() => document.activeElement.dataset.testid") == "output-card"
    assert page.evaluate("() => document.activeElement.dataset.letter") == "A"
    assert "rank" in page.get_by_test_id("key-mode-A").inner_text().lower()

    slots = {"A": 2, "B": 1, "C": 1, "D": 3}  # B and C tie
    likert = {"A": 3, "B": 7, "C": 6, "D": 2}  # A's "3" is a score: A must stay in slot 2
    keystrokes = 0
    for letter in "ABCD":
        page.keyboard.press(str(slots[letter]))
        keystrokes += 1
        assert "score" in page.get_by_test_id(f"key-mode-{letter}").inner_text().lower()  # the mode is shown
        page.keyboard.press(str(likert[letter]))
        keystrokes += 1
    assert page.get_by_test_id("placed-A").inner_text() == "slot 2"
    page.keyboard.press("Enter")
    keystrokes += 1
    page.get_by_test_id("nothing-left").wait_for()
    assert keystrokes <= 2 * 4 + 2

    stored = ranks_by_letter(fresh(committed_session), assignment_id)
    assert {letter: (rank, score) for letter, (rank, score, _) in stored.items()} == {
        "A": (2, 3),
        "B": (1, 7),
        "C": (1, 6),
        "D": (3, 2),
    }
    assert not page.js_errors


@pytest.mark.parametrize("screen_page", [LAPTOP], ids=["1280x800"], indirect=True)
def test_shortcuts_are_shown_and_listed_by_question_mark(screen_page, live_server, committed_session, labeler):
    page = screen_page
    seed_batch(committed_session, n_prompts=1, k=4)
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    open_next(page, live_server, "ranking")
    assert "1–4" in page.get_by_test_id("shortcut-hint").inner_text()
    page.keyboard.press("?")
    overlay = page.get_by_test_id("shortcuts")
    overlay.wait_for(state="visible")
    text = overlay.inner_text()
    assert "Enter" in text and "1–7" in text and "1–4" in text
    page.keyboard.press("Escape")
    overlay.wait_for(state="hidden")
    assert page.evaluate("() => document.activeElement.dataset.letter") == "A"
    assert not page.js_errors


@pytest.mark.parametrize("screen_page", [PHONE], ids=["390x844"], indirect=True)
def test_rank_by_tapping_on_a_phone(screen_page, live_server, committed_session, labeler):
    page = screen_page
    seed_batch(committed_session, n_prompts=1, k=4, guidelines="Rank by **correctness**.")
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    assignment_id = open_next(page, live_server, "ranking")
    assert no_sideways_scroll(page)

    logout = page.get_by_role("button", name="Log out")
    box = logout.bounding_box()
    assert logout.is_visible() and box is not None and box["x"] + box["width"] <= 390
    # The guidelines sit at the top, folded, above the work and the Submit button.
    guidelines = page.get_by_test_id("guidelines")
    assert guidelines.evaluate("g => g.tagName") == "DETAILS"
    assert guidelines.bounding_box()["y"] < page.get_by_test_id("prompt").bounding_box()["y"]
    page.get_by_test_id("guidelines-toggle").tap()
    assert page.locator("[data-testid=guidelines] strong").inner_text() == "correctness"

    slots = {"A": 4, "B": 1, "C": 2, "D": 2}  # C and D tie
    for letter in "ABCD":
        page.get_by_test_id(f"rank-card-{letter}").tap()
        page.get_by_test_id(f"slot-{slots[letter]}").tap()
        page.get_by_test_id(f"likert-{letter}-5").tap()
    assert page.get_by_test_id("placed-D").inner_text() == "slot 2"
    assert no_sideways_scroll(page)
    page.get_by_test_id("submit").tap()
    page.get_by_test_id("nothing-left").wait_for()
    stored = ranks_by_letter(fresh(committed_session), assignment_id)
    assert {letter: rank for letter, (rank, _, _) in stored.items()} == {"A": 3, "B": 1, "C": 2, "D": 2}
    assert not page.js_errors


@pytest.mark.parametrize("screen_page", [PHONE], ids=["390x844"], indirect=True)
def test_no_sideways_scrolling_at_390_px(screen_page, live_server, committed_session, labeler):
    page = screen_page
    seed_batch(
        committed_session,
        n_prompts=1,
        k=6,
        demonstrations=True,
        output_texts=["x" * 400, "a long line " * 40, "short", "y", "z", "w"],
    )
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    assert no_sideways_scroll(page), "home page"
    open_next(page, live_server, "ranking")
    assert no_sideways_scroll(page), "ranking page"
    open_next(page, live_server, "demonstration")
    assert no_sideways_scroll(page), "demonstration page"
    box = page.get_by_role("button", name="Log out").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 390
    assert not page.js_errors


@pytest.mark.parametrize("screen_page", [LAPTOP], ids=["1280x800"], indirect=True)
def test_not_ready_list_follows_the_fixes(screen_page, live_server, committed_session, labeler):
    page = screen_page
    seed_batch(committed_session, n_prompts=1, k=4)
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    open_next(page, live_server, "ranking")
    page.keyboard.press("Enter")  # nothing done yet: the list of what is missing
    message = page.get_by_test_id("form-message")
    assert "Output A needs a Likert score and a rank slot." in message.inner_text()
    page.keyboard.press("1")  # A's slot: the line for A shrinks at once
    assert "Output A needs a Likert score." in message.inner_text()
    page.keyboard.press("4")  # A's score: its line goes
    assert "Output A" not in message.inner_text() and "Output B needs" in message.inner_text()
    for key in ("2", "4", "3", "4", "4", "4"):
        page.keyboard.press(key)
    assert message.is_hidden()  # all fixed: the list is gone
    assert not page.js_errors
