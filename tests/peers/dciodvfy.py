"""dciodvfy (David Clunie's dicom3tools, Debian package `dicom3tools`) as a conformance peer.

It checks a file against the IOD its SOP Class names: required modules and
attributes, value representations, enumerated values, code sequences. A PACS
storing an object proves nothing (Orthanc stores anything); dciodvfy does.
It prints its findings to stderr, one per line, prefixed "Error" or "Warning".
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers import needs


@dataclass(frozen=True)
class Validation:
    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"dciodvfy {self.path.name}: {len(self.errors)} errors, {len(self.warnings)} warnings"]
        lines += [f"  {line}" for line in self.errors + self.warnings]
        return "\n".join(lines)


def available() -> bool:
    return shutil.which("dciodvfy") is not None


def required() -> pytest.MarkDecorator:
    return needs(available(), "dciodvfy (dicom3tools) not installed (apt-get install dicom3tools)")


def validate(path: Path) -> Validation:
    """Run dciodvfy on `path`; prints the findings (pytest shows them with -s or on failure)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    validation = Validation(
        path=Path(path),
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
    )
    if result.returncode != 0 and not validation.errors:
        validation.errors.append(f"dciodvfy exited with {result.returncode}: {lines[-1] if lines else 'no output'}")
    print(validation.report())
    return validation
