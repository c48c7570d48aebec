"""Schemathesis hooks for `test_openapi_conformance.py` (loaded through SCHEMATHESIS_HOOKS).

Every generated request is signed in with a fresh token of the test's user, so fuzzing
`POST /v1/auth/logout` (which revokes the token it is given) signs nothing else out.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import schemathesis


@schemathesis.auth(refresh_interval=None)
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
