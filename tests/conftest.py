"""Fixtures shared across test modules: the journal's databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    if not postgres.available():
        pytest.skip("PostgreSQL or psycopg not installed (apt-get install postgresql; pip install psycopg[binary])")
    with postgres.postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request, tmp_path: Path) -> str:
    """The journal's URL on each database the node supports: SQLite (the default) and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.sqlite'}"
    return request.getfixturevalue("postgres_server").new_database()
