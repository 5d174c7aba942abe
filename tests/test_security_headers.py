"""Security headers, cookies, sessions, the login rate limit and paths that must not escape their folders.

- Every response (pages, API answers, errors, redirects, static files, a
  413) carries a CSP without inline script, nosniff, and frame-ancestors
  'none' plus X-Frame-Options DENY; only /docs has Swagger's looser CSP.
- Every page is rendered with real data and scanned: no inline script
  code, no inline event handlers, no style attributes or <style>, no
  javascript: URLs, scripts only from /static, and a CSRF token in every
  POST form. Pages are discovered from the app, so a new page is scanned
  as soon as it exists (and fails here until it gets an id to render).
- Session and login-form cookies are HttpOnly and SameSite=Lax, and Secure
  when INSTRUCTLOOP_PUBLIC_BASE_URL is https (which also turns on HSTS).
- Logging in always starts a new session: a planted cookie is never
  promoted to the victim's account. Guessing passwords from one address
  across many accounts gets 429, even with the right password.
- Static files, uploaded file names, export file names and training-run
  parameters cannot reach outside their directories.
"""

from __future__ import annotations

import http.client
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.collection.sampling import store_samples
from app.config import get_settings
from app.labeling import leases, submissions
from app.models import ModelVersion, Prompt, TrainingRun, User, Webhook
from app.quality import evaluations
from app.security import LOGIN_CSRF_COOKIE, SESSION_COOKIE, create_api_token
from tests.factories import PASSWORD, AdminFactory, UserFactory
from tests.test_access import all_routes
from tests.test_labeling import items_for, seed_batch

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _csrf(html: str) -> str:
    return CSRF.search(html).group(1)


def _directives(csp: str) -> dict[str, set[str]]:
    parsed = {}
    for part in filter(str.strip, csp.split(";")):
        name, *values = part.split()
        parsed[name.lower()] = set(values)
    return parsed


def assert_hardened(response, where: str = "") -> None:
    """Asserts a response carries the strict CSP, nosniff and both anti-framing headers."""
    where = where or f"{response.request.method} {response.request.url.path} ({response.status_code})"
    csp = _directives(response.headers.get("content-security-policy", ""))
    assert csp.get("default-src") == {"'self'"}, where
    assert csp.get("script-src") == {"'self'"}, where  # no 'unsafe-inline', 'unsafe-eval', data: or hosts
    assert "'unsafe-inline'" not in csp.get("style-src", {"'unsafe-inline'"}), where
    assert csp.get("object-src") == {"'none'"} and csp.get("base-uri") == {"'self'"}, where
    assert csp.get("frame-ancestors") == {"'none'"}, where
    assert response.headers.get("x-content-type-options") == "nosniff", where
    assert response.headers.get("x-frame-options") == "DENY", where


# --- headers ------------------------------------------------------------------------------------


def test_api_answers_errors_redirects_and_static_files_carry_the_headers(client, db):
    admin = AdminFactory()
    raw, _ = create_api_token(db, admin, ["admin", "export:read"])
    bearer = {"authorization": f"Bearer {raw}"}
    responses = [
        client.get("/api/v1/me", headers=bearer),  # 200 JSON
        client.get("/api/v1/me"),  # 401
        client.get("/api/v1/batches/987654", headers=bearer),  # 404
        client.get("/api/v1/runs?limit=0", headers=bearer),  # 422
        client.post(
            "/api/v1/tokens",
            content=b"x" * (get_settings().max_body_bytes + 1),
            headers={"content-type": "application/json"},
        ),  # 413 from the body limit
        client.get("/api/v1/export/rankings", headers=bearer),  # a streamed export
        client.get("/api/v1/openapi.json"),
        client.get("/healthz"),
        client.get("/static/app.css"),
        client.get("/label", follow_redirects=False),  # 303 to the login page
        client.get("/no/such/page", headers={"accept": "text/html"}),  # 404
    ]
    assert [r.status_code for r in responses] == [200, 401, 404, 422, 413, 200, 200, 200, 200, 303, 404]
    for response in responses:
        assert_hardened(response)


def test_docs_alone_has_the_swagger_policy_and_still_refuses_framing(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "'unsafe-inline'" in docs.headers["content-security-policy"]  # Swagger UI's inline bootstrap
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]
    assert docs.headers["x-frame-options"] == "DENY" and docs.headers["x-content-type-options"] == "nosniff"
    assert_hardened(client.get("/docs/oauth2-redirect"))


# --- every page, rendered and scanned -----------------------------------------------------------


class PageScan(HTMLParser):
    """Collects what a strict CSP would block, or what would let injected markup act, in one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.in_inline_script = False
        self.forms: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...> inline event handler")
            if name == "style":
                self.problems.append(f"<{tag} style=...> style attribute")
            if name in ("href", "src", "action", "formaction", "xlink:href") and (
                value or ""
            ).strip().lower().startswith(("javascript:", "data:text/html")):
                self.problems.append(f"<{tag} {name}={value!r}> script URL")
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            src = found.get("src")
            if src is None and found.get("type") != "application/json":
                self.in_inline_script = True
                self.problems.append("inline <script> with code")
            elif src is not None and not src.startswith("/static/"):
                self.problems.append(f"<script src={src!r}> from elsewhere")
        if tag == "form":
            self.forms.append(
                {"method": (found.get("method") or "get").lower(), "action": found.get("action"), "csrf": False}
            )
        if tag == "input" and found.get("name") == "csrf_token" and self.forms and found.get("value"):
            self.forms[-1]["csrf"] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_inline_script = False


def scan(html: str) -> list[str]:
    """Returns the CSP-relevant problems of a page, and POST forms without a CSRF token."""
    parser = PageScan()
    parser.feed(html)
    parser.close()
    missing = [
        f"POST form to {f['action']} without csrf_token"
        for f in parser.forms
        if f["method"] == "post" and not f["csrf"]
    ]
    return parser.problems + missing


def test_scanner_finds_what_it_looks_for():
    bad = (
        '<script>alert(1)</script><p style="color:red" onclick="x()"><a href="javascript:x()">a</a>'
        '<style>p{}</style><script src="https://cdn.example/x.js"></script><form method="post"></form>'
    )
    assert len(scan(bad)) == 7
    assert (
        scan(
            '<script type="application/json" id="d">{"a": "</b>"}</script><script src="/static/a.js"></script>'
            '<form method="post"><input type="hidden" name="csrf_token" value="t"></form>'
        )
        == []
    )


def _world(db) -> dict[str, int]:
    """Seeds data so every page renders in full: batches with labels, a draft, models with curves, runs."""
    labeler, other = UserFactory(), UserFactory()
    ranking = seed_batch(db, n_prompts=3, k=4, overlap=1, guidelines="# Rules\n\n- be **brief**\n- `code`")
    demos = seed_batch(db, n_prompts=2, rankings=False, demonstrations=True)
    demos.allow_prompt_writing = True
    draft = seed_batch(db, n_prompts=1)
    draft.status = "draft"
    for _ in range(2):  # finished labels give the batch page its charts and tables
        done = leases.lease_next_task(db, other, "ranking")
        submissions.submit(db, other, done.id, items=items_for(done), active_seconds=12.0)
    skipped = leases.lease_next_task(db, other, "ranking")
    submissions.skip(db, other, skipped.id, "other", "not sure")
    held_ranking = leases.lease_next_task(db, labeler, "ranking")
    held_demo = leases.lease_next_task(db, labeler, "demonstration")
    base = db.query(ModelVersion).first()
    run = TrainingRun(
        kind="sft",
        status="running",
        progress=0.4,
        message="step 2/5",
        params={"epochs": 2},
        metrics={"curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]},
    )
    db.add(run)
    db.flush()
    sft = ModelVersion(
        name=f"sft-{uuid.uuid4().hex[:6]}",
        kind="sft",
        status="ready",
        artifact_path="/x",
        parent_id=base.id,
        training_run_id=run.id,
        metrics={"loss_curve": [2.0, 1.0], "acc": 0.5},
        data_snapshot={"demonstrations": 10, "ids": [1, 2]},
    )
    hook = Webhook(url="http://127.0.0.1:9/hook", secret="s" * 32, events=["batch.completed"])
    db.add_all([sft, hook])
    db.flush()
    # A blind evaluation with one verdict given and one comparison held by the labeler.
    db.add(Prompt(batch_id=ranking.id, text="A held-out prompt", split="test", normalized_key="d" * 64))
    db.flush()
    evaluation = evaluations.start_evaluation(db, model_a_id=sft.id, model_b_id=base.id, n_prompts=1, overlap=2)
    ((prompt_id, _),) = evaluations.prompts_needing_output(db, evaluation, sft.id)
    store_samples(db, sft.id, {prompt_id: ["four"]}, {})
    store_samples(db, base.id, {prompt_id: ["five"]}, {})
    evaluations.open_for_judging(db, evaluation)
    judged = leases.lease_next_task(db, other, "eval")
    submissions.submit(db, other, judged.id, choice=judged.display_order[0])
    held_eval = leases.lease_next_task(db, labeler, "eval")
    return {
        "labeler_id": labeler.id,
        "batch_id": draft.id,
        "version_id": sft.id,
        "run_id": run.id,
        "webhook_id": hook.id,
        "assignment_id": held_ranking.id,
        "demo_assignment": held_demo.id,
        "labeling_batch": ranking.id,
        "evaluation_id": evaluation.id,
        "eval_assignment": held_eval.id,
    }


def _page_urls(ids: dict[str, int]) -> dict[str, list[str]]:
    """Every GET page of the app, with ids filled in, by who must look at it."""
    urls: dict[str, list[str]] = {"anonymous": [], "labeler": [], "admin": []}
    for method, path in all_routes():
        if method != "GET" or path.startswith(("/api/", "/docs", "/healthz", "/static", "/favicon.ico")) or path == "/":
            continue
        names = re.findall(r"\{([^}]+)\}", path)
        unknown = [n for n in names if n not in ids]
        assert not unknown, f"{path}: give tests/test_security_headers.py an id for {unknown} to render it"
        url = re.sub(r"\{([^}]+)\}", lambda m: str(ids[m.group(1)]), path)
        who = "admin" if path.startswith("/admin") else "labeler" if path.startswith("/label") else "anonymous"
        urls[who].append(url)
    urls["labeler"].append(f"/label/assignments/{ids['demo_assignment']}")  # the demonstration page too
    urls["labeler"].append(f"/label/assignments/{ids['eval_assignment']}")  # and the blind comparison page
    urls["admin"].append(f"/admin/batches/{ids['labeling_batch']}")  # a started batch with activity
    return urls


@contextmanager
def _session(client, username: str) -> Iterator[None]:
    client.cookies.clear()
    form = client.get("/login")
    response = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": _csrf(form.text)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    yield
    client.cookies.clear()


def test_every_page_renders_without_inline_script_handlers_or_styles(client, db):
    ids = _world(db)
    admin = AdminFactory()
    labeler = db.get(User, ids["labeler_id"])
    pages = _page_urls(ids)
    scanned, problems = [], []

    def check(url: str, response, status: int = 200) -> None:
        assert response.status_code == status and response.headers["content-type"].startswith("text/html"), (
            url,
            response.status_code,
            response.text[:300],
        )
        assert_hardened(response, url)
        problems.extend(f"{url}: {p}" for p in scan(response.text))
        scanned.append(url)

    for url in pages["anonymous"]:
        check(url, client.get(url))
    form = client.get("/login")
    check(
        "/login, wrong password",
        client.post(
            "/login", data={"username": labeler.username, "password": "wrong password", "csrf_token": _csrf(form.text)}
        ),
        401,
    )
    for who, user in (("labeler", labeler), ("admin", admin)):
        with _session(client, user.username):
            for url in pages[who]:
                check(url, client.get(url))
            other_side = "/admin" if who == "labeler" else "/label"
            check(f"{other_side} as {who}", client.get(other_side, headers={"accept": "text/html"}), 403)
    assert not problems, "\n".join(problems)
    assert len(scanned) >= 16, scanned


# --- cookies and sessions -----------------------------------------------------------------------


def _cookie(response, name: str):
    for header in response.headers.get_list("set-cookie"):
        parsed = SimpleCookie()
        parsed.load(header)
        if name in parsed and parsed[name].value:
            return parsed[name]
    raise AssertionError(f"no {name} cookie set")


@contextmanager
def _public_url(url: str) -> Iterator[None]:
    """Runs the app as if deployed at `url` (settings are read once per process, so the cache is reset)."""
    previous = os.environ.get("INSTRUCTLOOP_PUBLIC_BASE_URL")
    os.environ["INSTRUCTLOOP_PUBLIC_BASE_URL"] = url
    get_settings.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("INSTRUCTLOOP_PUBLIC_BASE_URL", None)
        else:
            os.environ["INSTRUCTLOOP_PUBLIC_BASE_URL"] = previous
        get_settings.cache_clear()


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8000", "https://labels.example.org"])
def test_cookie_flags_follow_the_public_url(request, db, base_url):
    user = UserFactory()
    https = base_url.startswith("https")
    with _public_url(base_url):
        app = request.getfixturevalue("app")  # built now, with these settings
        with TestClient(app, base_url="https://testserver" if https else "http://testserver") as client:
            form = client.get("/login")
            login_cookie = _cookie(form, LOGIN_CSRF_COOKIE)
            response = client.post(
                "/login",
                data={"username": user.username, "password": PASSWORD, "csrf_token": _csrf(form.text)},
                follow_redirects=False,
            )
            assert response.status_code == 303
            session_cookie = _cookie(response, SESSION_COOKIE)
            for cookie in (login_cookie, session_cookie):
                assert cookie["httponly"] is True and cookie["samesite"].lower() == "lax"
                assert bool(cookie["secure"]) is https
                assert cookie["path"] == "/"
            assert ("strict-transport-security" in response.headers) is https
            assert client.get("/api/v1/me").json()["username"] == user.username


def test_login_starts_a_new_session_and_never_adopts_a_planted_one(client, db):
    attacker, victim = UserFactory(), UserFactory()
    with _session(client, attacker.username):
        planted = client.cookies.get(SESSION_COOKIE)
    client.cookies.set(SESSION_COOKIE, planted)  # fixation: the victim's browser carries the attacker's session
    form = client.get("/login")
    response = client.post(
        "/login",
        data={"username": victim.username, "password": PASSWORD, "csrf_token": _csrf(form.text)},
        follow_redirects=False,
    )
    issued = _cookie(response, SESSION_COOKIE).value
    assert issued != planted
    client.cookies.clear()

    def whoami(cookie: str) -> str:
        return client.get("/api/v1/me", headers={"cookie": f"{SESSION_COOKIE}={cookie}"}).json()["username"]

    assert (whoami(issued), whoami(planted)) == (victim.username, attacker.username)


def test_guessing_across_accounts_from_one_address_is_rate_limited(client):
    settings = get_settings()
    per_ip = settings.login_max_failures * 4
    users = [UserFactory() for _ in range(per_ip // (settings.login_max_failures - 1) + 1)]
    statuses = []
    for i in range(per_ip):
        # Fewer failures per account than the per-account limit: only the per-address limit can stop this.
        user = users[i // (settings.login_max_failures - 1)]
        form = client.get("/login")
        statuses.append(
            client.post(
                "/login", data={"username": user.username, "password": f"guess-{i}", "csrf_token": _csrf(form.text)}
            ).status_code
        )
    assert statuses == [401] * per_ip
    form = client.get("/login")
    fresh = users[-1]
    blocked = client.post(
        "/login", data={"username": fresh.username, "password": PASSWORD, "csrf_token": _csrf(form.text)}
    )
    assert blocked.status_code == 429 and "Too many failed attempts" in blocked.text
    assert SESSION_COOKIE not in client.cookies


# --- paths that must stay inside their folders --------------------------------------------------


def _raw_get(base_url: str, raw_path: str) -> tuple[int, bytes]:
    """Sends a request line exactly as given (http.client does not normalise '..' the way URL libraries do)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "raw_path",
    [
        "/static/../config.py",
        "/static/../../pyproject.toml",
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/%252e%252e/%252e%252e/pyproject.toml",
        "/static/....//....//pyproject.toml",
        "/static/..\\..\\pyproject.toml",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
    ],
)
def test_static_files_stay_in_their_folder(live_server, raw_path):
    status, body = _raw_get(live_server, raw_path)
    assert status in (400, 404), (raw_path, status)
    assert b"[project]" not in body and b"root:" not in body and b"get_settings" not in body
    assert _raw_get(live_server, "/static/app.css")[0] == 200  # the folder itself serves


@pytest.mark.parametrize(
    "filename",
    ["../../../../../../tmp/{tag}.jsonl", "..\\..\\{tag}.jsonl", "/tmp/{tag}.jsonl", "....//....//tmp/{tag}.jsonl"],
)
def test_uploaded_file_names_write_nothing_anywhere(client, db, login, filename):
    from app.models import Prompt, PromptBatch

    admin = AdminFactory()
    csrf = login(admin.username)
    batch = PromptBatch(name=f"upload-{uuid.uuid4().hex[:6]}", status="draft")
    db.add(batch)
    db.flush()
    tag = f"il-escape-{uuid.uuid4().hex}"
    name = filename.format(tag=tag)
    content = b'{"text": "What is 2 + 2?", "source_user_id": "u1"}\n'
    page = client.post(
        f"/admin/batches/{batch.id}/prompts",
        data={"csrf_token": csrf},
        files={"file": (name, content, "application/x-ndjson")},
        follow_redirects=False,
    )
    assert page.status_code == 303, page.text[:500]
    api = client.post(
        f"/api/v1/batches/{batch.id}/prompts",
        headers={"x-csrf-token": csrf},
        files={"file": (name, content, "application/x-ndjson")},
    )
    assert api.status_code == 201, api.text
    assert db.query(Prompt).filter(Prompt.batch_id == batch.id).count() == 1  # kept as a row, not a file
    data_dir = get_settings().data_dir
    for base in (Path.cwd(), data_dir, data_dir / "artifacts", Path("/tmp")):
        assert not (base / name).resolve().exists() and not (base / Path(name).name).exists()
    assert not [p for p in data_dir.rglob("*") if tag in p.name]


def test_export_file_names_come_from_the_server_only(client, db):
    admin = AdminFactory()
    raw, _ = create_api_token(db, admin, ["export:read"])
    bearer = {"authorization": f"Bearer {raw}"}
    for kind in ("demonstrations", "comparisons", "rankings"):
        for query in ("", "?format=csv", "?compress=gzip", "?format=csv&compress=gzip"):
            response = client.get(f"/api/v1/export/{kind}{query}", headers=bearer)
            assert response.status_code == 200
            disposition = response.headers["content-disposition"]
            assert re.fullmatch(rf'attachment; filename="{kind}\.(jsonl|csv)(\.gz)?"', disposition), disposition
        for hostile in ("../../etc/passwd", "jsonl/../../x", "csv%00.sh"):
            assert client.get(f"/api/v1/export/{kind}", params={"format": hostile}, headers=bearer).status_code == 422


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo", "pretrain"])
def test_run_parameters_cannot_name_output_paths(client, db, kind):
    admin = AdminFactory()
    raw, _ = create_api_token(db, admin, ["admin"])
    bearer = {"authorization": f"Bearer {raw}"}
    # The worker writes only under artifacts/models/<kind>-run<id> and artifacts/runs/<id>; a run's params
    # may not point it elsewhere, nor at another model to load.
    for key in ("out_dir", "output_dir", "checkpoint_dir", "model_path", "base_model_path", "artifact_path"):
        response = client.post(
            "/api/v1/runs", json={"kind": kind, "params": {key: "../../../../tmp/evil"}}, headers=bearer
        )
        assert response.status_code == 422, (kind, key, response.text)
        assert response.json()["detail"].startswith(f"params.{key}:")
    assert db.query(TrainingRun).count() == 0
