"""Real servers for the tests that need them: a throw-away PostgreSQL on 127.0.0.1 (its
own data directory, port and password) and a port to put a server on."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

USER = "cifar"  # the database superuser the tests connect as, with PASSWORD
PASSWORD = "not-in-any-url"  # reaches libpq through PGPASSWORD only, as docs/scaling.md says


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: `pg_config --bindir`, else PATH, else the
    newest /usr/lib/postgresql/<version>/bin (Debian's layout); None when none has both."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(p.split("/")[-2]))[::-1]]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _as_server_user() -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as nobody."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return ["runuser", "-u", "nobody", "--"]


@dataclass
class Postgres:
    bindir: Path
    root: Path  # data, socket and log, owned by the server's user
    port: int
    host: str = "127.0.0.1"

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        """An SQLAlchemy URL without the password (PGPASSWORD carries it)."""
        return f"{driver}://{USER}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """What a client process needs beside the URL."""
        return {"PGPASSWORD": PASSWORD}

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its URL."""
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=USER, password=PASSWORD, dbname="postgres"
        ) as connection:
            connection.autocommit = True
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*_as_server_user(), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{log.read_text() if log.exists() else ''}"
            )
        return result

    def stop(self) -> None:
        """Fast shutdown, then the directory goes."""
        try:
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "stop"
            )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(bindir: Path) -> Postgres:
    """initdb a fresh cluster in a temporary directory (password authentication over
    TCP, superuser USER) and start it on 127.0.0.1 at a free port. Raises RuntimeError
    with the server's log when initdb or the start fails; the caller stops it."""
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="cifar-pg-"))
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
    (root / "pwfile").write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(root / "pwfile", 65534, 65534)
    server = Postgres(bindir, root, free_port())
    try:
        server._run(
            str(bindir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            USER,
            f"--pwfile={root / 'pwfile'}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses={server.host} -p {server.port} "
            f"-c unix_socket_directories={root} -c fsync=off -c max_connections=100"
        )
        server._run(
            str(bindir / "pg_ctl"),
            "-D",
            str(root / "data"),
            "-l",
            str(root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def stop_process_group(process: subprocess.Popen, term_seconds: float = 15) -> None:
    """SIGTERM to the process's group (a server and its workers, started with
    ``start_new_session=True``), SIGKILL if it lingers past ``term_seconds``."""
    import signal

    for sig, wait in ((signal.SIGTERM, term_seconds), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200. Raises RuntimeError with the end of ``log``
    when the process exits or ``timeout`` seconds pass first."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer:\n{log.read_text()[-3000:]}")
