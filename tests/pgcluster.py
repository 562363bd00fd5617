"""A private PostgreSQL cluster for tests that fault a server: initdb in a temporary directory,
its own port, trust auth (or the pg_hba.conf lines given, e.g. hostssl + scram); started,
stopped, killed (-9), frozen (SIGSTOP) and removed; ``with_tls`` turns ``ssl`` on."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

PG_BIN = Path(os.environ.get("DBPROXY_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"
SUPERUSER = "postgres"


class ClusterError(RuntimeError):
    """The cluster could not be made, started or stopped; the message says why."""


def binaries_missing(
    pg_bin: Path = PG_BIN, needed: tuple[str, ...] = ("initdb", "pg_ctl", "postgres")
) -> str | None:
    """Why a private cluster (or whatever needs ``needed``) cannot be made here (None: it can)."""
    missing = [n for n in needed if not (pg_bin / n).is_file()]
    if missing:
        return f"PostgreSQL binaries missing under {pg_bin}: {', '.join(missing)}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root but runuser (util-linux) is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One private server; ``settings`` are extra postgresql.conf lines (name -> value);
    ``hba``: pg_hba.conf lines replacing initdb's (``local all all trust`` is kept first,
    so ``admin_dsn`` over the Unix socket always gets in)."""

    def __init__(
        self,
        settings: dict[str, str] | None = None,
        port: int | None = None,
        *,
        prefix: str = "dbproxy-pg-",
        base_dir: str | None = None,
        hba: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self.hba = hba
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir or _base_dir()))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self._frozen = False

    # -- addresses -------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        """The superuser over the Unix socket (trusted whatever ``hba`` says)."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.root}&port={self.port}"

    def with_tls(self, cert: Path, key: Path, client_ca: Path | None = None) -> PgCluster:
        """``ssl = on`` with copies of these files (owned by the server's user, key 0600);
        ``client_ca`` verifies client certificates (``clientcert=verify-full`` in hba)."""
        tls_dir = self.root / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        files = {"ssl_cert_file": cert, "ssl_key_file": key}
        if client_ca is not None:
            files["ssl_ca_file"] = client_ca
        self.settings["ssl"] = "on"
        for setting, source in files.items():
            target = tls_dir / f"{setting}.pem"
            shutil.copyfile(source, target)
            os.chmod(target, 0o600)
            self._chown(target)
            self.settings[setting] = f"'{target}'"
        self._chown(tls_dir)
        return self

    # -- life cycle ------------------------------------------------------------------

    def init(self) -> PgCluster:
        self._chown(self.root)
        self._run(
            self._as_owner(
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
            **self.settings,
        }
        with (self.data_dir / "postgresql.conf").open("a") as f:
            for name, value in conf.items():
                f.write(f"{name} = {value}\n")
        if self.hba is not None:
            lines = ["local all all trust", *self.hba]
            (self.data_dir / "pg_hba.conf").write_text("".join(f"{line}\n" for line in lines))
        return self

    def start(self, timeout: float = 30.0) -> PgCluster:
        if not self.data_dir.exists():
            self.init()
        self._pg_ctl("start", "-w", "-t", str(int(timeout)), "-l", str(self.log_file))
        return self

    def stop(self, mode: str = "fast") -> None:
        self.thaw()
        if self.pid() is not None:
            self._pg_ctl("stop", "-w", "-m", mode, check=False)

    def pid(self) -> int | None:
        """The postmaster's process id, or None when it is not running."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def kill(self) -> None:
        """kill -9 the postmaster and every backend (a crash); start() recovers."""
        for pid in self._server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._server_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()

    def freeze(self) -> None:
        """SIGSTOP every process of the server: connections stay open, nothing answers."""
        for pid in self._server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if not self._frozen:
            return
        for pid in self._server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = False

    def destroy(self) -> None:
        """Stop the server (killing it if it will not stop) and remove every file."""
        with contextlib.suppress(ClusterError):
            self.stop("immediate")
        if self._server_pids():
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- internals -------------------------------------------------------------------

    def _server_pids(self) -> list[int]:
        """The postmaster and its children (found through /proc, by parent id)."""
        main = self.pid()
        if main is None:
            return []
        pids = [main]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == main:
                pids.append(int(entry.name))
        return pids

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self._as_owner(str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), *args)
        return self._run(argv, check=check)

    def _as_owner(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", OS_USER, "--", *argv]
        return list(argv)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, OS_USER, OS_USER)

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = self.log_file.read_text()[-2000:]
            raise ClusterError(
                f"{' '.join(argv[-6:])} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}"
            )
        return proc


def _base_dir() -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**30:
        return shm
    return tempfile.gettempdir()


@contextlib.contextmanager
def private_cluster(settings: dict[str, str] | None = None) -> Iterator[PgCluster]:
    cluster = PgCluster(settings)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
