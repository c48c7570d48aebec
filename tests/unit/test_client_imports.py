"""`threadline.client` is usable without the server: importing it loads neither the web
framework nor the database layer (the API schemas it returns import without them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
SERVER_STACK = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "aiosqlite", "asyncpg", "alembic")


def test_client_import_leaves_the_server_stack_alone() -> None:
    code = (
        "import json, sys; import threadline.client; "
        f"print(json.dumps([m for m in {SERVER_STACK!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []
