"""`--config` before or after every command, and duplicate YAML keys refused with both lines."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.ops import cli
from dicom_node.config import ConfigError, load_config
from tests.peers import REPO

DICOM_NODE = Path(sys.executable).parent / "dicom-node"

# The arguments each command needs besides --config; a command missing here fails the test below.
REQUIRED = {
    ("serve",): [], ("check-config",): [], ("status",): [], ("send",): ["series", "--to", "pacs"],
    ("echo",): ["pacs"], ("audit",): [], ("demo-series",): ["out"],
    ("models", "list"): [], ("models", "check"): [], ("models", "import"): ["m.onnx", "--name", "m", "--preset",
                                                                         "monai-spleen"],
    ("jobs", "list"): [], ("jobs", "show"): ["1"], ("jobs", "retry"): ["--failed"], ("jobs", "dead-letter"): [],
    ("hash-password",): [],
}


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += leaf_commands(child, (*prefix, name)) or [(*prefix, name)]
    return found


def test_every_command_is_covered():
    assert sorted(leaf_commands(cli.build_parser())) == sorted(REQUIRED)


@pytest.mark.parametrize("command", sorted(REQUIRED), ids=" ".join)
def test_config_before_or_after_the_command(command):
    rest = [*command, *REQUIRED[command]]
    placements = [["--config", "site.yaml", *rest], [*rest, "--config", "site.yaml"],
                  [*command[:1], "--config", "site.yaml", *rest[1:]]]
    for argv in placements:
        args = cli.parse_args(argv)
        assert args.config == Path("site.yaml"), argv
        assert args.handler is not None
    default = cli.parse_args(rest).config
    assert default == (None if command[0] == "models" else cli.DEFAULT_CONFIG)


def test_check_config_path_is_the_same_option_and_two_different_files_are_refused(capsys):
    assert cli.parse_args(["check-config", "site.yaml"]).config == Path("site.yaml")
    assert cli.parse_args(["--config", "./site.yaml", "check-config", "site.yaml"]).config == Path("site.yaml")
    for argv in (["--config", "a.yaml", "check-config", "b.yaml"], ["--config", "a.yaml", "status", "--config", "b.yaml"],
                 ["jobs", "--config", "a.yaml", "list", "--config", "b.yaml"]):
        with pytest.raises(SystemExit) as exited:
            cli.parse_args(argv)
        assert exited.value.code == 2
        assert "the config file is given twice, differently: a.yaml, b.yaml" in capsys.readouterr().err


def test_config_before_the_command_reaches_the_handler(tmp_path):
    (tmp_path / "site.yaml").write_text((REPO / "config.yaml").read_text())
    result = subprocess.run([str(DICOM_NODE), "--config", str(tmp_path / "site.yaml"), "check-config"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{tmp_path / 'site.yaml'}: ok (AE DICOMNODE")


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("node:\n  port: 104\n  ae_title: NODE\ndestinations:\n  pacs: {host: 10.0.0.1, port: 104}\n"
                    "node:\n  port: 11112\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == ["config.yaml:6: invalid YAML: duplicate key 'node' (first at line 1): "
                                   "YAML keeps one value per key, remove one of them"]
    path.write_text("node:\n  port: 104\n  ae_title: NODE\n  port: 11112\n")
    result = subprocess.run([str(DICOM_NODE), "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("config.yaml:4: invalid YAML: duplicate key 'port' (first at line 2): "
                             "YAML keeps one value per key, remove one of them\n")
    serve = subprocess.run([str(DICOM_NODE), "serve", "--config", str(path)], capture_output=True, text=True,
                           timeout=60)
    assert (serve.returncode, serve.stderr) == (2, result.stderr)


def test_the_same_key_in_different_mappings_and_merge_overrides_are_fine(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("node: {port: 11113}\nhttp: {port: 8081}\n"
                    "destinations:\n  a: &pacs {ae_title: PACS, host: 10.0.0.1, port: 104}\n  b:\n    <<: *pacs\n    port: 4242\n")
    config = load_config(path)
    assert (config.node.port, config.http.port) == (11113, 8081)
    assert (config.destinations["a"].port, config.destinations["b"].port) == (104, 4242)
