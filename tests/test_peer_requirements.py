"""A missing peer: skipped with its reason on a developer's machine, a failed run under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.peers import REPO, needs

MISSING = textwrap.dedent("""\
    from tests.peers import needs

    pytestmark = needs(False, "frobnicator not installed (apt-get install frobnicator)")


    def test_talks_to_the_frobnicator():
        assert False, "must not run without its peer"
    """)


def run_pytest(tmp_path, ci: str | None, available: bool = False) -> subprocess.CompletedProcess:
    """pytest on a one-test module needing a peer, with this suite's conftest as a plugin."""
    (tmp_path / "test_needs_frobnicator.py").write_text(MISSING.replace("needs(False", f"needs({available}"))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-rs", "-q",
                           "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


@pytest.mark.parametrize("ci", [None, "false"])
def test_locally_a_missing_peer_skips_with_its_reason(tmp_path, ci):
    result = run_pytest(tmp_path, ci)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "frobnicator not installed (apt-get install frobnicator)" in result.stdout


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_under_ci_a_missing_peer_fails_the_run(tmp_path, ci):
    result = run_pytest(tmp_path, ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert ("frobnicator not installed (apt-get install frobnicator); CI=true: a missing peer fails the run "
            "instead of skipping") in result.stdout
    assert "must not run" not in result.stdout


def test_a_present_peer_runs_the_test_under_ci(tmp_path):
    result = run_pytest(tmp_path, "true", available=True)
    assert result.returncode == 1 and "must not run without its peer" in result.stdout and "1 failed" in result.stdout


def test_the_mark_carries_availability_and_reason():
    mark = needs(False, "why").mark
    assert (mark.name, mark.kwargs) == ("needs_peer", {"available": False, "reason": "why"})
