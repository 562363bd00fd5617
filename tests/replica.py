"""A private primary and a real streaming replica of it for integration tests: the primary is
a cluster of its own (``initdb`` in a temporary directory, its own port, trust auth,
``wal_level = replica``, a replication line in ITS pg_hba.conf); the replica is made with
``pg_basebackup -R`` from it, served on its own port, stopped, restarted and paused on demand.
Both are removed afterwards (processes, files; the replica's slot lives on the private primary).

Nothing here connects to, reads the configuration of, or changes the machine's PostgreSQL:
tests must never change the machine's services (issue 13, item 13).

Files live in fresh directories ``dbproxy-replica-<pid>-...`` under /dev/shm when that is a
tmpfs with room, else under /tmp; ``$DBPROXY_REPLICA_DIR`` overrides. Servers run as the
``postgres`` OS user (via ``runuser`` when we are root). ``start_primary()`` and
``Replica.start()`` first sweep what a killed test process left behind (directories named
after a process id that no longer exists, and their servers).

Methods block (they run ``pg_ctl``/``psql``); from async tests wrap slow ones
(``start``, ``stop``, ``restart``) in ``asyncio.to_thread`` when other tasks must keep running.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from proxy.resilience.routing import format_lsn, parse_lsn
from tests.pgcluster import PgCluster, free_port
from tests.pgcluster import binaries_missing as cluster_binaries_missing

PG_BIN = Path(os.environ.get("DBPROXY_PG_BIN", "/usr/lib/postgresql/15/bin"))
PRIMARY_HOST = "127.0.0.1"
SUPERUSER = "postgres"
OS_USER = "postgres"
DIR_PREFIX = "dbproxy-replica-"
SLOT_PREFIX = "dbproxy_replica_"
SHM_MIN_FREE = 2 * 1024**3  # a replica is the primary's size plus WAL; leave room for others
_SWEPT_DIRS = ("/dev/shm", "/tmp")
_NEEDED_BINARIES = ("initdb", "pg_basebackup", "pg_ctl", "psql", "postgres")
PRIMARY_SETTINGS = {  # what a primary needs to feed streaming replicas (and a slot each)
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
}
PRIMARY_HBA = (  # the private primary's own pg_hba.conf: trust, replication included
    "local all all trust\n"
    "host all all 127.0.0.1/32 trust\n"
    "host replication all 127.0.0.1/32 trust\n"
)
_COPIED_SETTINGS = (  # a hot standby refuses to start with less than the primary has
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)


class ReplicaError(RuntimeError):
    """The replica could not be built, started or queried; the message says why."""


def binaries_missing(pg_bin: Path = PG_BIN) -> str | None:
    """Why a replica cannot be made on this machine (None: the binaries are there)."""
    return cluster_binaries_missing(pg_bin, _NEEDED_BINARIES)


def default_base_dir() -> str:
    """Where replicas live: ``$DBPROXY_REPLICA_DIR``, else /dev/shm when it is a roomy tmpfs
    (a base backup there takes a fraction of the time it takes on disk), else /tmp."""
    explicit = os.environ.get("DBPROXY_REPLICA_DIR")
    if explicit:
        return explicit
    shm = "/dev/shm"
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= SHM_MIN_FREE:
            return shm
    return tempfile.gettempdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Replica:
    """One streaming replica of the private primary at ``primary_port`` (see
    ``start_primary``). ``start()`` builds it the first time, ``destroy()`` removes it."""

    def __init__(
        self,
        *,
        primary_port: int,
        primary_host: str = PRIMARY_HOST,
        user: str = SUPERUSER,
        pg_bin: Path = PG_BIN,
        base_dir: str | None = None,
    ) -> None:
        self.primary_host = primary_host
        self.primary_port = primary_port
        self.user = user
        self.pg_bin = pg_bin
        self.base_dir = base_dir if base_dir is not None else default_base_dir()
        self.port = 0
        self.root: Path | None = None  # holds data/, server.log and the unix socket
        self.slot = f"{SLOT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self._slot_created = False
        self._atexit_registered = False

    # ------------------------------------------------------------------ addresses

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def log_file(self) -> Path:
        return self._root() / "server.log"

    @property
    def dsn(self) -> str:
        """DSN of the replica's ``postgres`` database."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        if not self.port:
            raise ReplicaError("replica not started")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def primary_dsn(self) -> str:
        return f"postgresql://{self.user}@{self.primary_host}:{self.primary_port}/postgres"

    def _root(self) -> Path:
        if self.root is None:
            raise ReplicaError("replica not created (call start())")
        return self.root

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Build the replica on first use, start its server, and wait until it accepts
        connections, is in recovery, and has replayed everything the primary had written."""
        deadline = time.monotonic() + timeout
        created = self.root is None
        try:
            if created:
                self._create()
            if not self.running():
                self._start_server(deadline)
            if self.query("SELECT pg_is_in_recovery()") != "t":
                raise ReplicaError("the server came up as a primary, not as a standby")
            self.wait_caught_up(timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            if created:  # a replica that never came up is not left behind
                self.destroy()
            raise

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, clean shutdown; ``immediate``: abort)."""
        if self.root is None or not self.running():
            return
        self._pg_ctl("stop", "-m", mode, "-w", "-t", "30")

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (fast) and start again on the same port; waits until it has caught up."""
        self.stop()
        self.start(timeout)

    def reset(self, timeout: float = 30.0) -> None:
        """Back to the state ``start()`` leaves: running, replaying, caught up (after a test
        stopped it or paused replay)."""
        if self.running() and self.replay_paused():
            self.resume_replay()
        self.start(timeout)

    def destroy(self) -> None:
        """Stop the server at once, drop the slot, remove every file. Safe to call twice."""
        if self.root is not None:
            with contextlib.suppress(ReplicaError, OSError):
                self.stop("immediate")
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        if self._slot_created:
            with contextlib.suppress(ReplicaError, OSError):
                self._drop_slot(self.slot)
            self._slot_created = False
        if self._atexit_registered:
            atexit.unregister(self.destroy)
            self._atexit_registered = False

    def running(self) -> bool:
        if self.root is None or not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run(self._as_owner(self._bin("pg_ctl"), "status", "-D", str(self.data_dir)))
        return result.returncode == 0

    def __enter__(self) -> Replica:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # ------------------------------------------------------------------ replication control

    def pause_replay(self, timeout: float = 5.0) -> None:
        """Stop applying WAL (it is still received); returns once the pause is in effect."""
        self.query("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while self.query("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise ReplicaError(f"replay not paused after {timeout} s")
            time.sleep(0.005)

    def resume_replay(self) -> None:
        self.query("SELECT pg_wal_replay_resume()")

    def replay_paused(self) -> bool:
        return self.query("SELECT pg_get_wal_replay_pause_state()") != "not paused"

    def replayed_lsn(self) -> int:
        """The replica's ``pg_last_wal_replay_lsn()`` as an integer."""
        return self._lsn(self.query("SELECT pg_last_wal_replay_lsn()"), "replayed")

    def received_lsn(self) -> int:
        """The replica's ``pg_last_wal_receive_lsn()`` (received and flushed, maybe not applied)."""
        return self._lsn(self.query("SELECT pg_last_wal_receive_lsn()"), "received")

    def primary_lsn(self) -> int:
        """The primary's ``pg_current_wal_lsn()``."""
        return self._lsn(self.query_primary("SELECT pg_current_wal_lsn()"), "primary")

    def wait_caught_up(self, lsn: int | None = None, timeout: float = 10.0) -> int:
        """Wait until the replica has replayed ``lsn`` (default: the primary's current LSN).
        Returns the replayed LSN; raises ReplicaError on timeout (e.g. replay paused)."""
        target = self.primary_lsn() if lsn is None else lsn
        return self._wait_lsn(self.replayed_lsn, target, "replayed", timeout)

    def wait_received(self, lsn: int, timeout: float = 10.0) -> int:
        """Wait until the replica has received (not necessarily replayed) ``lsn``."""
        return self._wait_lsn(self.received_lsn, lsn, "received", timeout)

    def _wait_lsn(self, read: Callable[[], int], target: int, what: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            current: int = read()
            if current >= target:
                return current
            if time.monotonic() > deadline:
                raise ReplicaError(
                    f"replica has {what} {format_lsn(current)} < {format_lsn(target)} "
                    f"after {timeout} s "
                    f"(replay paused: {self.replay_paused()})"
                )
            time.sleep(0.005)

    @staticmethod
    def _lsn(text: str, what: str) -> int:
        if not text:
            raise ReplicaError(f"no {what} LSN")
        return parse_lsn(text)

    # ------------------------------------------------------------------ SQL through psql

    def query(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` on the replica; the unaligned, tuples-only output, stripped."""
        return self._psql(f"host=127.0.0.1 port={self.port} dbname={database}", sql)

    def query_primary(self, sql: str, database: str = "postgres") -> str:
        return self._psql(
            f"host={self.primary_host} port={self.primary_port} dbname={database}", sql
        )

    def _psql(self, conninfo: str, sql: str) -> str:
        result = self._run(
            [
                self._bin("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                f"{conninfo} user={self.user} connect_timeout=5",
                "-c",
                sql,
            ]
        )
        if result.returncode != 0:
            raise ReplicaError(f"psql ({conninfo}) failed on {sql!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    # ------------------------------------------------------------------ building

    def _create(self) -> None:
        sweep_leftovers(self.base_dir, self.pg_bin)
        self._check_primary()
        check_replication_access(self)
        self.root = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=self.base_dir))
        if not self._atexit_registered:
            atexit.register(self.destroy)
            self._atexit_registered = True
        self._chown(self.root)
        self._basebackup()
        self._write_config()

    def _check_primary(self) -> None:
        rows = self.query_primary(
            "SELECT current_setting('wal_level'),"
            " current_setting('max_wal_senders')::int"
            "   - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'),"
            " current_setting('max_replication_slots')::int"
            "   - (SELECT count(*) FROM pg_replication_slots)"
        )
        wal_level, free_senders, free_slots = rows.split("|")
        problems = []
        if wal_level not in ("replica", "logical"):
            problems.append(f"wal_level is {wal_level} (needs replica; restart required)")
        if int(free_senders) < 2:
            problems.append(f"only {free_senders} free WAL senders (raise max_wal_senders)")
        if int(free_slots) < 1:
            problems.append("no free replication slot (raise max_replication_slots)")
        if problems:
            raise ReplicaError("primary cannot feed a replica: " + "; ".join(problems))

    def _basebackup(self) -> None:
        result = self._run(
            self._as_owner(
                self._bin("pg_basebackup"),
                "-h",
                self.primary_host,
                "-p",
                str(self.primary_port),
                "-U",
                self.user,
                "-D",
                str(self.data_dir),
                "-R",  # standby.signal + primary_conninfo
                "-X",
                "stream",
                "-C",  # create the slot ...
                "-S",
                self.slot,  # ... and name it in primary_slot_name
                "--checkpoint=fast",
                "--no-sync",
                "--no-manifest",
                "-w",
            ),
            cwd=self._root(),
        )
        self._slot_created = self._slot_exists(self.slot)  # -C may create it, then fail
        if result.returncode != 0:
            raise ReplicaError(f"pg_basebackup failed: {result.stderr.strip()}")

    def _write_config(self) -> None:
        values = self.query_primary(
            "SELECT string_agg(current_setting(name), '|') FROM unnest(ARRAY["
            + ",".join(f"'{name}'" for name in _COPIED_SETTINGS)
            + "]) AS name"
        ).split("|")
        copied = "\n".join(
            f"{name} = {value}" for name, value in zip(_COPIED_SETTINGS, values, strict=True)
        )
        settings = f"""
# ---- dbproxy test replica (tests/replica.py)
listen_addresses = '127.0.0.1'
unix_socket_directories = '{self._root()}'
cluster_name = 'dbproxy-replica'
hot_standby = on
fsync = off
shared_buffers = 16MB
wal_receiver_status_interval = 1s
hba_file = '{self.data_dir / "pg_hba.conf"}'
ident_file = '{self.data_dir / "pg_ident.conf"}'
ssl = off
logging_collector = off
{copied}
"""
        # Debian keeps postgresql.conf in /etc, so a base backup usually has none; if the
        # primary keeps one in its data directory, the later lines here take precedence.
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(settings)
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n",
            encoding="utf-8",
        )
        (self.data_dir / "pg_ident.conf").touch()
        for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
            self._chown(self.data_dir / name)

    def _start_server(self, deadline: float) -> None:
        if not self.port:
            self.port = free_port()
        for attempt in range(3):
            self.log_file.unlink(missing_ok=True)
            result = self._pg_ctl(
                "start",
                "-w",
                "-t",
                str(max(1, int(deadline - time.monotonic()))),
                "-l",
                str(self.log_file),
                "-o",
                f"-p {self.port} -k {self._root()}",
                check=False,
            )
            if result.returncode == 0:
                return
            log = self._log_tail()
            if "could not bind" in log and attempt < 2:  # lost a race for the port
                self.port = free_port()
                continue
            with contextlib.suppress(ReplicaError):
                self._pg_ctl("stop", "-m", "immediate", "-w", check=False)
            raise ReplicaError(f"replica did not start: {result.stderr.strip()}\n{log}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ slots

    def _slot_exists(self, slot: str) -> bool:
        return bool(
            self.query_primary(
                f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{_slot_literal(slot)}'"
            )
        )

    def _drop_slot(self, slot: str) -> None:
        """Drop ``slot`` on the primary, waiting briefly for its walsender to go away."""
        deadline = time.monotonic() + 5.0
        literal = _slot_literal(slot)
        while True:
            active = self.query_primary(
                f"SELECT active FROM pg_replication_slots WHERE slot_name = '{literal}'"
            )
            if not active:
                return
            if active == "f":
                self.query_primary(f"SELECT pg_drop_replication_slot('{literal}')")
                return
            if time.monotonic() > deadline:
                raise ReplicaError(f"replication slot {slot} still active")
            time.sleep(0.01)

    # ------------------------------------------------------------------ processes

    def _bin(self, name: str) -> str:
        return str(self.pg_bin / name)

    def _as_owner(self, *argv: str) -> list[str]:
        """``argv`` run as the postgres OS user when we are root (the server refuses root)."""
        if os.geteuid() == 0:
            return ["runuser", "-u", OS_USER, "--", *argv]
        return list(argv)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, OS_USER, OS_USER)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self._run(
            self._as_owner(self._bin("pg_ctl"), *args, "-D", str(self.data_dir)),
            cwd=self._root(),
        )
        if check and result.returncode != 0:
            raise ReplicaError(f"pg_ctl {args[0]} failed: {result.stderr.strip()}")
        return result

    @staticmethod
    def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PGCONNECT_TIMEOUT": "5", "LC_ALL": "C"}
        env.pop("PGPASSWORD", None)
        return subprocess.run(
            argv,
            cwd=cwd or "/",
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _slot_literal(slot: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise ReplicaError(f"bad slot name {slot!r}")
    return slot


# ---------------------------------------------------------------------- the private primary


def start_primary(base_dir: str | None = None, pg_bin: Path = PG_BIN) -> PgCluster:
    """A private cluster that can feed streaming replicas, started; ``destroy()`` removes it."""
    base = base_dir if base_dir is not None else default_base_dir()
    sweep_leftovers(base, pg_bin)
    cluster = PgCluster(
        PRIMARY_SETTINGS, prefix=f"{DIR_PREFIX}{os.getpid()}-primary-", base_dir=base
    )
    try:
        cluster.init()
        (cluster.data_dir / "pg_hba.conf").write_text(PRIMARY_HBA, encoding="utf-8")
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    atexit.register(cluster.destroy)  # also when the test process ends without teardown
    return cluster


@contextlib.contextmanager
def replicated_pair(base_dir: str | None = None) -> Iterator[tuple[PgCluster, Replica]]:
    """A private primary and a running, caught-up streaming replica of it; both removed after."""
    primary = start_primary(base_dir)
    try:
        replica = Replica(primary_port=primary.port, base_dir=base_dir)
        try:
            replica.start()
            yield primary, replica
        finally:
            replica.destroy()
    finally:
        primary.destroy()
        atexit.unregister(primary.destroy)


def _replication_probe(replica: Replica) -> str | None:
    """None if postgres may open a physical replication connection to the primary, else why."""
    conninfo = (
        f"host={replica.primary_host} port={replica.primary_port} user={replica.user}"
        " replication=true connect_timeout=5"
    )
    result = replica._run(
        [replica._bin("psql"), "-X", "-A", "-t", "-d", conninfo, "-c", "IDENTIFY_SYSTEM"]
    )
    return None if result.returncode == 0 else result.stderr.strip()


def check_replication_access(replica: Replica) -> None:
    """Raise ReplicaError unless the primary accepts a replication connection (it never
    changes the primary's configuration: a private primary has the line from the start)."""
    problem = _replication_probe(replica)
    if problem is not None:
        raise ReplicaError(f"replication connection to the primary failed: {problem}")


def sweep_leftovers(base_dir: str, pg_bin: Path = PG_BIN) -> None:
    """Remove primaries and replicas (servers, directories) of test processes that are gone."""
    bases = {Path(base_dir), *(Path(d) for d in _SWEPT_DIRS)}
    for path in (p for base in bases for p in base.glob(f"{DIR_PREFIX}*")):
        match = re.match(rf"{re.escape(DIR_PREFIX)}(\d+)-", path.name)
        if match is None or _pid_alive(int(match.group(1))) or not path.is_dir():
            continue
        if (path / "data" / "postmaster.pid").exists():
            argv = [
                str(pg_bin / "pg_ctl"),
                "stop",
                "-m",
                "immediate",
                "-w",
                "-D",
                str(path / "data"),
            ]
            if os.geteuid() == 0:
                argv = ["runuser", "-u", OS_USER, "--", *argv]
            Replica._run(argv)
        shutil.rmtree(path, ignore_errors=True)
