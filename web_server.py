"""The web process's own server: requests answered by a fixed pool of threads (Factor VII).

Factor VII says the app is its own web server, bound to a port, with nothing injected.
That makes the server's limits the app's limits. The terrible day this module prevents:
a few hundred slow clients each hold a thread and a descriptor of every copy, `/healthz`
stops answering, the platform thinks the copy is dead, and the site is down without one
real request in flight. Here a fixed pool of threads answers requests that have already
arrived whole (`web_receiver.py` receives them, on one thread, and bounds what it holds);
only a long answer (a download) waits on its client, and at most MAX_TRANSFERS at once.

What it gives `webapp.py`: a `Request` for each route to read (`form()`, or its `body`,
whole), a `Response` to return (bytes, or `Pieces` of a known length, sent a piece at a
time), and `Server`, which runs it all (see its docstring). A route raises
`web_input.ClientError` for bad input (a 4xx with a one-line message, never a traceback);
a store's `Refused` is answered with its status (413 too large, 429 too many, 507 full); a
store that does not answer (`UNAVAILABLE`: SQLite locked past its busy timeout, Redis down
or frozen) with a 503, `Retry-After: 1` and one line in the log; anything else is a bug, a
500, with its traceback in the log. Each request gets one log line, through `database.log`, which
escapes it, so that nothing a client sends can forge a line of the platform's log; only a
health check answered well gets none (`Handler.log_request`). Of sessions it knows only
the cookie that carries one's id; which routes there are and what they do is `webapp.py`'s.
The standard library does most of the HTTP: `BaseHTTPRequestHandler` answers,
`socketserver` binds and closes.
"""
from __future__ import annotations

import io
import json
import queue
import threading
import time
import traceback
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable, Iterable, Iterator, Protocol

from database import UNAVAILABLE, Refused, log
from web_input import Body, ClientError, parse_form, session_id_from
from web_receiver import MAX_SILENCE, MIN_BODY_RATE, RETRY_SOON, PendingRequest, Receiver

ANSWER_THREADS = 32        # threads that answer requests, started once
MAX_TRANSFERS = 24         # of those, at most this many send a long answer at once
MAX_QUEUED = 1000          # whole requests waiting to be answered; beyond that, 503 at once
RESPONSE_BUFFER_BYTES = 64 << 10


# --- What a route gets, and what it gives back -------------------------------------

@dataclass
class Request:
    """What a route needs from the HTTP request, which has arrived whole."""
    handler: Handler
    sid: str | None
    path_id: str | None  # the <id> of /uploads/<id> and /jobs/<id>
    query: dict
    body: Body           # within the route's `body_limit`; closed when the request ends

    @property
    def headers(self):
        return self.handler.headers

    def form(self) -> dict[str, str]:
        content_type = self.headers.get("Content-Type", "application/x-www-form-urlencoded")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            raise ClientError(415, "send the form as application/x-www-form-urlencoded")
        return parse_form(self.body.read())


@dataclass(frozen=True)
class Pieces:
    """A body sent a piece at a time (a download from the store), its length known before
    the first piece: that is the Content-Length."""
    pieces: Iterable[bytes]
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class Response:
    status: int
    body: bytes | Pieces = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list = field(default_factory=list)


def plain_text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def as_json(value) -> Response:
    return Response(200, json.dumps(value).encode(), "application/json")


def redirect(location: str) -> Response:
    return Response(303, headers=[("Location", location)])


def error_response(error: ClientError) -> Response:
    response = plain_text(error.status, error.message)
    response.headers.extend(error.headers)
    return response


class Routes(Protocol):
    """What the server asks of the app: the route for a request and the id in its path;
    and, before a byte of a body is read, how large that route lets a body be."""

    def find_route(self, method: str,
                   path: str) -> tuple[Callable[[Request], Response], str | None]: ...

    def body_limit(self, method: str, path: str) -> int: ...


# --- Answering ------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Turns each request, received whole, into a call to the App and writes its Response."""
    protocol_version = "HTTP/1.0"  # one request per connection: simple for the router
    timeout = MAX_SILENCE          # `setup` puts it on the socket: it bounds each send
    rbufsize = 0                   # `setup` reads the head from memory, not the socket
    app: Routes                    # set on the subclass made by `webapp.serve`
    server: Server

    def setup(self) -> None:
        # The server hands over a PendingRequest it has received whole, head and body, so
        # that no answering thread waits on a client: BaseHTTPRequestHandler reads the
        # request line from the head in memory, as it would from the socket.
        self.pending: PendingRequest = self.request
        self.request = self.pending.sock
        super().setup()
        self.rfile = io.BytesIO(self.pending.head)
        # The head and a small body leave in one write (at `finish`), not one each.
        self.wfile = io.BufferedWriter(self.wfile, RESPONSE_BUFFER_BYTES)

    def parse_request(self) -> bool:
        """Take the request line and headers the receiving thread parsed (it needed them
        to receive the body, `web_input.parse_head`); False once a 4xx or 505 is sent."""
        self.command, self.close_connection = None, True
        self.request_version = "HTTP/1.0"  # of our answer, should the line be refused
        self.requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        head = self.pending.parsed
        if head is None:
            self.send(error_response(self.pending.refusal))
            return False
        self.command, self.path, self.request_version = head.method, head.target, head.version
        self.headers = head.headers
        return True

    def dispatch(self) -> None:
        response = self.respond()
        if self.command == "HEAD" or len(response.body) <= RESPONSE_BUFFER_BYTES:
            self.send(response)  # to the buffer, which leaves in one write at `finish`
            return
        try:
            with self.server.transfer_slot():
                self.send_long(response)
        except ClientError as error:
            self.send(error_response(error))

    def respond(self) -> Response:
        url = urllib.parse.urlsplit(self.path)
        cookies = "; ".join(self.headers.get_all("Cookie", []))
        try:
            route, path_id = self.app.find_route(self.command, url.path)
            if self.pending.refusal:  # refused as it arrived: the route must not run
                return error_response(self.pending.refusal)
            return route(Request(self, session_id_from(cookies), path_id,
                                 dict(urllib.parse.parse_qsl(url.query)), self.pending.body))
        except ClientError as error:
            return error_response(error)
        except Refused as error:  # a limit of the store: too large, too many, no room
            return plain_text(error.status, str(error))
        except UNAVAILABLE as error:  # locked, down or frozen: a wait, not a bug
            log(f"backing store unavailable: {error}")
            return error_response(ClientError(503, "the store is not answering; try again",
                                              RETRY_SOON))
        except Exception as error:  # a bug: say so loudly in the log, answer 500, keep serving
            log_bug(error)
            return plain_text(500, "internal error; the traceback is in this copy's log")

    def transfer_seconds(self, size: int) -> float:
        """How long an answer of `size` bytes may take to leave."""
        return self.server.client_timeout + size / MIN_BODY_RATE

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = dispatch

    def send(self, response: Response) -> None:
        self.send_head(response)
        if self.command != "HEAD":
            for piece in pieces_of(response.body):
                self.wfile.write(piece)

    def send_long(self, response: Response) -> None:
        """A body over the buffer, a piece at a time, against one deadline for the whole:
        each write waits on the client, and a socket timeout alone bounds only one wait."""
        deadline = time.monotonic() + self.transfer_seconds(len(response.body))
        self.send_head(response)
        self.wfile.flush()
        sent = 0
        for piece in pieces_of(response.body):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.connection.settimeout(left)
            self.connection.sendall(piece)  # bounded as a whole by `left` (Python 3.5+)
            sent += len(piece)
        if sent != len(response.body):  # the upload was deleted while it was being sent
            log(f'{self.address_string()} "{self.requestline}" ended at {sent} of '
                f'{len(response.body)} bytes: the upload was deleted meanwhile')

    def send_head(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()

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


def pieces_of(body: bytes | Pieces) -> Iterable[bytes]:
    return body.pieces if isinstance(body, Pieces) else (body,)


# --- The server -----------------------------------------------------------------------

class Server(HTTPServer):
    """Receives requests on one thread (`Receiver`); answers whole ones on a fixed pool.

    `ThreadingHTTPServer` starts a thread per connection, which then waits for the client
    to send its request, body and all. That is a thread start per request, and a client
    that sends a byte every few seconds holds a thread for as long as it likes: a few
    dozen of them and nothing is answered. Here, as in nginx or gunicorn's gthread worker:

    * One thread (`serve_forever`, the `Receiver`) accepts, and receives every request
      whole before any answering thread sees it.
    * ANSWER_THREADS threads, started once, answer the whole requests from a queue of at
      most MAX_QUEUED (beyond that, 503 at once). A long answer waits on the client, so at
      most MAX_TRANSFERS threads send one at a time (`transfer_slot`): the others always
      answer the rest (/healthz, the page, a login).
    * `start()` and `stop(deadline)` run and end it all; `stop` stops accepting and
      lets what has begun finish, until the deadline. socketserver's `shutdown()` ends
      the accept loop, as it ends socketserver's own, and waits for it.

    socketserver still binds, listens, accepts and closes; BaseHTTPRequestHandler still
    answers. The threads, and the Receiver, are what this class adds.
    """
    request_queue_size = 128  # the listen backlog; 5 overflows under a burst of clients

    def __init__(self, address: tuple, handler: type[Handler], client_timeout: float, dyno: str):
        super().__init__(address, handler)
        self.client_timeout = client_timeout  # seconds for a request head, and a body's start
        self.dyno = dyno                      # this copy's name, on every answer
        self.receiver = Receiver(self.socket, client_timeout, dyno, self.body_limit,
                                 self.hand_over)
        # A SimpleQueue, not a Queue(MAX_QUEUED): its put and get are a call into C each,
        # where a Queue's wait on a Condition built of Python locks (about 20 µs of CPU a
        # request, measured). `hand_over` keeps the bound: only the Receiver puts.
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

    def body_limit(self, method: str, path: str) -> int:
        return self.RequestHandlerClass.app.body_limit(method, path)

    @contextmanager
    def transfer_slot(self) -> Iterator[None]:
        """Held by an answering thread while it sends a long answer, which a slow client
        can stretch out. At most MAX_TRANSFERS at once; beyond, 503."""
        if not self.transfers.acquire(blocking=False):
            raise ClientError(503, "too many transfers at once; try again shortly", RETRY_SOON)
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
        """Stop accepting and wait for the accept loop to end, once the requests still
        arriving are whole or too late; the requests begun are still answered. The
        inherited `shutdown` waits for a flag that only socketserver's own loop sets, so
        here it would never return."""
        self.stopping.set()
        self.accept_thread.join()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.receiver.run(self.stopping, poll_interval)
        for _ in range(ANSWER_THREADS):
            self.requests.put(None)  # each answering thread's last item

    def hand_over(self, pending: PendingRequest) -> None:
        """Queue a whole request to be answered, unless MAX_QUEUED are waiting already."""
        if self.requests.qsize() >= MAX_QUEUED:  # far behind: say so now, not after a wait
            self.receiver.answer_early(pending, 503, "this copy is busy; try again shortly")
        else:
            self.requests.put(pending)

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
        except UNAVAILABLE as error:  # mid-download: too late for a 503
            log(f"{pending.address[0]} the answer was cut short: backing store "
                f"unavailable: {error}")
        except Exception as error:
            log_bug(error)
        finally:
            self.receiver.discard_body(pending)
            self.shutdown_request(pending.sock)


def log_bug(error: Exception) -> None:
    """A bug's traceback. Its message, which may quote a client's input, stays one line."""
    frames = "".join(traceback.format_tb(error.__traceback__)).splitlines()
    log("Traceback (most recent call last):", *frames, f"{type(error).__name__}: {error}")
