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
`upload_info`, `purge_expired`) and a name in `store_from_env`: `locked` would be a
transaction with `SELECT … FOR UPDATE` (Postgres) or a WATCH/MULTI retry loop (Redis);
uploads would go to object storage. Nothing else in the app changes.

`SQLiteStore` builds on `database.py`, the plumbing for the shared SQLite file that the
job queue (`job_queue.py`) uses too; each keeps to its own tables.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ContextManager, Iterator, Mapping

from database import ConfigError, Database, whole_seconds

MAX_SESSION_TTL = 400 * 86400  # browsers cap a cookie's Max-Age at 400 days (RFC 6265bis)


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


@dataclass(frozen=True)
class UploadInfo:
    """What a page lists about an upload, without its bytes."""
    id: str
    filename: str
    content_type: str
    size: int


class SessionStore:
    """The interface every store fills in. A new backend is one more subclass.

    `edit` and `load` are written once, here; a backend supplies the lock (`locked`) and
    the three primitive operations on one session (`read`, `write`, `remove`), which move
    its data as JSON text: the store never needs to know what a session holds.
    """
    kind = "abstract"
    ttl: float  # seconds a session lives after its last write (whole, from the environment)

    @contextmanager
    def edit(self, sid: str | None, rotate: bool = False) -> Iterator[Session]:
        """Lock, read, yield the session for changes, write: one atomic step.

        An unknown or expired `sid` is never adopted: the block gets a fresh session
        with a new id (a client cannot choose its own id). `rotate=True` moves the data
        to a new id and drops the old one in the same step (do it on login).
        """
        with self.locked():
            stored = self.read(sid)
            if stored is None:
                session = Session(new_session_id(), empty_session(), is_new=True)
            elif rotate:
                session = Session(new_session_id(), json.loads(stored), is_new=True)
            else:
                session = Session(sid, json.loads(stored))
            yield session
            if session.delete or session.id != sid:
                self.remove(sid)
            if not session.delete:
                # Save only when modified: an unchanged session costs no write. Modified
                # means its JSON differs from the text read: `json.dumps` wrote that text,
                # so unchanged data encodes to it exactly. Comparing texts needs no copy of
                # the data kept from before the block (a deep copy cost more than the read
                # and the write together, 25-85 µs for a cart of 100 to 400 items), the
                # text compared is the text written, and it tells 1 from 1.0 or True,
                # which `==` on the data does not.
                text = json.dumps(session.data)
                if session.is_new or text != stored:
                    self.write(session.id, text)

    def load(self, sid: str | None) -> dict | None:
        """The session's data, or None when it does not exist or has expired."""
        stored = self.read(sid)
        return None if stored is None else json.loads(stored)

    def locked(self) -> ContextManager:
        """Held from the read to the write of `edit`, across threads and processes."""
        raise NotImplementedError

    def read(self, sid: str | None) -> str | None:
        """The session's data as JSON text, or None when it does not exist or has expired."""
        raise NotImplementedError

    def write(self, sid: str, text: str) -> None:
        """Store the JSON `text` under `sid`, living SESSION_TTL seconds from now."""
        raise NotImplementedError

    def remove(self, sid: str | None) -> None:
        raise NotImplementedError

    def save_upload(self, filename: str, content_type: str, data: bytes) -> str:
        """Keep an uploaded file; returns its id (unguessable, like a session id)."""
        raise NotImplementedError

    def load_upload(self, upload_id: str) -> Upload | None:
        raise NotImplementedError

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        """The upload's name, type and size, without reading its bytes."""
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

    def read(self, sid: str | None) -> str | None:
        expires_at, text = self.sessions.get(sid, (0.0, ""))
        return text if expires_at > time.time() else None

    def write(self, sid: str, text: str) -> None:
        self.sessions[sid] = (time.time() + self.ttl, text)

    def remove(self, sid: str | None) -> None:
        self.sessions.pop(sid, None)

    def save_upload(self, filename: str, content_type: str, data: bytes) -> str:
        upload = Upload(secrets.token_urlsafe(16), filename, content_type, data)
        self.uploads[upload.id] = upload
        return upload.id

    def load_upload(self, upload_id: str) -> Upload | None:
        return self.uploads.get(upload_id)

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        upload = self.uploads.get(upload_id)
        if upload is None:
            return None
        return UploadInfo(upload.id, upload.filename, upload.content_type, len(upload.data))

    def purge_expired(self) -> int:
        now = time.time()
        with self.lock:
            expired = [sid for sid, (expires_at, _) in self.sessions.items() if expires_at <= now]
            for sid in expired:
                del self.sessions[sid]
        return len(expired)


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

    def read(self, sid: str | None) -> str | None:
        rows = self.db.query("SELECT data FROM sessions WHERE id = ? AND expires_at > ?",
                             (sid, time.time()))
        return rows[0]["data"] if rows else None

    def write(self, sid: str, text: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO sessions (id, data, expires_at) "
                        "VALUES (?, ?, ?)", (sid, text, time.time() + self.ttl))

    def remove(self, sid: str | None) -> None:
        self.db.execute("DELETE FROM sessions WHERE id = ?", (sid,))

    def save_upload(self, filename: str, content_type: str, data: bytes) -> str:
        upload_id = secrets.token_urlsafe(16)
        self.db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?)",
                        (upload_id, filename, content_type, data, time.time()))
        return upload_id

    def load_upload(self, upload_id: str) -> Upload | None:
        rows = self.db.query("SELECT id, filename, content_type, data FROM uploads "
                             "WHERE id = ?", (upload_id,))
        return Upload(*rows[0]) if rows else None

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        # length() of a BLOB needs only the row's header: the bytes are not read.
        rows = self.db.query("SELECT id, filename, content_type, length(data) FROM uploads "
                             "WHERE id = ?", (upload_id,))
        return UploadInfo(*rows[0]) if rows else None

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


def store_from_env(environ: Mapping[str, str], db: Database) -> SessionStore:
    """Pick the store named by SESSION_STORE (`sqlite`, the default, or `memory`).

    SESSION_TTL is whole seconds from 1, because it is also the cookie's `Max-Age`, which
    is whole seconds: 0.5 would have become `Max-Age=0`, a cookie deleted on arrival."""
    kind = environ.get("SESSION_STORE", "sqlite")
    ttl = whole_seconds(environ, "SESSION_TTL", 86400, MAX_SESSION_TTL)
    if kind == "sqlite":
        return SQLiteStore(db, ttl)
    if kind == "memory":
        return MemoryStore(ttl)
    raise ConfigError(f"SESSION_STORE must be 'sqlite' or 'memory', got {kind!r}")
