"""The labeling pages in headless Chromium: write a demonstration, rank by drag and drop and by keyboard alone,
find the autosaved draft after a reload, and show hostile prompts and outputs as inert text."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from app.models import Assignment, Demonstration, Ranking, RankingItem, User
from app.security import hash_password
from tests.factories import PASSWORD
from tests.test_labeling import seed_batch

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def labeler(committed_session) -> User:
    user = User(username="rita", role="labeler", password_hash=hash_password(PASSWORD))
    committed_session.add(user)
    committed_session.commit()
    return user


@pytest.fixture
def js_errors(page) -> list[str]:
    """Collects uncaught script errors; every test ends by asserting there were none."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def log_in(page, live_server: str, username: str) -> None:
    page.goto(live_server + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(live_server + "/label")


def open_next(page, live_server: str, kind: str) -> int:
    page.goto(f"{live_server}/label/next?kind={kind}")
    page.wait_for_url(re.compile(r".*/label/assignments/\d+$"))
    page.get_by_test_id(f"{kind}-page").wait_for()
    return int(page.url.rsplit("/", 1)[1])


def wait_for_another(page, previous: int) -> int:
    """Waits until the page has moved on from assignment `previous` to the next one; returns its id."""
    page.wait_for_url(lambda url: re.search(r"/label/assignments/\d+$", url) and not url.endswith(f"/{previous}"))
    return int(page.url.rsplit("/", 1)[1])


def fresh(session):
    session.rollback()  # end the old transaction so the reads below see what the server committed
    session.expire_all()
    return session


def ranks_by_letter(session, assignment_id: int) -> dict[str, tuple[int, int, list[str]]]:
    """Maps each output's letter on the page (A = first shown) to its stored (rank, likert, flags)."""
    ranking = session.scalar(select(Ranking).where(Ranking.assignment_id == assignment_id))
    assert ranking is not None
    rows = session.scalars(select(RankingItem).where(RankingItem.ranking_id == ranking.id)).all()
    return {chr(ord("A") + item.position): (item.rank, item.likert, item.flags) for item in rows}


def test_write_and_submit_demonstrations(page, live_server, committed_session, labeler, js_errors):
    prompt = "Write a haiku about tea.\n    Keep   the spacing:\n\tthree lines."
    seed_batch(
        committed_session,
        n_prompts=3,
        rankings=False,
        demonstrations=True,
        prompt_texts=[prompt, "Second prompt", "Third prompt"],
        guidelines="Be **brief**.\n\n- no rhymes",
    )
    committed_session.commit()
    log_in(page, live_server, labeler.username)

    first = open_next(page, live_server, "demonstration")
    assert page.get_by_test_id("prompt").inner_text() == prompt  # whitespace preserved
    assert page.locator("[data-testid=guidelines] strong").inner_text() == "brief"
    box = page.get_by_test_id("demonstration-text")
    page.get_by_test_id("submit").click()
    assert "Write a response" in page.get_by_test_id("form-message").inner_text()
    haiku = "Steam curls from the cup\nleaves unfold in quiet heat\nthe kettle goes still"
    box.fill(haiku)
    assert page.get_by_test_id("char-count").inner_text() == f"{len(haiku)} / 20,000 characters"
    page.get_by_test_id("submit").click()

    second = wait_for_another(page, first)  # submitting goes on to the next task by itself
    assert page.get_by_test_id("prompt").inner_text() == "Second prompt"
    page.get_by_test_id("skip-reason").select_option("other")
    page.get_by_test_id("skip-submit").click()
    assert "say in the note" in page.get_by_test_id("skip-message").inner_text()
    page.get_by_test_id("skip-note").fill("I do not know this topic")
    page.get_by_test_id("skip-submit").click()

    third = wait_for_another(page, second)
    assert page.get_by_test_id("prompt").inner_text() == "Third prompt"
    page.get_by_test_id("demonstration-text").type("Answer sent with the keyboard.")
    page.keyboard.press("Control+Enter")
    page.get_by_test_id("nothing-left").wait_for()

    session = fresh(committed_session)
    texts = dict(session.execute(select(Demonstration.assignment_id, Demonstration.text)).all())
    assert texts == {first: haiku, third: "Answer sent with the keyboard."}
    skipped = session.get(Assignment, second)
    assert (skipped.state, skipped.skip_reason, skipped.skip_note) == ("skipped", "other", "I do not know this topic")
    assert not js_errors


def test_rank_seven_outputs_by_drag_and_drop_with_a_tie(page, live_server, committed_session, labeler, js_errors):
    seed_batch(committed_session, n_prompts=1, k=7)
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    assignment_id = open_next(page, live_server, "ranking")
    assert page.get_by_test_id("output-card").count() == 7 and page.get_by_test_id("slot-7").is_visible()

    slots = {"A": 3, "B": 1, "C": 2, "D": 2, "E": 5, "F": 6, "G": 7}  # C and D tie; slot 4 stays empty
    likert = {"A": 4, "B": 7, "C": 6, "D": 6, "E": 3, "F": 2, "G": 1}
    for letter in "ABCDEF":
        page.get_by_test_id(f"likert-{letter}-{likert[letter]}").click()
        page.get_by_test_id(f"rank-card-{letter}").drag_to(page.get_by_test_id(f"slot-{slots[letter]}"))
    assert page.locator("[data-testid=slot-2] .rank-card").count() == 2
    assert page.get_by_test_id("placed-C").inner_text() == "slot 2"

    page.get_by_test_id("submit").click()  # G has neither a score nor a slot yet
    message = page.get_by_test_id("form-message")
    assert "Output G needs a Likert score and a rank slot." in message.inner_text()
    assert "Output A" not in message.inner_text()

    page.get_by_test_id("likert-G-1").click()
    page.get_by_test_id("rank-card-G").drag_to(page.get_by_test_id("slot-7"))
    # A second drag moves a card; dragging it back to the pool and out again works too.
    page.get_by_test_id("rank-card-E").drag_to(page.get_by_test_id("pool"))
    assert page.get_by_test_id("placed-E").inner_text() == "not ranked"
    page.get_by_test_id("rank-card-E").drag_to(page.get_by_test_id("slot-5"))
    page.locator("[data-testid=output-card][data-letter=A] summary").click()
    page.get_by_test_id("flag-A-hallucination").check()
    page.wait_for_function("() => Number(document.getElementById('labeling-root').dataset.activeSeconds) >= 1")
    page.get_by_test_id("submit").click()
    page.get_by_test_id("nothing-left").wait_for()

    session = fresh(committed_session)
    stored = ranks_by_letter(session, assignment_id)
    dense = {"A": 3, "B": 1, "C": 2, "D": 2, "E": 4, "F": 5, "G": 6}
    assert {letter: rank for letter, (rank, _, _) in stored.items()} == dense
    assert {letter: score for letter, (_, score, _) in stored.items()} == likert
    assert stored["A"][2] == ["hallucination"] and all(not f for letter, (_, _, f) in stored.items() if letter != "A")
    assert session.scalar(select(Ranking.active_seconds).where(Ranking.assignment_id == assignment_id)) >= 1
    assert not js_errors


def test_rank_five_outputs_with_the_keyboard_alone(page, live_server, committed_session, labeler, js_errors):
    seed_batch(committed_session, n_prompts=1, k=5)
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    assignment_id = open_next(page, live_server, "ranking")

    def focused() -> str | None:
        return page.evaluate("() => document.activeElement && document.activeElement.dataset.letter || null")

    for _ in range(60):  # Tab until the first output card has focus
        page.keyboard.press("Tab")
        if focused() == "A" and page.evaluate("() => document.activeElement.dataset.testid") == "output-card":
            break
    else:
        pytest.fail("Tab never reached the first output card")
    page.keyboard.press("ArrowDown")
    assert focused() == "B"
    page.keyboard.press("ArrowUp")
    assert focused() == "A"

    slots = {"A": 2, "B": 1, "C": 1, "D": 3, "E": 5}  # B and C tie
    likert = {"A": 5, "B": 7, "C": 7, "D": 3, "E": 1}
    for letter in "ABCDE":  # place every card: digit, then arrow to the next card
        page.keyboard.press(str(slots[letter]))
        if letter != "E":
            page.keyboard.press("ArrowDown")
    assert focused() == "E" and page.get_by_test_id("placed-E").inner_text() == "slot 5 (worst)"
    assert page.locator("[data-testid=slot-1] .rank-card").count() == 2

    page.keyboard.press("Control+Enter")  # refused: no Likert scores yet
    assert "Output A needs a Likert score." in page.get_by_test_id("form-message").inner_text()

    page.keyboard.press("ArrowDown")  # wraps around to A
    assert focused() == "A"
    for letter in "ABCDE":  # Tab into the card's 1-7 scale, choose with Space and arrows, Tab past the flags
        page.keyboard.press("Tab")
        page.keyboard.press("Space")
        for _ in range(likert[letter] - 1):
            page.keyboard.press("ArrowRight")
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
    page.keyboard.press("Control+Enter")
    page.get_by_test_id("nothing-left").wait_for()

    stored = ranks_by_letter(fresh(committed_session), assignment_id)
    assert {letter: (rank, score) for letter, (rank, score, _) in stored.items()} == {
        "A": (2, 5),
        "B": (1, 7),
        "C": (1, 7),
        "D": (3, 3),
        "E": (4, 1),
    }
    assert not js_errors


def test_reload_mid_task_finds_the_autosaved_draft(page, live_server, committed_session, labeler, js_errors):
    seed_batch(committed_session, n_prompts=1, k=4, demonstrations=True)
    committed_session.commit()
    log_in(page, live_server, labeler.username)

    demo_id = open_next(page, live_server, "demonstration")
    page.get_by_test_id("demonstration-text").type("First half of my answer,")
    page.wait_for_function("() => document.querySelector('[data-testid=save-status]').textContent === 'Saved'")
    page.reload()
    assert page.get_by_test_id("demonstration-text").input_value() == "First half of my answer,"
    assert page.get_by_test_id("save-status").inner_text() == "Draft restored"

    rank_id = open_next(page, live_server, "ranking")
    page.get_by_test_id("likert-B-6").click()
    page.get_by_test_id("rank-card-B").drag_to(page.get_by_test_id("slot-1"))
    page.get_by_test_id("rank-card-C").focus()
    page.keyboard.press("1")  # a tie, placed from the rank card by keyboard
    page.locator("[data-testid=output-card][data-letter=D] summary").click()
    page.get_by_test_id("flag-D-personal_data").check()
    page.get_by_test_id("all-unacceptable").check()
    page.wait_for_function("() => document.querySelector('[data-testid=save-status]').textContent === 'Saved'")
    page.reload()
    page.get_by_test_id("ranking-page").wait_for()
    assert page.get_by_test_id("save-status").inner_text() == "Draft restored"
    assert page.locator("[data-testid=slot-1] .rank-card").evaluate_all("cs => cs.map(c => c.dataset.letter)") == [
        "B",
        "C",
    ]
    assert page.get_by_test_id("placed-B").inner_text() == "slot 1 (best)"
    assert page.locator("[data-testid=likert-B-6] input").is_checked()
    assert (
        page.get_by_test_id("flag-D-personal_data").is_checked()
        and page.get_by_test_id("all-unacceptable").is_checked()
    )
    assert page.get_by_test_id("flag-count-D").inner_text() == "(1)"

    session = fresh(committed_session)
    draft = session.scalar(select(Assignment.draft).where(Assignment.id == rank_id))
    assert draft["all_unacceptable"] is True and sorted(draft["slots"].values()) == [1, 1]
    assert session.scalar(select(Assignment.draft).where(Assignment.id == demo_id)) == {
        "text": "First half of my answer,"
    }

    for letter, slot in (("A", 2), ("D", 4)):  # finish the restored ranking and submit it
        page.get_by_test_id(f"rank-card-{letter}").drag_to(page.get_by_test_id(f"slot-{slot}"))
    for letter in "ACD":
        page.get_by_test_id(f"likert-{letter}-2").click()
    page.get_by_test_id("submit").click()
    page.get_by_test_id("nothing-left").wait_for()  # no ranking left; the held demonstration is another kind
    stored = ranks_by_letter(fresh(committed_session), rank_id)
    assert {letter: rank for letter, (rank, _, _) in stored.items()} == {"A": 2, "B": 1, "C": 1, "D": 3}
    assert stored["D"][2] == ["personal_data"] and stored["B"][1] == 6
    assert committed_session.scalar(select(Ranking.all_unacceptable).where(Ranking.assignment_id == rank_id))
    assert not js_errors


PROMPT_PAYLOAD = (
    'Summarise: <script>window.__pwnedPrompt = 1</script><img src=x onerror="window.__pwnedPromptImg = 1"> & done'
)
OUTPUT_PAYLOAD = (
    'Sure! <script>window.__pwnedOutput = 1</script>\n<img src=x onerror="window.__pwnedOutputImg = 1"> **not bold**'
)


@pytest.mark.parametrize("kind", ["ranking", "demonstration"])
def test_hostile_prompt_and_outputs_show_as_text_and_run_nothing(
    page, live_server, committed_session, labeler, js_errors, kind
):
    seed_batch(
        committed_session,
        n_prompts=1,
        k=4,
        demonstrations=True,
        prompt_texts=[PROMPT_PAYLOAD],
        output_texts=[OUTPUT_PAYLOAD, "plain", "<b>bold?</b>", "</pre></textarea>x"],
        guidelines='Read this: <script>window.__pwnedGuide = 1</script> <img src=x onerror="window.__pwnedGuideImg=1">',
    )
    committed_session.commit()
    log_in(page, live_server, labeler.username)
    open_next(page, live_server, kind)

    assert page.get_by_test_id("prompt").inner_text() == PROMPT_PAYLOAD
    assert "<script>window.__pwnedGuide = 1</script>" in page.get_by_test_id("guidelines").inner_text()
    if kind == "ranking":
        shown = page.get_by_test_id("output-text").all_inner_texts()
        assert sorted(shown) == sorted([OUTPUT_PAYLOAD, "plain", "<b>bold?</b>", "</pre></textarea>x"])
        page.get_by_test_id("rank-card-A").drag_to(page.get_by_test_id("slot-1"))  # the script ran, payloads did not
        assert page.get_by_test_id("placed-A").inner_text() == "slot 1 (best)"
    assert page.locator("main img").count() == 0 and page.locator("main b").count() == 0
    flags = page.evaluate("""() => [window.__pwnedPrompt, window.__pwnedPromptImg, window.__pwnedOutput,
                                     window.__pwnedOutputImg, window.__pwnedGuide, window.__pwnedGuideImg]""")
    assert flags == [None] * 6
    assert not js_errors
