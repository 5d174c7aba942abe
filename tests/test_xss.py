"""XSS: hostile text everywhere users or models can put it renders as inert text on every page, in Chromium.

A corpus of payloads (script tags, event handlers, attribute breakouts,
`javascript:` URLs, markdown link tricks, template syntax, closing tags that
would end a <pre>, <textarea> or <script>) goes into prompts, model outputs,
batch names and guidelines, usernames, skip notes, demonstration drafts,
model names (also in blind evaluations), metrics and artifact paths, run messages, errors,
tracebacks and parameters, and webhook URLs and descriptions. Each page that shows them is opened in headless
Chromium, logged in through /login, with the Content-Security-Policy
*bypassed*, so escaping alone has to keep the payloads inert (the CSP is
the second wall, checked in test_security_headers.py). On every page:
the payload text is visible as text, `window.__xss` stays undefined, no
dialog opens, and no element, link or inline script from a payload exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from app.collection.sampling import store_samples
from app.labeling import leases, submissions
from app.models import Assignment, ModelVersion, Prompt, Task, TrainingRun, User, Webhook
from app.quality import evaluations, gold
from app.security import hash_password
from tests.factories import PASSWORD
from tests.test_labeling import seed_batch

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Every payload sets window.__xss or opens a dialog if it ever runs, and marks any element it
# manages to create with data-xss, so a payload that is parsed as markup is caught even if inert.
PAYLOADS = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1" data-xss>',
    '"><svg onload=window.__xss=1 data-xss>',
    '\'><iframe data-xss srcdoc="<script>parent.__xss=1</script>"></iframe>',
    "</pre></textarea></script><script>window.__xss=1</script>",
    '<a href="javascript:window.__xss=1" data-xss>click</a>',
    "javascript:window.__xss=1",
    "[click me](javascript:window.__xss=1)",
    "{{7*7}} {% print(7*7) %} ${7*7}",
    '<input data-xss autofocus onfocus="alert(1)">',
]
LABELER_NAME = "<img src=x onerror=alert(1) data-xss>"
ADMIN_NAME = '"><svg onload=window.__xss=1 data-xss>'
RANKING_BATCH = "<script>window.__xss=1</script> ranking"
DEMO_BATCH = '"><img src=x onerror=alert(1) data-xss> demonstrations'
SKIP_NOTE = "</textarea><svg onload=alert(1) data-xss> {{7*7}}"
DRAFT = "</textarea></script><script>window.__xss=1</script><b data-xss>draft</b>"
MODEL_NAME = "<svg onload=window.__xss=1 data-xss> sft"
METRIC = "<i data-xss onmouseover=alert(1)>acc</i>"
SHORT = "<b data-xss onclick=alert(1)>"  # fits triggered_by (32 characters)
# Guidelines are Markdown: the template-injection probe goes in a code span, where its asterisks stay asterisks
# (in running text CommonMark reads `7*7} ... (7*` as emphasis, which would hide them, not run anything).
GUIDELINES = "\n\n".join(["# " + PAYLOADS[0], "- " + PAYLOADS[1], *PAYLOADS[2:8], f"`{PAYLOADS[8]}`", *PAYLOADS[9:]])


# --- data ---------------------------------------------------------------------------------------


def _user(session, username: str, role: str) -> User:
    user = User(username=username, role=role, password_hash=hash_password(PASSWORD))
    session.add(user)
    return user


@pytest.fixture
def hostile(committed_session) -> dict:
    """Commits a labeling world whose every free-text field holds a payload; returns the ids that matter."""
    s = committed_session
    labeler, admin, other = (
        _user(s, LABELER_NAME, "labeler"),
        _user(s, ADMIN_NAME, "admin"),
        _user(s, "someone-else", "labeler"),
    )
    s.flush()
    ranking = seed_batch(
        s,
        n_prompts=2,
        k=len(PAYLOADS[:9]),
        prompt_texts=[PAYLOADS[0], PAYLOADS[4]],
        output_texts=PAYLOADS[:9],
        guidelines=GUIDELINES,
    )
    demos = seed_batch(
        s, n_prompts=1, rankings=False, demonstrations=True, prompt_texts=[PAYLOADS[1]], guidelines=GUIDELINES
    )
    ranking.name, demos.name = RANKING_BATCH, DEMO_BATCH
    demos.allow_prompt_writing = True
    held = leases.lease_next_task(s, labeler, "demonstration")
    held.draft = {"text": DRAFT}
    foreign = leases.lease_next_task(s, other, "ranking")

    base = s.scalars(select(ModelVersion)).first()
    base.name = PAYLOADS[5][:128]
    run = TrainingRun(
        kind="sft",
        status="running",
        progress=0.5,
        message=PAYLOADS[2],
        traceback=PAYLOADS[4],
        triggered_by=SHORT,
        params={"note": PAYLOADS[0]},
        metrics={"curve": [{"step": 1, METRIC: 1.0}, {"step": 2, METRIC: 0.5}]},
        checkpoint_dir=PAYLOADS[6],
    )
    failed = TrainingRun(kind="rm", status="failed", error=PAYLOADS[1], message=PAYLOADS[3], triggered_by=SHORT)
    s.add_all([run, failed])
    s.flush()
    sft = ModelVersion(
        name=MODEL_NAME,
        kind="sft",
        status="ready",
        artifact_path=PAYLOADS[4],
        parent_id=base.id,
        training_run_id=run.id,
        lineage={"base": base.id},
        metrics={METRIC: 0.5, "note": PAYLOADS[8], "nested": {"x": [PAYLOADS[3]]}, f"{METRIC}_curve": [0.1, 0.2]},
        data_snapshot={"source": PAYLOADS[7], "rows": [PAYLOADS[0]]},
    )
    hook = Webhook(url=PAYLOADS[6], description=PAYLOADS[1], secret="s" * 32, events=["batch.completed"])
    s.add_all([sft, hook])
    s.flush()
    # A blind evaluation of the two hostile-named models on a hostile held-out prompt with hostile outputs,
    # and a gold task (the other labeler's ranking) on the ranking batch.
    s.add(Prompt(batch_id=ranking.id, text=PAYLOADS[7], split="test", normalized_key="e" * 64))
    s.flush()
    evaluation = evaluations.start_evaluation(s, model_a_id=sft.id, model_b_id=base.id, n_prompts=1)
    ((prompt_id, _),) = evaluations.prompts_needing_output(s, evaluation, sft.id)
    store_samples(s, sft.id, {prompt_id: [PAYLOADS[0]]}, {})
    store_samples(s, base.id, {prompt_id: [PAYLOADS[3]]}, {})
    evaluations.open_for_judging(s, evaluation)
    order = foreign.display_order
    submissions.submit_ranking(
        s,
        other,
        foreign.id,
        [{"completion_id": c, "rank": i + 1, "likert": 4, "flags": []} for i, c in enumerate(order)],
    )
    gold.mark_consensus_gold(s, foreign.task_id, None, min_rankings=1)
    s.commit()
    return {
        "labeler": labeler.username,
        "admin": admin.username,
        "ranking": ranking.id,
        "demos": demos.id,
        "held": held.id,
        "foreign": foreign.id,
        "run": run.id,
        "failed": failed.id,
        "sft": sft.id,
        "base": base.id,
        "evaluation": evaluation.id,
    }


# --- browser ------------------------------------------------------------------------------------


@pytest.fixture
def browser_page(chromium) -> Iterator:
    """A page whose CSP is bypassed, so only escaping stands between a payload and the DOM."""
    context = chromium.new_context(bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(15000)
    page.dialogs = []  # type: ignore[attr-defined]
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    context.close()


def log_in(page, live_server: str, username: str, landing: str) -> None:
    page.goto(live_server + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(live_server + landing)


def assert_inert(page, *, visible: list[str] = (), values: dict[str, str] | None = None) -> None:
    """Asserts nothing from a payload ran or became markup, and the payloads read as text."""
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)  # autofocus, late image errors
    where = page.url
    assert page.evaluate("() => window.__xss") is None, where
    assert page.dialogs == [], where
    assert page.locator("[data-xss]").count() == 0, where
    assert page.locator("a[href^='javascript:' i], [src^='javascript:' i], iframe, object, embed").count() == 0, where
    inline = page.evaluate("""() => [...document.scripts].filter(s => !s.src && s.type !== 'application/json')
                                     .map(s => s.textContent)""")
    assert inline == [], where
    text = page.locator("body").inner_text()
    for shown in visible:
        assert shown in text, f"{shown!r} not shown as text on {where}"
    for selector, value in (values or {}).items():
        assert page.locator(selector).first.input_value() == value, (selector, where)


STALE = "stale: not rewritten by the page's script yet"


def wait_for_rewrite(page, root: str, fields: tuple[str, ...]) -> None:
    """Marks the script-written fields under `root` stale, then waits until the page's own poll has rewritten each.

    A fixed wait would pass whether or not the script ran; this waits for the rewrite itself, so the checks
    after it are on what the script wrote from the API's JSON.
    """
    page.locator(root).first.wait_for()
    args = [root, list(fields), STALE]
    page.evaluate(
        """([root, fields, stale]) => {
        const el = document.querySelector(root);
        for (const name of fields) el.querySelector(`[data-field="${name}"]`).textContent = stale;
    }""",
        args,
    )
    page.wait_for_function(
        """([root, fields, stale]) => {
        const el = document.querySelector(root);
        return fields.every((name) => !el.querySelector(`[data-field="${name}"]`).textContent.includes(stale));
    }""",
        arg=args,
        timeout=15000,
    )


# --- labeler pages ------------------------------------------------------------------------------


def test_labeler_pages_show_payloads_as_text(browser_page, live_server, hostile, committed_session):
    page = browser_page
    log_in(page, live_server, hostile["labeler"], "/label")
    assert_inert(page, visible=[f"Hello, {LABELER_NAME}"])

    page.goto(f"{live_server}/label/next?kind=demonstration")
    page.get_by_test_id("demonstration-page").wait_for()
    assert page.url.endswith(f"/label/assignments/{hostile['held']}")
    assert page.get_by_test_id("prompt").inner_text() == PAYLOADS[1]
    assert_inert(page, visible=[DEMO_BATCH, *PAYLOADS[2:]], values={"[data-testid=demonstration-text]": DRAFT})
    guide = page.get_by_test_id("guidelines")
    assert guide.locator("h3").inner_text() == PAYLOADS[0]  # markdown heading, text escaped
    assert guide.locator("li").inner_text() == PAYLOADS[1]
    assert guide.locator("a").count() == 0  # markdown links are not links

    page.goto(f"{live_server}/label/next?kind=ranking")
    page.get_by_test_id("ranking-page").wait_for()
    assignment_id = int(page.url.rsplit("/", 1)[1])
    shown = page.get_by_test_id("output-text").all_inner_texts()
    assert sorted(shown) == sorted(PAYLOADS[:9])
    assert page.get_by_test_id("prompt").inner_text() in (PAYLOADS[0], PAYLOADS[4])
    assert_inert(page, visible=[RANKING_BATCH])
    # The page shows the labeler's own new lease on the hostile ranking batch, not someone else's assignment.
    committed_session.rollback()  # see what the server committed
    leased = committed_session.get(Assignment, assignment_id)
    labeler_id = committed_session.scalar(select(User.id).where(User.username == hostile["labeler"]))
    assert (leased.labeler_id, leased.state) == (labeler_id, "leased") and leased.id != hostile["foreign"]
    assert committed_session.get(Task, leased.task_id).batch_id == hostile["ranking"]

    page.goto(f"{live_server}/label/next?kind=eval")
    page.get_by_test_id("eval-page").wait_for()
    assert page.get_by_test_id("prompt").inner_text() == PAYLOADS[7]
    assert sorted(
        [page.get_by_test_id("eval-text-left").inner_text(), page.get_by_test_id("eval-text-right").inner_text()]
    ) == sorted([PAYLOADS[0], PAYLOADS[3]])
    assert_inert(page, visible=[PAYLOADS[7]])

    page.goto(f"{live_server}/label/write")
    page.get_by_test_id("write-page").wait_for()
    assert_inert(page, visible=[DEMO_BATCH, PAYLOADS[2]])

    page.goto(f"{live_server}/label/assignments/{hostile['foreign']}")  # someone else's: an error page
    assert_inert(page)
    assert page.get_by_test_id("error-message").is_visible()


def test_skip_note_is_stored_verbatim_and_the_batch_page_stays_inert(
    browser_page, live_server, hostile, committed_session
):
    page = browser_page
    log_in(page, live_server, hostile["labeler"], "/label")
    page.goto(f"{live_server}/label/next?kind=ranking")
    page.get_by_test_id("ranking-page").wait_for()
    assignment_id = int(page.url.rsplit("/", 1)[1])
    page.get_by_test_id("skip-reason").select_option("other")
    page.get_by_test_id("skip-note").fill(SKIP_NOTE)
    page.get_by_test_id("skip-submit").click()
    page.wait_for_url(lambda url: not url.endswith(f"/{assignment_id}"))
    assert_inert(page)
    committed_session.rollback()  # see what the server committed
    stored = committed_session.get(Assignment, assignment_id)
    assert (stored.state, stored.skip_reason, stored.skip_note) == ("skipped", "other", SKIP_NOTE)

    log_in(page, live_server, hostile["admin"], "/admin")
    page.goto(f"{live_server}/admin/batches/{hostile['ranking']}")
    assert_inert(page, visible=[LABELER_NAME, "other", SKIP_NOTE])  # labelers, skip reasons and the note itself


# --- admin pages --------------------------------------------------------------------------------


def test_admin_pages_show_payloads_as_text(browser_page, live_server, hostile):
    page = browser_page
    log_in(page, live_server, hostile["admin"], "/admin")
    assert_inert(page, visible=[ADMIN_NAME, MODEL_NAME])

    page.goto(f"{live_server}/admin/batches")
    assert_inert(page, visible=[RANKING_BATCH, DEMO_BATCH])
    for batch in ("ranking", "demos"):
        page.goto(f"{live_server}/admin/batches/{hostile[batch]}")
        assert (
            page.get_by_test_id("batch-name")
            .inner_text()
            .startswith(RANKING_BATCH if batch == "ranking" else DEMO_BATCH)
        )
        assert_inert(
            page,
            visible=PAYLOADS[2:],
            values={
                "[data-testid=field-name]": RANKING_BATCH if batch == "ranking" else DEMO_BATCH,
                "[data-testid=field-guidelines]": GUIDELINES,
            },
        )

    page.goto(f"{live_server}/admin/batches/{hostile['ranking']}/quality")
    assert_inert(page, visible=[RANKING_BATCH])
    page.goto(f"{live_server}/admin/batches/{hostile['ranking']}/gold")
    assert_inert(page, visible=[RANKING_BATCH])
    page.goto(f"{live_server}/admin/labelers")
    assert_inert(page, visible=[LABELER_NAME])
    page.goto(f"{live_server}/admin/evaluations")
    assert_inert(page, visible=[MODEL_NAME, PAYLOADS[5][:128]])
    page.goto(f"{live_server}/admin/evaluations/{hostile['evaluation']}")
    assert_inert(page, visible=[MODEL_NAME, PAYLOADS[5][:128]])
    page.goto(f"{live_server}/admin/webhooks")
    assert_inert(page, visible=[PAYLOADS[6], PAYLOADS[1]])

    page.goto(f"{live_server}/admin/models")
    assert_inert(page, visible=[MODEL_NAME, PAYLOADS[5]])
    page.goto(f"{live_server}/admin/models/{hostile['sft']}")
    assert_inert(page, visible=[MODEL_NAME, PAYLOADS[4], PAYLOADS[8], PAYLOADS[7], METRIC])
    page.goto(f"{live_server}/admin/models/{hostile['base']}")
    assert_inert(page, visible=[PAYLOADS[5], MODEL_NAME])

    page.goto(f"{live_server}/admin/runs")
    wait_for_rewrite(page, f"[data-testid=run-row-{hostile['run']}]", ("status", "percent", "message"))
    assert page.get_by_test_id(f"run-row-{hostile['run']}").locator("[data-field=message]").inner_text() == PAYLOADS[2]
    assert_inert(page, visible=[PAYLOADS[2], PAYLOADS[1], SHORT])
    page.goto(f"{live_server}/admin/runs/{hostile['run']}")
    # The live run page, with its latest-metrics table built by script.
    wait_for_rewrite(page, "[data-testid=run]", ("message", "latest"))
    assert page.get_by_test_id("run-message").inner_text() == PAYLOADS[2]
    assert page.get_by_test_id("live-metrics").locator("th").all_inner_texts() == ["step", METRIC]
    page.get_by_test_id("run-traceback-details").locator("summary").click()  # the traceback starts folded
    assert_inert(page, visible=[PAYLOADS[2], PAYLOADS[4], PAYLOADS[6], METRIC, SHORT])
    page.goto(f"{live_server}/admin/runs/{hostile['failed']}")
    assert_inert(page, visible=[PAYLOADS[1], PAYLOADS[3]])


def test_admin_forms_echo_payloads_as_text(browser_page, live_server, hostile):
    page = browser_page
    log_in(page, live_server, hostile["admin"], "/admin")

    # A duplicate name: the form comes back with the error and everything typed, escaped.
    page.goto(f"{live_server}/admin/batches/new")
    page.get_by_test_id("field-name").fill(RANKING_BATCH)
    page.get_by_test_id("field-guidelines").fill(GUIDELINES)
    page.get_by_test_id("create-batch").click()
    page.get_by_test_id("form-error").wait_for()
    assert_inert(page, values={"[data-testid=field-name]": RANKING_BATCH, "[data-testid=field-guidelines]": GUIDELINES})

    # Run parameters that are not JSON come back in their textarea.
    page.goto(f"{live_server}/admin/runs")
    page.get_by_test_id("run-kind").select_option("ppo")
    page.fill("textarea[data-testid=run-params]", PAYLOADS[4])
    page.get_by_test_id("start-run").click()
    page.get_by_test_id("page-error").wait_for()
    assert_inert(page, values={"textarea[data-testid=run-params]": PAYLOADS[4]})

    # A tampered status value is echoed by the error page.
    page.goto(f"{live_server}/admin/batches/{hostile['ranking']}")
    page.locator("input[name=status]").first.evaluate("(el, v) => { el.value = v; }", PAYLOADS[2])
    page.locator("form[action$='/status'] button").first.click()
    page.get_by_test_id("error-message").wait_for()
    assert_inert(page, visible=[PAYLOADS[2]])


# --- login and error pages ----------------------------------------------------------------------


def test_login_page_echoes_payloads_as_text(browser_page, live_server, hostile):
    page = browser_page
    page.goto(f"{live_server}/login")
    page.fill("input[name=username]", ADMIN_NAME)
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    page.get_by_test_id("login-error").wait_for()
    assert_inert(page, values={"input[name=username]": ADMIN_NAME})

    for target in ('/"><svg onload=window.__xss=1 data-xss>', "javascript:window.__xss=1"):
        page.goto(f"{live_server}/login?next={target}")
        assert_inert(page)
    # A javascript: next falls back to the home page.
    page.fill("input[name=username]", hostile["labeler"])
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(live_server + "/label")
    assert_inert(page)

    response = page.goto(f"{live_server}/label/assignments/{PAYLOADS[1]}")  # not an id
    assert response.status == 422
    assert_inert(page)
    response = page.goto(f"{live_server}/admin/{PAYLOADS[0]}")  # no such page
    assert response.status == 404
    assert_inert(page)
