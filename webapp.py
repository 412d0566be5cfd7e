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
(`worker.py`: this process only puts them in `job_queue.py`), where state lives
(`session_store.py`), and HTTP itself (`web_server.py`, `web_receiver.py`, `web_input.py`:
requests, responses, and a server bounded against slow and hostile clients). It reads
top-down: the routes (`App`) and what they use, what a job may carry, binding the port and
`main()`. The page is `page.py` (its template is `page.html`).

Configuration is the environment (Factor III), read once in `main()`: PORT, HOST,
SESSION_STORE, DATABASE_URL, DATABASE_BUSY_TIMEOUT, SESSION_TTL, DYNO (or honcho's
HONCHO_PROCESS_NAME, or foreman's PS), COOKIE_SECURE, STOP_TIMEOUT (25 s), CLIENT_TIMEOUT
(10 s). SIGTERM stops accepting and lets the requests in flight finish for at most
STOP_TIMEOUT seconds, then exits 0. Input is bounded where it comes in (`web_receiver.py`)
and where it is stored (`job_args`, `required_field`, the upload limit, and what one
session may hold: `MAX_CART_ITEMS`, `MAX_UPLOADS`, `MAX_OWN_JOBS`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

from database import (ConfigError, database_from_env, log, positive_number, process_name,
                      stop_timeout)
from job_queue import JobQueue, queue_from_env
from session_store import Session, SessionStore, empty_session, store_from_env
from page import news_address, render_page, with_query
from web_input import (COOKIE_NAME, MAX_FORM_BYTES, ClientError, FilePart, parse_multipart,
                       required_field, whole_number)
from web_server import (Handler, Pieces, Request, Response, Server, as_json, plain_text,
                        redirect)

MAX_UPLOAD_BYTES = 10 << 20
# A session is read and rewritten whole on every change, under the one write lock of
# the shared file: what one session may hold is bounded, so that no user slows everyone.
MAX_CART_ITEMS = 2000
MAX_UPLOADS = 100
MAX_OWN_JOBS = 100            # job ids kept in a session; older jobs go on, unlisted
MAX_ARGS_BYTES = 64 << 10     # a job's args are read back by every list that shows the job
MAX_ARGS_DEPTH = 16
MAX_SAFE_INTEGER = 2**53 - 1  # the largest integer every JSON reader carries exactly
# The page shows the newest few of each list, and reads no more than it shows.
PAGE_UPLOADS = 20             # of yours
PAGE_OWN_JOBS = 10            # of yours
PAGE_QUEUE_JOBS = 10          # of everyone's
LISTED_JOBS = 100             # GET /jobs: the newest this many,
MAX_LIST_BYTES = 1 << 20      # ... in at most this many bytes of JSON
LIST_PAGE = 20                # ... read from the queue this many at a time


# --- The application: one method per route -----------------------------------------

class App:
    """The routes. Each takes the request and returns a Response; none keeps state."""

    def __init__(self, store: SessionStore, queue: JobQueue, config: WebConfig):
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
        allowed = ", ".join([*methods, *(["HEAD"] if "GET" in methods else []), "OPTIONS"])
        if method == "OPTIONS":  # what may be sent here: the methods, and no body
            return functools.partial(self.options, allowed), path_id
        if method not in methods:
            raise ClientError(405, f"{method} is not allowed here; use {allowed}",
                              (("Allow", allowed),))
        return methods[method], path_id

    def options(self, allowed: str, request: Request) -> Response:
        """OPTIONS: which methods this address takes, in `Allow`, and no body."""
        return Response(204, headers=[("Allow", allowed)])

    def body_limit(self, method: str, path: str) -> int:
        """The most bytes a request's body may hold, asked before a byte of it is read."""
        return MAX_UPLOAD_BYTES if path == "/uploads" else MAX_FORM_BYTES

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

    def back_with_news(self, back: str | None, did: str, session: Session,
                       **values: object) -> str | None:
        """A form from the page returns to it (`back`, its `next`), told what this copy did;
        None for other clients, who get the resource they made."""
        if back is None:
            return None
        return news_address(back, did, self.config.dyno, session.unknown, **values)

    def page(self, request: Request) -> Response:
        """Read-only: what just happened comes in the address, so a GET writes nothing."""
        data = self.store.load(request.sid)
        stranger = request.sid is not None and data is None
        data = data or empty_session()
        uploads = [self.store.upload_info(upload_id)
                   for upload_id in data["uploads"][-PAGE_UPLOADS:]]
        own_jobs = [self.queue.get(job_id) for job_id in data.get("jobs", [])[-PAGE_OWN_JOBS:]]
        body = render_page(
            session=data, dyno=self.config.dyno, store_kind=self.store.kind,
            query=request.query, stranger=stranger,
            uploads=[upload for upload in reversed(uploads) if upload],
            own_jobs=[job for job in reversed(own_jobs) if job],
            queue=[public_face(job) for job in self.queue.recent(limit=PAGE_QUEUE_JOBS)])
        return Response(200, body.encode(), "text/html; charset=utf-8")

    def session_json(self, request: Request) -> Response:
        data = self.store.load(request.sid) or empty_session()
        return as_json({"user": data["user"], "cart": data["cart"], "uploads": data["uploads"],
                        "served_by": self.config.dyno, "pid": os.getpid(),
                        "store": self.store.kind})

    def login(self, request: Request) -> Response:
        form = request.form()
        name = required_field(form, "name")
        def log_in(session: Session) -> None:
            session.data["user"] = name

        session = self.store.edit(request.sid, log_in, rotate=True)  # fixation defence
        back = return_path(form.get("next"))
        if back and self.store.kind == "memory":
            # This session lives in this copy's memory only: the address says where, so
            # that a page from another copy can tell you why it does not know you.
            back = with_query(back, login_on=self.config.dyno)
        location = self.back_with_news(back, "login", session, name=name)
        return self.set_cookie(redirect(location or "/"), session, request.sid)

    def logout(self, request: Request) -> Response:
        back = return_path(request.form().get("next"))
        session = self.store.edit(request.sid, end_session)
        location = self.back_with_news(back, "logout", session)
        return self.set_cookie(redirect(location or "/"), session, request.sid)

    def add_to_cart(self, request: Request) -> Response:
        form = request.form()
        item = required_field(form, "item")
        def add(session: Session) -> None:
            if len(session.data["cart"]) >= MAX_CART_ITEMS:  # raising here writes nothing
                raise ClientError(400, f"the cart is full ({MAX_CART_ITEMS:,} items)")
            session.data["cart"].append(item)

        session = self.store.edit(request.sid, add)
        location = self.back_with_news(return_path(form.get("next")), "cart", session, item=item)
        return self.set_cookie(redirect(location or "/"), session, request.sid)

    def upload(self, request: Request) -> Response:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ClientError(415, "send the file as multipart/form-data, field 'file'")
        parts = parse_multipart(request.body, content_type)
        part = parts.get("file")
        if part is None or not part.size:
            raise ClientError(400, "the multipart field 'file' is missing or empty")
        upload_id = self.store.save_upload(part.filename, part.content_type, part.pieces())

        def attach(session: Session) -> None:
            if len(session.data["uploads"]) >= MAX_UPLOADS:
                raise ClientError(400, f"this session holds {MAX_UPLOADS} uploads already")
            renew_if_anonymous(session)
            session.data["uploads"].append(upload_id)

        try:
            session = self.store.edit(request.sid, attach)
        except BaseException:
            self.store.discard_upload(upload_id)  # refused, or failed: not left pending
            raise
        location = self.back_with_news(return_path(field_text(parts.get("next"))), "upload",
                                       session, file=part.filename, size=part.size)
        return self.set_cookie(redirect(location or f"/uploads/{upload_id}"), session,
                               request.sid)

    def download(self, request: Request) -> Response:
        """Only to the session that uploaded it; to anyone else it does not exist."""
        session = self.store.load(request.sid) or empty_session()
        upload = (self.store.upload_info(request.path_id)
                  if request.path_id in session["uploads"] else None)
        if upload is None:
            raise ClientError(404, f"no upload {request.path_id} in the {self.store.kind} store")
        # Served from our own origin, an uploaded HTML file could run script as us:
        # `sandbox` and `nosniff` stop that.
        return Response(200, Pieces(self.store.upload_chunks(upload.id), upload.size),
                        upload.content_type,
                        [("Content-Security-Policy", "sandbox"),
                         ("X-Content-Type-Options", "nosniff")])

    def enqueue(self, request: Request) -> Response:
        form = request.form()
        task = required_field(form, "task")
        args = job_args(form.get("args") or "{}")
        return self.enqueue_private_or_public(request, form, task, args)

    def enqueue_private_or_public(self, request: Request, form: dict, task: str,
                                  args: dict) -> Response:
        """A job sent with a session, or from the page (which then gets one), is private to
        that session. One sent with no session at all (curl) is public. A logged-in
        session's job goes in the users' lane, any other in the public lane."""
        back = return_path(form.get("next"))
        data = self.store.load(request.sid)
        if back is None and data is None:
            return redirect(f"/jobs/{self.queue.enqueue(task, args)}")
        lane = "users" if data and data.get("user") else "public"
        owner = owner_of(request.sid) if data else None  # a stale cookie owns nothing
        job_id = self.queue.enqueue(task, args, lane, owner, private=True)

        def own(session: Session) -> None:
            renew_if_anonymous(session)
            # The newest only: the session would grow with every job, and be rewritten whole
            # on every change.
            session.data["jobs"] = (session.data.get("jobs", []) + [job_id])[-MAX_OWN_JOBS:]

        session = self.store.edit(request.sid, own)
        location = self.back_with_news(back, "job", session, job=job_id, task=task)
        return self.set_cookie(redirect(location or f"/jobs/{job_id}"), session, request.sid)

    def job_status(self, request: Request) -> Response:
        job_id = whole_number(request.path_id)
        job = self.queue.get(job_id) if job_id is not None else None
        if job is None:
            raise ClientError(404, f"no job {request.path_id}")
        return as_json(job_as_seen_by(job, self.store.load(request.sid)))

    def list_jobs(self, request: Request) -> Response:
        """The newest jobs (of one task, with `?task=`), at most LISTED_JOBS of them and at
        most MAX_LIST_BYTES: a job's args may be 64 KiB, and a list of a hundred would be
        megabytes for anyone to ask for again and again. The rest is a page further on,
        `?before=<id>`, named in a `Link: <...>; rel="next"` header (as GitHub's API
        pages). Jobs are read a page of LIST_PAGE at a time, so a cut list reads little."""
        task, before = request.query.get("task"), request.query.get("before")
        older_than = whole_number(before) if before is not None else None
        if before is not None and older_than is None:
            raise ClientError(400, f"'before' must be a job id, got {before!r}")
        session = self.store.load(request.sid)
        listed: list[str] = []  # each job's JSON, as json.dumps writes it in a list
        size, cut = 2, False    # the brackets; stopped by the size, with jobs left
        while len(listed) < LISTED_JOBS and not cut:
            wanted = min(LIST_PAGE, LISTED_JOBS - len(listed))
            page = self.queue.recent(task, older_than, wanted)
            for job in page:
                text = json.dumps(job_as_seen_by(job, session))
                if listed and size + len(text) + 2 > MAX_LIST_BYTES:
                    cut = True
                    break
                listed.append(text)
                size, older_than = size + len(text) + 2, job["id"]
            if len(page) < wanted:  # no older job is left
                break
        response = Response(200, f"[{', '.join(listed)}]".encode(), "application/json")
        if cut or len(listed) == LISTED_JOBS:
            more = with_query("/jobs", **({"task": task} if task else {}), before=older_than)
            response.headers.append(("Link", f'<{more}>; rel="next"'))
        return response

    def healthz(self, request: Request) -> Response:
        return plain_text(200, "ok")


def end_session(session: Session) -> None:
    session.delete = True


def renew_if_anonymous(session: Session) -> None:
    """Before something private (an upload, a job) goes into a session nobody has logged
    into, move it to a new id. Whoever planted that id in your browser (a sibling site can
    set a cookie for this host) made the session, knows its id, and would see your upload;
    the new id they cannot know. A login moves the id anyway (`rotate`)."""
    if session.data["user"] is None and not session.is_new:
        session.renew_id()


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


def field_text(part: FilePart | None) -> str | None:
    """A plain (not file) field of a multipart form, as text."""
    return part.text() if part else None


PUBLIC_JOB_FIELDS = ("id", "task", "state", "attempts", "worker", "key", "private")


def owner_of(sid: str) -> str:
    """Whose job it is, for the queue's quota: a hash of the session id, never the id."""
    return hashlib.sha256(sid.encode()).hexdigest()[:32]


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


# --- What a job may carry ----------------------------------------------------------

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
    try:  # "\ud800" is valid JSON, but half a character: no log or database can hold it
        json.dumps(args, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(400, "'args' holds a lone surrogate (like \\ud800), which is not "
                               "text") from None
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
        shown = text if len(text) <= 20 else text[:20] + "..."  # not 60 KB of digits back
        raise ClientError(400, f"'args' holds {shown}, too large for a 64-bit float")
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


# --- Binding the port, and main ----------------------------------------------------

def serve(app: App) -> Server:
    handler = type("AppHandler", (Handler,), {"app": app})
    address = (app.config.host, app.config.port)
    try:
        return Server(address, handler, app.config.client_timeout, app.config.dyno)
    except OSError as error:
        raise ConfigError(f"PORT={app.config.port}: cannot listen on "
                          f"{app.config.host}:{app.config.port}: {error.strerror}") from None


@dataclass(frozen=True)
class WebConfig:
    host: str
    port: int
    dyno: str
    cookie_secure: bool
    stop_timeout: float    # seconds from SIGTERM to exit, whatever is still in flight
    client_timeout: float  # seconds to send a request head; a body has this and more


def config_from_env(environ: dict) -> WebConfig:
    text = environ.get("PORT", "5000")
    port = whole_number(text)
    if port is None or not 0 < port < 65536:
        raise ConfigError(f"PORT must be a port number from 1 to 65535, got {text!r}")
    return WebConfig(
        host=environ.get("HOST", "127.0.0.1"), port=port,
        dyno=process_name(environ, "web.1"),
        cookie_secure=environ.get("COOKIE_SECURE", "") == "1",
        stop_timeout=stop_timeout(environ),
        client_timeout=positive_number(environ, "CLIENT_TIMEOUT", 10, 3600))  # nginx: 60


def main() -> None:
    try:
        config = config_from_env(os.environ)
        db = database_from_env(os.environ)
        store = store_from_env(os.environ, db)
        server = serve(App(store, queue_from_env(os.environ, db), config))
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


if __name__ == "__main__":
    main()
