"""The web process's own server: HTTP in and out, bounded (Factor VII).

Factor VII says the app is its own web server, bound to a port, with nothing injected.
That makes the server's limits the app's limits. The terrible day this module prevents:
a few hundred clients that send a byte a second (by malice or a bad network) each hold a
thread and a descriptor of every copy, `/healthz` stops answering, the platform thinks
the copy is dead, and the whole site is down without one real request in flight.

What it gives `webapp.py`: a `Request` for each route to read (the body only when asked
for, against a size limit and a deadline), a `Response` to return, `ClientError` for bad
input (a 4xx with a one-line message, never a traceback), the input parsers (forms,
multipart uploads, the session cookie), and `Server`, which accepts connections, waits
for request heads on one thread and answers whole requests on a fixed pool of threads
(see its docstring for the bounds). Each request gets one log line, through
`database.log`, which escapes it, so that nothing a client sends can forge a line of the
platform's log; only a health check answered well gets none (`Handler.log_request`).

What a route raises is answered here: a `ClientError` with its 4xx; a store's `Refused`
with its status (413 too large, 429 too many, 507 full); a store that does not answer
(`UNAVAILABLE`: SQLite locked past its busy timeout, Redis down or frozen) with a 503,
`Retry-After: 1` and one line in the log; anything else is a bug, a 500, with its
traceback in the log. It
does not know which backing store stands behind the routes. Of sessions it knows only the
cookie that carries one's id (`COOKIE_NAME`, `session_id_from`): what a session holds, and
where, is `session_store.py`'s business. It knows nothing of jobs or the page:
`webapp.py` holds the routes and binds the port (`serve`), and that is where this toy
app lives. The standard library does most of the HTTP: `BaseHTTPRequestHandler` answers,
`socketserver` binds and accepts; only the request head is read here
(`Handler.parse_request`), as cheaply as its grammar allows.
"""
from __future__ import annotations

import errno
import io
import json
import queue
import re
import selectors
import socket
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
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import PurePosixPath, PureWindowsPath
from typing import Callable, Iterator, Protocol

from database import UNAVAILABLE, Refused, log

MAX_FORM_BYTES = 1 << 20      # a form is a few fields; refuse anything bigger unread
MAX_FIELD_CHARS = 200
MAX_FORM_FIELDS = 100
MAX_PART_HEAD_BYTES = 8 << 10  # the headers of one part of a multipart upload
# A media type as RFC 6838 spells one (type/subtype, plain parameters), nothing more.
MEDIA_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+( ?; ?[\w!#$&^.+-]+=[\w!#$&^.+-]+)*",
                        re.ASCII)
COOKIE_NAME = "sid"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")  # what `new_session_id` makes, and a margin

MAX_HEAD_BYTES = 64 << 10  # the request line and every header, together
MIN_BODY_RATE = 16 << 10   # bytes a second, in or out: 10 MiB may take 11 minutes
MAX_SILENCE = 30           # seconds a client, mid-request, may send or take no byte at all
ANSWER_THREADS = 32        # threads that answer requests, started once
MAX_TRANSFERS = 24         # of those, at most this many move a long body at once
MAX_QUEUED = 1000          # whole requests waiting to be answered; beyond that, 503 at once
MAX_WAITING = 1000         # connections whose head is still arriving
RESPONSE_BUFFER_BYTES = 64 << 10
ACCEPT_PAUSE = 0.1         # seconds without accepting, out of descriptors with none to drop
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line; BaseHTTPRequestHandler takes a bare \n
MAX_HEADERS = 100          # as http.client; more get a 431
# RFC 9112's request line (`POST /cart HTTP/1.1`) and header line (`Name: value`). A line
# that begins with a space would continue the header before it (obs-fold): refused.
REQUEST_LINE = re.compile(r"(\S+) +(\S+) +(HTTP/([0-9])\.[0-9])")
HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")


# --- What a route gets, and what it gives back -------------------------------------

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
        if self.headers.get("Transfer-Encoding"):  # chunked, Chunked, gzip: none is read
            raise ClientError(411, "send a Content-Length; chunked bodies are not accepted")
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", ["0"])}
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
        MAX_SILENCE seconds without a byte.

        A socket timeout alone bounds each wait, not the whole: a client sending a byte
        every few seconds would never trip it and could hold a thread for hours.
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
        response = plain_text(self.status, self.message)
        response.headers.extend(self.headers)
        return response


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list = field(default_factory=list)


def plain_text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def as_json(value) -> Response:
    return Response(200, json.dumps(value).encode(), "application/json")


def redirect(location: str) -> Response:
    return Response(303, headers=[("Location", location)])


class Routes(Protocol):
    """What the server asks of the app: the route for a request, and the id in its path."""

    def find_route(self, method: str,
                   path: str) -> tuple[Callable[[Request], Response], str | None]: ...


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
        if len(head) > MAX_PART_HEAD_BYTES:  # a browser sends two short lines
            raise ClientError(400, f"a part's headers are over {MAX_PART_HEAD_BYTES >> 10} KiB")
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


def request_line(line: str) -> tuple[str, str, str]:
    """The method, target and version of a request line: `POST /cart HTTP/1.1`."""
    match = REQUEST_LINE.fullmatch(line)
    if not match:
        raise ClientError(400, "the request line is not METHOD TARGET HTTP/1.x")
    if int(match[4]) >= 2:
        raise ClientError(505, "HTTP/2 and later are not spoken here; use HTTP/1.1")
    return match[1], match[2], match[3]


def read_headers(stream: io.BufferedIOBase) -> HTTPMessage:
    """The header lines, up to the blank one, in the HTTPMessage that http.server makes:
    `get` and `get_all` work as ever. At most MAX_HEADERS lines of MAX_HEAD_BYTES each."""
    headers = HTTPMessage()
    while (line := stream.readline(MAX_HEAD_BYTES + 1)) not in (b"\r\n", b"\n", b""):
        if len(line) > MAX_HEAD_BYTES or len(headers) == MAX_HEADERS:
            raise ClientError(431, f"over {MAX_HEADERS} headers, or a header over "
                                   f"{MAX_HEAD_BYTES >> 10} KiB")
        field = HEADER_LINE.fullmatch(line.decode("iso-8859-1").rstrip("\r\n"))
        if not field:
            raise ClientError(400, "a header line is not `Name: value`, or is folded")
        headers[field[1]] = field[2]
    return headers


def whole_number(text: str) -> int | None:
    """The value of `text` if it is 1 to 18 ASCII digits, else None.

    Not `str.isdigit()`: it also accepts '²', which `int()` then rejects. And at most 18
    digits: they fit SQLite's 64-bit INTEGER, and `int()` refuses more than 4300.
    """
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


# --- The server --------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Turns each HTTP request into a call to the App and writes its Response."""
    protocol_version = "HTTP/1.0"  # one request per connection: simple for the router
    timeout = MAX_SILENCE          # `setup` puts it on the socket: it bounds each send, recv
    rbufsize = 0                   # `setup` puts its own buffer over the head and the socket
    app: Routes                    # set on the subclass made by `webapp.serve`
    server: Server

    def setup(self) -> None:
        # The server hands over a PendingRequest whose head it has already read, so that
        # no thread waited for it: put those bytes back in front of the socket's, and
        # BaseHTTPRequestHandler reads the request as it always does.
        pending: PendingRequest = self.request
        self.request = pending.sock
        super().setup()
        self.rfile = io.BufferedReader(HeadFirst(bytes(pending.head), self.rfile))
        # The head and a small body leave in one write (at `finish`), not one each.
        self.wfile = io.BufferedWriter(self.wfile, RESPONSE_BUFFER_BYTES)

    def parse_request(self) -> bool:
        """Read the request line and the headers; False once a 4xx or 505 is sent.

        BaseHTTPRequestHandler's own hands the headers to email.parser, which reads whole
        mail messages (MIME parts, folded lines, their defects): cProfile ranked it first
        in a copy's CPU, and /healthz costs a quarter less without it. A request head is
        simpler (`request_line`, `read_headers`), and whole in memory by now.
        """
        self.command, self.close_connection = None, True
        self.request_version = "HTTP/1.0"  # of our answer, should the line be refused
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        try:
            self.command, self.path, self.request_version = request_line(self.requestline)
            self.headers = read_headers(self.rfile)
        except ClientError as error:
            self.send(error.response())
            return False
        return True

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
        except Refused as error:  # a limit of the store: too large, too many, no room
            return plain_text(error.status, str(error))
        except UNAVAILABLE as error:  # locked, down or frozen: a wait, not a bug
            log(f"backing store unavailable: {error}")
            response = plain_text(503, "the store is not answering; try again")
            response.headers.append(("Retry-After", "1"))
            return response
        except Exception as error:  # a bug: say so loudly in the log, answer 500, keep serving
            log_bug(error)
            return plain_text(500, "internal error; the traceback is in this copy's log")

    def transfer_seconds(self, size: int) -> float:
        """How long a body of `size` bytes may take to arrive, or to leave."""
        return self.server.client_timeout + size / MIN_BODY_RATE

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
        self.send_header("X-Served-By", self.server.dyno)
        super().end_headers()

    def log_request(self, code="-", size="-") -> None:
        # A health check answered 2xx is not logged, whoever asks. The platform asks every
        # copy for /healthz every second (so does a Kubernetes probe), and a line each
        # would bury the requests people made. Who asks is not checked: a User-Agent is
        # whatever the client says, and the server need not know its platform. Leaving
        # these out hides nobody's doing, since `GET /healthz` reveals and changes
        # nothing. Everything else is logged: another method or path, a query string, a
        # head that could not be read, and a check that fails, which the operator needs.
        health_check = (self.command == "GET" and self.path == "/healthz"
                        and isinstance(code, int) and 200 <= code < 300)
        if not health_check:
            super().log_request(code, size)

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
class PendingRequest:
    """A client's connection, from its accept until it is answered: the socket, and the
    request's head as far as it has arrived."""
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
    * ANSWER_THREADS threads, started once, answer the whole heads from a queue of at
      most MAX_QUEUED (beyond that, 503 at once). Each reads a request's body, and
      writes a long response, against a deadline (`Handler.transfer_seconds`).
    * `start()` and `stop(deadline)` run and end it all; `stop` stops accepting and
      lets what has begun finish, until the deadline. socketserver's `shutdown()` ends
      the accept loop, as it ends socketserver's own, and waits for it.

    socketserver still binds, listens, accepts and closes; BaseHTTPRequestHandler still
    parses and answers. The loop and the threads are what this class adds.
    """
    request_queue_size = 128  # the listen backlog; 5 overflows under a burst of clients

    def __init__(self, address: tuple, handler: type[Handler], client_timeout: float, dyno: str):
        super().__init__(address, handler)
        self.client_timeout = client_timeout  # seconds for a whole request head
        self.dyno = dyno                      # this copy's name, on every answer
        self.selector = selectors.DefaultSelector()
        self.waiting: OrderedDict[PendingRequest, None] = OrderedDict()  # the oldest first
        # A SimpleQueue, not a Queue(MAX_QUEUED): its put and get are a call into C each,
        # where a Queue's wait on a Condition built of Python locks (about 20 µs of CPU a
        # request, measured). `hand_over` keeps the bound: it is the only thread that puts.
        self.requests: queue.SimpleQueue[PendingRequest | None] = queue.SimpleQueue()
        self.transfers = threading.BoundedSemaphore(MAX_TRANSFERS)
        self.stopping = threading.Event()
        # Daemon threads: `stop` waits for them itself, until its deadline, and no longer.
        self.accept_thread = threading.Thread(target=self.serve_forever, name="accept",
                                              daemon=True)
        self.threads = [self.accept_thread]
        self.threads += [threading.Thread(target=self.answer_requests, daemon=True,
                                          name=f"answer-{number}")
                         for number in range(ANSWER_THREADS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    @contextmanager
    def transfer_slot(self) -> Iterator[None]:
        """Held by an answering thread while it moves a body a slow client can stretch
        out (a request's; a response's over the buffer). At most MAX_TRANSFERS at once, so
        that the other threads always answer the rest (/healthz, the page); beyond, 503."""
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

    def shutdown(self) -> None:
        """Stop accepting and wait for the accept loop to end, once the heads still
        arriving are whole or too late; the requests begun are still answered. The
        inherited `shutdown` waits for a flag that only socketserver's own loop sets, so
        here it would never return."""
        self.stopping.set()
        self.accept_thread.join()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and read heads until stopped, then until no head is still arriving."""
        self.socket.setblocking(False)
        self.selector.register(self.socket, selectors.EVENT_READ)
        while not self.stopping.is_set():
            self.wait_for_events(poll_interval)
        self.stop_accepting()
        while self.waiting:
            self.wait_for_events(poll_interval)
        for _ in range(ANSWER_THREADS):
            self.requests.put(None)  # each answering thread's last item

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
            deadline = time.monotonic() + self.client_timeout
            self.read_head(PendingRequest(sock, address, deadline))

    def make_room(self) -> None:
        """Drop the request that has waited longest; with none, pause accepting, as
        the listening socket stays readable and every accept would fail at once: a spin."""
        if self.waiting:
            self.answer_early(next(iter(self.waiting)), 503, "too many clients waiting")
        else:
            time.sleep(ACCEPT_PAUSE)

    def read_head(self, pending: PendingRequest) -> None:
        """Read what has arrived; hand the request over to be answered once its head is
        whole."""
        try:
            data = pending.sock.recv(MAX_HEAD_BYTES)
        except BlockingIOError:  # nothing yet
            self.wait_for_more(pending)
            return
        except OSError:  # reset by the client
            self.close(pending)
            return
        searched = max(0, len(pending.head) - 2)  # the blank line may straddle two reads
        pending.head += data
        if HEAD_END.search(pending.head, searched):
            self.hand_over(pending)
        elif not data:  # the client is done sending: its head ends here, if it sent one
            if pending.head:
                self.hand_over(pending)
            else:  # connected and closed: a probe of the port, no request, no log line
                self.close(pending)
        elif len(pending.head) > MAX_HEAD_BYTES:
            self.answer_early(pending, 431, f"the request head is over "
                                            f"{MAX_HEAD_BYTES >> 10} KiB")
        else:
            self.wait_for_more(pending)

    def wait_for_more(self, pending: PendingRequest) -> None:
        if pending not in self.waiting:
            self.waiting[pending] = None
            self.selector.register(pending.sock, selectors.EVENT_READ, pending)

    def drop_expired(self) -> None:
        now = time.monotonic()
        while self.waiting:
            oldest = next(iter(self.waiting))  # the deadlines come in accept order
            if oldest.deadline > now:
                return
            if oldest.head:
                self.answer_early(oldest, 408, f"the request head did not arrive within "
                                               f"{self.client_timeout:g}s")
            else:  # connected, never sent a byte (a browser's preconnect): no line
                self.close(oldest)

    def hand_over(self, pending: PendingRequest) -> None:
        self.stop_waiting(pending)
        if self.requests.qsize() >= MAX_QUEUED:  # far behind: say so now, not after a wait
            self.answer_early(pending, 503, "this copy is busy; try again shortly")
        else:
            self.requests.put(pending)

    def answer_early(self, pending: PendingRequest, status: int, message: str) -> None:
        """Answer from this thread, not an answering one, and close: at most one small send."""
        body = f"{message}\n".encode()
        head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; "
                f"charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"X-Served-By: {self.dyno}\r\n\r\n").encode()
        try:
            pending.sock.send(head + body)
        except OSError:  # gone, or not reading: there is no more to do for it
            pass
        log(f"{pending.address[0]} {status} {message}")
        self.close(pending)

    def stop_accepting(self) -> None:
        """Close the listening socket; close the connections that have not begun a request."""
        self.selector.unregister(self.socket)
        self.socket.close()
        for pending in [waiting for waiting in self.waiting if not waiting.head]:
            self.close(pending)

    def stop_waiting(self, pending: PendingRequest) -> None:
        if pending in self.waiting:
            del self.waiting[pending]
            self.selector.unregister(pending.sock)

    def close(self, pending: PendingRequest) -> None:
        self.stop_waiting(pending)
        self.close_request(pending.sock)

    def answer_requests(self) -> None:
        """Answer the requests handed over, until the None that `serve_forever` puts last."""
        while (pending := self.requests.get()) is not None:
            self.answer(pending)

    def answer(self, pending: PendingRequest) -> None:
        try:
            self.finish_request(pending, pending.address)  # runs the Handler
        except (ConnectionError, TimeoutError) as error:  # hung up, or stopped reading
            log(f"{pending.address[0]} left before the answer was sent "
                f"({type(error).__name__})")
        except Exception as error:
            log_bug(error)
        finally:
            self.shutdown_request(pending.sock)


def log_bug(error: Exception) -> None:
    """A bug's traceback. Its message, which may quote a client's input, stays one line."""
    frames = "".join(traceback.format_tb(error.__traceback__)).splitlines()
    log("Traceback (most recent call last):", *frames, f"{type(error).__name__}: {error}")
