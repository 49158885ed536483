"""The reliability suite's ledger: every case tried, how the node answered, what was lost.

Tests record one `CaseResult` per case; `conftest.py` prints the table at
the end of the session, so a run shows at a glance how many hostile inputs
were tried, how many were handled as required, and that no acknowledged
instance went missing.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class CaseResult:
    area: str  # bad input, protocol, access, crash, load, disk full
    case: str
    expected: str  # what the node must do, e.g. "refused|quarantined"
    outcome: str  # what it did
    correct: bool
    lost_instances: int = 0  # acknowledged by the node but not in its spool/journal (must be 0)


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: list[CaseResult] = []

    def record(self, result: CaseResult) -> CaseResult:
        with self._lock:
            self.results.append(result)
        return result

    def table(self) -> str:
        """One row per area plus a total, in Markdown (the README records it as printed)."""
        areas: dict[str, list[CaseResult]] = defaultdict(list)
        for result in self.results:
            areas[result.area].append(result)
        header = ["area", "cases tried", "handled as required", "lost instances"]
        rows = [[area, str(len(items)), str(sum(r.correct for r in items)), str(sum(r.lost_instances for r in items))]
                for area, items in areas.items()]
        rows.append(["total", str(len(self.results)), str(sum(r.correct for r in self.results)),
                     str(sum(r.lost_instances for r in self.results))])
        widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
        lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in [header, *rows]]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.correct or r.lost_instances]


LEDGER = Ledger()
