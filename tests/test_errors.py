"""One error base (app.errors): every 4xx of the API has the same JSON shape, documented once in OpenAPI, and
a form page refused by a service comes back with the message and what the user typed."""

from __future__ import annotations

import html
import re

import pytest

from app.collection.batches import BatchError
from app.errors import AppError, Conflict, FieldError, NotFound, code_for
from app.export.stream import ExportError
from app.registry.versions import RegistryError
from app.runs import RunError
from app.security import CredentialError, create_api_token
from app.webhooks.service import WebhookError
from tests.factories import AdminFactory, UserFactory

SHAPE = {"detail", "code", "field", "message"}


@pytest.fixture
def admin_auth(db):
    raw, _ = create_api_token(db, AdminFactory(), ["admin"])
    return {"authorization": f"Bearer {raw}"}


@pytest.fixture
def labeler_auth(db):
    raw, _ = create_api_token(db, UserFactory(), ["label"])
    return {"authorization": f"Bearer {raw}"}


def error_of(response, status: int, code: str) -> dict:
    """Checks a 4xx answer's shape, status and code; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= SHAPE, body
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert body["field"] is None or isinstance(body["field"], str)
    return body


def test_service_errors_say_field_and_message_in_one_shape(client, admin_auth):
    created = client.post("/api/v1/batches", json={"name": "shape"}, headers=admin_auth)
    assert created.status_code == 201
    batch_id = created.json()["id"]

    conflict = error_of(client.post("/api/v1/batches", json={"name": "shape"}, headers=admin_auth), 409, "conflict")
    assert (conflict["field"], conflict["message"]) == ("name", "a batch called 'shape' already exists")
    assert conflict["detail"] == "name: a batch called 'shape' already exists"

    refused = client.patch(
        f"/api/v1/batches/{batch_id}", json={"wants_demonstrations": False, "wants_rankings": False}, headers=admin_auth
    )
    invalid = error_of(refused, 422, "invalid")
    assert invalid["field"] == "wants_rankings"
    assert invalid["detail"] == f"wants_rankings: {invalid['message']}"

    empty = error_of(client.post(f"/api/v1/batches/{batch_id}/start", headers=admin_auth), 409, "conflict")
    assert empty["field"] == "prompts"

    binary = client.post(
        f"/api/v1/batches/{batch_id}/prompts",
        content=b"PK\x03\x04rest of a zip",
        headers={**admin_auth, "content-type": "application/octet-stream"},
    )
    assert error_of(binary, 415, "unsupported_media_type")["field"] == "file"


def test_not_found_validation_and_access_errors_have_the_same_shape(client, admin_auth, labeler_auth):
    missing = error_of(client.get("/api/v1/batches/999999", headers=admin_auth), 404, "not_found")
    assert missing["detail"] == missing["message"] == "batch 999999 not found" and missing["field"] is None

    beyond = error_of(client.get(f"/api/v1/batches/{2**70}", headers=admin_auth), 404, "not_found")
    assert beyond["field"] == "batch_id" and beyond["detail"] == f"batch_id: no such id {2**70}"

    no_route = error_of(client.get("/api/v1/no-such-thing", headers=admin_auth), 404, "not_found")
    assert no_route["detail"] == "Not Found"
    error_of(client.put("/api/v1/batches", headers=admin_auth), 405, "method_not_allowed")

    # FastAPI's own validation: every problem in `errors`, the first one as field and message.
    bad = error_of(client.post("/api/v1/batches", json={"name": "", "k": 99}, headers=admin_auth), 422, "invalid")
    assert {e["field"] for e in bad["errors"]} == {"name", "k"}
    assert (bad["field"], bad["message"]) == (bad["errors"][0]["field"], bad["errors"][0]["message"])
    assert bad["detail"] == "; ".join(f"{e['field']}: {e['message']}" for e in bad["errors"])

    anonymous = error_of(client.get("/api/v1/batches"), 401, "unauthorized")
    assert anonymous["detail"] == "Authentication required"
    error_of(client.get("/api/v1/batches", headers={"authorization": "Bearer il_nope"}), 401, "unauthorized")
    forbidden = error_of(client.get("/api/v1/batches", headers=labeler_auth), 403, "forbidden")
    assert forbidden["detail"] == "This needs the 'admin' scope"

    # An API path answers JSON even to a browser.
    browser = client.get("/api/v1/batches/999999", headers={**admin_auth, "accept": "text/html"})
    error_of(browser, 404, "not_found")


def test_import_errors_by_line_keep_their_list_in_the_same_shape(client, admin_auth):
    batch_id = client.post("/api/v1/batches", json={"name": "lines"}, headers=admin_auth).json()["id"]
    response = client.post(
        f"/api/v1/batches/{batch_id}/prompts",
        content=b'{"text": ""}\n{"text": "ok"}\n',
        headers={**admin_auth, "content-type": "application/jsonl"},
    )
    body = error_of(response, 422, "invalid")
    assert body["detail"] == "the file has 1 error; nothing was imported" and body["total"] == 1
    assert body["errors"][0]["line"] == 1 and body["errors"][0]["field"] == "text"


def test_openapi_points_every_api_4xx_at_error_out(client):
    schema = client.get("/api/v1/openapi.json").json()
    error_out = schema["components"]["schemas"]["ErrorOut"]
    assert set(error_out["required"]) == SHAPE
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    operations = [
        (path, method, op)
        for path, ops in schema["paths"].items()
        if path.startswith("/api/v1/")
        for method, op in ops.items()
    ]
    assert len(operations) > 30
    for path, method, operation in operations:
        responses = operation["responses"]
        expected = {"401", "403", "4XX"} | ({"404"} if "{" in path else set())
        assert expected <= set(responses), (method, path)
        for status, response in responses.items():
            if status.startswith("4"):
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"}, (
                    method,
                    path,
                    status,
                )


def test_a_refused_form_comes_back_with_the_message_and_the_values(client, db, login):
    csrf = login(AdminFactory().username)
    form = {
        "csrf_token": csrf,
        "name": "Twice",
        "guidelines": "Rank by correctness, then brevity.",
        "task_mix": "rankings",
        "k": "6",
        "overlap": "2",
        "temperature": "0.7",
        "top_p": "0.9",
        "max_new_tokens": "32",
        "priority": "3",
        "pii_policy": "redact",
        "policy_version_id": "",
    }
    assert client.post("/admin/batches/new", data=form, follow_redirects=False).status_code == 303

    again = client.post("/admin/batches/new", data={**form, "guidelines": "Second <try>"}, follow_redirects=False)
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("text/html")
    text = html.unescape(again.text)
    assert re.search(r'data-testid="form-error">name: a batch called \'Twice\' already exists<', text)
    assert 'value="Twice"' in again.text and "Second &lt;try&gt;" in again.text  # what was typed, escaped
    assert re.search(r'name="k"[^>]*value="6"', again.text)

    # The runs form: a service refusal (no such setting) keeps the kind and the JSON as typed.
    runs = client.post(
        "/admin/runs", data={"csrf_token": csrf, "kind": "sft", "params": '{"epochz": 2}'}, follow_redirects=False
    )
    assert runs.status_code == 422
    assert "params.epochz: sft has no such setting" in html.unescape(runs.text)
    assert "{&#34;epochz&#34;: 2}</textarea>" in runs.text or "{&quot;epochz&quot;: 2}</textarea>" in runs.text


def test_a_page_without_a_form_shows_the_error_page(client, db, login):
    login(UserFactory().username)
    page = client.get("/label/assignments/424242", headers={"accept": "text/html"})
    assert page.status_code == 404
    assert "Task 424242 is not one of your tasks" in page.text and 'data-testid="error-message"' in page.text


def test_every_service_error_is_an_app_error_with_a_field():
    for error in (
        BatchError("k", "too big"),
        RegistryError("status", "retired"),
        RunError("kind", "busy"),
        ExportError("split", "no such split"),
        WebhookError("url", "not absolute"),
        CredentialError("scopes", "unknown"),
    ):
        assert isinstance(error, AppError) and isinstance(error, ValueError)
        assert error.field and str(error) == f"{error.field}: {error.message}"
    assert (RegistryError("status", "x").status, RunError("kind", "x").status) == (409, 409)
    assert (ExportError("cursor", "x").param, ExportError("cursor", "x").status) == ("cursor", 422)
    assert FieldError("k", "x", 409).code == "conflict" and FieldError("k", "x").code == "invalid"
    assert (NotFound(None, "gone").detail, NotFound(None, "gone").code) == ("gone", "not_found")
    assert Conflict("name", "taken").status == 409 and code_for(429) == "rate_limited"
