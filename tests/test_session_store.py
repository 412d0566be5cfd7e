"""The store's contract, for every store (memory, SQLite, Redis), and the atomic edit across
real processes, each store in its own idiom."""
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_until
from database import ConfigError, Database, Refused, Room, StoreFull, database_path
from redis_client import Redis
from session_store import (MAX_SESSION_BYTES, MemoryStore, RedisStore, Session, SQLiteStore,
                           store_from_env)

ROOMY = 1 << 40  # a ceiling no test reaches


def sqlite_store(path: Path, ttl: float = 60) -> SQLiteStore:
    db = Database(path)
    return SQLiteStore(db, ttl, Room(db, ROOMY))


def redis_store(url: str, ttl: float = 60) -> RedisStore:
    redis = Redis(url)
    return RedisStore(redis, ttl, Room(redis, ROOMY))


@pytest.fixture(params=["sqlite", "redis", "memory"])
def make_store(request, tmp_path):
    def make(ttl: float = 60):
        if request.param == "memory":
            return MemoryStore(ttl)
        if request.param == "redis":
            return redis_store(request.getfixturevalue("fresh_redis"), ttl)
        return sqlite_store(tmp_path / "app.db", ttl)
    return make


def setting(**data):
    def change(session: Session) -> None:
        session.data.update(data)
    return change


def new_session(store, **data) -> str:
    return store.edit(None, setting(**data)).id


def add_to_cart(item):
    def change(session: Session) -> None:
        session.data["cart"].append(item)
    return change


def end(session: Session) -> None:
    session.delete = True


def test_an_unknown_id_is_never_adopted(make_store):
    store = make_store()
    session = store.edit("chosen-by-the-client", setting(user="mallory"))
    assert session.id != "chosen-by-the-client" and session.is_new
    assert store.load("chosen-by-the-client") is None
    assert store.load(session.id)["user"] == "mallory"


def test_rotate_moves_the_data_to_a_new_id_and_drops_the_old(make_store):
    store = make_store()
    old = new_session(store, cart=["tea"])
    session = store.edit(old, setting(user="ada"), rotate=True)
    assert session.id != old
    assert store.load(old) is None
    assert store.load(session.id) == {"user": "ada", "cart": ["tea"], "uploads": []}


def test_delete_ends_the_session(make_store):
    store = make_store()
    sid = new_session(store, user="ada")
    store.edit(sid, end)
    assert store.load(sid) is None


def test_an_error_inside_edit_changes_nothing(make_store):
    store = make_store()
    sid = new_session(store, cart=["tea"])

    def fail_half_way(session: Session) -> None:
        session.data["cart"].append("cake")
        raise RuntimeError("the request failed half-way")

    with pytest.raises(RuntimeError):
        store.edit(sid, fail_half_way)
    assert store.load(sid)["cart"] == ["tea"]


def test_a_session_over_its_limit_in_bytes_is_refused_and_unchanged(make_store):
    store = make_store()
    sid = new_session(store, cart=["tea"])
    # 30 items of 200 emoji: json.dumps writes each emoji as 12 bytes ("\ud83d\ude00").
    with pytest.raises(Refused) as refused:
        store.edit(sid, setting(cart=["\U0001F600" * 200] * 30))
    assert refused.value.status == 413 and f"{MAX_SESSION_BYTES >> 10} KiB" in str(refused.value)
    assert store.load(sid)["cart"] == ["tea"]


def test_expired_sessions_read_as_absent(make_store):
    store = make_store(ttl=0.3)
    sid = new_session(store, user="ada")
    assert store.load(sid)["user"] == "ada"
    wait_until(lambda: store.load(sid) is None, timeout=5, what="the session to expire")


def test_concurrent_edits_from_many_threads_all_land(make_store):
    store = make_store()
    sid = new_session(store)

    def add_items(thread: int):
        for n in range(25):
            store.edit(sid, add_to_cart(f"{thread}-{n}"))

    threads = [threading.Thread(target=add_items, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.load(sid)["cart"]) == 200


def test_a_redis_edit_that_raced_another_is_run_again_with_the_others_change(fresh_redis):
    store = redis_store(fresh_redis)
    sid = new_session(store)
    runs = []

    def add_cake_while_another_adds_tea(session: Session) -> None:
        runs.append(list(session.data["cart"]))
        if len(runs) == 1:  # between our read and our write, another copy writes
            store.edit(sid, add_to_cart("tea"))
        session.data["cart"].append("cake")

    store.edit(sid, add_cake_while_another_adds_tea)
    assert runs == [[], ["tea"]]  # the second run saw the other write
    assert store.load(sid)["cart"] == ["tea", "cake"]


def test_uploads_keep_their_bytes_exactly_in_pieces(make_store):
    store = make_store()
    data = bytes(range(256)) * 4000 + b"\r\n--not-a-boundary\r\n"  # over 1 MiB: two pieces
    upload_id = store.save_upload("a.bin", "application/octet-stream",
                                  [data[:600_000], data[600_000:]])
    info = store.upload_info(upload_id)
    assert (info.filename, info.content_type, info.size) == \
        ("a.bin", "application/octet-stream", len(data))
    assert b"".join(store.upload_chunks(upload_id)) == data
    assert store.upload_info("no-such-id") is None
    assert list(store.upload_chunks("no-such-id")) == []


def attach(upload_id):
    def change(session: Session) -> None:
        session.data["uploads"].append(upload_id)
    return change


def test_uploads_go_with_their_session_at_logout(make_store):
    store = make_store()
    upload_id = store.save_upload("a.txt", "text/plain", [b"secret"])
    sid = store.edit(None, attach(upload_id)).id
    sid = store.edit(sid, setting(user="ada"), rotate=True).id  # a login keeps them
    assert store.upload_info(upload_id) is not None
    store.edit(sid, end)
    assert store.upload_info(upload_id) is None
    assert list(store.upload_chunks(upload_id)) == []


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_purge_removes_expired_sessions_their_uploads_and_old_unattached_ones(tmp_path, kind):
    store = MemoryStore(0.3) if kind == "memory" else sqlite_store(tmp_path / "app.db", 0.3)
    kept = store.save_upload("kept.txt", "text/plain", [b"mine"])
    going = store.save_upload("going.txt", "text/plain", [b"theirs"])
    pending = store.save_upload("pending.txt", "text/plain", [b"never attached"])
    sid = new_session(store)
    store.edit(sid, attach(going))
    wait_until(lambda: store.load(sid) is None, timeout=5, what="the session to expire")
    live = store.edit(None, attach(kept)).id
    assert store.purge_expired() == 1
    assert store.upload_info(going) is None and store.upload_info(kept) is not None
    assert store.upload_info(pending) is not None  # an upload may wait an hour for its edit
    later = time.time() + 3601
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: later)
        store.purge_expired()
    assert store.upload_info(pending) is None
    assert store.load(live) is None or store.upload_info(kept) is not None


def test_redis_expires_a_session_and_its_uploads_together(fresh_redis):
    store = redis_store(fresh_redis, ttl=0.3)
    upload_id = store.save_upload("a.txt", "text/plain", [b"secret"])
    ttl_before = store.redis.execute("TTL", f"upload:{upload_id}")
    assert 3500 < ttl_before <= 3600  # pending: an hour to be attached
    sid = store.edit(None, attach(upload_id)).id
    expiries = [store.redis.execute("PTTL", key) for key in (f"upload:{upload_id}",
                                                             f"session:{sid}")]
    assert all(0 < expiry <= 300 for expiry in expiries) and abs(expiries[0] - expiries[1]) < 50
    wait_until(lambda: store.upload_info(upload_id) is None, timeout=5,
               what="the upload to expire with its session")
    assert store.load(sid) is None and store.purge_expired() == 0


def test_a_full_store_refuses_what_would_grow_it_with_507(tmp_path, fresh_redis):
    for store in (SQLiteStore(Database(tmp_path / "app.db"), 60,
                              Room(Database(tmp_path / "app.db"), 1)),
                  RedisStore(Redis(fresh_redis), 60, Room(Redis(fresh_redis), 1))):
        with pytest.raises(StoreFull) as full:
            store.save_upload("a.txt", "text/plain", [b"x"])
        assert full.value.status == 507 and "STORE_MAX_MB" in str(full.value)
        with pytest.raises(StoreFull):
            new_session(store, user="ada")


def test_redis_out_of_memory_is_a_full_store_and_no_lost_write_passes_for_done(fresh_redis):
    store = redis_store(fresh_redis)
    sid = new_session(store, user="ada")

    def pieces():  # the upload's first write goes through; its piece meets a full Redis
        store.redis.execute("CONFIG", "SET", "maxmemory", "1")
        yield b"x" * 100

    try:
        with pytest.raises(StoreFull, match="out of memory"):
            store.save_upload("a.txt", "text/plain", pieces())
        for refused in (lambda: new_session(store, user="bob"),  # a login
                        lambda: store.edit(sid, add_to_cart("tea")),
                        lambda: store.save_upload("b.txt", "text/plain", [b"y"])):
            with pytest.raises(StoreFull, match="out of memory"):
                refused()
    finally:
        store.redis.execute("CONFIG", "SET", "maxmemory", "0")
    assert store.load(sid) == {"user": "ada", "cart": [], "uploads": []}
    assert store.redis.execute("KEYS", "*") == [f"session:{sid}".encode()]  # none half-made


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_uploads_in_a_row_count_against_the_ceiling_as_they_are_written(request, tmp_path,
                                                                          kind):
    store = (redis_store(request.getfixturevalue("fresh_redis")) if kind == "redis"
             else sqlite_store(tmp_path / "app.db"))
    store.room = Room(store.room.service, store.room.held() + (1 << 20))  # 1 MiB more

    def saved() -> bool:
        try:
            return bool(store.save_upload("a.bin", "application/octet-stream",
                                          [b"x" * 700_000]))
        except StoreFull:
            return False

    assert [saved() for _ in range(4)] == [True, False, False, False]


def test_uploads_in_flight_together_stay_under_the_ceiling(tmp_path):
    store = sqlite_store(tmp_path / "app.db")
    # After every piece written, a trigger notes what all the pieces held then.
    store.db.execute("CREATE TABLE held (bytes INTEGER)")
    store.db.execute("CREATE TRIGGER note_held AFTER INSERT ON file_chunks BEGIN "
                     "INSERT INTO held SELECT sum(length(data)) FROM file_chunks; END")
    store.room = Room(store.db, store.room.held() + (2 << 20))  # room for 2 MiB more
    piece = b"x" * (256 << 10)

    def upload() -> None:
        try:
            store.save_upload("a.bin", "application/octet-stream", [piece] * 4)
        except StoreFull:
            pass

    threads = [threading.Thread(target=upload) for _ in range(16)]  # 16 MiB in all
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.db.query("SELECT max(bytes) FROM held")[0][0] <= 2 << 20


def test_an_unchanged_session_is_not_written_again(tmp_path):
    store = sqlite_store(tmp_path / "app.db")
    sid = new_session(store, user="ada")
    expiry = "SELECT expires_at FROM sessions WHERE id = ?"
    before = store.db.query(expiry, (sid,))[0][0]
    store.edit(sid, lambda session: None)
    assert store.db.query(expiry, (sid,))[0][0] == before


def test_a_change_that_compares_equal_is_still_written(make_store):
    """1 and True are equal in Python, but a JSON reader (the page's script) tells them apart."""
    store = make_store()
    sid = new_session(store, count=1)
    store.edit(sid, setting(count=True))
    assert store.load(sid)["count"] is True


EDITOR = textwrap.dedent("""
    import sys
    from database import database_from_env, room_from_env
    from session_store import store_from_env
    service = database_from_env({"DATABASE_URL": sys.argv[1]})
    store = store_from_env({}, service)
    def add(n):
        return lambda session: session.data["cart"].append(n)
    for n in range(int(sys.argv[3])):
        store.edit(sys.argv[2], add(n))
""")


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_concurrent_edits_from_four_processes_all_land(request, tmp_path, kind):
    """The read-modify-write is atomic across processes: no lost update, no error."""
    url = (request.getfixturevalue("fresh_redis") if kind == "redis"
           else f"sqlite:///{tmp_path}/app.db")
    store = store_from_env({}, __import__("database").database_from_env({"DATABASE_URL": url}))
    sid = new_session(store)
    editors = [subprocess.Popen([sys.executable, "-c", EDITOR, url, sid, "100"],
                                cwd=REPO, stderr=subprocess.PIPE) for _ in range(4)]
    errors = [editor.communicate(timeout=60)[1].decode() for editor in editors]
    assert errors == [""] * 4
    assert sorted(store.load(sid)["cart"]) == sorted(list(range(100)) * 4)


def test_the_database_is_in_wal_mode(tmp_path):
    Database(tmp_path / "app.db").query("SELECT 1")
    conn = sqlite3.connect(tmp_path / "app.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_url_forms():
    assert database_path("sqlite:///var/app.db") == Path("var/app.db")
    assert database_path("sqlite:////tmp/app.db") == Path("/tmp/app.db")
    for bad in ("postgres://db/app", "sqlite://", "var/app.db"):
        with pytest.raises(ConfigError, match="DATABASE_URL"):
            database_path(bad)


@pytest.mark.parametrize("environ, variable", [
    ({"SESSION_STORE": "redis"}, "SESSION_STORE"),  # the URL names a SQLite file
    ({"SESSION_STORE": "postgres"}, "SESSION_STORE"),
    ({"SESSION_TTL": "soon"}, "SESSION_TTL"),
    ({"SESSION_TTL": "-5"}, "SESSION_TTL"),
    ({"SESSION_TTL": "inf"}, "SESSION_TTL"),  # would overflow the cookie's Max-Age
    ({"SESSION_TTL": "nan"}, "SESSION_TTL"),
    ({"SESSION_TTL": "0.5"}, "SESSION_TTL"),  # would be sent as the cookie's Max-Age=0
    ({"SESSION_TTL": "1e10"}, "SESSION_TTL"),  # longer than a browser keeps a cookie
    ({"STORE_MAX_MB": "0"}, "STORE_MAX_MB"),
    ({"STORE_MAX_MB": "1.5"}, "STORE_MAX_MB"),
    ({"STORE_MAX_MB": "\u00b2"}, "STORE_MAX_MB"),
])
def test_bad_store_settings_name_the_variable(tmp_path, environ, variable):
    with pytest.raises(ConfigError, match=variable):
        store_from_env(environ, Database(tmp_path / "app.db"))


def test_the_url_picks_the_store_and_the_ttl_is_whole_seconds(tmp_path, fresh_redis):
    db = Database(tmp_path / "app.db")
    assert store_from_env({"SESSION_TTL": "90"}, db).ttl == 90
    assert store_from_env({}, db).kind == "sqlite"
    assert store_from_env({}, Redis(fresh_redis)).kind == "redis"
    assert store_from_env({"SESSION_STORE": "memory"}, Redis(fresh_redis)).kind == "memory"
    assert json.loads(json.dumps(store_from_env({}, db).ttl)) == 86400


def test_once_old_sessions_expire_their_space_is_used_again(tmp_path):
    db = Database(tmp_path / "app.db")
    store = sqlite_store(tmp_path / "app.db", ttl=0.3)
    pages = db.query("SELECT * FROM pragma_page_count(), pragma_page_size()")[0]
    store.room = Room(db, pages[0] * pages[1] + (600 << 10))  # 600 KiB more, then full

    def stored() -> bool:  # a session of 50 KiB, if there is room for it
        try:
            return bool(new_session(store, cart=["x" * (50 << 10)]))
        except StoreFull:
            return False

    def all_purged() -> bool:
        store.purge_expired()
        return db.query("SELECT count(*) FROM sessions")[0][0] == 0

    wait_until(lambda: not stored(), timeout=5, what="the store to be full")
    wait_until(all_purged, timeout=5, what="every session to expire and be purged")
    wait_until(stored, timeout=5, what="the purged space to count as free")
