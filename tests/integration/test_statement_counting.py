"""THREADLINE_DEBUG_COUNT_STATEMENTS: /metrics counts the database work (for bench/runs.py),
and nothing is counted or shown when it is off."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.integration.test_runs_support import run_settings, running_app

pytestmark = pytest.mark.integration


def _value(metrics: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def _metrics(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_the_counting_hook_counts_statements_and_transactions(settings_factory) -> None:
    async with running_app(run_settings(settings_factory, debug_count_statements=True)) as h:
        user = await h.user()
        before = await _metrics(h.client)
        await h.thread(user)
        after = await _metrics(h.client)
    for name in (
        "threadline_db_statements_total",
        'threadline_db_transactions_total{outcome="commit"}',
        "threadline_db_pool_checkouts_total",
    ):
        assert _value(after, name) > _value(before, name), name
    assert _value(after, "threadline_db_pings_total") == 0  # the pool does not pre-ping


async def test_nothing_is_counted_by_default(settings_factory) -> None:
    async with running_app(run_settings(settings_factory)) as h:
        assert "threadline_db_statements_total" not in await _metrics(h.client)
