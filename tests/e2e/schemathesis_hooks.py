"""Schemathesis hooks for `test_openapi_conformance.py` (loaded through SCHEMATHESIS_HOOKS).

Generated requests are signed in as the test's user. Schemathesis keeps the token and signs in
again when a request gets a 401, so fuzzing `POST /v1/auth/logout` (which revokes the token it
is given) does not sign the rest of the run out.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import schemathesis


@schemathesis.auth(retry_on=[401])
class FreshToken:
    def get(self, case: Any, ctx: Any) -> str:
        response = httpx.post(
            f"{os.environ['THREADLINE_FUZZ_URL']}/v1/auth/token",
            json={
                "email": os.environ["THREADLINE_FUZZ_EMAIL"],
                "password": os.environ["THREADLINE_FUZZ_PASSWORD"],
            },
            timeout=30,
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
