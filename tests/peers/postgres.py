"""PostgreSQL 15 (Debian package `postgresql`) as a real journal database: a throwaway cluster per test session.

The cluster lives in a temp folder, listens on a free loopback port and a private socket folder, trusts
local connections (it is reachable from this machine only, for the life of the tests) and is stopped by
pid. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.peers import ManagedProcess, free_port, needs, wait_for_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> bool:
    if _bin("initdb") is None or _bin("postgres") is None or importlib.util.find_spec("psycopg") is None:
        return False
    return os.getuid() != 0 or _postgres_user() is not None


MISSING = "PostgreSQL or psycopg not installed (apt-get install postgresql; pip install psycopg[binary])"


def required() -> pytest.MarkDecorator:
    return needs(available(), MISSING)


def _postgres_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


class PostgresServer:
    """The running cluster: databases for the tests, and a restart (a database maintenance window)."""

    def __init__(self, root: Path, port: int, command: list):
        self.root = root
        self.port = port
        self._command = command
        self._databases = 0
        self._process: ManagedProcess | None = None

    def start(self) -> None:
        """Start and wait until it takes connections: it listens while still replaying its WAL, and a
        connection then fails with "the database system is starting up"."""
        import psycopg

        self._process = ManagedProcess(self._command, log=self.root / "postgres.log")
        wait_for_port(self.port, timeout=60, process=self._process.process)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres").close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self._process.process.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(first_signal=signal.SIGINT)  # "fast" shutdown: SIGTERM would wait for pooled clients

    def restart(self) -> None:
        self.stop()
        self.start()

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = f"journal_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, url: str) -> None:
        """Drop the database `url` names, its open sessions terminated (a journal lost under a running node)."""
        import psycopg

        name = url.rpartition("/")[2]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f"DROP DATABASE {name} WITH (FORCE)")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    as_user: list[str] = []
    if os.getuid() == 0:
        user = _postgres_user()
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]  # execs: the pid
        # stays the server's, so stopping it by pid stops PostgreSQL itself
    data, sockets = root / "data", root / "sockets"
    port = free_port()
    try:
        subprocess.run([*as_user, _bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, "mkdir", str(sockets)], check=True)
        server = PostgresServer(root, port, [*as_user, _bin("postgres"), "-D", data, "-p", str(port), "-h",
                                             "127.0.0.1", "-k", sockets])
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
