"""External services the tests run against, found once per session: each helper returns where the
service is, or skips the test saying why, except under CI=true, where a missing service fails the test
(a CI run that silently skipped its PostgreSQL tests would prove nothing)."""

from __future__ import annotations

import functools
import os
import uuid

import pytest

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"  # trust auth, as on this machine and in CI


@functools.cache
def _postgres_problem(url: str) -> str | None:
    """Why `url` cannot be used (None: it can)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return f"PostgreSQL at {url} is unreachable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def unavailable(why: str) -> None:
    """Skip, or fail under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(why)


def postgres_url() -> str:
    """The test database's URL ($BANDGATE_TEST_POSTGRES, else 127.0.0.1:5432, database `test`), or skip
    (fail under CI=true) when it cannot be reached."""
    url = os.environ.get("BANDGATE_TEST_POSTGRES", POSTGRES_URL)
    problem = _postgres_problem(url)
    if problem is not None:
        unavailable(problem)
    return url


def unique_name(prefix: str) -> str:
    """A schema or role name no other test (or concurrent run) uses: roles are cluster-wide."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
