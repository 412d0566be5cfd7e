"""Where user state lives: the backing service every process shares (Factor VI).

Factor VI says a process keeps nothing it cannot lose. The terrible day this module
prevents: you raise the web copies from one to four, and three requests out of four
forget who the user is, because the session sat in the memory of the copy that happened
to log them in. Here every byte of user state (sessions and uploads) goes to a store
outside the process, so any copy can serve any request and any copy can die.

Three stores share one small interface (`SessionStore`), and the same URL that names the
backing service picks between the two right ones (`database.py`):

* `SQLiteStore`: one SQLite file that every process on the machine opens.
* `RedisStore`: a Redis server that every machine can reach (Factor IV: a URL away).
* `MemoryStore`, a dict inside this process, kept on purpose to show the failure
  (SESSION_STORE=memory).

The interface is Django's session backend plus what Django lacks, an atomic
read-modify-write: `edit(sid, change)` reads the session, calls `change(session)`, and
writes the result, so two requests that change the same session at once (two tabs
adding to one cart) both land. Last-write-wins, the default in Django and
Flask-Session, silently loses one of them. Each store makes `edit` atomic its own way,
and the two ways are the two classic ones:

* pessimistic (SQLite, memory): take the lock, read, change, write, let go. `change`
  runs once; the others wait.
* optimistic (Redis): WATCH the key, read, change, write in MULTI/EXEC; if anyone
  wrote the key in between, EXEC does nothing, and it all runs again. So `change` may
  run more than once: it must only change the session, never do anything else (enqueue,
  send, store) that a second run would repeat.

What `edit` does with the result is written once (`plan`): an unknown or expired id is
never adopted (a client cannot choose its id); `rotate=True` moves the data to a new id
(at login, against a planted id); a session is written only when it changed, and refused
over MAX_SESSION_BYTES (it is rewritten whole on every change); and its uploads live and
die with it. An upload is stored in chunks before it is attached (`save_upload`), so a
10 MiB file never sits whole in a process's memory, and it belongs to the session that
lists it: a logout deletes it, and so does the session's expiry (Redis expires both
keys together; SQLite and memory purge them, `purge_expired`).

`SQLiteStore` builds on `database.py`'s `Database`, `RedisStore` on `redis_client.py`.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Mapping

from database import (ConfigError, Database, Refused, Room, room_from_env, waits_recognised,
                      whole_seconds)
from redis_client import Connection, Redis, RedisError

MAX_SESSION_TTL = 400 * 86400  # browsers cap a cookie's Max-Age at 400 days (RFC 6265bis)
MAX_SESSION_BYTES = 64 << 10   # a session as stored: it is read and written whole
PENDING_UPLOAD_TTL = 3600      # seconds an upload may wait to be attached to a session
MAX_EDIT_SECONDS = 5.0         # an optimistic edit that keeps losing gives up (503)


def new_session_id() -> str:
    """256 random bits from the OS: unguessable, so a session cannot be hijacked by guessing."""
    return secrets.token_urlsafe(32)


def empty_session() -> dict:
    return {"user": None, "cart": [], "uploads": []}


@dataclass
class Session:
    """One user's state, as `edit` hands it to `change`. `id` may differ from the id asked
    for (a new session, a rotated one)."""
    id: str
    data: dict
    is_new: bool = False
    unknown: bool = False  # the id asked for named no live session: this one is new
    delete: bool = False   # set by `change` to end the session

    def renew_id(self) -> None:
        """Go on under a new id, and drop the old one, in the same edit (as `rotate`)."""
        self.id, self.is_new = new_session_id(), True


@dataclass(frozen=True)
class UploadInfo:
    """What a page lists about an upload; its bytes come from `upload_chunks`."""
    id: str
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class Plan:
    """What an edit writes, the same for every store."""
    remove: str | None = None               # an id that ends (a logout, a rotation's old id)
    remove_uploads: tuple[str, ...] = ()    # ... the uploads that end with it (a logout)
    write: str | None = None                # the id to write, living `ttl` from now
    text: str = ""                          # ... its data as JSON
    uploads: tuple[str, ...] = field(default=())  # ... and the uploads that live as long


def opened(sid: str | None, stored: str | None, rotate: bool) -> Session:
    """The session `edit` hands out: a fresh one for an id that is unknown or expired."""
    if stored is None:
        return Session(new_session_id(), empty_session(), is_new=True, unknown=sid is not None)
    if rotate:
        return Session(new_session_id(), json.loads(stored), is_new=True)
    return Session(sid, json.loads(stored))


def plan(sid: str | None, stored: str | None, session: Session) -> Plan:
    """What to write after `change`. Save only when modified: modified means its JSON
    differs from the text read, which `json.dumps` wrote, so unchanged data encodes to it
    exactly; no copy of the data is kept from before, and 1 is told from 1.0 and True."""
    ending = session.delete or session.id != sid
    remove = sid if ending and stored is not None else None
    remove_uploads = tuple(json.loads(stored)["uploads"]) if remove and session.delete else ()
    if session.delete:
        return Plan(remove, remove_uploads)
    text = json.dumps(session.data)
    if len(text.encode()) > MAX_SESSION_BYTES:
        raise Refused(413, f"this session would hold over {MAX_SESSION_BYTES >> 10} KiB; "
                           f"empty the cart or log out")
    if not session.is_new and text == stored:
        return Plan()
    return Plan(remove, (), session.id, text, tuple(session.data["uploads"]))


def chunks_of(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


class SessionStore:
    """The interface every store fills in. A new backend is one more subclass."""
    kind = "abstract"
    ttl: int  # seconds a session lives after its last write (whole, from the environment)

    def edit(self, sid: str | None, change: Callable[[Session], None],
             rotate: bool = False) -> Session:
        """Read, `change`, write: one atomic step, whatever other copies do at the same
        time. `change` may raise (a full cart): nothing is written. Returns the session.

        Written here for a store with a lock (SQLite, memory): hold it from the read to
        the write, and `change` runs once. Redis overrides it with its optimistic loop."""
        with self.locked():
            stored = self.read(sid)
            session = opened(sid, stored, rotate)
            change(session)
            self.apply(plan(sid, stored, session))
        return session

    def locked(self) -> ContextManager:
        """Held from the read to the write of `edit`, across threads and processes."""
        raise NotImplementedError

    def apply(self, plan: Plan) -> None:
        """Write what `plan` says, inside `locked`."""
        raise NotImplementedError

    def load(self, sid: str | None) -> dict | None:
        """The session's data, or None when it does not exist or has expired."""
        stored = self.read(sid)
        return None if stored is None else json.loads(stored)

    def read(self, sid: str | None) -> str | None:
        """The session's data as JSON text, or None when it does not exist or has expired."""
        raise NotImplementedError

    def save_upload(self, filename: str, content_type: str, chunks: Iterable[bytes]) -> str:
        """Keep a file, piece by piece; its id (unguessable, like a session id). It is
        pending until a session lists it; one left pending is purged after an hour."""
        raise NotImplementedError

    def discard_upload(self, upload_id: str) -> None:
        raise NotImplementedError

    def upload_info(self, upload_id: str) -> UploadInfo | None:
        raise NotImplementedError

    def upload_chunks(self, upload_id: str) -> Iterator[bytes]:
        """The upload's bytes, a piece at a time (empty if it is gone meanwhile)."""
        raise NotImplementedError

    def purge_expired(self) -> int:
        """Remove expired sessions and their uploads; returns how many sessions went."""
        raise NotImplementedError


class MemoryStore(SessionStore):
    """A dict in this process: fine for one copy, wrong for two. Kept to show why.

    A second copy has a second dict, so a user logged in on web.1 is a stranger to web.2,
    and a restart forgets everybody.
    """
    kind = "memory"

    def __init__(self, ttl: int):
        self.ttl = ttl
        self.sessions: dict[str, tuple[float, str]] = {}  # id -> (expires_at, JSON)
        self.uploads: dict[str, tuple[UploadInfo, bytes, float]] = {}  # ... saved_at
        self.owners: dict[str, str] = {}  # upload id -> the session that lists it
        self.lock = threading.Lock()  # one `edit` at a time, like a write transaction

    def locked(self):
        return self.lock

    def apply(self, plan: Plan) -> None:
        self.sessions.pop(plan.remove, None)
        for upload_id in plan.remove_uploads:
            self.uploads.pop(upload_id, None)
        if plan.write:
            self.sessions[plan.write] = (time.time() + self.ttl, plan.text)
            self.owners.update(dict.fromkeys(plan.uploads, plan.write))

    def read(self, sid):
        expires_at, text = self.sessions.get(sid, (0.0, ""))
        return text if expires_at > time.time() else None

    def save_upload(self, filename, content_type, chunks):
        data = b"".join(chunks)
        info = UploadInfo(secrets.token_urlsafe(16), filename, content_type, len(data))
        self.uploads[info.id] = (info, data, time.time())
        return info.id

    def discard_upload(self, upload_id):
        self.uploads.pop(upload_id, None)
        self.owners.pop(upload_id, None)

    def upload_info(self, upload_id):
        return self.uploads[upload_id][0] if upload_id in self.uploads else None

    def upload_chunks(self, upload_id):
        return chunks_of(self.uploads[upload_id][1] if upload_id in self.uploads else b"")

    def purge_expired(self):
        now = time.time()
        with self.lock:
            expired = [sid for sid, (expires_at, _) in self.sessions.items() if expires_at <= now]
            for sid in expired:
                del self.sessions[sid]
            for upload_id, (_, _, saved_at) in list(self.uploads.items()):
                if self.orphaned(upload_id, saved_at, now):
                    self.discard_upload(upload_id)
        return len(expired)

    def orphaned(self, upload_id: str, saved_at: float, now: float) -> bool:
        """Its session is gone; or it was never attached, and an hour has passed."""
        owner = self.owners.get(upload_id)
        if owner is None:
            return saved_at < now - PENDING_UPLOAD_TTL
        return owner not in self.sessions


SESSION_TABLES = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    session TEXT
);
CREATE INDEX IF NOT EXISTS files_by_session ON files (session);
CREATE TABLE IF NOT EXISTS file_chunks (
    file_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (file_id, seq)
)
"""


class SQLiteStore(SessionStore):
    """Sessions and uploads in the shared SQLite file: every copy sees the same state.

    `edit` is pessimistic: `BEGIN IMMEDIATE` takes SQLite's write lock before the read,
    so a second edit of any session waits until the first has written. An upload is a
    row in `files` and its pieces in `file_chunks`, each piece written in a transaction
    of its own, so a 10 MiB upload never holds the write lock long; `files.session` says
    whose it is, kept in step with the session's list at every write."""
    kind = "sqlite"

    def __init__(self, db: Database, ttl: int, room: Room):
        self.db, self.ttl, self.room = db, ttl, room
        db.create_tables(SESSION_TABLES)

    def locked(self):
        return self.db.write()  # BEGIN IMMEDIATE: the write lock before the read

    def apply(self, plan: Plan) -> None:
        if plan.remove:
            self.db.execute("DELETE FROM sessions WHERE id = ?", (plan.remove,))
        if plan.remove_uploads:
            self.delete_files("session = ?", (plan.remove,))
        if plan.write:
            with self.room.writing(len(plan.text)):
                self.db.execute("INSERT OR REPLACE INTO sessions (id, data, expires_at) "
                                "VALUES (?, ?, ?)",
                                (plan.write, plan.text, time.time() + self.ttl))
            marks = ", ".join("?" * len(plan.uploads))
            self.db.execute(f"UPDATE files SET session = ? WHERE id IN ({marks})",
                            (plan.write, *plan.uploads))

    def delete_files(self, where: str, params: tuple) -> int:
        self.db.execute(f"DELETE FROM file_chunks WHERE file_id IN "
                        f"(SELECT id FROM files WHERE {where})", params)
        return len(self.db.execute(f"DELETE FROM files WHERE {where} RETURNING id", params))

    def read(self, sid):
        rows = self.db.query("SELECT data FROM sessions WHERE id = ? AND expires_at > ?",
                             (sid, time.time()))
        return rows[0]["data"] if rows else None

    def save_upload(self, filename, content_type, chunks):
        upload_id, size = secrets.token_urlsafe(16), 0
        self.db.execute("INSERT INTO files (id, filename, content_type, size, created_at) "
                        "VALUES (?, ?, ?, 0, ?)", (upload_id, filename, content_type, time.time()))
        try:
            for seq, chunk in enumerate(chunks):
                with self.room.writing(len(chunk)):  # a large piece measures the store first
                    self.db.execute("INSERT INTO file_chunks VALUES (?, ?, ?)",
                                    (upload_id, seq, chunk))
                size += len(chunk)
            self.db.execute("UPDATE files SET size = ? WHERE id = ?", (size, upload_id))
        except BaseException:
            self.discard_upload(upload_id)
            raise
        return upload_id

    def discard_upload(self, upload_id):
        with self.db.write():
            self.delete_files("id = ?", (upload_id,))

    def upload_info(self, upload_id):
        rows = self.db.query("SELECT id, filename, content_type, size FROM files WHERE id = ?",
                             (upload_id,))
        return UploadInfo(*rows[0]) if rows else None

    def upload_chunks(self, upload_id):
        for seq in range(1 << 30):  # a piece at a time: never the whole file in memory
            rows = self.db.query("SELECT data FROM file_chunks WHERE file_id = ? AND seq = ?",
                                 (upload_id, seq))
            if not rows:
                return
            yield rows[0]["data"]

    def purge_expired(self, batch: int = 500) -> int:
        """Delete in small batches so the write lock is never held for long: expired
        sessions, then the files no live session holds (a session gone, or an upload
        never attached within an hour)."""
        total = 0
        while True:
            with self.db.write() as conn:
                deleted = conn.execute(
                    "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                    "WHERE expires_at <= ? LIMIT ?)", (time.time(), batch)).rowcount
            total += deleted
            if deleted < batch:
                break
        orphan = ("id IN (SELECT id FROM files WHERE session NOT IN (SELECT id FROM sessions) "
                  "OR session IS NULL AND created_at < ? LIMIT ?)")
        while True:
            with self.db.write():
                if self.delete_files(orphan, (time.time() - PENDING_UPLOAD_TTL, batch)) < batch:
                    return total


# Redis keys: a session is one string, an upload one hash (its name, type, size, and its
# pieces as fields "0", "1", ...). Both live `ttl` seconds from the session's last write.
def session_key(sid: str | None) -> str:
    return f"session:{sid}"


def upload_key(upload_id: str) -> str:
    return f"upload:{upload_id}"


class RedisStore(SessionStore):
    """Sessions and uploads in Redis: every copy, on every machine, sees the same state.

    `edit` is optimistic (WATCH/MULTI/EXEC): nothing is locked, and a write that raced
    another is not made, but read, changed and tried again, until MAX_EDIT_SECONDS (a
    503). Expiry is Redis's own: each write sets the session's key and its uploads' keys
    to expire together, `ttl` seconds later, so nothing needs purging. A Redis out of
    memory refuses what would grow it: StoreFull (507), as a full SQLite file does.
    """
    kind = "redis"

    def __init__(self, redis: Redis, ttl: int, room: Room):
        self.redis, self.ttl, self.room = redis, ttl, room

    def edit(self, sid, change, rotate=False):
        deadline = time.monotonic() + MAX_EDIT_SECONDS
        while time.monotonic() < deadline:
            with waits_recognised(), self.redis.connection() as conn:
                # WATCH, then GET, in one round trip: the watch starts before the read.
                _, stored = conn.pipeline([("WATCH", session_key(sid)), ("GET", session_key(sid))])
                stored = None if stored is None else stored.decode()
                session = opened(sid, stored, rotate)
                change(session)
                writes = plan(sid, stored, session)
                if writes == Plan():
                    return session  # nothing to write (the connection UNWATCHes)
                # A plan that only deletes needs no room. Redis out of memory refuses the
                # commands as MULTI queues them, and EXEC then runs none: that is raised
                # (`waits_recognised`: StoreFull, 507), never taken for a write made.
                with self.room.writing(len(writes.text)) if writes.write else nullcontext():
                    if self.transact(conn, writes):
                        return session
            # Another request wrote this session between our GET and EXEC: EXEC did
            # nothing. Read it again, with that request's change in it, and redo ours.
        raise Refused(503, "this session is changing too fast; try again")

    def transact(self, conn: Connection, writes: Plan) -> bool:
        """Make `writes` in one MULTI/EXEC; False if the session changed since the GET."""
        commands = self.commands(writes)
        try:
            return conn.transaction(commands) is not None
        except RedisError as error:
            if writes.write or error.code != "OOM":
                raise
        # A logout, with Redis out of memory: it refuses every command a MULTI would queue,
        # DEL too, but takes a DEL on its own, which frees memory. The session ends.
        conn.pipeline(commands)
        return True

    def commands(self, plan: Plan) -> list[tuple]:
        commands: list[tuple] = []
        if plan.write:
            ttl_ms = int(self.ttl * 1000)  # PX, not EX: a test's ttl may be a fraction
            commands.append(("SET", session_key(plan.write), plan.text, "PX", ttl_ms))
            commands += [("PEXPIRE", upload_key(upload), ttl_ms) for upload in plan.uploads]
        if plan.remove:
            commands.append(("DEL", session_key(plan.remove),
                             *map(upload_key, plan.remove_uploads)))
        return commands

    def read(self, sid):
        stored = self.redis.execute("GET", session_key(sid))
        return None if stored is None else stored.decode()

    def save_upload(self, filename, content_type, chunks):
        upload_id, size, count = secrets.token_urlsafe(16), 0, 0
        key = upload_key(upload_id)
        with waits_recognised():  # out of memory: StoreFull (507)
            with self.redis.connection() as conn:  # both or neither: never a key without expiry
                conn.transaction([("HSET", key, "filename", filename, "content_type",
                                   content_type, "size", 0, "chunks", 0),
                                  ("EXPIRE", key, PENDING_UPLOAD_TTL)])
            try:
                for chunk in chunks:
                    with self.room.writing(len(chunk)):  # a large piece measures the store first
                        self.redis.execute("HSET", key, str(count), chunk)
                    size, count = size + len(chunk), count + 1
                self.redis.execute("HSET", key, "size", size, "chunks", count)
            except BaseException:
                self.discard_upload(upload_id)
                raise
        return upload_id

    def discard_upload(self, upload_id):
        self.redis.execute("DEL", upload_key(upload_id))

    def upload_info(self, upload_id):
        filename, content_type, size = self.redis.execute(
            "HMGET", upload_key(upload_id), "filename", "content_type", "size")
        if filename is None:
            return None
        return UploadInfo(upload_id, filename.decode(), content_type.decode(), int(size))

    def upload_chunks(self, upload_id):
        count = self.redis.execute("HGET", upload_key(upload_id), "chunks")
        for seq in range(int(count or 0)):
            chunk = self.redis.execute("HGET", upload_key(upload_id), str(seq))
            if chunk is None:  # expired or deleted meanwhile
                return
            yield chunk

    def purge_expired(self):
        return 0  # Redis expires sessions and their uploads itself, together


def store_from_env(environ: Mapping[str, str], service: Database | Redis) -> SessionStore:
    """The store for the backing service that DATABASE_URL named, or the memory store if
    SESSION_STORE=memory says so (the lesson). SESSION_STORE=sqlite or redis must match the
    service, or it would be a store the other processes cannot see.

    SESSION_TTL is whole seconds from 1, because it is also the cookie's `Max-Age`, which
    is whole seconds: 0.5 would have become `Max-Age=0`, a cookie deleted on arrival."""
    ttl = whole_seconds(environ, "SESSION_TTL", 86400, MAX_SESSION_TTL)
    kind = environ.get("SESSION_STORE", "redis" if isinstance(service, Redis) else "sqlite")
    if kind == "memory":
        return MemoryStore(ttl)
    if kind == "redis" and isinstance(service, Redis):
        return RedisStore(service, ttl, room_from_env(environ, service))
    if kind == "sqlite" and isinstance(service, Database):
        return SQLiteStore(service, ttl, room_from_env(environ, service))
    raise ConfigError(f"SESSION_STORE must be 'memory', or the kind of store DATABASE_URL "
                      f"names ({'redis' if isinstance(service, Redis) else 'sqlite'}), "
                      f"got {kind!r}")
