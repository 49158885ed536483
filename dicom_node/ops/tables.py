"""How the admin CLI prints: aligned columns for people, JSON for scripts (`--json`)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TextIO


def to_json(value):
    """`json.dumps` default: ISO 8601 for datetimes, text for anything else it cannot encode."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def cell(value) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def print_table(rows: list[dict], columns: tuple[str, ...], as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(rows, default=to_json), file=out)
        return
    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    for line in [list(columns)] + cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip(), file=out)
