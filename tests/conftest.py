"""Fixtures shared across test modules (the journal's databases), and the `needs_peer` mark: a test
whose peer is missing is skipped with the reason, or fails under CI=true (tests/peers/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import missing_peer, postgres


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_peer(available, reason): the test needs a peer program; skipped "
                                       "when it is missing, a failure under CI=true")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_peer"):
        if not mark.kwargs["available"]:
            missing_peer(mark.kwargs["reason"])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    if not postgres.available():
        missing_peer(postgres.MISSING)
    with postgres.postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request, tmp_path: Path) -> str:
    """The journal's URL on each database the node supports: SQLite (the default) and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.sqlite'}"
    return request.getfixturevalue("postgres_server").new_database()
