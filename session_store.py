"""Where user state lives: the backing service every process shares (Factor VI).

Factor VI says a process keeps nothing it cannot lose. The terrible day this module
prevents: you raise the web copies from one to four, and three requests out of four
forget who the user is, because the session sat in the memory of the copy that happened
to log them in. Here every byte of user state (sessions and uploads) goes to a store
outside the process, so any copy can serve any request and any copy can die.

Two stores share one small interface (`SessionStore`):

* `SQLiteStore`, the right way: one SQLite file that every process on the machine opens.
* `MemoryStore`, a dict inside this process, kept on purpose to show the failure.

The interface is Django's session backend plus what Django lacks, an atomic
read-modify-write: `edit(sid)` holds a write lock from the read to the write, so two
requests that change the same session at once (two tabs adding to one cart) both land.
Last-write-wins, the default in Django and Flask-Session, silently loses one of them.

    with store.edit(sid) as session:      # locked from here ...
        session.data["cart"].append(item)
    # ... to here, where the change is written (only if something changed)

Adding a Redis or Postgres store means one more subclass that fills in the same hooks
(`locked`, `read`, `write`, `remove` for sessions; `save_upload`, `load_upload`,
`purge_expired`) and a name in `store_from_env`: `locked` would be a transaction with
`SELECT … FOR UPDATE` (Postgres) or a WATCH/MULTI retry loop (Redis); uploads would go to
object storage. Nothing else in the app changes.

`Database` is the plumbing for the shared SQLite file, used by `SQLiteStore` here and by
the job queue in `worker.py`. SQLite suits processes on one machine with a local disk;
several machines need a networked database, which is where this toy ends.
"""
from __future__ import annotations

import copy
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Iterator, Mapping


class ConfigError(Exception):
    """A bad configuration value; the message names the environment variable."""


def new_session_id() -> str:
    """256 random bits from the OS: unguessable, so a session cannot be hijacked by guessing."""
    return secrets.token_urlsafe(32)


def empty_session() -> dict:
    return {"user": None, "cart": [], "uploads": []}


@dataclass
class Session:
    """One user's state, as `edit` hands it out. `id` may differ from the id asked for."""
    id: str
    data: dict
    is_new: bool = False
    delete: bool = False  # set to end the session when the `edit` block closes


@dataclass(frozen=True)
class Upload:
    id: str
    filename: str
    content_type: str
    data: bytes = field(repr=False)


class SessionStore:
    """The interface every store fills in. A new backend is one more subclass.

    `edit` is written once, here; a backend supplies the lock (`locked`) and the three
    primitive operations on one session (`read`, `write`, `remove`).
    """
    kind = "abstract"
    ttl: float  # seconds a session lives after its last write

    def load(self, sid: str | None) -> dict | None:
        """The session's data, or None when it does not exist or has expired."""
        return self.read(sid)

    @contextmanager
    def edit(self, sid: str | None, rotate: bool = False) -> Iterator[Session]:
        """Lock, read, yield the session for changes, write: one atomic step.

        An unknown or expired `sid` is never adopted: the block gets a fresh session
        with a new id (a client cannot choose its own id). `rotate=True` moves the data
        to a new id and drops the old one in the same step (do it on login).
        """
        with self.locked():
            before = self.read(sid)
            if before is None:
                session = Session(new_session_id(), empty_session(), is_new=True)
            elif rotate:
                session = Session(new_session_id(), before, is_new=True)
            else:  # a copy, so that `before` still shows what changed
                session = Session(sid, copy.deepcopy(before))
            yield session
            if session.delete or session.id != sid:
                self.remove(sid)
            # Save only when modified: an unchanged session costs no write.
            if not session.delete and (session.is_new or session.data != before):
                self.write(session.id, session.data)

    def locked(self) -> ContextManager:
        """Held from the read to the write of `edit`, across threads and processes."""
        raise NotImplementedError

    def read(self, sid: str | None) -> dict | None:
        raise NotImplementedError

    def write(self, sid: str, data: dict) -> None:
        """Store `data` under `sid`, living SESSION_TTL seconds from now."""
        raise NotImplementedError

    def remove(self, sid: str | None) -> None:
        raise NotImplementedError

    def save_upload(self, filename: str, content_type: str, data: bytes) -> str:
        """Keep an uploaded file; returns its id (unguessable, like a session id)."""
        raise NotImplementedError

    def load_upload(self, upload_id: str) -> Upload | None:
        raise NotImplementedError

    def purge_expired(self) -> int:
        """Remove expired sessions; returns how many went."""
        raise NotImplementedError


class MemoryStore(SessionStore):
    """A dict in this process: fine for one copy, wrong for two. Kept to show why.

    A second copy has a second dict, so a user logged in on web.1 is a stranger to web.2,
    and a restart forgets everybody.
    """
    kind = "memory"

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.sessions: dict[str, tuple[float, str]] = {}  # id -> (expires_at, JSON)
        self.uploads: dict[str, Upload] = {}
        self.lock = threading.Lock()  # one `edit` at a time, like a write transaction

    def locked(self) -> ContextManager:
        return self.lock

    def read(self, sid: str | None) -> dict | None:
        expires_at, text = self.sessions.get(sid, (0.0, ""))
        return json.loads(text) if expires_at > time.time() else None

    def write(self, sid: str, data: dict) -> None:
        self.sessions[sid] = (time.time() + self.ttl, json.dumps(data))

    def remove(self, sid: str | None) -> None:
        self.sessions.pop(sid, None)

    def save_upload(self, filename: str, content_type: str, data: bytes) -> str:
        upload = Upload(secrets.token_urlsafe(16), filename, content_type, data)
        self.uploads[upload.id] = upload
        return upload.id

    def load_upload(self, upload_id: str) -> Upload | None:
        return self.uploads.get(upload_id)

    def purge_expired(self) -> int:
        now = time.time()
        with self.lock:
            expired = [sid for sid, (expires_at, _) in self.sessions.items() if expires_at <= now]
            for sid in expired:
                del self.sessions[sid]
        return len(expired)


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
        """A transaction holding SQLite's write lock from its first statement."""
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


SESSION_TABLES = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


class SQLiteStore(SessionStore):
    """Sessions and uploads in the shared SQLite file: every copy sees the same state."""
    kind = "sqlite"

    def __init__(self, db: Database, ttl: float):
        self.db = db
        self.ttl = ttl
        db.create_tables(SESSION_TABLES)

    def locked(self) -> ContextManager:
        return self.db.write()

    def read(self, sid: str | None) -> dict | None:
        rows = self.db.query("SELECT data FROM sessions WHERE id = ? AND expires_at > ?",
                             (sid, time.time()))
        return json.loads(rows[0]["data"]) if rows else None

    def write(self, sid: str, data: dict) -> None:
        self.db.query("INSERT OR REPLACE INTO sessions (id, data, expires_at) VALUES (?, ?, ?)",
                      (sid, json.dumps(data), time.time() + self.ttl))

    def remove(self, sid: str | None) -> None:
        self.db.query("DELETE FROM sessions WHERE id = ?", (sid,))

    def save_upload(self, filename: str, content_type: str, data: bytes) -> str:
        upload_id = secrets.token_urlsafe(16)
        self.db.query("INSERT INTO uploads VALUES (?, ?, ?, ?, ?)",
                      (upload_id, filename, content_type, data, time.time()))
        return upload_id

    def load_upload(self, upload_id: str) -> Upload | None:
        rows = self.db.query("SELECT id, filename, content_type, data FROM uploads "
                             "WHERE id = ?", (upload_id,))
        return Upload(*rows[0]) if rows else None

    def purge_expired(self, batch: int = 500) -> int:
        """Delete in small batches so the write lock is never held for long."""
        total = 0
        while True:
            with self.db.write() as conn:
                deleted = conn.execute(
                    "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                    "WHERE expires_at <= ? LIMIT ?)", (time.time(), batch)).rowcount
            total += deleted
            if deleted < batch:
                return total


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


def positive_number(environ: Mapping[str, str], name: str, default: float) -> float:
    """Read a positive number from the environment, or say which variable is wrong."""
    text = environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:  # `inf` and `nan` parse as floats too
        raise ConfigError(f"{name} must be a positive number of seconds, got {text!r}")
    return value


def store_from_env(environ: Mapping[str, str], db: Database) -> SessionStore:
    """Pick the store named by SESSION_STORE (`sqlite`, the default, or `memory`)."""
    kind = environ.get("SESSION_STORE", "sqlite")
    ttl = positive_number(environ, "SESSION_TTL", 86400)
    if kind == "sqlite":
        return SQLiteStore(db, ttl)
    if kind == "memory":
        return MemoryStore(ttl)
    raise ConfigError(f"SESSION_STORE must be 'sqlite' or 'memory', got {kind!r}")
