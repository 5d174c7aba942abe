"""A blind evaluation in headless Chromium: a labeler judges side-by-side pairs with the mouse and the keyboard,
then the admin finds the win rate and its interval on the model's page."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.models import Completion, EvalJudgment, User
from app.quality import evaluations
from app.quality.stats import win_rate
from app.security import hash_password
from tests.factories import PASSWORD
from tests.test_evaluations import held_out_batch, sample_by_hand, two_models
from tests.test_labeling_browser import fresh
from tests.test_xss import log_in

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def side_of(session, page, model_id: int) -> str:
    """Which side ('left' or 'right') shows the output of `model_id` on the current page."""
    assignment_id = int(page.url.rsplit("/", 1)[1])
    from app.models import Assignment

    order = fresh(session).get(Assignment, assignment_id).display_order
    models = [session.get(Completion, cid).model_version_id for cid in order]
    return "left" if models[0] == model_id else "right"


def test_labeler_judges_blind_pairs_and_admin_sees_the_win_rate(chromium, live_server, committed_session):
    db = committed_session
    held_out_batch(db, n=3)
    a, b = two_models(db)
    labeler = User(username="evan", role="labeler", password_hash=hash_password(PASSWORD))
    admin = User(username="ada", role="admin", password_hash=hash_password(PASSWORD))
    db.add_all([labeler, admin])
    db.flush()
    evaluation = evaluations.start_evaluation(db, model_a_id=a.id, model_b_id=b.id, n_prompts=3)
    assert sample_by_hand(db, evaluation) == 3
    db.commit()

    errors: list[str] = []
    context = chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(15000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, live_server, "evan", "/label")
    assert page.get_by_test_id("avail-eval").inner_text() == "3"
    page.get_by_test_id("start-eval").click()
    page.get_by_test_id("eval-page").wait_for()
    # Blind: no model name anywhere on the page.
    html = page.content()
    assert a.name not in html and b.name not in html

    # 1: click model A's response, submit with the button.
    first = page.url
    page.get_by_test_id(f"eval-{side_of(db, page, a.id)}").click()
    page.get_by_test_id("submit").click()
    page.wait_for_url(lambda url: url != first and "/label/" in url)
    # 2: submitting with nothing chosen is refused with a message; then keyboard only: 1 = left, 3 = right.
    page.get_by_test_id("eval-page").wait_for()
    second = page.url
    page.keyboard.press("Control+Enter")
    assert "Choose the better response" in page.get_by_test_id("form-message").inner_text()
    page.keyboard.press("1" if side_of(db, page, a.id) == "left" else "3")
    page.keyboard.press("Control+Enter")
    page.wait_for_url(lambda url: url != second and "/label/" in url)
    # 3: a tie by key 2.
    page.get_by_test_id("eval-page").wait_for()
    page.keyboard.press("2")
    page.keyboard.press("Control+Enter")
    page.get_by_test_id("nothing-left").wait_for()
    assert errors == []

    verdicts = fresh(db).scalars(select(EvalJudgment.winner).where(EvalJudgment.evaluation_id == evaluation.id))
    assert sorted(verdicts) == ["a", "a", "tie"]
    db.refresh(evaluation)
    assert evaluation.status == "completed"
    context.close()

    # The admin sees A's win rate, 2 wins and a tie = 83.3 %, with its Wilson interval, on A's model page.
    expected = win_rate(2, 0, 1)
    context = chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(15000)
    log_in(page, live_server, "ada", "/admin")
    page.goto(f"{live_server}/admin/models/{a.id}")
    row = page.get_by_test_id(f"model-eval-row-{evaluation.id}")
    assert row.get_by_test_id("model-eval-win-rate").inner_text() == f"{expected.rate * 100:.1f} %"
    interval = row.get_by_test_id("model-eval-interval").inner_text()
    assert interval == f"{expected.low * 100:.1f} – {expected.high * 100:.1f} %"
    assert page.get_by_test_id("model-eval-chart").is_visible()
    # And the evaluation's own page agrees.
    page.goto(f"{live_server}/admin/evaluations/{evaluation.id}")
    assert page.get_by_test_id("win-rate").inner_text() == "83.3 %"
    assert (
        page.get_by_test_id("win-interval").inner_text()
        == f"95 % CI {expected.low * 100:.1f} % – {expected.high * 100:.1f} %"
    )
    context.close()
