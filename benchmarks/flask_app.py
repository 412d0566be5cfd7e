"""The session workload on Flask, for bench.py: what a user would run instead of webapp.py.

Not part of the app (it needs `pip install flask gunicorn`): bench.py serves it with
gunicorn's sync workers beside our own copies. To keep the comparison fair it does what
webapp.py does for `POST /cart`: read and write one session row of a SQLite file in WAL
mode inside `BEGIN IMMEDIATE`, one connection per worker process (a sync worker serves
one request at a time), opened after gunicorn forks.
"""
import json
import os
import secrets
import sqlite3
import time

from flask import Flask, redirect, request

app = Flask(__name__)
TTL = 86400
connections: dict[int, sqlite3.Connection] = {}  # by pid: never use a parent's connection


def database() -> sqlite3.Connection:
    if os.getpid() not in connections:
        path = os.environ["DATABASE_URL"].removeprefix("sqlite:///")
        conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        for pragma in ("busy_timeout=10000", "journal_mode=WAL", "synchronous=NORMAL"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("CREATE TABLE IF NOT EXISTS flask_sessions "
                     "(id TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at REAL NOT NULL)")
        connections[os.getpid()] = conn
    return connections[os.getpid()]


def edit_session(sid, change):
    """Read, change and write one session under SQLite's write lock; returns its id."""
    conn = database()
    conn.execute("BEGIN IMMEDIATE")  # the lock before the read: no lost updates
    row = conn.execute("SELECT data FROM flask_sessions WHERE id = ? AND expires_at > ?",
                       (sid, time.time())).fetchone()
    if row is None:
        sid, data = secrets.token_urlsafe(32), {"user": None, "cart": []}
    else:
        data = json.loads(row[0])
    change(data)
    conn.execute("INSERT OR REPLACE INTO flask_sessions VALUES (?, ?, ?)",
                 (sid, json.dumps(data), time.time() + TTL))
    conn.execute("COMMIT")
    return sid


def answer(sid):
    response = redirect("/", 303)
    if sid != request.cookies.get("sid"):
        response.set_cookie("sid", sid, max_age=TTL, httponly=True, samesite="Lax")
    return response


@app.post("/login")
def login():
    name = request.form["name"]
    return answer(edit_session(None, lambda data: data.update(user=name)))


@app.post("/cart")
def add_to_cart():
    item = request.form["item"]
    return answer(edit_session(request.cookies.get("sid"), lambda data: data["cart"].append(item)))


@app.get("/healthz")
def healthz():
    return "ok\n"
