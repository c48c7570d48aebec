"""`schemathesis run`, with its default checks, against a real `threadline serve` (issue 6,
item 16): the OpenAPI document describes what the server does, so that generated clients work.

Every operation is run, in every default phase (examples, coverage, fuzzing, stateful), with a
fresh token per request (`schemathesis_hooks.py`) and the expected statuses of
`schemathesis.toml` (413 beside schemathesis' defaults: no schema can state a size in bytes),
with two exceptions, each by design:
- the `use_after_free` check: `DELETE /v1/threads/{id}` archives (a soft delete), so the
  thread is still there afterwards, as documented;
- the live event streams (`GET .../events`, `GET .../stream`): a live stream never ends, so
  a request/response fuzzer can only time out on it; `tests/integration/test_fuzz.py` fuzzes
  them within a time window and the e2e SSE tests cover their answers.
The protocol endpoints that start runs (`POST /v1/agui/{agent}`, `POST /v1/ai-sdk/chat`) are
in: their documented bodies are what the server checks (`api/openapi.py`), stricter than the
protocols' own published schemas.

It takes minutes (the coverage phase sends every boundary value of every parameter), hence its
own timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import DedicatedPostgres, StartServer, clean_environment, run_cli

pytestmark = pytest.mark.e2e

EXAMPLES = 5
RUN_TIMEOUT = 840.0
PASSWORD = "conformance password"


@pytest.mark.timeout(900)
def test_schemathesis_default_checks_pass_over_every_operation(
    tmp_path: Path, serve_process: StartServer, dedicated_postgres: DedicatedPostgres
):
    # PostgreSQL + Redis, the scale-out set-up: the fuzzer queues hundreds of runs at once, and
    # on SQLite's single writer a request can wait behind them longer than any sane timeout
    # (seen once: 30 s without an answer on a loaded two-core machine).
    env = clean_environment(
        THREADLINE_DATABASE_URL=dedicated_postgres.database_url,
        THREADLINE_REDIS_URL=dedicated_postgres.redis_url,
        THREADLINE_REDIS_PREFIX=dedicated_postgres.redis_prefix,
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
        # The fuzzer posts thousands of messages and signs in again after every logout.
        THREADLINE_MESSAGES_PER_MINUTE="1000000",
        THREADLINE_MAX_ACTIVE_RUNS_PER_USER="100000",
        THREADLINE_PASSWORD_TIME_COST="1",
        THREADLINE_PASSWORD_MEMORY_KIB="1024",
    )
    migrated = run_cli("migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    server = serve_process(tmp_path, env)
    email = f"conformance-{uuid.uuid4().hex[:8]}@example.com"
    registered = httpx.post(
        f"{server.base_url}/v1/auth/register",
        json={"email": email, "password": PASSWORD},
        timeout=30,
    )
    assert registered.status_code == 201, registered.text
    repo = Path(__file__).parents[2]
    env = {
        **os.environ,
        # Run from a scratch directory (schemathesis keeps a cache where it runs), importing
        # the hooks from the checkout.
        "PYTHONPATH": str(repo),
        "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
        "THREADLINE_FUZZ_URL": server.base_url,
        "THREADLINE_FUZZ_EMAIL": email,
        "THREADLINE_FUZZ_PASSWORD": PASSWORD,
    }
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{server.base_url}/openapi.json",
            "--max-examples",
            str(EXAMPLES),
            # One worker: with two, schemathesis' generator threads parse source concurrently
            # and CPython 3.11 can fail with "AST constructor recursion depth mismatch".
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--exclude-checks",
            "use_after_free",
            "--exclude-path-regex",
            ".*/(events|stream)$",
            "--generation-deterministic",
            # Generating message bodies that satisfy the text pattern and the length limit
            # together is slow for Hypothesis; this health check is about the generator, not
            # about the server.
            "--suppress-health-check",
            "too_slow",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    errors = result.stdout.find("= ERRORS =")
    report = (result.stdout[errors : errors + 6000] if errors >= 0 else "") + (
        result.stdout[-6000:] + result.stderr[-2000:]
    )
    # The server's side of a failure: a request answered late shows here (a 503 after a pool
    # timeout logs the pool's state).
    report += "\n--- server log (tail) ---\n" + server.output()[-4000:]
    assert result.returncode == 0, report
    # The last line: "No issues found in ...", or "N warning(s) in ..." (warnings are about
    # the generated data, such as operations that mostly met a 404 on a random id).
    summary = [line for line in result.stdout.splitlines() if line.startswith("=")][-1]
    assert "failure" not in summary and "error" not in summary, report
    counts = re.search(r"(\d+) generated, \1 passed", result.stdout)
    assert counts is not None and int(counts.group(1)) >= 300, report  # it did run
    # Every selected operation was tested (all but the exclusions above).
    assert re.search(r"Selected: (\d+)/\d+\s+Tested: \1\b", result.stdout), report
    assert "Traceback" not in server.output(), server.output()[-3000:]
