"""The backing service's plumbing: one URL picks SQLite or Redis (Factors IV and VI).

Factor VI keeps state out of the processes, in a backing service they all share; Factor
IV makes that service an attached resource, named by one URL, swapped without a code
change. The terrible day this module prevents: two processes write the same row at once
and one write vanishes without an error, or one gets "database is locked" and a user
sees a 500, because the store was opened the way a one-process script opens it; or the
app is rewritten the day it outgrows one machine. Here `DATABASE_URL` (or `REDIS_URL`,
the name Heroku's Redis sets, when DATABASE_URL is unset) names the service:
`sqlite:///var/app.db` (the default: a file every process on this machine opens,
`Database` below) or `redis://[:PASSWORD@]HOST[:PORT][/DB]` (a server every machine can
reach, spoken by `redis_client.py`). Both backing services build on what
`database_from_env` returns: `session_store.py` (sessions, uploads) and `job_queue.py`
(jobs), each with one class per store behind one interface. Neither imports the other.

A store that cannot answer is a wait, not a crash: another process holds SQLite's write
lock past the busy timeout, or Redis is down, frozen, or still loading its data after a
restart. `StoreUnavailable` and `RedisUnavailable` say so (`UNAVAILABLE`). `keep_trying`
is how a worker or a clock waits that out: it logs one line and tries again, so a result
is recorded once and a tick enqueued once, later rather than never. A web copy answers
503 and asks the client to come back. A store that is full (`StoreFull`: the ceiling
STORE_MAX_MB, a disk nearly full, SQLite's "disk is full", or Redis out of memory)
refuses what would grow it, with 507, and is a wait for a worker or a clock too
(`WAITS`). `waits_recognised` tells these apart from the other errors either store
raises, which stay what they are, bugs, never mistaken for a wait.

It also holds the small helpers every process uses, most of them to read its
configuration from the environment (Factor III): `ConfigError`, which a process turns
into one line on stderr and exit code 2, `positive_number`, `whole_seconds` and
`whole_number` (each
with a sane maximum, so that `POLL_INTERVAL=1e10` is refused at start instead of
crashing `time.sleep` later), `stop_timeout` (how long a copy may take to stop),
`process_name` (which copy am I: web.1, worker.2), and `log`, one line to stdout with
everything a client may have sent escaped. Every process logs through it.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar, Union

from redis_client import CONNECT_TIMEOUT, REPLY_TIMEOUT, Redis, RedisError, RedisUnavailable

T = TypeVar("T")

DEFAULT_STOP_TIMEOUT = 25  # seconds from SIGTERM to exit: under Heroku's 30 before SIGKILL
BUSY_TIMEOUT = 10.0        # seconds a statement waits for another process's write lock
# A statement already waiting for the lock when SIGTERM comes returns (done, or
# StoreUnavailable) before the default stop deadline, with a fifth of it to spare: a web
# copy still answers that request, a clock still exits in time.
MAX_BUSY_TIMEOUT = 0.8 * DEFAULT_STOP_TIMEOUT
IDLE_READERS = 8           # read connections kept open for the next read
RETRY_PAUSE = 0.1          # seconds between two tries of `keep_trying`, on top of the busy wait


class ConfigError(Exception):
    """A bad configuration value; the message names the environment variable."""


def positive_number(environ: Mapping[str, str], name: str, default: float,
                    maximum: float, minimum: float = 0.0) -> float:
    """Read a number of seconds above 0 (and at least `minimum`, if one is given) and at
    most `maximum`, or say which variable is wrong.

    The maximum keeps a typo (`1e10`) from reaching `time.sleep` or SQLite, which would
    overflow, and from making a process wait for centuries. A minimum keeps a loop that
    waits this long from turning into a busy loop (`POLL_INTERVAL=1e-9`)."""
    text = environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value <= maximum and value >= minimum):  # false for `nan` too
        least = f"at least {minimum:g}" if minimum else "above 0"
        raise ConfigError(f"{name} must be a number of seconds {least} and at most "
                          f"{maximum:g}, got {text!r}")
    return value


def whole_seconds(environ: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    """Read a whole number of seconds from 1 to `maximum` (an interval, a cookie's Max-Age)."""
    value = positive_number(environ, name, default, maximum)
    if not value.is_integer():
        raise ConfigError(f"{name} must be a whole number of seconds from 1 to {maximum}, "
                          f"got {environ[name]!r}")
    return int(value)


def whole_number(environ: Mapping[str, str], name: str, default: int, maximum: int,
                 unit: str = "") -> int:
    """Read a whole number from 1 to `maximum`: a count, or a size in `unit`s. Digits only
    (no sign, no exponent), and no more of them than `maximum` has, so that a 5,000-digit
    typo is refused rather than converted."""
    text = environ.get(name, str(default))
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(maximum))
            and 1 <= int(text) <= maximum):
        raise ConfigError(f"{name} must be a whole number{f' of {unit}' if unit else ''} "
                          f"from 1 to {maximum}, got {text!r}")
    return int(text)


def stop_timeout(environ: Mapping[str, str]) -> float:
    """STOP_TIMEOUT: seconds from SIGTERM to exit, whatever is still in flight. A thread
    cannot usefully be waited for longer than an hour."""
    return positive_number(environ, "STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT, 3600)


def process_name(environ: Mapping[str, str], default: str) -> str:
    """This copy's name, as the process manager that started it tells it: Heroku and our
    launcher set DYNO, honcho sets HONCHO_PROCESS_NAME, foreman sets PS (all like `web.2`)."""
    for variable in ("DYNO", "HONCHO_PROCESS_NAME", "PS"):
        if environ.get(variable):
            return environ[variable]
    return default


# Control characters become \xNN in the log: a client's bytes can neither move the
# operator's cursor, retitle their terminal, nor start a line of their own. A backslash
# is doubled, so that an escape cannot be faked. (BaseHTTPRequestHandler.log_message
# escapes the same way; overriding it loses that.) Every process logs through it: a job's
# error, in the worker's log, may quote what a client put in its args.
LOG_ESCAPES = str.maketrans({code: f"\\x{code:02x}"
                             for code in [*range(0x20), *range(0x7f, 0xa0)]})
# A lone surrogate (JSON's "\ud800") cannot even be written as UTF-8: escaped too.
LOG_ESCAPES.update({code: f"\\u{code:04x}" for code in range(0xD800, 0xE000)})
LOG_ESCAPES[ord("\\")] = "\\\\"


def log(*lines: str) -> None:
    """Lines to stdout, each escaped. A single write, so lines from many threads never
    interleave."""
    try:
        sys.stdout.write("".join(line.translate(LOG_ESCAPES) + "\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader (the launcher) is gone; keep working, then stop
        pass


class StoreUnavailable(Exception):
    """The backing store cannot answer now (another process holds SQLite's write lock past
    the busy timeout): a wait, not a bug. Its message is SQLite's, "database is locked"."""


class Refused(Exception):
    """The store refuses a write that would break one of its limits; `status` tells the
    client which (413: too large, 429: too many, 507: no room), the message what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class StoreFull(Refused):
    """No room: the store holds STORE_MAX_MB, its disk is nearly full, or Redis is out of
    memory. Refused before the disk is full, because a full disk refuses even the DELETE
    that would make room."""

    def __init__(self, message: str):
        super().__init__(507, message)


# A store that does not answer now, SQLite (locked) or Redis (down, frozen, unreachable,
# loading its data): a web copy answers 503. With a full store, what a worker or a clock
# waits out.
UNAVAILABLE = (StoreUnavailable, RedisUnavailable)
WAITS = (*UNAVAILABLE, StoreFull)


class StillLocked(Exception):
    """`keep_trying` stopped: its caller must stop, and the store still cannot answer."""


def is_locked(error: sqlite3.OperationalError) -> bool:
    """SQLite's SQLITE_BUSY, "database is locked": another connection holds the lock this
    statement needs. SQLite refused the statement whole, so trying again is safe."""
    return "database is locked" in str(error)


@contextmanager
def waits_recognised() -> Iterator[None]:
    """Around what either store runs: raise `StoreUnavailable` for SQLite's "database is
    locked", and `StoreFull` for its "database or disk is full" (SQLITE_FULL) and for
    Redis's OOM (over its maxmemory). Each store refused the statement, the command or the
    transaction whole. Let every other error through as it is, so that a bug (a missing
    column) looks like one. (A Redis loading its data, or busy, the client already raises
    as `RedisUnavailable`.)"""
    try:
        yield
    except sqlite3.OperationalError as error:
        if is_locked(error):
            raise StoreUnavailable(str(error)) from error
        if "database or disk is full" in str(error):
            raise StoreFull(f"{error}; make room on the disk") from error
        raise
    except RedisError as error:
        if error.code == "OOM":
            raise StoreFull(f"redis is out of memory ({error}); make room") from None
        raise


class Outage:
    """Who is waiting for the store, in one process: the first thread to meet a store
    that cannot answer logs the line, the others (a worker's claim loops, its lease
    renewals) wait in silence until every one of them got through. One wait, one line."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = 0  # threads waiting now

    def began(self, line: str) -> None:
        with self.lock:
            if not self.waiting:
                log(line)
            self.waiting += 1

    def ended(self) -> None:
        with self.lock:
            self.waiting -= 1


def keep_trying(action: Callable[[], T], what: str,
                stopping: Callable[[], bool] = lambda: False,
                outage: Outage | None = None) -> T:
    """Run `action` until the store lets it through; return what it returns.

    While the store cannot answer (`WAITS`: SQLite locked past its busy timeout, Redis
    down, frozen or loading, the store full), log one line and try again; any other error
    is a real one and is raised at once. Threads that share an `outage` log one line between
    them. When `stopping()` turns true (a worker at its stop deadline), raise
    `StillLocked` instead of trying again. Repeating `action` is safe because each of its
    writes is one statement or one transaction, refused whole (a Redis command cut off
    mid-reply may have run: the queue's writes are fenced, so a second run of one changes
    nothing).
    """
    outage = outage or Outage()
    waiting = False
    try:
        while True:
            try:
                return action()
            except WAITS as error:
                if stopping():
                    raise StillLocked(f"{what}: {error}") from None
                if not waiting:
                    outage.began(f"{what}: {error}; trying again until it answers")
                    waiting = True
            time.sleep(RETRY_PAUSE)
    finally:
        if waiting:
            outage.ended()


class Database:
    """The shared SQLite file, opened correctly for many processes and many threads.

    * WAL lets readers and the one writer work at the same time; `synchronous=NORMAL`
      is safe in WAL (a power cut may lose the last commits, never corrupt the file).
    * `busy_timeout`: a writer that finds the file locked by another process waits for
      it instead of failing with "database is locked".
    * `write()` starts with `BEGIN IMMEDIATE`, which takes the write lock *before* the
      first read. Python's default starts the transaction at the first write, so a
      read-modify-write would read outside it and silently lose updates.
    * Writes (`write()`, `execute()`) share one connection per process, used by one
      thread at a time behind `self.lock`. A web copy answers on 32 threads, and threads
      of one process would only queue for SQLite's single write lock anyway: on a Python
      lock the next thread wakes as soon as the lock is free, where SQLite's busy handler
      sleeps and retries, and may sleep past that moment.
    * Reads (`query()`) do not queue there. In WAL a reader never waits for the writer,
      but a read behind `self.lock` would wait for whichever thread held it, and that
      thread may itself be waiting for another process's write lock: a `GET /session`
      would take as long as a `POST /cart` on the same copy that waits. So a read takes a
      connection of its own from a small pool of read-only ones (`query_only`: a write
      sent there by mistake fails loudly instead of bypassing `BEGIN IMMEDIATE`). A read
      inside `write()` stays on the writer's connection: it is part of the transaction.
    * Every connection is opened lazily and belongs to the process that opened it, so a
      forked child never uses its parent's (sqlite.org, "How to corrupt a database", 2.6).
      Opening retries while the file is locked (`_open`): copies that start together on
      a brand-new file all start.
    * A lock still held when the busy timeout runs out, at the open, at `BEGIN
      IMMEDIATE`, at any statement or at `COMMIT`, is raised as `StoreUnavailable`.
    """

    def __init__(self, path: Path, timeout: float = BUSY_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self.lock = threading.RLock()  # the writer's: one write at a time in this process
        self._writer: sqlite3.Connection | None = None
        self._writer_pid = 0
        self._readers_lock = threading.Lock()  # only guards the list below
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_pid = 0
        self._transaction = threading.local()  # .connection while this thread is in write()

    def _open(self, read_only: bool = False) -> sqlite3.Connection:
        """A configured connection, retried while the file is locked, up to the timeout.

        Switching a brand-new file to WAL needs every other connection out of the way, and
        SQLite does not call the busy handler there when another opener holds the write
        lock (it would deadlock): two processes that open a new file at the same instant
        made one fail at once with "database is locked". So the open itself retries.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA query_only={int(read_only)}")
                return conn
            except sqlite3.OperationalError as error:
                conn.close()
                if not is_locked(error) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    def _writer_connection(self) -> sqlite3.Connection:
        """The process's one write connection; the caller holds `self.lock`."""
        if self._writer is None or self._writer_pid != os.getpid():
            self._writer, self._writer_pid = self._open(), os.getpid()
        return self._writer

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding SQLite's write lock from its first statement.

        An exception inside the block rolls back everything the block wrote."""
        with self.lock, waits_recognised():
            conn = self._writer_connection()
            conn.execute("BEGIN IMMEDIATE")
            self._transaction.connection = conn
            try:
                yield conn
                conn.execute("COMMIT")
            finally:
                self._transaction.connection = None
                if conn.in_transaction:  # the block raised, or COMMIT failed (a full disk):
                    conn.execute("ROLLBACK")  # never leave the next write inside this one

    def execute(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run one statement that writes: alone it is its own transaction; inside
        `write()`, part of it."""
        with self.lock, waits_recognised():
            return self._writer_connection().execute(sql, params).fetchall()

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run one read. Inside this thread's `write()`, it is part of the transaction;
        anywhere else it runs on a read connection and never waits for a writer."""
        with waits_recognised():
            conn = getattr(self._transaction, "connection", None)
            if conn is not None:
                return conn.execute(sql, params).fetchall()
            conn = self._take_reader()
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                self._return_reader(conn)

    def _take_reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            if self._readers_pid != os.getpid():  # forked: the parent's are not ours
                self._idle_readers, self._readers_pid = [], os.getpid()
            if self._idle_readers:
                return self._idle_readers.pop()
        return self._open(read_only=True)

    def _return_reader(self, conn: sqlite3.Connection) -> None:
        with self._readers_lock:
            if self._readers_pid == os.getpid() and len(self._idle_readers) < IDLE_READERS:
                self._idle_readers.append(conn)
                return
        conn.close()

    def create_tables(self, script: str) -> None:
        """Create what is missing. A file that is not a database, or holds tables of the
        same names laid out otherwise, is a configuration error: one line, exit 2. (A
        locked one is `StoreUnavailable`, busy and not wrong: the caller's usual handling
        applies.)"""
        try:
            with self.write() as conn:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        except sqlite3.DatabaseError as error:
            raise ConfigError(f"{self.path} is not a database of this app: {error}") from None

    def close(self) -> None:
        """Close this process's connections, except a writer still in use: a worker that
        stops at its deadline may leave a task's thread inside a write, and the process's
        exit ends that one."""
        with self._readers_lock:
            idle = self._idle_readers if self._readers_pid == os.getpid() else []
            self._idle_readers = []
        for conn in idle:
            conn.close()
        if self.lock.acquire(blocking=False):
            try:
                if self._writer is not None and self._writer_pid == os.getpid():
                    self._writer.close()
                self._writer = None
            finally:
                self.lock.release()


def database_path(url: str) -> Path:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` to a path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(f"DATABASE_URL must look like sqlite:///path/to/file.db, got {url!r}")
    path = url[len(prefix):]
    if path == ":memory:" or path.startswith("file:"):
        # Each connection would get a database of its own, shared with no other process:
        # the memory store's failure, hidden behind the SQLite store's name.
        raise ConfigError(f"DATABASE_URL must name a file that every process can open, "
                          f"got {url!r}")
    return Path(path)


BackingService = Union["Database", Redis]

DEFAULT_STORE_MAX_MB = 1024
MIN_FREE_DISK = 64 << 20   # bytes: below this, a SQLite file's disk counts as full
ROOM_MEASURED_EVERY = 0.5  # seconds a measurement of the store's size is trusted, ...
LARGE_WRITE = 64 << 10     # ... except by a write this large (an upload's piece: 1 MiB)


class Room:
    """Is there room to write? STORE_MAX_MB is a ceiling on what the store holds (SQLite:
    its pages in use; Redis: its memory), and for a SQLite file the disk must keep
    MIN_FREE_DISK free: a full disk refuses even the DELETE that would make room, and the
    WAL needs space to commit one. A ceiling below the disk, not a quota.

    A measurement costs a query (Redis: INFO), so it is trusted for ROOM_MEASURED_EVERY
    seconds; but what this process writes counts against it at once (`writing`): the bytes
    of its writes under way, and of those done since the measurement began. So a process
    alone never passes the ceiling, however fast it writes (but for a stored byte's
    overhead: SQLite's pages, Redis's allocations). A large write measures first, and so
    also sees what other processes have written. What they have under way at that moment
    it cannot see: several copies together may pass the ceiling by one piece (1 MiB) per
    upload they have in flight, plus the small writes (sessions) they made in the last
    ROOM_MEASURED_EVERY seconds.
    """

    def __init__(self, service: BackingService, max_bytes: int):
        self.service, self.max_bytes = service, max_bytes
        self.lock = threading.Lock()  # guards the numbers below; never held to measure
        self.measured_at = -ROOM_MEASURED_EVERY  # when the last measurement began
        self.left = 0           # bytes the store could still take then,
        self.full = ""          # ... and what to say to a write that does not fit
        self.written = 0        # bytes of this process's writes done, since it started
        self.written_then = 0   # ... of which done before the last measurement began
        self.under_way = 0      # bytes of this process's writes under way now

    def check(self) -> None:
        """Raise StoreFull (507) when there is no room for more (for a write of a size not
        known here: it is not counted)."""
        self.measure_if_due(0)
        with self.lock:
            self.refuse_unless_it_fits(0)

    @contextmanager
    def writing(self, size: int) -> Iterator[None]:
        """Around a write of `size` bytes: StoreFull (507) if they do not fit; else they
        count as under way in the block, then as written until a measurement sees them."""
        self.measure_if_due(size)
        with self.lock:
            self.refuse_unless_it_fits(size)
            self.under_way += size
        try:
            yield
        finally:  # a write that failed counts too, until the next measurement: no harm
            with self.lock:
                self.under_way -= size
                self.written += size

    def refuse_unless_it_fits(self, size: int) -> None:
        """Raise StoreFull unless `size` bytes fit beside what was written since the
        measurement and what is under way. The caller holds `self.lock`."""
        if self.written - self.written_then + self.under_way + size >= self.left:
            raise StoreFull(self.full)

    def measure_if_due(self, size: int) -> None:
        """Measure again if the last measurement is too old, or the write large."""
        if size < LARGE_WRITE and time.monotonic() - self.measured_at < ROOM_MEASURED_EVERY:
            return
        with self.lock:
            began, written_then = time.monotonic(), self.written
        left, full = self.measure()
        with self.lock:
            if began > self.measured_at:  # one that began later may have ended first
                self.measured_at, self.left, self.full = began, left, full
                self.written_then = written_then

    def measure(self) -> tuple[int, str]:
        """How many bytes more the store may take, and what to say to a write that does
        not fit."""
        held = self.held()
        if isinstance(self.service, Database):
            disk_left = shutil.disk_usage(self.service.path.parent).free - MIN_FREE_DISK
            if disk_left < self.max_bytes - held:
                return disk_left, (f"the disk of {self.service.path} is nearly full; "
                                   f"try again later")
        return self.max_bytes - held, (
            f"no room under the store's ceiling, STORE_MAX_MB={self.max_bytes / (1 << 20):g} "
            f"(it held {held / (1 << 20):.1f} MB when measured); try again once old "
            f"sessions have expired")

    def held(self) -> int:
        """What the store holds now, in bytes: SQLite its pages in use, Redis its memory."""
        if isinstance(self.service, Redis):
            info = self.service.execute("INFO", "memory").decode()
            return int(info.split("used_memory:", 1)[1].split()[0])
        pages = self.service.query("SELECT * FROM pragma_page_count(), "
                                   "pragma_freelist_count(), pragma_page_size()")[0]
        return (pages[0] - pages[1]) * pages[2]


def room_from_env(environ: Mapping[str, str], service: BackingService) -> Room:
    """STORE_MAX_MB: what the store may hold, in MB (default 1024)."""
    megabytes = whole_number(environ, "STORE_MAX_MB", DEFAULT_STORE_MAX_MB, 1 << 20,
                             "megabytes")
    return Room(service, megabytes << 20)


def database_from_env(environ: Mapping[str, str]) -> BackingService:
    """Open the backing service that DATABASE_URL names (REDIS_URL when it is unset, as
    Heroku's Redis add-on sets it; else the default SQLite file, var/app.db). A malformed
    URL or a refused password is a ConfigError: one line, exit 2.

    DATABASE_BUSY_TIMEOUT (seconds): how long the store may take to answer. For SQLite
    (default 10), how long one statement waits for another process's write lock before
    "database is locked"; for Redis (default 5), how long a command waits for its reply,
    on top of at most 2 s to connect: under the 10 s in which a web copy must answer,
    503 if it comes to that."""
    url = environ.get("DATABASE_URL") or environ.get("REDIS_URL") or "sqlite:///var/app.db"
    if url.startswith(("redis://", "rediss://")):
        return redis_from_url(url, positive_number(environ, "DATABASE_BUSY_TIMEOUT",
                                                   REPLY_TIMEOUT, MAX_BUSY_TIMEOUT))
    path = database_path(url)
    db = Database(path, positive_number(environ, "DATABASE_BUSY_TIMEOUT", BUSY_TIMEOUT,
                                        MAX_BUSY_TIMEOUT))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db.execute("SELECT 1")  # opens the write connection: creates the file, in WAL
    except (OSError, sqlite3.Error, StoreUnavailable) as error:
        raise ConfigError(f"DATABASE_URL={url}: cannot open the database: {error}") from None
    return db


def redis_from_url(url: str, reply_timeout: float) -> Redis:
    """A Redis client. A typo in the URL, or a password Redis refuses, is found at start, not
    at the first user's request (its password is never printed). A Redis that does not
    answer yet (down, or loading its data after a restart) is a wait, as later: the
    process starts, and its first request finds out."""
    try:
        redis = Redis(url, min(CONNECT_TIMEOUT, reply_timeout), reply_timeout)
    except ValueError as error:  # the message never quotes the URL: it may hold a password
        raise ConfigError(f"DATABASE_URL: {error}") from None
    try:
        redis.execute("PING")
    except RedisUnavailable as error:
        log(f"{error}; starting anyway, and trying again at each request")
    except RedisError as error:  # a refused password, or no such database number
        raise ConfigError(f"DATABASE_URL={redis.url.masked}: {error}") from None
    return redis
