"""A small tmpfs mounted for one test: a disk that really fills up, for the disk-full and retention tests.

Mounting needs CAP_SYS_ADMIN (root in a container); without it the test is skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def small_tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _mount(["-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder: Path, size_mb: int) -> None:
    result = _mount(["-o", f"remount,size={size_mb}m", str(folder)])
    assert result.returncode == 0, result.stderr
