"""Honest pages (issue 20): one styled error page with the navigation for every HTML 4xx/5xx (JSON stays for the
API), a favicon, a login through `next` that keeps its query string and never leaves the site, and a bad
assignment id said in words a labeler understands."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import User
from app.security import hash_password
from tests.factories import PASSWORD, AdminFactory, UserFactory

HTML = {"accept": "text/html,application/xhtml+xml"}


def test_a_403_and_a_bad_assignment_keep_the_navigation_and_speak_plainly(client, db, login):
    login(UserFactory().username)
    forbidden = client.get("/admin", headers=HTML)
    assert forbidden.status_code == 403
    assert 'href="/label"' in forbidden.text and "Log out" in forbidden.text
    assert 'data-testid="error-title">Not allowed<' in forbidden.text

    missing = client.get("/label/assignments/99999", headers=HTML)
    assert missing.status_code == 404 and 'href="/label"' in missing.text
    message = re.search(r'data-testid="error-message">([^<]*)<', missing.text).group(1)
    assert message == "Task 99999 is not one of your tasks (or it no longer exists). My tasks has your next one."
    assert "assignment_id" not in missing.text


def test_server_errors_answer_the_error_page_and_json_for_the_api(app, db):
    def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/admin/boom", boom)
    app.add_api_route("/api/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        page = client.get("/admin/boom", headers=HTML)
        api = client.get("/api/v1/boom", headers=HTML)
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert 'href="/static/app.css"' in page.text and "a bug" not in page.text
    assert 'data-testid="error-message">Something went wrong on our side' in page.text
    assert api.status_code == 500 and api.json()["code"] == "error" and "a bug" not in api.text


def test_the_favicon_is_served_and_linked(client, db):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] in ("image/x-icon", "image/vnd.microsoft.icon")
    assert icon.content[:4] == b"\x00\x00\x01\x00"
    login_page = client.get("/login").text
    href = re.search(r'<link rel="icon" href="([^"]+)"', login_page).group(1)
    assert client.get(href).status_code == 200


def _login_form(client, next_url: str) -> str:
    form = client.get("/login", params={"next": next_url})
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    hidden = re.search(r'name="next" value="([^"]*)"', form.text).group(1)
    response = client.post(
        "/login",
        data={"username": "nextuser", "password": PASSWORD, "csrf_token": token, "next": hidden.replace("&amp;", "&")},
        follow_redirects=False,
    )
    assert response.status_code == 303
    return response.headers["location"]


def test_login_through_next_keeps_the_query_string_and_stays_on_the_site(client, db):
    AdminFactory(username="nextuser")
    wanted = "/admin/batches?status=draft&page=2"
    bounced = client.get(wanted, follow_redirects=False)
    assert bounced.status_code == 303 and bounced.headers["location"] == "/login?next=" + quote(wanted, safe="/")
    assert _login_form(client, wanted) == wanted
    for elsewhere in ("//evil.example", "/\\evil.example", "https://evil.example/", "/\t/evil.example", " //evil"):
        client.cookies.clear()
        assert _login_form(client, elsewhere) == "/admin", elsewhere


@pytest.mark.slow
@pytest.mark.browser
def test_unknown_pages_and_wrong_methods_get_the_styled_page_with_navigation(
    live_server, committed_session, page, tmp_path
):
    committed_session.add(User(username="lost-admin", role="admin", password_hash=hash_password(PASSWORD)))
    committed_session.commit()
    assert committed_session.scalar(select(User.id).where(User.username == "lost-admin"))
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.goto(f"{live_server}/login")
    page.fill("input[name=username]", "lost-admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin")
    assert missing == []  # the favicon too

    answer = page.goto(f"{live_server}/admin/no-such-page")
    assert answer.status == 404
    assert page.get_by_test_id("error-title").inner_text() == "Page not found"
    assert page.locator("nav a[href='/admin/batches']").is_visible()
    assert page.get_by_test_id("whoami").inner_text().startswith("lost-admin")
    page.screenshot(path=str(tmp_path / "404.png"))

    wrong = page.goto(f"{live_server}/logout")  # a form's address opened as a link
    assert wrong.status == 405
    assert page.get_by_test_id("error-title").inner_text() == "Wrong kind of request"
    assert page.locator("nav a[href='/admin/batches']").is_visible()
    assert missing == [f"{live_server}/admin/no-such-page"]


# -- wording (issue 20) -------------------------------------------------------------------------------------


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_counts_names_and_separators_read_as_words(client, db, login):
    from app.runs import start_run
    from tests.factories import BatchFactory

    login(AdminFactory().username)
    UserFactory()  # the one active labeler
    home = _text(client.get("/admin").text)
    assert "1 active labeler" in home and "1 active labelers" not in home

    models = _text(client.get("/admin/models").text)
    assert "No reward model versions yet." in models and "No rm versions yet." not in models

    runs = _text(client.get("/admin/runs").text)
    assert "Nothing is due." in runs and "Due: none." not in runs

    run = start_run(db, "sample", batch_id=BatchFactory().id, triggered_by="batch-start")
    db.flush()
    page = client.get(f"/admin/runs/{run.id}").text
    for paragraph in re.findall(r'<p class="muted">(.*?)</p>', page, re.S):
        words = _text(paragraph)
        assert not words.startswith("·") and not words.endswith("·") and "· ·" not in words, words


def test_the_dashboard_links_its_ids_and_gives_progress_a_figure(client, db, login):
    from app.runs import start_run
    from tests.factories import ModelVersionFactory

    login(AdminFactory().username)
    model = ModelVersionFactory(name="tiny-base")
    run = start_run(db, "sft", triggered_by="admin")
    run.progress = 0.25
    db.flush()
    home = client.get("/admin").text
    assert f'<a href="/admin/runs/{run.id}">{run.id}</a>' in home
    assert f'<a href="/admin/models/{model.id}">tiny-base</a>' in home
    assert re.search(r"</progress>\s*25%", home)


def test_the_batch_page_counts_one_task_in_the_singular(client, db, login):
    from app.models import Task
    from tests.factories import BatchFactory, PromptFactory

    login(AdminFactory().username)
    batch = BatchFactory(status="labeling", wants_rankings=False)
    db.add(Task(batch_id=batch.id, prompt_id=PromptFactory(batch_id=batch.id).id, kind="demonstration", needed=1))
    db.flush()
    page = _text(client.get(f"/admin/batches/{batch.id}").text)
    assert "0 / 1 1 task " in page and "1 tasks" not in page
