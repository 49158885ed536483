"""Prints the reliability ledger (cases tried, handled as required, lost instances) after the run."""

from __future__ import annotations

import pytest

from tests.reliability.summary import LEDGER, Ledger


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter) -> None:
    if not LEDGER.results:
        return
    terminalreporter.section("reliability summary")
    terminalreporter.write_line(LEDGER.table())
    if terminalreporter.config.option.verbose > 0:
        for result in LEDGER.results:
            terminalreporter.write_line(f"{'ok ' if result.correct and not result.lost_instances else 'NOT'} "
                                        f"{result.area} / {result.case}: {result.outcome}")
    for result in LEDGER.failures():
        terminalreporter.write_line(f"NOT AS REQUIRED: {result.area} / {result.case}: expected {result.expected}, "
                                    f"got {result.outcome}; lost {result.lost_instances}")
