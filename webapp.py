"""The web process: it binds its own port (Factor VII) and keeps no state (Factor VI).

Factor VII says the app *is* the web server: `python webapp.py` binds `$PORT` and serves
HTTP, with nothing injected by an Apache or a container runtime. Factor VI says it keeps
nothing it cannot lose. The terrible day this file prevents: four copies run behind a
router, a user logs in on one, and the next request, served by another, has forgotten
them. Here every request reads and writes its state through `session_store`, so any
copy can answer any request, and a copy that dies takes nothing with it.

What it does: a small shop-like page (log in, fill a cart, upload files, enqueue jobs),
a JSON view of the session, and `/healthz` for the router. Every response says which
copy served it (`X-Served-By`). A form posted from the page comes back to it (303 to its
`next`), where one line says which copy did what; other clients (curl) get the resource
they made. Your uploads are served only to your session, and a job enqueued with a
session shows its args and result only to that session. What it leaves to others: running
several copies and spreading traffic over them (`launcher.py`, the platform), running jobs
(`worker.py`: this process only puts them in `job_queue.py`), and where state lives
(`session_store.py`). It reads top-down: the routes (`App`) and what they use, the HTTP
plumbing and `main()`, then the page (its template is `page.html`).

Configuration is the environment (Factor III), read once in `main()`: PORT, HOST,
SESSION_STORE, DATABASE_URL, DATABASE_BUSY_TIMEOUT, SESSION_TTL, DYNO (or honcho's
HONCHO_PROCESS_NAME, or foreman's PS), COOKIE_SECURE, STOP_TIMEOUT (25 s), CLIENT_TIMEOUT
(10 s). SIGTERM stops accepting and lets the requests in flight finish for at most
STOP_TIMEOUT seconds, then exits 0. Slow, huge or odd input is bounded where it comes in:
`Server` bounds connections and request heads (a head must arrive whole within
CLIENT_TIMEOUT), `Request` bodies, and the routes what they store.
"""
from __future__ import annotations

import errno
import html
import io
import json
import math
import os
import queue
import re
import selectors
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
import unicodedata
import urllib.parse
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath, PureWindowsPath
from string import Template
from typing import Iterator

from database import ConfigError, database_from_env, positive_number, process_name
from job_queue import JobQueue
from session_store import (Session, SessionStore, UploadInfo, empty_session,
                           store_from_env)
from tasks import TASKS

MAX_FORM_BYTES = 1 << 20      # a form is a few fields; refuse anything bigger unread
MAX_UPLOAD_BYTES = 10 << 20
MAX_FIELD_CHARS = 200
MAX_FORM_FIELDS = 100
MAX_ARGS_BYTES = 64 << 10     # a job's args are read back by every list that shows the job
MAX_ARGS_DEPTH = 16
MAX_SAFE_INTEGER = 2**53 - 1  # the largest integer every JSON reader carries exactly
# A media type as RFC 6838 spells one (type/subtype, plain parameters), nothing more.
MEDIA_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+( ?; ?[\w!#$&^.+-]+=[\w!#$&^.+-]+)*",
                        re.ASCII)
COOKIE_NAME = "sid"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")  # what `new_session_id` makes, and a margin


# --- The application: one method per route -----------------------------------------

class App:
    """The routes. Each takes the request and returns a Response; none keeps state."""

    def __init__(self, store: SessionStore, queue: JobQueue, config: Config):
        self.store, self.queue, self.config = store, queue, config
        self.routes = {
            "/": {"GET": self.page},
            "/session": {"GET": self.session_json},
            "/login": {"POST": self.login},
            "/logout": {"POST": self.logout},
            "/cart": {"POST": self.add_to_cart},
            "/uploads": {"POST": self.upload},
            "/jobs": {"GET": self.list_jobs, "POST": self.enqueue},
            "/healthz": {"GET": self.healthz},
        }
        self.routes_with_id = {  # /uploads/<id>, /jobs/<id>
            "/uploads": {"GET": self.download},
            "/jobs": {"GET": self.job_status},
        }

    def find_route(self, method: str, path: str):
        """(handler, the id in the path or None), or a ClientError 404/405."""
        methods, path_id = self.routes.get(path), None
        if methods is None:
            base, _, path_id = path.rpartition("/")  # "/jobs/17" -> "/jobs", "17"
            methods = self.routes_with_id.get(base) if path_id else None
        if methods is None:
            raise ClientError(404, f"no such page: {path}")
        if method == "HEAD" and "GET" in methods:  # a GET whose body `send` leaves out
            method = "GET"
        if method not in methods:
            allowed = ", ".join(methods)
            raise ClientError(405, f"{method} is not allowed here; use {allowed}",
                              (("Allow", allowed),))
        return methods[method], path_id

    def set_cookie(self, response: Response, session: Session, sent_sid: str | None) -> Response:
        """Tell the browser its session id when it changed (new, rotated, or ended)."""
        attributes = "; Path=/; HttpOnly; SameSite=Lax"
        if self.config.cookie_secure:
            attributes += "; Secure"
        if session.delete:
            response.headers.append(("Set-Cookie", f"{COOKIE_NAME}=; Max-Age=0{attributes}"))
        elif session.id != sent_sid:
            max_age = int(self.store.ttl)
            response.headers.append(
                ("Set-Cookie", f"{COOKIE_NAME}={session.id}; Max-Age={max_age}{attributes}"))
        return response

    def did(self, what: str) -> str:
        """A notice: which copy did what, and where the session lives."""
        return f"{self.config.dyno} {what}, in the {self.store.kind} store"

    def page(self, request: Request) -> Response:
        data = self.store.load(request.sid)
        stranger = request.sid is not None and data is None
        data = data or empty_session()
        notice = self.take_notice(request.sid) if data.get("notice") else None
        # The newest first, and only the last few: a page never reads more than it shows.
        uploads = [self.store.upload_info(upload_id) for upload_id in data["uploads"][-20:]]
        own_jobs = [self.queue.get(job_id) for job_id in data.get("jobs", [])[-10:]]
        body = render_page(
            data, self.config.dyno, self.store.kind,
            notice_line(notice, request.query, stranger, self.config.dyno),
            stranger_notice(self.store, html.escape(self.config.dyno)) if stranger else "",
            [upload for upload in reversed(uploads) if upload],
            [job for job in reversed(own_jobs) if job],
            [public_face(job) for job in self.queue.recent(limit=10)])
        return Response(200, body.encode(), "text/html; charset=utf-8")

    def take_notice(self, sid: str) -> str | None:
        """The session's "what happened" line, removed as it is read: it is shown once."""
        with self.store.edit(sid) as session:
            notice = session.data.pop("notice", None)
            # Ended a moment ago (a logout in another tab): a GET must not start a session.
            session.delete = session.is_new
        return notice

    def session_json(self, request: Request) -> Response:
        data = self.store.load(request.sid) or empty_session()
        return as_json({"user": data["user"], "cart": data["cart"], "uploads": data["uploads"],
                        "served_by": self.config.dyno, "pid": os.getpid(),
                        "store": self.store.kind})

    def login(self, request: Request) -> Response:
        form = request.form()
        name = required_field(form, "name")
        with self.store.edit(request.sid, rotate=True) as session:  # fixation defence
            session.data["user"] = name
            session.data["notice"] = self.did(f"logged you in as '{name}'")
        back = return_path(form.get("next"))
        if back and self.store.kind == "memory":
            # This session lives in this copy's memory only, so the notice in it is lost
            # if another copy serves the page. The address carries the news instead.
            back = with_query(back, login_on=self.config.dyno)
        return self.set_cookie(redirect(back or "/"), session, request.sid)

    def logout(self, request: Request) -> Response:
        back = return_path(request.form().get("next"))
        with self.store.edit(request.sid) as session:
            session.delete = True
        # The session is gone, and its notice with it: the address says what happened.
        location = with_query(back, logout_on=self.config.dyno) if back else "/"
        return self.set_cookie(redirect(location), session, request.sid)

    def add_to_cart(self, request: Request) -> Response:
        form = request.form()
        item = required_field(form, "item")
        with self.store.edit(request.sid) as session:
            session.data["cart"].append(item)
            session.data["notice"] = self.did(f"added '{item}' to your cart")
        return self.set_cookie(redirect(return_path(form.get("next")) or "/"), session,
                               request.sid)

    def upload(self, request: Request) -> Response:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ClientError(415, "send the file as multipart/form-data, field 'file'")
        parts = parse_multipart(request.body(MAX_UPLOAD_BYTES), content_type)
        part = parts.get("file")
        if part is None or not part.data:
            raise ClientError(400, "the multipart field 'file' is missing or empty")
        upload_id = self.store.save_upload(part.filename, part.content_type, part.data)
        with self.store.edit(request.sid) as session:
            session.data["uploads"].append(upload_id)
            session.data["notice"] = self.did(
                f"stored '{part.filename}' ({len(part.data):,} bytes)")
        back = return_path(field_text(parts.get("next")))
        return self.set_cookie(redirect(back or f"/uploads/{upload_id}"), session, request.sid)

    def download(self, request: Request) -> Response:
        """Only to the session that uploaded it; to anyone else it does not exist."""
        session = self.store.load(request.sid) or empty_session()
        upload = (self.store.load_upload(request.path_id)
                  if request.path_id in session["uploads"] else None)
        if upload is None:
            raise ClientError(404, f"no upload {request.path_id} in the {self.store.kind} store")
        # Served from our own origin, an uploaded HTML file could run script as us:
        # `sandbox` and `nosniff` stop that.
        return Response(200, upload.data, upload.content_type,
                        [("Content-Security-Policy", "sandbox"),
                         ("X-Content-Type-Options", "nosniff")])

    def enqueue(self, request: Request) -> Response:
        form = request.form()
        task = required_field(form, "task")
        args = job_args(form.get("args") or "{}")
        return self.enqueue_for_session(request, form, task, args)

    def enqueue_for_session(self, request: Request, form: dict, task: str,
                            args: dict) -> Response:
        """A job sent with a session, or from the page (which then gets one), is private to
        that session. One sent with no session at all (curl) is public, as it always was."""
        back = return_path(form.get("next"))
        if back is None and self.store.load(request.sid) is None:
            return redirect(f"/jobs/{self.queue.enqueue(task, args)}")
        with self.store.edit(request.sid) as session:
            job_id = self.queue.enqueue(task, args, private=True)
            session.data.setdefault("jobs", []).append(job_id)
            session.data["notice"] = (f"{self.config.dyno} put job {job_id} ({task}) in the "
                                      f"queue; a worker will take it")
        return self.set_cookie(redirect(back or f"/jobs/{job_id}"), session, request.sid)

    def job_status(self, request: Request) -> Response:
        job_id = whole_number(request.path_id)
        job = self.queue.get(job_id) if job_id is not None else None
        if job is None:
            raise ClientError(404, f"no job {request.path_id}")
        return as_json(job_as_seen_by(job, self.store.load(request.sid)))

    def list_jobs(self, request: Request) -> Response:
        task = request.query.get("task")
        session = self.store.load(request.sid)
        return as_json([job_as_seen_by(job, session)
                        for job in self.queue.recent(task=task, limit=100)])

    def healthz(self, request: Request) -> Response:
        return text(200, "ok")


@dataclass
class Request:
    """What a route needs from the HTTP request; the body is read only when asked for."""
    handler: Handler
    sid: str | None
    path_id: str | None  # the <id> of /uploads/<id> and /jobs/<id>
    query: dict

    @property
    def headers(self):
        return self.handler.headers

    def body(self, limit: int) -> bytes:
        """The body, at most `limit` bytes, refused before a byte of it is read if bigger."""
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise ClientError(411, "send a Content-Length; chunked bodies are not accepted")
        lengths = set(self.headers.get_all("Content-Length", ["0"]))
        declared = whole_number(lengths.pop()) if len(lengths) == 1 else None
        if declared is None:
            raise ClientError(400, "Content-Length is not one number")
        if declared > limit:
            raise ClientError(413, f"the body is over the limit of {limit >> 20} MiB")
        with self.handler.server.transfer_slot():
            if (self.headers.get("Expect", "").lower() == "100-continue"
                    and self.handler.request_version >= "HTTP/1.1"):
                self.handler.handle_expect_100()  # else curl waits a second before sending
            return self.read_body(declared)

    def read_body(self, size: int) -> bytes:
        """`size` bytes, or a 4xx: within `Handler.transfer_seconds` in all, and at most
        `Handler.timeout` without a byte.

        A socket timeout alone bounds each wait, not the whole: a client sending a byte
        every few seconds would never trip it and could hold a worker for hours.
        """
        deadline = time.monotonic() + self.handler.transfer_seconds(size)
        chunks, received = [], 0
        try:
            while received < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.handler.connection.settimeout(min(left, self.handler.timeout))
                chunk = self.handler.rfile.read1(size - received)
                if not chunk:
                    raise ClientError(400, "the body is shorter than its Content-Length")
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            raise ClientError(408, "the body arrived too slowly") from None
        except ConnectionError:
            raise ClientError(400, "the connection broke while the body was arriving") from None
        finally:
            self.handler.connection.settimeout(self.handler.timeout)
        return b"".join(chunks)

    def form(self) -> dict[str, str]:
        content_type = self.headers.get("Content-Type", "application/x-www-form-urlencoded")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            raise ClientError(415, "send the form as application/x-www-form-urlencoded")
        return parse_form(self.body(MAX_FORM_BYTES))


class ClientError(Exception):
    """Bad input: answered with `status` and a one-line message, never a traceback."""

    def __init__(self, status: int, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> Response:
        response = text(self.status, self.message)
        response.headers.extend(self.headers)
        return response


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list = field(default_factory=list)


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def as_json(value) -> Response:
    return Response(200, json.dumps(value).encode(), "application/json")


def redirect(location: str) -> Response:
    return Response(303, headers=[("Location", location)])


# --- Where a form post returns, and who sees what ---------------------------------------

def return_path(value: str | None) -> str | None:
    """The page a browser's form asks to return to (its hidden `next` field), if it is a
    path on this site; None otherwise, and the route answers as it would to curl.

    Django's `url_has_allowed_host_and_scheme`, for paths only: one leading slash, not
    two (`//evil.example` is another host to a browser), no backslash (browsers read
    `/\\evil.example` as `//evil.example`), no scheme, no space or control character.
    Without this check, `next` would make the site an open redirect.
    """
    if value is None or not re.fullmatch(r"/(?!/)[\x21-\x7e]{0,500}", value) or "\\" in value:
        return None
    return value


def with_query(path: str, **params: str) -> str:
    """`path` with `params` added to its query string, escaped."""
    parts = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qsl(parts.query) + list(params.items())
    return urllib.parse.urlunsplit(("", "", parts.path, urllib.parse.urlencode(query),
                                    parts.fragment))


def field_text(part: FilePart | None) -> str | None:
    """A plain (not file) field of a multipart form, as text."""
    try:
        return part.data.decode("utf-8") if part else None
    except UnicodeDecodeError:
        return None


PUBLIC_JOB_FIELDS = ("id", "task", "state", "attempts", "worker", "key", "private")


def public_face(job: dict) -> dict:
    """What anyone may see of a job: the queue at work, not what it works on."""
    return {name: job[name] for name in PUBLIC_JOB_FIELDS}


def job_as_seen_by(job: dict, session: dict | None) -> dict:
    """All of a job for the session that enqueued it, and for anyone if no session did;
    only its public face for everyone else. Job ids are sequential, so anyone can ask for
    any of them: a private job's args (an upload's id) and result stay with its owner."""
    if job["private"] and job["id"] not in (session or {}).get("jobs", []):
        return public_face(job)
    return job


# --- Reading input ------------------------------------------------------------------

def parse_form(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                       max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise ClientError(400, "the form is not valid UTF-8") from None
    except ValueError:  # parse_qsl's "Max number of fields exceeded"
        raise ClientError(400, f"the form has over {MAX_FORM_FIELDS} fields") from None
    return dict(pairs)


def required_field(form: dict, name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise ClientError(400, f"the field '{name}' is missing or empty")
    if len(value) > MAX_FIELD_CHARS:
        raise ClientError(400, f"the field '{name}' is over {MAX_FIELD_CHARS} characters")
    return value


def job_args(text: str) -> dict:
    """A job's arguments: a JSON object, bounded here, before it is stored.

    Every page and list that shows the job reads them back, so what is stored must be
    cheap and safe to read for good: small, shallow (a deep one would make `json.loads`
    raise RecursionError in every reader), and made of numbers any JSON reader can carry
    (`json.loads` accepts NaN and Infinity, which are not JSON, and integers of any size,
    which JavaScript rounds past 2**53 and `int()` refuses past 4300 digits).
    """
    if len(text.encode()) > MAX_ARGS_BYTES:
        raise ClientError(400, f"'args' is over the limit of {MAX_ARGS_BYTES >> 10} KiB")
    try:
        args = json.loads(text, parse_int=json_integer, parse_float=json_float,
                          parse_constant=json_constant)
        too_deep = json_depth(args) > MAX_ARGS_DEPTH
    except RecursionError:  # [[[[… deeper than the parser itself goes
        too_deep = True
    except json.JSONDecodeError as error:
        raise ClientError(400, f"'args' is not valid JSON: {error}") from None
    if too_deep:
        raise ClientError(400, f"'args' nests deeper than {MAX_ARGS_DEPTH} levels")
    if not isinstance(args, dict):
        raise ClientError(400, "'args' must be a JSON object, like {\"seconds\": 2}")
    return args


def json_integer(text: str) -> int:
    # The length first: int() refuses over 4300 digits. 17 is len("-9007199254740991").
    if len(text) > 17 or abs(int(text)) > MAX_SAFE_INTEGER:
        raise ClientError(400, f"'args' holds an integer beyond ±{MAX_SAFE_INTEGER} "
                               f"(2**53 - 1), which JSON readers cannot carry exactly")
    return int(text)


def json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ClientError(400, f"'args' holds {text}, too large for a 64-bit float")
    return value


def json_constant(text: str):
    raise ClientError(400, f"'args' holds {text}, which is not a JSON number")


def json_depth(value) -> int:
    """How deeply arrays and objects nest in `value` (a number is 0), without recursing."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in items)
    return deepest


def header_param(header: str, param: str) -> str | None:
    """A parameter of a structured header, e.g. the boundary of a Content-Type.

    None when it is absent, and also for the RFC 2231 form (`boundary*=utf-8''b`): for
    that `get_param` returns a tuple, and browsers never send it for these parameters.
    """
    message = Message()
    message["content-type"] = header
    value = message.get_param(param)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class FilePart:
    filename: str
    content_type: str
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> dict[str, FilePart]:
    """Split a multipart/form-data body (RFC 7578) into its named parts.

    The body is `--B` part `--B` part `--B--`, each delimiter preceded by CRLF, each
    part headers, a blank line, then its bytes. The bytes are kept exactly as sent. The
    headers are UTF-8: browsers send a file's name as it is (`filename="café.txt"`).
    """
    boundary = header_param(content_type, "boundary")
    if not boundary:
        raise ClientError(400, "malformed multipart body: no boundary")
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise ClientError(400, "malformed multipart body: missing closing boundary")
    if len(pieces) > MAX_FORM_FIELDS + 2:
        raise ClientError(400, f"the form has over {MAX_FORM_FIELDS} fields")
    parts = {}
    for piece in pieces[1:-1]:  # pieces[0] is the preamble, pieces[-1] the epilogue
        _, _, rest = piece.partition(b"\r\n")
        head, blank_line, data = rest.partition(b"\r\n\r\n")
        headers = HeaderParser().parsestr(head.decode("utf-8", "replace") + "\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if not blank_line or not isinstance(name, str):
            raise ClientError(400, "malformed multipart body: a part without a name")
        parts[name] = FilePart(safe_filename(headers.get_filename() or ""),
                               media_type(headers.get("content-type", "")), data)
    return parts


def media_type(value: str) -> str:
    """`value` if it is a plain `type/subtype; name=value` (RFC 6838's characters), else
    application/octet-stream. It is sent back as a header when the file is downloaded:
    a folded or odd value would let an uploader write headers of their own."""
    if len(value) <= MAX_FIELD_CHARS and MEDIA_TYPE.fullmatch(value):
        return value
    return "application/octet-stream"


def safe_filename(name: str) -> str:
    """Only the last path component (old browsers send C:\\Users\\…), without control or
    format characters (a terminal escape, a right-to-left override), at most 200 chars."""
    name = "".join(char for char in name if unicodedata.category(char) not in ("Cc", "Cf"))
    base = PureWindowsPath(PurePosixPath(name).name).name
    return base[:MAX_FIELD_CHARS] or "upload"


def session_id_from(cookie_header: str) -> str | None:
    """The session id the browser sent, or None for no cookie or a malformed one.

    The header is `name=value` pairs joined by `; `, split here by hand as Django and
    werkzeug do. Not `http.cookies.SimpleCookie`: it follows RFC 2109, which browsers
    don't, so one neighbour it dislikes (`foo`, `a=b c`, `prefs={"a":1}`; any site on
    this host can set one) hides every cookie; and before Python 3.13 a long quoted value
    costs it seconds of CPU (CVE-2024-7592). Here the work is one split of a header the
    server has already bounded (MAX_HEAD_BYTES). When two `sid` come, the first wins:
    browsers send the most specific cookie (the longest path) first.
    """
    for pair in cookie_header.split(";"):
        name, _, value = pair.partition("=")
        if name.strip() == COOKIE_NAME:
            value = value.strip()
            return value if SESSION_ID.fullmatch(value) else None
    return None


def whole_number(text: str) -> int | None:
    """The value of `text` if it is 1 to 18 ASCII digits, else None.

    Not `str.isdigit()`: it also accepts '²', which `int()` then rejects. And at most 18
    digits: they fit SQLite's 64-bit INTEGER, and `int()` refuses more than 4300.
    """
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


# --- HTTP plumbing ------------------------------------------------------------------

MAX_HEAD_BYTES = 64 << 10  # the request line and every header, together
MIN_BODY_RATE = 16 << 10   # bytes a second, in or out: 10 MiB may take 11 minutes
WORKERS = 32               # threads that answer requests, started once
MAX_TRANSFERS = 24         # of those, at most this many move a long body at once
MAX_QUEUED = 1000          # whole requests waiting for a worker; beyond that, 503 at once
MAX_WAITING = 1000         # connections whose head is still arriving
RESPONSE_BUFFER_BYTES = 64 << 10
ACCEPT_PAUSE = 0.1         # seconds without accepting, out of descriptors with none to drop
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line; BaseHTTPRequestHandler takes a bare \n


class Handler(BaseHTTPRequestHandler):
    """Turns each HTTP request into a call to the App and writes its Response."""
    protocol_version = "HTTP/1.0"  # one request per connection: simple for the router
    timeout = 30                   # the longest wait for a client to send or take bytes
    rbufsize = 0                   # `setup` puts its own buffer over the head and the socket
    app: App                       # set on the subclass made in `serve`
    server: Server

    def setup(self) -> None:
        # The server hands over a Connection whose head it has already read, so that no
        # thread waited for it: put those bytes back in front of the socket's, and
        # BaseHTTPRequestHandler reads the request as it always does.
        connection: Connection = self.request
        self.request = connection.sock
        super().setup()
        self.rfile = io.BufferedReader(HeadFirst(bytes(connection.head), self.rfile))
        # The head and a small body leave in one write (at `finish`), not one each.
        self.wfile = io.BufferedWriter(self.wfile, RESPONSE_BUFFER_BYTES)

    def handle_expect_100(self) -> bool:
        super().handle_expect_100()
        self.wfile.flush()  # now, not with the answer: the client waits for it to send
        return True

    def dispatch(self) -> None:
        response = self.respond()
        if self.command == "HEAD" or len(response.body) <= RESPONSE_BUFFER_BYTES:
            self.send(response)  # to the buffer, which leaves in one write at `finish`
            return
        try:
            with self.server.transfer_slot():
                # The write of a long body waits on the client: give it a body's deadline.
                self.connection.settimeout(self.transfer_seconds(len(response.body)))
                self.send(response)
        except ClientError as error:
            self.send(error.response())

    def respond(self) -> Response:
        url = urllib.parse.urlsplit(self.path)
        cookies = "; ".join(self.headers.get_all("Cookie", []))
        try:
            route, path_id = self.app.find_route(self.command, url.path)
            return route(Request(self, session_id_from(cookies), path_id,
                                 dict(urllib.parse.parse_qsl(url.query))))
        except ClientError as error:
            return error.response()
        except sqlite3.OperationalError as error:  # e.g. a disk that is full
            log(f"backing store error: {error}")
            return text(503, "the backing store is unavailable; try again shortly")
        except Exception as error:  # a bug: say so loudly in the log, answer 500, keep serving
            log_bug(error)
            return text(500, "internal error; the traceback is in this copy's log")

    def transfer_seconds(self, size: int) -> float:
        """How long a body of `size` bytes may take to arrive, or to leave."""
        return self.app.config.client_timeout + size / MIN_BODY_RATE

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = dispatch

    def send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def end_headers(self) -> None:
        # Every response, errors included, says which copy answered.
        self.send_header("X-Served-By", self.app.config.dyno)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # stdout, not stderr
        log(f"{self.address_string()} {format % args}")


class HeadFirst(io.RawIOBase):
    """A socket's stream that gives back, first, the bytes already read from it."""

    def __init__(self, head: bytes, rest: io.RawIOBase):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.head:
            return self.rest.readinto(buffer)
        size = min(len(buffer), len(self.head))
        buffer[:size] = self.head[:size]
        self.head = self.head[size:]
        return size

    def close(self) -> None:
        self.rest.close()
        super().close()


@dataclass(eq=False)  # compared by identity: each is a key of `Server.waiting`
class Connection:
    """A client's connection, from its accept until its request head has arrived."""
    sock: socket.socket
    address: tuple
    deadline: float  # for the whole head
    head: bytearray = field(default_factory=bytearray)


class Server(HTTPServer):
    """Waits for request heads on one thread; answers whole requests on a fixed pool.

    `ThreadingHTTPServer` starts a thread per connection, which then waits for the client
    to send its request. That is a thread start per request, and a client that sends a
    byte a second holds a thread and a descriptor for as long as it likes: a thousand of
    them and the copy is out of descriptors, /healthz times out, and the accept loop
    spins (socketserver retries a failed accept at once). Here, as in nginx or the
    gthread worker of gunicorn:

    * One thread (`serve_forever`) accepts, and waits with a selector for the head of
      every request: a descriptor and a small buffer each, no thread. The head must be
      whole within CLIENT_TIMEOUT (else 408) and MAX_HEAD_BYTES (else 431). When MAX_WAITING
      are waiting and one more comes, or descriptors run out, the oldest is dropped: a
      browser sends its head in milliseconds, so the oldest is the likeliest to be slow.
    * WORKERS threads, started once, answer the whole heads from a queue of at most
      MAX_QUEUED (beyond that, 503 at once). A worker reads a request's body, and
      writes a long response, against a deadline (`Handler.transfer_seconds`).
    * `start()` and `stop(deadline)` run and end it all; `stop` stops accepting and
      lets what has begun finish, until the deadline.

    socketserver still binds, listens, accepts and closes; BaseHTTPRequestHandler still
    parses and answers. The loop and the threads are what this class adds.
    """
    request_queue_size = 128  # the listen backlog; 5 overflows under a burst of clients

    def __init__(self, address: tuple, handler: type[Handler], config: Config):
        super().__init__(address, handler)
        self.config = config
        self.selector = selectors.DefaultSelector()
        self.waiting: OrderedDict[Connection, None] = OrderedDict()  # the oldest first
        self.requests: queue.Queue[Connection | None] = queue.Queue(MAX_QUEUED)
        self.transfers = threading.BoundedSemaphore(MAX_TRANSFERS)
        self.stopping = threading.Event()
        # Daemon threads: `stop` waits for them itself, until its deadline, and no longer.
        self.threads = [threading.Thread(target=self.serve_forever, name="accept", daemon=True)]
        self.threads += [threading.Thread(target=self.work, name=f"worker-{number}",
                                          daemon=True) for number in range(WORKERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    @contextmanager
    def transfer_slot(self) -> Iterator[None]:
        """Held by a worker while it moves a body a slow client can stretch out (a
        request's; a response's over the buffer). At most MAX_TRANSFERS at once, so that
        the other workers always answer the rest (/healthz, the page); beyond, 503."""
        if not self.transfers.acquire(blocking=False):
            raise ClientError(503, "too many transfers at once; try again shortly",
                              (("Retry-After", "1"),))
        try:
            yield
        finally:
            self.transfers.release()

    def stop(self, deadline: float) -> bool:
        """Stop accepting; let the requests begun finish, until `deadline` (monotonic).
        False if some are still running then: the caller exits all the same."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and read heads until stopped, then until no head is still arriving."""
        self.socket.setblocking(False)
        self.selector.register(self.socket, selectors.EVENT_READ)
        while not self.stopping.is_set():
            self.wait_for_events(poll_interval)
        self.stop_accepting()
        while self.waiting:
            self.wait_for_events(poll_interval)
        for _ in range(WORKERS):
            self.requests.put(None)  # each worker's last item

    def wait_for_events(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.socket:
                self.accept()
            else:
                self.read_head(key.data)
        self.drop_expired()

    def accept(self) -> None:
        """Take every connection in the listen backlog, and read what it has sent."""
        while True:
            if len(self.waiting) >= MAX_WAITING:
                self.make_room()
            try:
                sock, address = self.get_request()
            except BlockingIOError:  # the backlog is empty
                return
            except OSError as error:  # ECONNABORTED and the like: that client gave up
                if error.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors
                    self.make_room()
                return
            sock.setblocking(False)
            deadline = time.monotonic() + self.config.client_timeout
            self.read_head(Connection(sock, address, deadline))

    def make_room(self) -> None:
        """Drop the connection that has waited longest; with none, pause accepting, as
        the listening socket stays readable and every accept would fail at once: a spin."""
        if self.waiting:
            self.answer_early(next(iter(self.waiting)), 503, "too many clients waiting")
        else:
            time.sleep(ACCEPT_PAUSE)

    def read_head(self, connection: Connection) -> None:
        """Read what has arrived; hand the request to a worker once its head is whole."""
        try:
            data = connection.sock.recv(MAX_HEAD_BYTES)
        except BlockingIOError:  # nothing yet
            self.wait_for_more(connection)
            return
        except OSError:  # reset by the client
            self.close(connection)
            return
        searched = max(0, len(connection.head) - 2)  # the blank line may straddle two reads
        connection.head += data
        if HEAD_END.search(connection.head, searched):
            self.hand_over(connection)
        elif not data:  # the client is done sending: its head ends here, if it sent one
            if connection.head:
                self.hand_over(connection)
            else:  # connected and closed: a probe of the port, no request, no log line
                self.close(connection)
        elif len(connection.head) > MAX_HEAD_BYTES:
            self.answer_early(connection, 431, f"the request head is over "
                                               f"{MAX_HEAD_BYTES >> 10} KiB")
        else:
            self.wait_for_more(connection)

    def wait_for_more(self, connection: Connection) -> None:
        if connection not in self.waiting:
            self.waiting[connection] = None
            self.selector.register(connection.sock, selectors.EVENT_READ, connection)

    def drop_expired(self) -> None:
        now = time.monotonic()
        while self.waiting:
            oldest = next(iter(self.waiting))  # the deadlines come in accept order
            if oldest.deadline > now:
                return
            if oldest.head:
                self.answer_early(oldest, 408, f"the request head did not arrive within "
                                               f"{self.config.client_timeout:g}s")
            else:  # connected, never sent a byte (a browser's preconnect): no line
                self.close(oldest)

    def hand_over(self, connection: Connection) -> None:
        self.stop_waiting(connection)
        try:
            self.requests.put_nowait(connection)
        except queue.Full:  # the workers are far behind: say so now, not after a long wait
            self.answer_early(connection, 503, "this copy is busy; try again shortly")

    def answer_early(self, connection: Connection, status: int, message: str) -> None:
        """Answer from this thread, without a worker, and close: at most one small send."""
        body = f"{message}\n".encode()
        head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; "
                f"charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"X-Served-By: {self.config.dyno}\r\n\r\n").encode()
        try:
            connection.sock.send(head + body)
        except OSError:  # gone, or not reading: there is no more to do for it
            pass
        log(f"{connection.address[0]} {status} {message}")
        self.close(connection)

    def stop_accepting(self) -> None:
        """Close the listening socket; close the connections that have not begun a request."""
        self.selector.unregister(self.socket)
        self.socket.close()
        for connection in [waiting for waiting in self.waiting if not waiting.head]:
            self.close(connection)

    def stop_waiting(self, connection: Connection) -> None:
        if connection in self.waiting:
            del self.waiting[connection]
            self.selector.unregister(connection.sock)

    def close(self, connection: Connection) -> None:
        self.stop_waiting(connection)
        self.close_request(connection.sock)

    def work(self) -> None:
        while (connection := self.requests.get()) is not None:
            self.answer(connection)

    def answer(self, connection: Connection) -> None:
        try:
            self.finish_request(connection, connection.address)  # runs the Handler
        except (ConnectionError, TimeoutError) as error:  # hung up, or stopped reading
            log(f"{connection.address[0]} left before the answer was sent "
                f"({type(error).__name__})")
        except Exception as error:
            log_bug(error)
        finally:
            self.shutdown_request(connection.sock)


def serve(app: App) -> Server:
    handler = type("AppHandler", (Handler,), {"app": app})
    address = (app.config.host, app.config.port)
    try:
        return Server(address, handler, app.config)
    except OSError as error:
        raise ConfigError(f"PORT={app.config.port}: cannot listen on "
                          f"{app.config.host}:{app.config.port}: {error.strerror}") from None


# Control characters become \xNN in the log: a client's bytes can neither move the
# operator's cursor, retitle their terminal, nor start a line of their own. A backslash
# is doubled, so that an escape cannot be faked. (BaseHTTPRequestHandler.log_message
# escapes the same way; overriding it loses that.)
LOG_ESCAPES = str.maketrans({code: f"\\x{code:02x}"
                             for code in [*range(0x20), *range(0x7f, 0xa0)]})
LOG_ESCAPES[ord("\\")] = "\\\\"


def log(*lines: str) -> None:
    """Lines to stdout, each escaped. A single write, so lines from many threads never
    interleave."""
    try:
        sys.stdout.write("".join(line.translate(LOG_ESCAPES) + "\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader (the launcher) is gone; keep serving, then stop
        pass


def log_bug(error: Exception) -> None:
    """A bug's traceback. Its message, which may quote a client's input, stays one line."""
    frames = "".join(traceback.format_tb(error.__traceback__)).splitlines()
    log("Traceback (most recent call last):", *frames, f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    dyno: str
    cookie_secure: bool
    stop_timeout: float    # seconds from SIGTERM to exit, whatever is still in flight
    client_timeout: float  # seconds to send a request head; a body has this and more


def config_from_env(environ: dict) -> Config:
    text = environ.get("PORT", "5000")
    port = whole_number(text)
    if port is None or not 0 < port < 65536:
        raise ConfigError(f"PORT must be a port number from 1 to 65535, got {text!r}")
    return Config(host=environ.get("HOST", "127.0.0.1"), port=port,
                  dyno=process_name(environ, "web.1"),
                  cookie_secure=environ.get("COOKIE_SECURE", "") == "1",
                  # under Heroku's 30 s; a thread cannot usefully wait longer than an hour
                  stop_timeout=positive_number(environ, "STOP_TIMEOUT", 25, 3600),
                  client_timeout=positive_number(environ, "CLIENT_TIMEOUT", 10, 3600))  # nginx: 60


def main() -> None:
    try:
        config = config_from_env(os.environ)
        db = database_from_env(os.environ)
        store = store_from_env(os.environ, db)
        server = serve(App(store, JobQueue(db), config))
    except ConfigError as error:
        print(f"webapp: {error}", file=sys.stderr)
        sys.exit(2)
    # Block SIGTERM and SIGINT in every thread, then take them here with sigwait: the
    # serving threads are never interrupted, and the shutdown runs as ordinary code.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server.start()
    log(f"{config.dyno} listening on http://{config.host}:{config.port} "
        f"(pid {os.getpid()}, {store.kind} store)")
    received = signal.sigwait(stop_signals)
    deadline = time.monotonic() + config.stop_timeout  # the deadline runs from the signal
    log(f"{config.dyno} got {signal.Signals(received).name}: finishing the requests in "
        f"flight, for at most {config.stop_timeout:g}s")
    if not server.stop(deadline):
        # Exit now; the OS closes what is still open. A worker still in the store may
        # hold its lock, so the store is not closed either: SQLite rolls back what was not
        # committed. os._exit, as the interpreter's shutdown could wait on those threads.
        log(f"{config.dyno} stopped at STOP_TIMEOUT, cutting off the requests in flight")
        os._exit(0)
    db.close()  # the connection of the store and of the job queue
    log(f"{config.dyno} stopped")


# --- The page -----------------------------------------------------------------------

PAGE = Template(Path(__file__).with_name("page.html").read_text(encoding="utf-8"))
COPY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def notice_line(notice: str | None, query: dict, stranger: bool, dyno: str) -> str:
    """The one line saying what just happened, or "".

    Usually it comes from the session, put there by the copy that did it. Two pieces of
    news come in the address instead, because no session can carry them: a logout (the
    session is gone) and a login under the memory store when another copy serves the page
    after it. Anyone can write an address, so those two are fixed sentences around a name.
    """
    login_on, logout_on = query.get("login_on", ""), query.get("logout_on", "")
    if notice:
        line = html.escape(notice)
    elif stranger and login_on != dyno and COPY_NAME.fullmatch(login_on):
        line = (f"You logged in on <b>{login_on}</b>. This page came from "
                f"<b>{html.escape(dyno)}</b>, which has never heard of that login.")
    elif COPY_NAME.fullmatch(logout_on):
        line = f"{logout_on} logged you out: your session is gone."
    else:
        return ""
    return f'<p class="notice" id="notice">{line}</p>\n'


def stranger_notice(store: SessionStore, dyno: str) -> str:
    """The lesson, said plainly, when the browser's session is unknown to this copy."""
    if store.kind == "memory":
        why = (f"With <code>SESSION_STORE=memory</code> each process keeps its own sessions "
               f"in its own memory: the copy that knows you is another one, and {dyno} "
               f"cannot see into it. This is the failure Factor VI prevents.")
    else:
        why = "It has expired or was ended by a logout."
    return (f'<p class="warn">Your browser sent a session cookie, but this process '
            f'({dyno}) has never heard of that session. {why}</p>\n')


def render_page(session: dict, dyno: str, store_kind: str, notice: str, stranger: str,
                uploads: list[UploadInfo], own_jobs: list[dict], queue: list[dict]) -> str:
    """The page; `notice` and `stranger` are HTML already, everything else is escaped here."""
    esc = html.escape
    user = session["user"]
    if user:
        who = f"Logged in as <b>{esc(user)}</b>."
    else:
        who = f"Not logged in, as far as {esc(dyno)} knows." if stranger else "Not logged in."
    logout = ('<form method="post" action="/logout"><input type="hidden" name="next" '
              'value="/"><button>Log out</button></form>')
    return PAGE.substitute(
        dyno=esc(dyno), pid=os.getpid(), store=esc(store_kind), notice=notice,
        stranger=stranger, who=who, logout=logout if user else "",
        cart="".join(f"<li>{esc(item)}</li>" for item in session["cart"]) or "<li>empty</li>",
        uploads="".join(upload_row(upload) for upload in uploads),
        own_jobs="".join(own_job_row(job) for job in own_jobs),
        queue="".join(queue_row(job) for job in queue),
        tasks=esc(", ".join(sorted(TASKS))))


def upload_row(upload: UploadInfo) -> str:
    """An upload by name, size and type, with a link and a button to count its words."""
    esc = html.escape
    args = esc(json.dumps({"upload": upload.id}))
    return (f'<tr><td><a href="/uploads/{esc(upload.id)}">{esc(upload.filename)}</a></td>'
            f'<td>{upload.size:,} bytes</td><td>{esc(upload.content_type)}</td>'
            f'<td><form method="post" action="/jobs"><input type="hidden" name="next" '
            f'value="/"><input type="hidden" name="task" value="wordcount">'
            f'<input type="hidden" name="args" value="{args}">'
            f'<button>count its words</button></form></td></tr>\n')


def own_job_row(job: dict) -> str:
    """A job of yours; the page's script updates its state and result while it runs."""
    esc = html.escape
    return (f'<tr data-job="{job["id"]}" data-state="{esc(job["state"])}">'
            f'<td><a href="/jobs/{job["id"]}">{job["id"]}</a></td><td>{esc(job["task"])}</td>'
            f'<td class="state">{esc(job["state"])}</td>'
            f'<td class="attempts">{job["attempts"]}</td>'
            f'<td class="result">{esc(job_outcome(job))}</td></tr>\n')


def job_outcome(job: dict) -> str:
    """A done job's result, any other's error: as the page's script shows them."""
    if job["state"] == "done":
        return json.dumps(job["result"], ensure_ascii=False, separators=(",", ":"))
    return job["error"] or ""


def queue_row(job: dict) -> str:
    cells = (job["id"], job["task"], job["state"], job["attempts"], job["worker"] or "")
    return "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>\n"


if __name__ == "__main__":
    main()
