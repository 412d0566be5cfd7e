"""The accepting thread: each request received whole, bounded, before a thread sees it
(Factor VII).

Factor VII says the app is its own web server, so how it receives requests is the app's
business. The terrible day this module prevents: four dozen clients each begin an upload
and send a byte every ten seconds. Had each request a thread from the moment its head
arrived, those clients would hold every thread of every copy: logins answer 503 while
`/healthz` stays green, and nobody can do anything, though no real request is in flight.
And had a body a deadline from its declared size, declaring 10 MiB would buy it eleven
minutes.

Here, as in nginx, one thread (`Receiver`) accepts every connection and receives each
request whole, head and body, with a selector: a descriptor and a small buffer each,
never a thread. Only a whole request is handed to the answering threads
(`web_server.Server`), which then never wait on a client's body. A body's deadline grows
with the bytes that actually arrive (`body_deadline`); a small body is kept in memory and
a large one in a scratch file (`web_input.Body`). Before a byte of a body is read, the
head decides its fate (`Receiver.expected_body`): a 411, 400 or 413 (its length against
the route's limit), a 403 for a request that would change something but comes from a page
of another site (`cross_origin`: login and logout CSRF), a 503 when no scratch file is
free, or a `100 Continue`. A request refused so is still handed over, to be answered and
logged as any other, without running its route. Parsing is `web_input.py`'s; answering,
and starting and stopping it all, `web_server.py`'s.
"""
from __future__ import annotations

import errno
import re
import selectors
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

from database import log
from web_input import (MAX_HEAD_BYTES, Body, ClientError, RequestHead, declared_length,
                       parse_head)

# A body must keep coming: CLIENT_TIMEOUT to begin with, then a second more for every
# MIN_BODY_RATE bytes received (Apache's mod_reqtimeout MinRate), so a client must average
# this rate, whatever it declared. 16 KiB/s (128 kbit/s) is what a 10 MiB upload needed
# before; any phone network sends faster. A trickle of 40 B/s is cut just after
# CLIENT_TIMEOUT: at 10 s, it has earned 10 * 40 / 16384 s, a fortieth of a second, more.
# An answer must leave at the same rate (`web_server`).
MIN_BODY_RATE = 16 << 10
MAX_SILENCE = 30           # seconds a client, mid-request, may send or take no byte at all
MAX_WAITING = 1000         # connections whose head or body is still arriving
MEMORY_BODY_BYTES = 16 << 10  # a body up to this stays in memory (any form of the page): at
# most 16 MiB for MAX_WAITING, and as much for the requests queued. Larger ones go to files:
MAX_SPOOLED = 32           # scratch files at once, so at most 32 descriptors and 320 MiB of disk
RECEIVE_BYTES = 256 << 10  # read from a socket at once, into the one buffer bodies need:
# large, so that the receiving thread waits for the GIL once per 256 KiB of an upload
SWEEP_EVERY = 0.25         # seconds between two checks of the bodies' deadlines
ACCEPT_PAUSE = 0.1         # seconds without accepting, out of descriptors with none to drop
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line; BaseHTTPRequestHandler takes a bare \n
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # they change nothing, so any site may send them
RETRY_SOON = (("Retry-After", "1"),)


@dataclass(eq=False)  # compared by identity: each is a key of the Receiver's dicts
class PendingRequest:
    """A client's connection, from its accept until it is answered: what has arrived of
    its request, and until when the rest may take."""
    sock: socket.socket
    address: tuple
    deadline: float  # for the head; then for the body, moved on as the body arrives
    head: bytearray = field(default_factory=bytearray)
    parsed: RequestHead | None = None   # the head, once whole and well formed
    refusal: ClientError | None = None  # the answer instead of the route's
    body: Body = field(default_factory=Body)
    expected: int = 0                   # the body's declared length
    body_began: float = 0.0


def body_deadline(began: float, received: int, now: float, client_timeout: float) -> float:
    """When a body that began to arrive at `began`, with `received` bytes of it in by
    `now` (the latest came then), is cut off with a 408.

    CLIENT_TIMEOUT, plus a second for every MIN_BODY_RATE bytes received: Apache's
    mod_reqtimeout (`body=20,MinRate=500`). It grows with what arrived, never with what
    was declared, so declaring 10 MiB buys no more time than declaring 10 bytes; and it
    is never more than MAX_SILENCE after the latest byte, so time earned early by a fast
    start cannot be spent in silence.
    """
    return min(began + client_timeout + received / MIN_BODY_RATE, now + MAX_SILENCE)


def cross_origin(head: RequestHead) -> str | None:
    """Which header shows that a page of another site sent this request, which may change
    something; None if none does. Go 1.25's `http.CrossOriginProtection`, rule for rule.

    SameSite=Lax keeps our cookie off another site's POST, but the browser still stores
    the answer's Set-Cookie, so a page anywhere could log a visitor out, or into the
    attacker's account (login CSRF). Browsers say where a request comes from:
    `Sec-Fetch-Site` (every browser since 2023) is trusted when present, and only
    `same-origin` or `none` (the user typed the address) pass; `same-site` does not, since
    another port or subdomain of this host is another origin. Older browsers send only
    `Origin`, which must name the host the request is for. A request with neither is not
    from a browser's page (curl, a script), and carries no visitor's cookie to abuse.
    """
    if head.method in SAFE_METHODS:
        return None
    for name in ("Sec-Fetch-Site", "Origin"):  # a browser sends each once; two is a forgery
        if len(head.headers.get_all(name, [])) > 1:
            return name
    fetch_site = head.headers.get("Sec-Fetch-Site", "")
    if fetch_site:
        return None if fetch_site in ("same-origin", "none") else "Sec-Fetch-Site"
    origin = head.headers.get("Origin", "")
    try:
        host = urllib.parse.urlsplit(origin).netloc  # `null` (a sandboxed page) has none
    except ValueError:  # `http://[`: no origin at all
        host = ""
    # An origin must name a host, and this one: `null` never matches, even with no Host.
    return None if not origin or host and host == head.headers.get("Host", "") else "Origin"


def send_at_once(sock: socket.socket, data: bytes) -> None:
    """A few bytes of our own (a 100 Continue, an early answer): a new connection's empty
    send buffer takes them at once. A client that is gone, or not reading, gets nothing
    more, and its next read or the close finds that out."""
    try:
        sock.send(data)
    except OSError:
        pass


class Receiver:
    """The accepting thread: takes connections and receives each request whole, head
    first, then body, for many clients at once with one selector, then hands it over.

    * A head must be whole within CLIENT_TIMEOUT (else 408) and MAX_HEAD_BYTES (else 431).
    * A body must keep its `body_deadline` (else 408). It is refused before a byte of it
      is read when the head says so (`expected_body`), and it goes to memory or to a
      scratch file (`new_body`): at most MAX_SPOOLED of those (else 503).
    * At most MAX_WAITING connections are held, heads and bodies together. When one more
      comes, or descriptors run out, the oldest head still arriving is dropped (503): a
      browser sends its head in milliseconds, so the oldest is the likeliest to be slow;
      with no head, the oldest body.

    Nothing here waits but the selector; the one blocking call writes to a scratch file,
    and the page cache takes that at once.
    """

    def __init__(self, listener: socket.socket, client_timeout: float, dyno: str,
                 body_limit: Callable[[str, str], int],
                 hand_over: Callable[[PendingRequest], None]):
        self.listener, self.client_timeout, self.dyno = listener, client_timeout, dyno
        self.body_limit = body_limit  # the route's, in bytes, for a method and a path
        self.to_answer = hand_over    # queues a whole request for the answering threads
        self.selector = selectors.DefaultSelector()
        self.heads: OrderedDict[PendingRequest, None] = OrderedDict()   # the oldest first
        self.bodies: OrderedDict[PendingRequest, None] = OrderedDict()  # the same
        self.scratch_files = threading.BoundedSemaphore(MAX_SPOOLED)
        self.buffer = memoryview(bytearray(RECEIVE_BYTES))  # one thread: one buffer
        self.next_sweep = 0.0

    def run(self, stopping: threading.Event, poll_interval: float) -> None:
        """Accept and receive until stopped, then until no request is still arriving."""
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        while not stopping.is_set():
            self.wait_for_events(poll_interval)
        self.stop_accepting()
        while self.heads or self.bodies:
            self.wait_for_events(poll_interval)

    def wait_for_events(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                self.accept()
            elif key.data in self.bodies:
                self.read_body(key.data)
            else:
                self.read_head(key.data)
        self.drop_expired()

    def accept(self) -> None:
        """Take every connection in the listen backlog, and read what it has sent."""
        while True:
            if len(self.heads) + len(self.bodies) >= MAX_WAITING:
                self.make_room()
            try:
                sock, address = self.listener.accept()
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
        """Drop the connection that has waited longest; with none, pause accepting, as
        the listening socket stays readable and every accept would fail at once: a spin."""
        oldest = next(iter(self.heads or self.bodies), None)
        if oldest:
            self.answer_early(oldest, 503, "too many clients waiting")
        else:
            time.sleep(ACCEPT_PAUSE)

    def read_head(self, pending: PendingRequest) -> None:
        """Read what has arrived; once the head is whole, go on to the body."""
        try:
            data = pending.sock.recv(MAX_HEAD_BYTES)
        except BlockingIOError:  # nothing yet
            self.wait_for_more(pending, self.heads)
            return
        except OSError:  # reset by the client
            self.close(pending)
            return
        searched = max(0, len(pending.head) - 2)  # the blank line may straddle two reads
        pending.head += data
        end = HEAD_END.search(pending.head, searched)
        if end or (not data and pending.head):  # at the end of input, what came is the head
            self.head_arrived(pending, end.end() if end else len(pending.head))
        elif not data:  # connected and closed: a probe of the port, no request, no log line
            self.close(pending)
        elif len(pending.head) > MAX_HEAD_BYTES:
            self.answer_early(pending, 431, f"the request head is over "
                                            f"{MAX_HEAD_BYTES >> 10} KiB")
        else:
            self.wait_for_more(pending, self.heads)

    def head_arrived(self, pending: PendingRequest, end: int) -> None:
        """Decide the body's fate from the head; keep what came of it with the head."""
        early = bytes(pending.head[end:])
        del pending.head[end:]
        try:
            pending.parsed = parse_head(bytes(pending.head))
            pending.expected = self.expected_body(pending.parsed)
            pending.body = self.new_body(pending.expected)
        except ClientError as error:
            self.refuse(pending, error)
            return
        pending.body.write(early[:pending.expected])
        if pending.body.size == pending.expected:
            self.hand_over(pending)
            return
        if pending.parsed.expects_continue and not early:  # else curl waits a second
            send_at_once(pending.sock, f"HTTP/1.0 100 Continue\r\nX-Served-By: {self.dyno}"
                                       f"\r\n\r\n".encode())
        now = time.monotonic()
        pending.body_began = now
        pending.deadline = body_deadline(now, pending.body.size, now, self.client_timeout)
        self.stop_waiting(pending)
        self.wait_for_more(pending, self.bodies)

    def expected_body(self, head: RequestHead) -> int:
        """The body's declared length, or the ClientError that refuses it unread."""
        site_header = cross_origin(head)
        if site_header:
            raise ClientError(403, f"a page of another site may not change anything here "
                                   f"(its {site_header} header says where it is from)")
        size = declared_length(head.headers)
        limit = self.body_limit(head.method, urllib.parse.urlsplit(head.target).path)
        if size > limit:
            raise ClientError(413, f"the body is over the limit of {limit >> 20} MiB")
        return size

    def new_body(self, size: int) -> Body:
        """Somewhere for a body of `size` bytes: memory when it is small, else a scratch
        file, while one of MAX_SPOOLED is free and the system will make one (else 503)."""
        if size <= MEMORY_BODY_BYTES:
            return Body()
        if not self.scratch_files.acquire(blocking=False):
            raise ClientError(503, "too many large bodies arriving at once; try again "
                                   "shortly", RETRY_SOON)
        try:
            return Body(spooled=True)
        except OSError as error:  # out of descriptors, or TMPDIR is not writable
            self.scratch_files.release()
            log(f"no scratch file for a request's body: {error}")
            raise ClientError(503, "no room for the body; try again shortly",
                              RETRY_SOON) from None

    def read_body(self, pending: PendingRequest) -> None:
        missing = pending.expected - pending.body.size
        try:
            size = pending.sock.recv_into(self.buffer, min(RECEIVE_BYTES, missing))
        except BlockingIOError:  # nothing yet
            return
        except OSError:  # reset by the client
            self.refuse(pending, ClientError(400, "the connection broke while the body "
                                                  "was arriving"))
            return
        if not size:
            self.refuse(pending, ClientError(400, "the body is shorter than its "
                                                  "Content-Length"))
            return
        try:
            pending.body.write(self.buffer[:size])
        except OSError as error:  # the scratch file's disk is full, or failing
            log(f"could not keep a request's body: {error}")
            self.refuse(pending, ClientError(503, "no room for the body; try again shortly",
                                             RETRY_SOON))
            return
        if pending.body.size == pending.expected:
            self.hand_over(pending)
        else:
            pending.deadline = body_deadline(pending.body_began, pending.body.size,
                                             time.monotonic(), self.client_timeout)

    def wait_for_more(self, pending: PendingRequest, waiting: OrderedDict) -> None:
        if pending not in waiting:
            waiting[pending] = None
            self.selector.register(pending.sock, selectors.EVENT_READ, pending)

    def drop_expired(self) -> None:
        now = time.monotonic()
        while self.heads:
            oldest = next(iter(self.heads))  # the heads' deadlines come in accept order
            if oldest.deadline > now:
                break
            if oldest.head:
                self.answer_early(oldest, 408, f"the request head did not arrive within "
                                               f"{self.client_timeout:g}s")
            else:  # connected, never sent a byte (a browser's preconnect): no line
                self.close(oldest)
        if now >= self.next_sweep:  # the bodies' deadlines move: look at each, now and then
            self.next_sweep = now + SWEEP_EVERY
            for pending in [body for body in self.bodies if body.deadline <= now]:
                self.refuse(pending, ClientError(408, "the body arrived too slowly"))

    def refuse(self, pending: PendingRequest, error: ClientError) -> None:
        """Hand the request over with the answer it gets instead of its route's: an
        answering thread sends it and logs it as any other."""
        pending.refusal = error
        self.hand_over(pending)

    def hand_over(self, pending: PendingRequest) -> None:
        self.stop_waiting(pending)
        self.to_answer(pending)

    def answer_early(self, pending: PendingRequest, status: int, message: str) -> None:
        """Answer from this thread, not an answering one, and close: at most one small send."""
        body = f"{message}\n".encode()
        send_at_once(pending.sock, (
            f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\nX-Served-By: {self.dyno}"
            f"\r\n\r\n").encode() + body)
        log(f"{pending.address[0]} {status} {message}")
        self.close(pending)

    def stop_accepting(self) -> None:
        """Close the listening socket; close the connections that have not begun a request."""
        self.selector.unregister(self.listener)
        self.listener.close()
        for pending in [waiting for waiting in self.heads if not waiting.head]:
            self.close(pending)

    def stop_waiting(self, pending: PendingRequest) -> None:
        for waiting in (self.heads, self.bodies):
            if pending in waiting:
                del waiting[pending]
                self.selector.unregister(pending.sock)

    def close(self, pending: PendingRequest) -> None:
        self.stop_waiting(pending)
        self.discard_body(pending)
        pending.sock.close()

    def discard_body(self, pending: PendingRequest) -> None:
        """The request has ended: free its body (a scratch file is gone once closed)."""
        if pending.body.spooled:
            self.scratch_files.release()
        pending.body.close()
