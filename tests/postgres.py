"""A private PostgreSQL server for the tests and benchmarks: the real server, never a mock.

``PrivateServer`` runs ``initdb`` in a temporary folder and starts ``postgres`` on a
private port with its unix socket in that folder (no TCP listener), trust auth for the
one local user. As root it runs the server as the ``postgres`` user (initdb refuses
root). Binaries come from ``$ZOO_PG_BIN``, ``pg_config --bindir``, Debian's
/usr/lib/postgresql/*/bin, or ``PATH``; ``ensure_binaries`` installs Debian's package
when none is found and we are root (``make test`` on a fresh machine).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "zoo"


def find_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = [os.environ.get("ZOO_PG_BIN", "")]
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                         reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if c and all((Path(c) / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def ensure_binaries() -> tuple[Path | None, str]:
    """The server binaries, installing Debian's ``postgresql`` when missing and root.
    Returns (folder, why not) with folder None when they cannot be had."""
    found = find_binaries()
    if found is not None:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "PostgreSQL server binaries not found (install postgresql, or set ZOO_PG_BIN)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True,
                       timeout=600, check=True)
    except (OSError, subprocess.SubprocessError):
        try:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True,
                           timeout=600, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"PostgreSQL is not installed and apt-get install postgresql failed ({e})"
    found = find_binaries()
    return (found, "") if found else (None, "apt-get installed postgresql but its binaries were not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """One PostgreSQL server in a temporary folder, for one test session."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="zoo-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        self._n = 0

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]) if args[0] != "bash" else "bash", *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True,
                              env={**os.environ, "LC_ALL": "C"})

    def start(self) -> "PrivateServer":
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")
        # The test user needs no password; any other role does (so wrong credentials can be tested).
        hba = self.data / "pg_hba.conf"
        self._run("bash", "-c", f"printf 'local all {USER} trust\\nlocal all all scram-sha-256\\n' > {hba}")
        opts = (f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60",
                  "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        except (OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU seconds the server has used: the postmaster and its exited children (each
        connection's backend process is one), from /proc."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def create_database(self, prefix: str = "zoo") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("?", 1)[0].rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def create_role(self, name: str, password: str) -> None:
        """A role that logs in with a password (scram-sha-256)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")


if __name__ == "__main__":  # `make test`: install the server before pytest starts (prints why not)
    import sys

    found, why = ensure_binaries()
    print(f"PostgreSQL server binaries: {found}" if found else f"no PostgreSQL: {why}; its tests will skip")
    sys.exit(0)
