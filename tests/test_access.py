"""The access matrix: every route × every kind of caller gets exactly the expected answer.

Routes are discovered from the application itself, so a new route that no
rule below classifies fails this test until someone decides who may call it.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from starlette.routing import Mount

from app.models import UserSession, utcnow
from app.security import create_api_token
from tests.factories import AdminFactory, UserFactory

# (path pattern, who may call it). "public": anyone; "user": any signed-in user or token;
# a scope name: API callers holding it; "page:<role>": browser pages for that role only; "tokens": any
# signed-in user's session, or a token with the admin scope (tests/security/test_token_scope.py).
RULES: list[tuple[str, str]] = [
    (r"^/(login|healthz|favicon\.ico)$", "public"),
    (r"^/$", "redirect"),
    (r"^/(docs|docs/oauth2-redirect|api/v1/openapi\.json)$", "public"),
    (r"^/logout$", "page:any"),
    (r"^/account/password$", "page:any"),
    (r"^/label(/.*)?$", "page:labeler"),
    (r"^/admin(/.*)?$", "page:admin"),
    (r"^/api/v1/me$", "user"),
    (r"^/api/v1/tokens(/.*)?$", "tokens"),
    (r"^/api/v1/export(/.*)?$", "export:read"),
    (r"^/api/v1/(tasks|assignments|prompts/written|prompts/writable-batches)(/.*)?$", "label"),
    (r"^/api/v1/(batches|models|runs|webhooks|evaluations|users|audit)(/.*)?$", "admin"),
]
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def _walk(routes, prefix: str = ""):
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:  # FastAPI >= 0.160 wraps included routers
            context = getattr(route, "include_context", None)
            yield from _walk(original.routes, prefix + (getattr(context, "prefix", "") or ""))
        elif isinstance(route, Mount):
            continue  # /static
        elif hasattr(route, "methods"):
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                yield method, prefix + route.path


def all_routes() -> list[tuple[str, str]]:
    from app.main import create_app

    return sorted(set(_walk(create_app().routes)))


def rule_for(path: str) -> str:
    for pattern, rule in RULES:
        if re.match(pattern, path):
            return rule
    raise AssertionError(f"route {path} is not classified in tests/test_access.py RULES")


def test_every_route_is_classified():
    routes = all_routes()
    assert len(routes) > 30
    for _, path in routes:
        rule_for(path)


def _concrete(path: str) -> str:
    # An id that exists nowhere: a route must check access before it looks anything up (and the matrix
    # must not, say, revoke its own tokens).
    return re.sub(r"\{[^}]+\}", "987654", path)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _session_headers(client, username: str) -> tuple[dict, str]:
    from tests.factories import PASSWORD

    client.cookies.clear()
    form = client.get("/login")
    client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": _csrf(form.text)},
        follow_redirects=False,
    )
    cookie = client.cookies.get("il_session")
    page = client.get("/admin" if username.startswith("admin") else "/label")
    return {"cookie": f"il_session={cookie}", "x-csrf-token": _csrf(page.text)}, cookie


def _denied_anonymous(response) -> bool:
    return response.status_code == 401 or (
        response.status_code == 303 and response.headers.get("location", "").startswith("/login")
    )


def _expected(rule: str, caller: str) -> str:
    """Returns 'allow', 'anonymous' (401 or redirect to login) or 'forbidden' (403)."""
    if rule == "public":
        return "allow"
    if rule == "redirect":
        return "any"
    kind, _, detail = caller.partition(":")
    if kind in ("anonymous", "revoked", "expired"):
        return "anonymous"
    if rule.startswith("page:"):
        role = rule.split(":")[1]
        if kind == "token":
            return "anonymous"  # pages need a browser session
        return "allow" if role in ("any", detail) else "forbidden"
    if rule == "user" or (rule == "tokens" and kind == "session"):
        return "allow"
    if rule == "tokens":
        return "allow" if detail == "admin" else "forbidden"
    if kind == "session":
        return (
            "allow"
            if rule in {"labeler": {"label"}, "admin": {"label", "export:read", "admin"}}[detail]
            else "forbidden"
        )
    return "allow" if detail == rule else "forbidden"


def test_access_matrix(client, db):
    labeler, admin = UserFactory(), AdminFactory()
    tokens = {
        scope: create_api_token(db, admin if scope != "label" else labeler, [scope])[0]
        for scope in ("export:read", "label", "admin")
    }
    revoked_raw, revoked = create_api_token(db, admin, ["admin"])
    revoked.revoked_at = utcnow()
    db.flush()
    sessions = {
        role: _session_headers(client, user.username) for role, user in (("labeler", labeler), ("admin", admin))
    }
    expired_headers, _ = _session_headers(client, AdminFactory().username)
    for row in db.query(UserSession).all():
        if row.user_id not in (labeler.id, admin.id):
            row.expires_at = utcnow() - timedelta(minutes=1)
    db.flush()
    client.cookies.clear()

    callers: dict[str, dict] = {
        "anonymous": {},
        "revoked:token": {"authorization": f"Bearer {revoked_raw}"},
        "expired:session": expired_headers,
    }
    callers |= {f"session:{role}": headers for role, (headers, _) in sessions.items()}
    callers |= {f"token:{scope}": {"authorization": f"Bearer {raw}"} for scope, raw in tokens.items()}

    failures = []
    for method, path in all_routes():
        rule = rule_for(path)
        if path in ("/logout",):
            continue  # ends the session it is called with; covered in test_auth.py
        for caller, headers in callers.items():
            client.cookies.clear()
            response = client.request(
                method, _concrete(path), headers=headers, follow_redirects=False, json={} if method in UNSAFE else None
            )
            expected = _expected(rule, caller)
            status = response.status_code
            ok = {
                "allow": status < 500 and status not in (401, 403) and not _denied_anonymous(response),
                "anonymous": _denied_anonymous(response),
                "forbidden": status == 403,
                "any": status < 500,
            }[expected]
            if status >= 500 or not ok:
                failures.append(f"{method} {path} as {caller}: {status}, expected {expected}")
    assert not failures, "\n".join(failures)


def test_state_changing_routes_refuse_a_session_without_csrf(client, db):
    labeler, admin = UserFactory(), AdminFactory()
    failures = []
    for role, user in (("labeler", labeler), ("admin", admin)):
        headers, _ = _session_headers(client, user.username)
        headers.pop("x-csrf-token")
        for method, path in all_routes():
            rule = rule_for(path)
            if method not in UNSAFE or rule in ("public", "redirect") or path == "/logout":
                continue
            if _expected(rule, f"session:{role}") != "allow":
                continue
            client.cookies.clear()
            response = client.request(method, _concrete(path), headers=headers, json={}, follow_redirects=False)
            if response.status_code != 403:
                failures.append(f"{method} {path} as {role} without CSRF: {response.status_code}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", ["/label", "/admin"])
def test_pages_send_anonymous_visitors_to_login(client, path):
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/login?next={path}"
