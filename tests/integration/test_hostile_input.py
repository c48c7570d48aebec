"""Hostile and careless input, for the whole class at once (every operation of the OpenAPI
document): each is a clear 4xx with its own code, never a 500 or a pydantic sentence.

- a body that is not JSON, not sent as JSON, empty, or not an object;
- a lone UTF-16 surrogate anywhere in a JSON body (object keys too) or a JSON query value;
- OPTIONS and unsupported methods, answered with `Allow`;
- `/docs`, which must load nothing from another host.
"""

from __future__ import annotations

import re

import pytest

from tests.integration._support import create_thread, error_code
from threadline.ids import IdPrefix, new_id

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}


async def _operations_with_a_body(client) -> list[tuple[str, str]]:
    spec = (await client.get("/openapi.json")).json()
    return [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if "requestBody" in operation
    ]


def _url(path: str, thread_id: str) -> str:
    return path.format(
        thread_id=thread_id, run_id=new_id(IdPrefix.RUN), agent="demo", chat_id=thread_id
    )


async def test_bodies_that_are_not_json_objects_get_their_own_codes(client, make_user):
    user = await make_user()
    thread_id = (await create_thread(client, user))["id"]
    operations = await _operations_with_a_body(client)
    assert len(operations) >= 6, operations
    cases = [
        ({**JSON}, b'{"title": "x"', 400, "invalid_json"),
        ({**JSON}, b"\xff\xfe not utf-8", 400, "invalid_json"),
        ({}, b'{"content": "hello"}', 415, "unsupported_media_type"),
        ({"content-type": "text/plain"}, b'{"content": "hello"}', 415, "unsupported_media_type"),
        ({**JSON}, b"", 422, "body_required"),
        ({**JSON}, b"[1, 2]", 422, "validation_error"),
    ]
    for method, path in operations:
        for headers, body, status, code in cases:
            response = await client.request(
                method, _url(path, thread_id), content=body, headers={**user.headers, **headers}
            )
            where = (method, path, body)
            assert response.status_code == status, (where, response.text)
            assert error_code(response) == code, (where, response.text)
            assert "valid dictionary" not in response.text and "JSON decode" not in response.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"title": "t", "metadata": {"\\ud800": 1}}',  # a key (the 500 of the issue)
        b'{"title": "t", "metadata": {"k": {"deep\\udfff": [1]}}}',  # a nested key
        b'{"title": "\\ud83d"}',  # a value: a high surrogate with no low one
        b'{"content": "x", "metadata": {"list": ["ok", "\\udc00"]}}',  # inside a list
        b'{"email": "a\\ud800@example.com", "password": "correct horse"}',
    ],
)
async def test_a_lone_surrogate_anywhere_in_any_body_is_400(client, make_user, body):
    user = await make_user()
    thread_id = (await create_thread(client, user))["id"]
    for method, path in await _operations_with_a_body(client):
        response = await client.request(
            method, _url(path, thread_id), content=body, headers={**user.headers, **JSON}
        )
        assert response.status_code == 400, (method, path, response.text)
        assert error_code(response) == "invalid_unicode"


async def test_a_valid_surrogate_pair_is_ordinary_text(client, make_user):
    user = await make_user()
    response = await client.post(
        "/v1/threads",
        content=b'{"title": "\\ud83d\\ude00", "metadata": {"\\ud83d\\ude00": 1}}',
        headers={**user.headers, **JSON},
    )
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "\U0001f600"
    assert response.json()["metadata"] == {"\U0001f600": 1}


async def test_a_lone_surrogate_in_a_json_query_value_is_400(client, make_user):
    user = await make_user()
    for value in ('{"\\ud800": 1}', '{"k": "\\udfff"}'):
        response = await client.get("/v1/threads", params={"metadata": value}, headers=user.headers)
        assert response.status_code == 400, response.text
        assert error_code(response) == "invalid_unicode"
    # The text `\ud800` in a plain search is just text.
    plain = await client.get("/v1/threads", params={"q": "\\ud800"}, headers=user.headers)
    assert plain.status_code == 200, plain.text


async def test_options_and_unsupported_methods_name_the_allowed_ones(client, make_user):
    user = await make_user()
    thread_id = (await create_thread(client, user))["id"]
    options = await client.options(f"/v1/threads/{thread_id}")
    assert options.status_code == 204, options.text
    assert set(options.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE", "OPTIONS"}
    collection = await client.options("/v1/threads")
    assert set(collection.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    refused = await client.put("/v1/threads", json={}, headers=user.headers)
    assert refused.status_code == 405
    assert set(refused.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    assert error_code(refused) == "method_not_allowed"


async def test_docs_load_nothing_from_another_host(client):
    page = await client.get("/docs")
    assert page.status_code == 200
    assert "swagger-ui" in page.text
    references = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert references, page.text
    for reference in references:
        assert not re.match(r"^(https?:)?//", reference), reference
        if reference.startswith("/docs/assets/"):
            asset = await client.get(reference)
            assert asset.status_code == 200 and len(asset.content) > 100, reference
    assert "cdn" not in page.text.lower()
