"""`dicom-node`: the admin's command line.

Each subcommand is registered by one function that adds its parser and sets
`handler` (a function of the parsed arguments returning the exit code), so a
new subcommand is one more entry in `REGISTRARS`, never another branch here.
`--config FILE` is accepted before the command and after it, at every level
(`dicom-node --config FILE jobs list` = `dicom-node jobs list --config FILE`):
`add_config_options` adds it to every parser after registration, so no
registrar declares it. Given twice with different files, the command line is refused.
Exit codes: 0 success, 1 the operation failed, 2 unusable configuration or
command line (argparse's convention), 141 the reader of stdout went away (as
a shell reports a command killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node import JournalSchemaError, ListenError
from dicom_node.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("config.yaml")
CONFIG_DEST = "config_option_"  # + the parser's depth: the top level 0, a command 1, a subcommand 2
EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

Registrar = Callable[[argparse._SubParsersAction], None]


class ConfigUnusable(Exception):
    """Raised by handlers that need a config; main prints the located errors and exits 2."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.errors = error.errors


def config_from(path: Path) -> Config:
    """The config a command runs with, or ConfigUnusable for main to report."""
    try:
        return load_config(path)
    except ConfigError as error:
        raise ConfigUnusable(error) from None


def _check_config(args: argparse.Namespace) -> int:
    config = config_from(args.config)
    enabled = sum(pipeline.enabled for pipeline in config.pipelines.values())
    forward = f"{len(config.forward)} forward rules, " if config.forward else ""
    kinds = Counter(destination.kind for destination in config.destinations.values())
    transports = f" ({', '.join(f'{count} {kind}' for kind, count in sorted(kinds.items()))})" if kinds else ""
    print(
        f"{args.config}: ok (AE {config.node.ae_title} on {config.node.host}:{config.node.port}, "
        f"{len(config.pipelines)} pipelines ({enabled} enabled), {forward}{len(config.destinations)} destinations"
        f"{transports}, inference {config.inference.backend})"
    )
    return 0


def register_check_config(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("check-config", help="validate a config file and print located errors")
    parser.add_argument(f"{CONFIG_DEST}path", nargs="?", type=Path, metavar="path",
                        help="config file (default config.yaml; --config FILE says the same)")
    parser.set_defaults(handler=_check_config)


def _serve(args: argparse.Namespace) -> int:
    config = config_from(args.config)
    from dicom_node.ops import server  # imported here: check-config and the admin commands stay light

    try:
        server.serve(config, log_format=args.log_format)
    except ListenError as error:
        print(f"dicom-node serve: {error}", file=sys.stderr)
        return 1
    return 0


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the DICOM node (C-STORE receiver, pipelines, dispatch)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON")
    parser.set_defaults(handler=_serve)


def register_models(subparsers: argparse._SubParsersAction) -> None:
    from dicom_node.ops import models

    models.add_parser(subparsers)
    parser = subparsers.choices["models"]
    parser.set_defaults(config_optional=True)  # without --config: the models folder and default backend settings

    def handler(args: argparse.Namespace) -> int:
        return models.run(args, config_from(args.config) if args.config else None)

    parser.set_defaults(handler=handler)


def register_jobs(subparsers: argparse._SubParsersAction) -> None:
    from dicom_node.ops import jobs

    jobs.add_parser(subparsers)
    parser = subparsers.choices["jobs"]
    parser.set_defaults(handler=lambda args: jobs.run(args, config_from(args.config)))


def _with_config(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace, Config], int]) -> None:
    parser.set_defaults(handler=lambda args: handler(args, config_from(args.config)))


def register_status(subparsers: argparse._SubParsersAction) -> None:
    from dicom_node.ops import status

    _with_config(status.add_parser(subparsers), status.run)


def register_send(subparsers: argparse._SubParsersAction) -> None:
    from dicom_node.ops import send

    send_parser, echo_parser = send.add_parsers(subparsers)
    _with_config(send_parser, send.run_send)
    _with_config(echo_parser, send.run_echo)


def register_audit(subparsers: argparse._SubParsersAction) -> None:
    from dicom_node.ops import audit

    def handler(args: argparse.Namespace, config: Config) -> int:
        from dicom_node.store.journal import Journal

        journal = Journal(config.node.journal_url)
        try:
            return audit.run(args, journal)
        finally:
            journal.close()

    _with_config(audit.add_parser(subparsers), handler)


def register_demo_series(subparsers: argparse._SubParsersAction) -> None:
    from dicom_node.ops import demo

    demo.add_parser(subparsers).set_defaults(handler=demo.run)


def _hash_password(args: argparse.Namespace) -> int:
    """Read the password from the terminal (twice) or one line of stdin; print its hash for config.yaml."""
    import getpass

    from dicom_node.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("dicom-node hash-password: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("dicom-node hash-password: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def register_hash_password(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("hash-password", help="print a password hash for http.console.users (reads the "
                                                         "password from the terminal or one line of stdin)")
    parser.set_defaults(handler=_hash_password)


REGISTRARS: tuple[Registrar, ...] = (register_serve, register_check_config, register_status, register_models,
                                     register_jobs, register_send, register_audit, register_demo_series,
                                     register_hash_password)


def build_parser(registrars: Sequence[Registrar] = REGISTRARS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description="A DICOM node that runs AI pipelines on CT series.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in registrars:
        register(subparsers)
    add_config_options(parser)
    return parser


def add_config_options(parser: argparse.ArgumentParser, depth: int = 0) -> None:
    """`--config FILE` on this parser and every parser below it, each level into its own attribute, so a
    file given at two levels is seen twice (argparse would let the deeper one win in silence)."""
    parser.add_argument("--config", type=Path, dest=f"{CONFIG_DEST}{depth}", default=argparse.SUPPRESS,
                        metavar="FILE", help="config file (default config.yaml); before or after the command")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                add_config_options(child, depth + 1)


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line with `args.config` resolved from wherever it was given (None: a command that
    runs without one, `models`, was given none)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    options = [name for name in vars(args) if name.startswith(CONFIG_DEST)]
    files = {getattr(args, name) for name in options} - {None}  # None: check-config's path left out
    for name in options:
        delattr(args, name)
    if len(files) > 1:
        parser.error(f"the config file is given twice, differently: {', '.join(sorted(map(str, files)))}")
    args.config = files.pop() if files else None if getattr(args, "config_optional", False) else DEFAULT_CONFIG
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is handled below
        return code
    except ConfigUnusable as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except JournalSchemaError as error:
        print(f"dicom-node {args.command}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`dicom-node status | head -1`): not a failure of the command. Point stdout
        # at /dev/null so Python's own flush at exit stays quiet, and exit as a shell reports SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
