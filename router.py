"""The routing layer: requests in through one front port, log lines out as one stream.

Factor VIII scales the web process by running more copies of it, and something must then
spread the traffic over them. The terrible day this module prevents: four copies run, but
users reach only the one whose port they know, or a copy that just died, and see an
error. Here one front port takes every connection and hands it to the next live copy in
`rotation`, round-robin, as Heroku's router or kube-proxy does: one copy dies, the
others take the traffic; with none live, the client gets a 503 at once, not a hang.

It moves bytes and reads no HTTP: each TCP connection is relayed to one copy, both ways,
until both sides have finished. The supervisor in `launcher.py` decides which copies are
live, by asking each for `GET /healthz` (`HealthCheck`, below), and hands the router their
ports; the router never starts or stops anything.

The other way out of the copies is their output, which `logs.py` routes. Neither imports
anything of the app, and the app nothing of them.
"""
from __future__ import annotations

import errno
import re
import resource
import selectors
import socket
import threading
import time
from contextlib import suppress
from typing import Callable

COPY_HOST = "127.0.0.1"  # copies are reached only through the router, on loopback
BACKLOG = 128            # a backlog of 5 overflows under a burst of clients: slow SYN retries
CHUNK = 65536            # bytes read at once, and held per direction (backpressure)
IDLE_TIMEOUT = 60.0      # a connection with no byte either way this long is closed (nginx: 60)
UPSTREAM_TIMEOUT = 30.0  # a request its copy has not begun to answer by then gets a 504
CONNECT_TIMEOUT = 3.0    # a copy that has not taken the connection by then is skipped
SWEEP_EVERY = 1.0        # how often the router looks for connections past a deadline
MAX_CONNECTIONS = 4096   # clients held at once; the next ones wait in the listen backlog
RESERVED_DESCRIPTORS = 256  # left to the supervisor: copies' pipes, health checks, stdio


def plain_answer(status: str, body: str) -> bytes:
    """An HTTP answer of the router's own, for when no copy can give one."""
    return (f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}").encode()


NO_COPY = plain_answer("503 Service Unavailable",
                       "503: no web copy is running; try again in a moment\n")
BAD_GATEWAY = plain_answer("502 Bad Gateway",
                           "502: the web copy hung up without answering\n")
GATEWAY_TIMEOUT = plain_answer("504 Gateway Timeout",
                               "504: the web copy did not begin to answer in time\n")


class Flow:
    """One direction of a connection: bytes read from `source`, held in `pending` until
    `target` takes them. When the router answers a client itself (503, 504), the client's
    request becomes a flow with no target (read, then dropped), and the answer a flow with
    no source, whose bytes are pending from the start."""

    def __init__(self, source, target, pending: bytes = b"", ended: bool = False):
        self.source, self.target = source, target
        self.pending = bytearray(pending)
        self.received = False  # a byte came from the source: for a copy, its answer began
        self.ended = ended     # the source has sent its end of file
        self.done = False      # ... and it was passed on: the target is shut for writing


class Connection:
    """One client, the copies still to try for it, and once connected, its two flows."""

    def __init__(self, client: socket.socket, candidates: list[int]):
        self.client = client
        self.candidates = candidates
        self.upstream: socket.socket | None = None
        self.port = 0                      # the copy's, once one is chosen (for the log)
        self.flows: tuple[Flow, ...] = ()  # empty while connecting to a copy
        self.last_active = time.monotonic()

    def sockets(self) -> list[socket.socket]:
        return [sock for sock in (self.client, self.upstream) if sock is not None]

    def awaits_answer(self) -> bool:
        """The client has sent something to its copy, and the copy nothing back yet: the
        one moment the router may still answer in its place (502, 504)."""
        request, reply = self.flows
        return self.upstream is not None and request.received and not reply.received


class Router:
    """The front door: one thread, one `selectors` loop, plain non-blocking sockets.

    Each client goes to the next port of `rotation` (round-robin). A copy that refuses, or
    has not taken the connection within CONNECT_TIMEOUT (frozen, its backlog full), is
    skipped and the next one tried, each at most once; with none left the client gets a
    503, not a hang. Then bytes are relayed both ways. A side is not read while the other
    side's buffer is full (backpressure: a slow client slows its copy, it does not fill our
    memory), and an end of file is passed on as a half-close, as HTTP/1.0 reads until the
    close.

    Deadlines, checked once a second by `sweep`, so that the relay itself never looks at a
    clock: a copy that has not begun to answer `upstream_timeout` after the client's last
    byte gets its client a 504 (as Heroku's router does at 30 s); a connection with no byte
    either way for `idle_timeout` is closed, and that includes a client that never sends
    its request. At most `max_connections` clients are held at once (HAProxy's maxconn):
    the next ones wait in the listen backlog, and the descriptors the supervisor needs are
    never taken. A copy that hangs up without answering gets its client a 502.

    The supervisor replaces `rotation` whole (storing a tuple is atomic), so no lock.
    """

    def __init__(self, listener: socket.socket, log: Callable[[str], None],
                 idle_timeout: float = IDLE_TIMEOUT, upstream_timeout: float = UPSTREAM_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS):
        self.listener = listener
        self.log = log  # one line in the platform's output, for the router's rare events
        self.idle_timeout = idle_timeout
        self.upstream_timeout = upstream_timeout
        self.max_connections = max_connections
        self.rotation: tuple[int, ...] = ()
        self.turn = 0
        self.selector = selectors.DefaultSelector()
        self.watching: dict[socket.socket, int] = {}  # socket -> the events it waits for
        self.connections: set[Connection] = set()
        self.listening = False
        self.next_sweep = 0.0

    def start(self) -> None:
        threading.Thread(target=self.serve, name="router", daemon=True).start()

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.listen(True)
        while True:
            for key, events in self.selector.select(SWEEP_EVERY):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.handle(key.data, key.fileobj, events)
            self.sweep()

    def listen(self, on: bool) -> None:
        """Watch the listener, or stop: clients then wait in the backlog, and the loop does
        not spin on a listener that stays readable while it cannot take anyone."""
        if on != self.listening:
            if on:
                self.selector.register(self.listener, selectors.EVENT_READ)
            else:
                self.selector.unregister(self.listener)
            self.listening = on

    def accept(self) -> None:
        """Take every client waiting in the backlog: under load, one wake-up brings many."""
        while len(self.connections) < self.max_connections:
            try:
                client, _ = self.listener.accept()
            except OSError as error:  # none left (EAGAIN), or one gave up already
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    self.listen(False)  # out of descriptors: until the next sweep
                return
            try:
                self.forward(client)
            except OSError:  # no descriptor left for its copy's side: this client only
                client.close()
        self.listen(False)  # full: until a connection closes

    def forward(self, client: socket.socket) -> None:
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rotation = self.rotation
        first = self.turn % len(rotation) if rotation else 0
        self.turn += 1
        conn = Connection(client, list(rotation[first:] + rotation[:first]))
        self.connect_next(conn)
        self.connections.add(conn)

    def connect_next(self, conn: Connection) -> None:
        """Start connecting to the next candidate copy; with none left, answer 503."""
        while conn.candidates:
            upstream = socket.socket()
            upstream.setblocking(False)
            conn.port = conn.candidates.pop(0)
            code = upstream.connect_ex((COPY_HOST, conn.port))
            if code in (0, errno.EINPROGRESS):
                conn.upstream = upstream
                self.watch(upstream, selectors.EVENT_WRITE, conn)  # writable: connect ended
                return
            upstream.close()  # refused at once: a copy that is gone or restarting
        self.answer(conn, NO_COPY)

    def finish_connect(self, conn: Connection) -> None:
        upstream = conn.upstream
        if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.drop_upstream(conn)
            self.connect_next(conn)
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.flows = (Flow(conn.client, upstream), Flow(upstream, conn.client))
        self.update(conn)

    def drop_upstream(self, conn: Connection) -> None:
        self.watch(conn.upstream, 0, conn)
        conn.upstream.close()
        conn.upstream = None

    def answer(self, conn: Connection, response: bytes) -> None:
        """Answer the client in the copy's place; what it sends from now on is dropped."""
        if conn.upstream is not None:
            self.drop_upstream(conn)
        conn.flows = (Flow(conn.client, None), Flow(None, conn.client, response, ended=True))
        self.update(conn)

    def handle(self, conn: Connection, sock: socket.socket, events: int) -> None:
        # An error on one connection must never stop the router: close that one and go on.
        conn.last_active = time.monotonic()
        try:
            if not conn.flows:
                self.finish_connect(conn)
                return
            for flow in conn.flows:
                if flow.source is sock and events & selectors.EVENT_READ:
                    self.receive(conn, flow)
                self.send(flow)
            self.update(conn)
        except OSError:  # a peer reset or vanished: an ordinary event in TCP
            self.close(conn)
        except Exception as error:  # a bug: say so in one line, keep the other connections
            self.log(f"router: closed a connection after {error!r}")
            self.close(conn)

    def receive(self, conn: Connection, flow: Flow) -> None:
        try:
            data = flow.source.recv(CHUNK)
        except ConnectionResetError:  # an end too, abrupt: what came before it is passed on
            data = b""
        if data:
            flow.received = True
            if flow.target is not None:
                flow.pending += data
            return
        if flow.source is conn.upstream and conn.awaits_answer():
            # The copy hung up, or died, before a byte of its answer: say so (nginx: 502),
            # rather than leave the client an empty reply it cannot tell from a bug.
            self.log(f"router: the copy on port {conn.port} hung up without answering: "
                     f"502 to its client")
            flow.pending += BAD_GATEWAY
        flow.ended = True

    def send(self, flow: Flow) -> None:
        if flow.pending and flow.target is not None:
            try:
                del flow.pending[:flow.target.send(flow.pending)]
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                # The target hung up before reading it all: a copy that answered early
                # (413, body too large) and closed. Drop what it will never read, and go on
                # passing its answer the other way.
                flow.target = None
                flow.pending.clear()
        if flow.ended and not flow.pending and not flow.done:
            if flow.target is not None:
                flow.target.shutdown(socket.SHUT_WR)
            flow.done = True

    def update(self, conn: Connection) -> None:
        """Close a finished connection, or watch each socket for what its flows need next."""
        if all(flow.done for flow in conn.flows):
            self.close(conn)
            return
        for sock in conn.sockets():
            events = 0
            for flow in conn.flows:
                if flow.source is sock and not flow.ended and len(flow.pending) < CHUNK:
                    events |= selectors.EVENT_READ
                if flow.target is sock and flow.pending:
                    events |= selectors.EVENT_WRITE
            self.watch(sock, events, conn)

    def watch(self, sock: socket.socket, events: int, conn: Connection) -> None:
        # Our own record of each socket's events: asking the selector (`get_map()`) about
        # an unregistered socket costs two system calls, on every relay step.
        registered = self.watching.get(sock, 0)
        if events == registered:
            return
        if events and registered:
            self.selector.modify(sock, events, conn)
        elif events:
            self.selector.register(sock, events, conn)
        else:
            self.selector.unregister(sock)
            del self.watching[sock]
            return
        self.watching[sock] = events

    def close(self, conn: Connection) -> None:
        for sock in conn.sockets():
            if self.watching.pop(sock, 0):
                self.selector.unregister(sock)
            sock.close()
        self.connections.discard(conn)
        self.listen(True)  # a place is free (and descriptors): take the next client

    def sweep(self) -> None:
        """Once a second: act on the connections past a deadline, and listen again if
        running out of descriptors made us stop."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_EVERY
        for conn in list(self.connections):
            try:
                self.enforce_deadlines(conn, now - conn.last_active)
            except OSError:  # no descriptor left to try the next copy: this client only
                self.close(conn)
        self.listen(True)

    def enforce_deadlines(self, conn: Connection, idle: float) -> None:
        if not conn.flows:
            if idle > CONNECT_TIMEOUT:  # a frozen copy's full backlog: try the next one
                conn.last_active = time.monotonic()
                self.drop_upstream(conn)
                self.connect_next(conn)
        elif idle > self.upstream_timeout and conn.awaits_answer():
            self.log(f"router: the copy on port {conn.port} sent no answer in "
                     f"{self.upstream_timeout:g}s: 504 to its client")
            self.answer(conn, GATEWAY_TIMEOUT)
        elif idle > self.idle_timeout:
            self.close(conn)


# --- The copies' ports and health ---------------------------------------------------------

def port_is_free(port: int) -> bool:
    """Could a copy bind this port? Asked as servers bind (SO_REUSEADDR), so that the old
    connections of a copy's own last run, waiting out TIME_WAIT, do not count as in use."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((COPY_HOST, port))
        except OSError:
            return False
        return True


HEALTH_REQUEST = (b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                  b"User-Agent: launcher.py health check\r\n\r\n")
HEALTHY = re.compile(rb"HTTP/1\.[01] [23][0-9][0-9] ")  # 2xx or 3xx, as a Kubernetes probe
PROBE_EVERY = 0.05  # a copy that does not listen yet is asked this often, until it answers
CHECK_EVERY = 1.0   # then this often, with as long to answer


class HealthCheck:
    """Asks one web copy `GET /healthz` again and again, as Kubernetes probes a pod, and
    reports each outcome: `report(True)` for a 2xx or 3xx, `report(False)` for a wrong
    answer or none within `every` seconds. What a row of them means (up, dead) is the
    formation's rule, not this class's.

    A port that accepts proves nothing: the kernel completes the handshake of a frozen or
    deadlocked copy into its backlog, and a request then waits there forever. Each
    question is a non-blocking socket in the supervisor's own `selectors` loop, so that a
    copy that never answers cannot stall the supervisor; `due` is the supervisor's timer:
    when to ask next, or, with a question in flight, when to give up waiting.
    """

    def __init__(self, address: tuple[str, int], every: float,
                 selector: selectors.BaseSelector, report: Callable[[bool], None]):
        self.address, self.every, self.selector, self.report = address, every, selector, report
        self.answered_once = False
        self.sock: socket.socket | None = None    # the question in flight
        self.sent = False
        self.answer = b""                         # the start of its answer, so far
        self.due: float | None = time.monotonic()

    def run_timer(self, now: float) -> None:
        if self.due is None or now < self.due:
            return
        if self.sock is not None:
            self.answered(False)  # no answer in time
            return
        try:
            self.sock = socket.socket()
        except OSError:  # no descriptor left: the launcher's trouble, not the copy's
            self.due = now + self.every
            return
        self.sock.setblocking(False)
        self.sock.connect_ex(self.address)  # refused or in progress: `step` sees which
        self.selector.register(self.sock, selectors.EVENT_WRITE, self.step)
        self.sent, self.answer, self.due = False, b"", now + self.every

    def step(self) -> None:
        if self.sock is None:
            return  # stopped earlier in this round of events
        try:
            if self.sent:
                # Read to the end, which HTTP/1.0 marks by closing: hanging up on a copy
                # still writing its answer would reset its connection, an error in its log.
                data = self.sock.recv(4096)
                self.answer = (self.answer + data)[:64]  # the status line is all we judge
                if not data:
                    self.answered(bool(HEALTHY.match(self.answer)))
            elif self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.answered(False)  # refused: not listening (yet, or any more)
            else:
                self.sock.send(HEALTH_REQUEST)  # small: a new socket's buffer takes it whole
                self.sent = True
                self.selector.modify(self.sock, selectors.EVENT_READ, self.step)
        except OSError:
            self.answered(False)

    def answered(self, healthy: bool) -> None:
        self.close()
        # Until a starting copy listens, ask again soon; once it answers, at the usual pace.
        soon = not (self.answered_once or healthy or self.answer)
        self.answered_once = self.answered_once or healthy
        self.due = time.monotonic() + (PROBE_EVERY if soon else self.every)
        self.report(healthy)

    def stop(self) -> None:
        self.close()
        self.due = None

    def close(self) -> None:
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


# --- The front port -----------------------------------------------------------------------

def bind_front_port(host: str, port: int) -> socket.socket:
    """Listen on the front port before any child starts, so that a busy port costs nothing.
    Raises OSError with a message that says what to do."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on the front port {host}:{port}: {error.strerror} "
                      f"(choose another with --port)") from None
    listener.listen(BACKLOG)
    return listener


def connection_limit() -> int:
    """How many clients the router may hold at once: two descriptors each, less a reserve
    for the supervisor. The soft limit is raised first to what MAX_CONNECTIONS needs, as
    HAProxy does for its maxconn: its usual default, 1024, dates from select(), which
    nothing here uses, and would let about 500 slow clients fill the front door. The
    copies inherit the raised limit, which serves their own clients too."""
    wanted = 2 * MAX_CONNECTIONS + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with suppress(ValueError, OSError):  # macOS may allow less still
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    descriptors = wanted if soft == resource.RLIM_INFINITY else soft
    return min(MAX_CONNECTIONS, (descriptors - min(RESERVED_DESCRIPTORS, descriptors // 2)) // 2)
