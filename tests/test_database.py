"""database.py: opening the shared file from many processes at once, reads that never wait
for a writer, a locked database waited out, and the configuration helpers."""
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, get, post_form, session_cookie, write_lock_held
from database import (ConfigError, Database, Room, StillLocked, database_path, keep_trying,
                      positive_number, process_name, whole_seconds)
from job_queue import open_queue
from session_store import SQLiteStore


# --- Opening a brand-new file ---------------------------------------------------------

def test_a_new_file_opens_while_another_opener_holds_its_write_lock(tmp_path):
    """Switching a new file to WAL skips the busy handler: without a retry this fails at
    once with "database is locked", as when two copies start at the same instant."""
    path = tmp_path / "app.db"
    with write_lock_held(path, at_most=0.3):  # the file is new: not in WAL yet
        started = time.monotonic()
        Database(path).execute("SELECT 1")
    assert time.monotonic() - started >= 0.2  # it waited for the lock, then opened
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


OPENER = """
import os, sys
from database import database_from_env
from job_queue import open_queue
from session_store import store_from_env
sys.stdin.read(1)  # every copy is released at the same instant
db = database_from_env(os.environ)
store_from_env(os.environ, db)
open_queue(db)
"""


def test_four_processes_starting_at_once_on_a_new_file_all_start(tmp_path):
    for round_number in range(5):  # the race is narrow: give it several chances
        url = f"sqlite:///{tmp_path}/round-{round_number}.db"
        copies = [subprocess.Popen([sys.executable, "-c", OPENER], cwd=REPO, text=True,
                                   env=dict(os.environ, DATABASE_URL=url),
                                   stdin=subprocess.PIPE, stderr=subprocess.PIPE)
                  for _ in range(4)]
        for copy in copies:
            copy.stdin.write("x")
        for copy in copies:
            copy.stdin.flush()
        errors = [copy.communicate(timeout=30)[1] for copy in copies]
        assert errors == [""] * 4, errors


# --- Reads never queue behind a write -------------------------------------------------

def test_a_read_answers_while_a_write_in_the_same_process_waits_for_the_lock(tmp_path):
    db = Database(tmp_path / "app.db")
    db.execute("CREATE TABLE notes (text TEXT)")
    db.execute("INSERT INTO notes VALUES ('before')")
    with write_lock_held(tmp_path / "app.db", at_most=3):
        writer = threading.Thread(target=db.execute, args=("INSERT INTO notes VALUES ('x')",))
        writer.start()
        started = time.monotonic()
        while time.monotonic() - started < 0.3:  # the writer holds `db.lock` from early on
            asked = time.monotonic()
            assert [row[0] for row in db.query("SELECT text FROM notes")] == ["before"]
            assert time.monotonic() - asked < 1  # not the 3 s of a read queued behind it
        assert writer.is_alive()  # still waiting for SQLite's lock
    writer.join()
    assert len(db.query("SELECT text FROM notes")) == 2


def test_a_read_sees_its_own_transaction_and_cannot_write(tmp_path):
    db = Database(tmp_path / "app.db")
    db.execute("CREATE TABLE notes (text TEXT)")
    with db.write():
        db.execute("INSERT INTO notes VALUES ('draft')")
        assert len(db.query("SELECT text FROM notes")) == 1  # inside write(): its connection
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.query("INSERT INTO notes VALUES ('sneaked past BEGIN IMMEDIATE')")


def test_a_get_answers_while_a_post_on_the_same_copy_waits_for_the_lock(web):
    sid = session_cookie(post_form(web.url + "/cart", {"item": "tea"}))
    replies = []
    with write_lock_held(database_path(web.env["DATABASE_URL"]), at_most=3):
        post = threading.Thread(
            target=lambda: replies.append(post_form(web.url + "/cart", {"item": "cake"}, sid)))
        post.start()
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # the POST takes the copy's writer early on
            asked = time.monotonic()
            assert get(web.url + "/session", sid).json()["cart"] == ["tea"]
            assert time.monotonic() - asked < 1.0
        assert post.is_alive()  # still waiting for SQLite's lock
    post.join(10)
    assert replies[0].status == 303
    assert get(web.url + "/session", sid).json()["cart"] == ["tea", "cake"]


# --- A locked database is a wait ------------------------------------------------------

def test_keep_trying_waits_out_a_lock_longer_than_the_busy_timeout(tmp_path, capsys):
    db = Database(tmp_path / "app.db", timeout=0.1)
    db.execute("CREATE TABLE notes (text TEXT)")
    with write_lock_held(tmp_path / "app.db", at_most=0.3):  # three busy timeouts
        keep_trying(lambda: db.execute("INSERT INTO notes VALUES ('late')"), "noting")
    assert len(db.query("SELECT text FROM notes")) == 1
    assert capsys.readouterr().out == \
        "noting: database is locked; trying again until it answers\n"


def test_keep_trying_gives_up_on_a_lock_only_when_told_to_stop(tmp_path):
    db = Database(tmp_path / "app.db", timeout=0.1)
    db.execute("CREATE TABLE notes (text TEXT)")
    with write_lock_held(tmp_path / "app.db"):
        with pytest.raises(StillLocked, match="noting: database is locked"):
            keep_trying(lambda: db.execute("INSERT INTO notes VALUES ('x')"), "noting",
                        stopping=lambda: True)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):  # a real error
        keep_trying(lambda: db.execute("INSERT INTO missing VALUES (1)"), "noting")


# --- Configuration --------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "1e10", "3601"])
def test_a_number_of_seconds_outside_its_bounds_is_refused(text):
    with pytest.raises(ConfigError, match=f"POLL_INTERVAL must be .* at most 3600, got '{text}'"):
        positive_number({"POLL_INTERVAL": text}, "POLL_INTERVAL", 1, 3600)


def test_whole_seconds_refuse_a_fraction():
    assert whole_seconds({"SESSION_TTL": "60"}, "SESSION_TTL", 1, 3600) == 60
    assert whole_seconds({}, "SESSION_TTL", 86400, 86400) == 86400
    with pytest.raises(ConfigError, match="whole number of seconds from 1 to 3600, got '0.5'"):
        whole_seconds({"SESSION_TTL": "0.5"}, "SESSION_TTL", 1, 3600)


def test_the_process_name_comes_from_whichever_manager_started_us():
    assert process_name({}, "web.1") == "web.1"
    assert process_name({"PS": "web.3"}, "web.1") == "web.3"  # foreman
    assert process_name({"HONCHO_PROCESS_NAME": "web.2", "PS": "web.3"}, "web.1") == "web.2"
    assert process_name({"DYNO": "web.4", "HONCHO_PROCESS_NAME": "web.2"}, "web.1") == "web.4"
    assert process_name({"DYNO": ""}, "web.1") == "web.1"


def test_a_database_url_that_is_not_one_shared_file_is_refused():
    for url in ("sqlite:///:memory:", "sqlite:///file:app.db?mode=memory"):
        with pytest.raises(ConfigError, match="DATABASE_URL must name a file"):
            database_path(url)


def test_a_file_that_is_not_this_apps_database_is_a_configuration_error(tmp_path):
    foreign = Database(tmp_path / "other.db")
    foreign.execute("CREATE TABLE sessions (who TEXT)")  # another app's table of that name
    with pytest.raises(ConfigError, match="not a database of this app"):
        SQLiteStore(foreign, 60, Room(foreign, 1 << 30))
    (tmp_path / "notes.txt").write_text("not SQLite at all\n" * 100)
    with pytest.raises(ConfigError, match="not a database of this app"):
        open_queue(Database(tmp_path / "notes.txt"))
