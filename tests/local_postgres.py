"""A private PostgreSQL cluster for the SQL tests when ``BACKOUT_TEST_POSTGRES_URL`` is unset.

PostgreSQL is part of what we support, so its tests never skip: they use the URL from the
environment (``./run test`` starts the machine's cluster and sets it), else this module
creates a throwaway cluster from the installed server binaries (Debian's ``postgresql``
package: ``/usr/lib/postgresql/<version>/bin``) on a free loopback port, and removes it
afterwards. Without binaries the tests fail with what to install.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL is required for the SQL tests: install the server (Debian: "
    "`apt-get install postgresql`), or set BACKOUT_TEST_POSTGRES_URL, or run `./run test`, "
    "which does both"
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started; the message says why."""


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server's ``bin`` directory, if any."""
    root = Path("/usr/lib/postgresql")
    found = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists() and (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPostgres:
    """A throwaway cluster: ``start()`` it, connect to ``url``, ``stop()`` removes it."""

    bin_dir: Path
    port: int = 0
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root: use its system account
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{args[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}"
            )

    def start(self) -> LocalPostgres:
        """Create and start the cluster; wait until it accepts connections."""
        self.workdir = Path(tempfile.mkdtemp(prefix="backout-pg-"))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable(
                    "running as root and there is no `postgres` account to run the server"
                ) from exc
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
        data = self.workdir / "data"
        self.port = self.port or _free_port()
        self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.workdir / "log"),
                  "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"PostgreSQL did not listen on {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server and delete its files."""
        if self.workdir is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.workdir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
