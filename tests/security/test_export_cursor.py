"""Finding 7: a malformed or oversized export cursor answered 500.

Every cursor that is not one a row of this export could carry is a 400 naming
`cursor`, decided before the first byte is streamed.
"""

from __future__ import annotations

import pytest

from app.security import create_api_token
from tests.factories import AdminFactory

BAD_CURSORS = [
    "99999999999999999999",  # past a 64-bit id: the database refused it mid-export
    "9223372036854775808",
    "1:99999999999999999999",
    "9" * 5000,  # past Python's int() digit limit
    "x" * 3000,
    "12:3:4",
    "12:x",
    "1_000",  # int() reads underscores; a cursor never has them
    " 12",
    "١٢",  # non-ASCII digits, which int() also reads
    "12\x00",
    "-1",
]


@pytest.mark.parametrize("kind", ["comparisons", "rankings", "demonstrations"])
def test_every_bad_cursor_is_a_400_naming_cursor(client, db, kind):
    token, _ = create_api_token(db, AdminFactory(), ["export:read"])
    db.commit()
    auth = {"authorization": f"Bearer {token}"}
    for cursor in BAD_CURSORS:
        response = client.get(f"/api/v1/export/{kind}", params={"cursor": cursor}, headers=auth)
        assert response.status_code == 400, (cursor[:40], response.status_code, response.text[:200])
        body = response.json()
        assert body["field"] == "cursor" and body["detail"].startswith("cursor:"), body
        assert len(response.content) < 2000  # the cursor is not echoed back whole


def test_a_good_cursor_past_the_end_is_an_empty_export(client, db):
    token, _ = create_api_token(db, AdminFactory(), ["export:read"])
    db.commit()
    auth = {"authorization": f"Bearer {token}"}
    for kind, cursor in (("comparisons", "9223372036854775807:3"), ("rankings", "9223372036854775807")):
        response = client.get(f"/api/v1/export/{kind}", params={"cursor": cursor}, headers=auth)
        assert response.status_code == 200 and response.text == ""
