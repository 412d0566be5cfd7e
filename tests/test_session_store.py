"""The store's contract, for both stores, and SQLite's atomicity across real processes."""
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import REPO, wait_until
from database import ConfigError, Database, database_path
from session_store import MemoryStore, SQLiteStore, store_from_env


@pytest.fixture(params=["sqlite", "memory"])
def make_store(request, tmp_path):
    def make(ttl: float = 60.0):
        if request.param == "memory":
            return MemoryStore(ttl)
        return SQLiteStore(Database(tmp_path / "app.db"), ttl)
    return make


def new_session(store, **data) -> str:
    with store.edit(None) as session:
        session.data.update(data)
    return session.id


def test_an_unknown_id_is_never_adopted(make_store):
    store = make_store()
    with store.edit("chosen-by-the-client") as session:
        session.data["user"] = "mallory"
    assert session.id != "chosen-by-the-client"
    assert store.load("chosen-by-the-client") is None
    assert store.load(session.id)["user"] == "mallory"


def test_rotate_moves_the_data_to_a_new_id_and_drops_the_old(make_store):
    store = make_store()
    old = new_session(store, cart=["tea"])
    with store.edit(old, rotate=True) as session:
        session.data["user"] = "ada"
    assert session.id != old
    assert store.load(old) is None
    assert store.load(session.id) == {"user": "ada", "cart": ["tea"], "uploads": []}


def test_delete_ends_the_session(make_store):
    store = make_store()
    sid = new_session(store, user="ada")
    with store.edit(sid) as session:
        session.delete = True
    assert store.load(sid) is None


def test_an_error_inside_edit_changes_nothing(make_store):
    store = make_store()
    sid = new_session(store, cart=["tea"])
    with pytest.raises(RuntimeError):
        with store.edit(sid) as session:
            session.data["cart"].append("cake")
            raise RuntimeError("the request failed half-way")
    assert store.load(sid)["cart"] == ["tea"]


def test_expired_sessions_read_as_absent_and_purge_removes_them(make_store):
    store = make_store(ttl=0.2)
    sid = new_session(store, user="ada")
    assert store.load(sid)["user"] == "ada"
    wait_until(lambda: store.load(sid) is None, timeout=5, what="the session to expire")
    assert store.purge_expired() == 1
    assert store.purge_expired() == 0


def test_concurrent_edits_from_many_threads_all_land(make_store):
    store = make_store()
    sid = new_session(store)

    def add_items(thread: int):
        for n in range(25):
            with store.edit(sid) as session:
                session.data["cart"].append(f"{thread}-{n}")

    threads = [threading.Thread(target=add_items, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.load(sid)["cart"]) == 200


def test_uploads_keep_their_bytes_exactly(make_store):
    store = make_store()
    data = bytes(range(256)) * 100 + b"\r\n--not-a-boundary\r\n"
    upload_id = store.save_upload("a.bin", "application/octet-stream", data)
    upload = store.load_upload(upload_id)
    assert (upload.filename, upload.content_type, upload.data) == \
        ("a.bin", "application/octet-stream", data)
    assert store.load_upload("no-such-id") is None


def test_an_unchanged_session_is_not_written_again(tmp_path):
    store = SQLiteStore(Database(tmp_path / "app.db"), 60)
    sid = new_session(store, user="ada")
    expiry = "SELECT expires_at FROM sessions WHERE id = ?"
    before = store.db.query(expiry, (sid,))[0][0]
    with store.edit(sid):
        pass
    assert store.db.query(expiry, (sid,))[0][0] == before


def test_a_change_that_compares_equal_is_still_written(make_store):
    """1 and True are equal in Python, but a JSON reader (the page's script) tells them apart."""
    store = make_store()
    sid = new_session(store, count=1)
    with store.edit(sid) as session:
        session.data["count"] = True
    assert store.load(sid)["count"] is True


EDITOR = textwrap.dedent("""
    import sys
    from pathlib import Path
    from database import Database
    from session_store import SQLiteStore
    store = SQLiteStore(Database(Path(sys.argv[1])), 60)
    for n in range(int(sys.argv[3])):
        with store.edit(sys.argv[2]) as session:
            session.data["cart"].append(n)
""")


def test_concurrent_edits_from_four_processes_all_land(tmp_path):
    """The read-modify-write is atomic across processes: no lost update, no 'locked' error."""
    path = tmp_path / "app.db"
    store = SQLiteStore(Database(path), 60)
    sid = new_session(store)
    editors = [subprocess.Popen([sys.executable, "-c", EDITOR, str(path), sid, "100"],
                                cwd=REPO, stderr=subprocess.PIPE) for _ in range(4)]
    errors = [editor.communicate(timeout=60)[1].decode() for editor in editors]
    assert errors == [""] * 4
    assert len(store.load(sid)["cart"]) == 400


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
    ({"SESSION_STORE": "redis"}, "SESSION_STORE"),
    ({"SESSION_TTL": "soon"}, "SESSION_TTL"),
    ({"SESSION_TTL": "-5"}, "SESSION_TTL"),
    ({"SESSION_TTL": "inf"}, "SESSION_TTL"),  # would overflow the cookie's Max-Age
    ({"SESSION_TTL": "nan"}, "SESSION_TTL"),
    ({"SESSION_TTL": "0.5"}, "SESSION_TTL"),  # would be sent as the cookie's Max-Age=0
    ({"SESSION_TTL": "1e10"}, "SESSION_TTL"),  # longer than a browser keeps a cookie
])
def test_bad_store_settings_name_the_variable(tmp_path, environ, variable):
    with pytest.raises(ConfigError, match=variable):
        store_from_env(environ, Database(tmp_path / "app.db"))


def test_the_session_ttl_is_whole_seconds_as_a_cookie_needs(tmp_path):
    db = Database(tmp_path / "app.db")
    assert store_from_env({"SESSION_TTL": "90"}, db).ttl == 90
    assert isinstance(store_from_env({}, db).ttl, int)
