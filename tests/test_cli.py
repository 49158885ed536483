"""The `dicom-node` command line: subcommand registration, exit codes, `python -m dicom_node`."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO, free_port

from dicom_node.ops import cli

DICOM_NODE = Path(sys.executable).parent / "dicom-node"


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(DICOM_NODE), *argv], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_help_lists_the_registered_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "models"):
        assert command in result.stdout


def test_check_config_defaults_to_config_yaml_in_the_working_folder(tmp_path):
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    result = run("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("config.yaml: ok (AE DICOMNODE on 0.0.0.0:11112, 2 pipelines (2 enabled), "
                             "1 destinations (1 dimse), inference embedded)\n")


def test_python_dash_m_is_the_same_command(tmp_path):
    (tmp_path / "config.yaml").write_text("node:\n  port: 0\n")
    result = subprocess.run([sys.executable, "-m", "dicom_node", "check-config", str(tmp_path / "config.yaml")],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr == "config.yaml:2 node.port: Input should be greater than or equal to 1\n"


def test_serve_refuses_an_invalid_config_with_exit_2_before_starting(tmp_path):
    (tmp_path / "config.yaml").write_text("node:\n  ae_title: THIS_AE_TITLE_IS_TOO_LONG\n")
    result = run("serve", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 2
    assert result.stderr == "config.yaml:2 node.ae_title: String should have at most 16 characters\n"


def test_unknown_command_and_bad_option_are_usage_errors():
    assert run("frobnicate").returncode == 2
    result = run("serve", "--log-format", "xml")
    assert result.returncode == 2 and "invalid choice: 'xml'" in result.stderr


def test_a_registrar_adds_a_command_without_touching_main(capsys):
    def register_hello(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("hello")
        parser.add_argument("name")
        parser.set_defaults(handler=lambda args: print(f"hello {args.name}") or 3)

    parser = cli.build_parser((*cli.REGISTRARS, register_hello))
    args = parser.parse_args(["hello", "admin"])
    assert args.handler(args) == 3
    assert capsys.readouterr().out == "hello admin\n"
    with pytest.raises(SystemExit):
        cli.build_parser(cli.REGISTRARS).parse_args(["hello", "admin"])


def test_check_config_counts_forward_rules(tmp_path):
    text = (REPO / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(
        text + "\nforward:\n  archive:\n    match: {modality: CT}\n    destinations: [pacs]\n")
    result = run("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 pipelines (2 enabled), 1 forward rules, 1 destinations" in result.stdout


@pytest.mark.parametrize("command", [("serve",), ("status",), ("jobs", "list")])
def test_a_journal_this_version_cannot_use_stops_the_command_with_exit_1(tmp_path, command):
    """No C-STORE is acknowledged into a journal whose every insert would fail (tests/test_journal.py)."""
    import sqlite3

    from dicom_node.store.journal import Journal

    (tmp_path / "config.yaml").write_text(f"node:\n  host: 127.0.0.1\n  port: {free_port()}\n  storage_dir: var\n"
                                          f"http:\n  host: 127.0.0.1\n  port: {free_port()}\n")
    (tmp_path / "var").mkdir()
    journal_file = tmp_path / "var" / "journal.sqlite"
    Journal(f"sqlite:///{journal_file}").close()
    with sqlite3.connect(journal_file) as db:
        db.execute("ALTER TABLE instances DROP COLUMN size")
    result = run(command[0], "--config", str(tmp_path / "config.yaml"), *command[1:], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(f"dicom-node {command[0]}: the journal sqlite:///{journal_file} cannot be used as "
                                  "it is: instances.size is missing and must have a value\n"), result.stderr
