"""The shared SQLite file: plumbing for every backing service (Factor VI).

Factor VI keeps state out of the processes, in a backing service they all share. The
terrible day this module prevents: two processes write the same row at once and one
write vanishes without an error, or one gets "database is locked" and a user sees a 500,
because the file was opened the way a one-process script opens it. Here it is opened once,
correctly, for many processes and many threads, and both backing services build on it:
`session_store.py` (sessions, uploads) and `job_queue.py` (jobs). Neither imports the
other; each owns its tables.

It also holds the small helpers every process uses to read its configuration from the
environment (Factor III): `ConfigError`, which a process turns into one line on stderr
and exit code 2, `positive_number` and `whole_seconds` (each with a sane maximum, so
that `POLL_INTERVAL=1e10` is refused at start instead of crashing `time.sleep` later),
and `process_name` (which copy am I: web.1, worker.2).

SQLite suits processes on one machine with a local disk; several machines need a
networked database (Postgres), which is where this toy ends.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


class ConfigError(Exception):
    """A bad configuration value; the message names the environment variable."""


def positive_number(environ: Mapping[str, str], name: str, default: float,
                    maximum: float) -> float:
    """Read a number of seconds above 0 and at most `maximum`, or say which variable is wrong.

    The maximum keeps a typo (`1e10`) from reaching `time.sleep` or SQLite, which would
    overflow, and from making a process wait for centuries."""
    text = environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= maximum:  # false for `nan` too, which parses as a float
        raise ConfigError(f"{name} must be a number of seconds above 0 and at most "
                          f"{maximum:g}, got {text!r}")
    return value


def whole_seconds(environ: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    """Read a whole number of seconds from 1 to `maximum` (an interval, a cookie's Max-Age)."""
    value = positive_number(environ, name, default, maximum)
    if not value.is_integer():
        raise ConfigError(f"{name} must be a whole number of seconds from 1 to {maximum}, "
                          f"got {environ[name]!r}")
    return int(value)


def process_name(environ: Mapping[str, str], default: str) -> str:
    """This copy's name, as the process manager that started it tells it: Heroku and our
    launcher set DYNO, honcho sets HONCHO_PROCESS_NAME, foreman sets PS (all like `web.2`)."""
    for variable in ("DYNO", "HONCHO_PROCESS_NAME", "PS"):
        if environ.get(variable):
            return environ[variable]
    return default


class Database:
    """The shared SQLite file, opened correctly for many processes and many threads.

    * WAL lets readers and the one writer work at the same time; `synchronous=NORMAL`
      is safe in WAL (a power cut may lose the last commits, never corrupt the file).
    * `busy_timeout`: a writer that finds the file locked by another process waits for
      it instead of failing with "database is locked".
    * `write()` starts with `BEGIN IMMEDIATE`, which takes the write lock *before* the
      first read. Python's default starts the transaction at the first write, so a
      read-modify-write would read outside it and silently lose updates.
    * One connection per process, used by one thread at a time behind `self.lock`.
      `ThreadingHTTPServer` starts a thread per request, so "a connection per thread"
      would mean a connection per request. Threads of one process would only queue for
      SQLite's single write lock anyway, and queueing on a Python lock is cheaper than
      SQLite's sleep-and-retry (measured: higher throughput, far lower p99).
    * The connection is keyed by process id and opened lazily, so a forked child never
      uses its parent's connection (sqlite.org, "How to corrupt a database", 2.6).
    """

    def __init__(self, path: Path, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._connection, self._pid = conn, os.getpid()
        return self._connection

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding SQLite's write lock from its first statement.

        An exception inside the block rolls back everything the block wrote."""
        with self.lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run one statement: alone it is its own transaction; inside `write()`, part of it."""
        with self.lock:
            return self._connect().execute(sql, params).fetchall()

    def create_tables(self, script: str) -> None:
        with self.write() as conn:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def close(self) -> None:
        with self.lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None


def database_path(url: str) -> Path:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` to a path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(f"DATABASE_URL must look like sqlite:///path/to/file.db, got {url!r}")
    return Path(url[len(prefix):])


def database_from_env(environ: Mapping[str, str]) -> Database:
    """Open the shared SQLite file named by DATABASE_URL, creating its folder."""
    url = environ.get("DATABASE_URL", "sqlite:///var/app.db")
    path = database_path(url)
    db = Database(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db.query("SELECT 1")
    except (OSError, sqlite3.Error) as error:
        raise ConfigError(f"DATABASE_URL={url}: cannot open the database: {error}") from None
    return db
