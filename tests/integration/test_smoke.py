import pytest

pytestmark = pytest.mark.integration


async def test_register_create_thread_post_message(client, make_user):
    user = await make_user()
    thread = await client.post("/v1/threads", json={"title": "Hi"}, headers=user.headers)
    assert thread.status_code == 201
    posted = await client.post(
        f"/v1/threads/{thread.json()['id']}/messages",
        json={"content": "hello"},
        headers=user.headers,
    )
    assert posted.status_code == 201
    assert posted.json()["position"] == 1
