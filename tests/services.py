"""The external services some tests need (PostgreSQL; later NATS), found or explained.

A test asks for a service's URL here. When the service cannot be reached the test is skipped, saying
why; under `CI=true` it fails instead, so a CI run without its services never passes by skipping.
"""

from __future__ import annotations

import functools
import os
import uuid

import pytest

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"  # trust auth, database `test` (the dev machine)


def postgres_url() -> str:
    """The test PostgreSQL server (`BANDGATE_TEST_POSTGRES`, else POSTGRES_URL): a database the tests
    may create and drop schemas in. Skips (fails under CI=true) when it does not answer."""
    url = os.environ.get("BANDGATE_TEST_POSTGRES", POSTGRES_URL)
    problem = _postgres_problem(url)
    if problem:
        missing("PostgreSQL", url, problem)
    return url


@functools.cache
def _postgres_problem(url: str) -> str:
    """Why `url` cannot be used ("" if it can): asked once a session."""
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - a pinned dependency
        return f"psycopg is not installed: {e}"
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ""


def missing(service: str, where: str, why: str) -> None:
    """Skip the test for a service that is not there, or fail it under CI=true."""
    message = f"{service} at {where} is not reachable: {why}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(message)


def unique_name(prefix: str) -> str:
    """A schema or role name no other test (or concurrent run) uses: roles are cluster-wide."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
