"""The routing layer: requests in through one front port, log lines out as one stream.

Factor VIII scales the web process by running more copies of it, and something must then
spread the traffic over them. The terrible day this module prevents: four copies run, but
users reach only the one whose port they know, or a copy that just died, and see an
error. Here one front port takes every connection and hands it to the next live copy in
`rotation`, round-robin, as Heroku's router or kube-proxy does: one copy dies, the
others take the traffic; with none live, the client gets a 503 at once, not a hang.

It moves bytes and reads no HTTP, but for the blank line that ends a request's head: each
TCP connection is relayed to one copy, both ways, until both sides have finished. The
supervisor in `launcher.py` decides which copies are live, by asking each for
`GET /healthz` (`HealthCheck`, in health.py), and hands the router their ports; the router
never starts or stops anything.

The other way out of the copies is their output, which `logs.py` routes. Neither imports
anything of the app, and the app nothing of them.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import resource
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import zlib
from contextlib import suppress
from functools import partial
from typing import Callable

from health import CHECK_EVERY, CHECKS_FAILED, Address, Upstreams, at
from logs import LogPrinter

COPY_HOST = "127.0.0.1"  # copies are reached only through the router, on loopback
BACKLOG = 128            # a backlog of 5 overflows under a burst of clients: slow SYN retries
CHUNK = 65536            # bytes read at once, and held per direction (backpressure)
IDLE_TIMEOUT = 60.0      # a connection with no byte either way this long is closed (nginx: 60)
REQUEST_TIMEOUT = 10.0   # to send a whole request head, and to hang up after the answer
UPSTREAM_TIMEOUT = 30.0  # a request its copy has not begun to answer by then gets a 504
CONNECT_TIMEOUT = 1.0    # a copy that has not taken the connection by then is skipped
SWEEP_EVERY = 0.25       # how often the router looks for connections past a deadline
MAX_CONNECTIONS = 4096   # clients held at once (and past that: see `accept`)
RESERVED_DESCRIPTORS = 256  # left to the supervisor: copies' pipes, health checks, stdio
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after a request's head (a bare \n too)


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


class Relay:
    """One client's connection relayed to a copy: the client, the copies still to try for
    it, and once connected, its two flows."""

    def __init__(self, client: socket.socket, candidates: list[Address]):
        self.client = client
        self.candidates = candidates
        self.upstream: socket.socket | None = None
        self.address: Address = ("", 0)    # the copy's, once one is chosen (for the log)
        self.flows: tuple[Flow, ...] = ()  # empty while connecting to a copy
        self.last_active = time.monotonic()
        self.head_sent = False  # the client has sent its request's head whole
        self.head_end = b""     # its last two bytes so far: the blank line may straddle reads

    def sockets(self) -> list[socket.socket]:
        return [sock for sock in (self.client, self.upstream) if sock is not None]

    def head_ends_with(self, data: bytes) -> bool:
        """Do these bytes from the client end its request's head (b"": its input ended)?"""
        seen = self.head_end + data
        self.head_end = seen[-2:]
        self.head_sent = not data or HEAD_END.search(seen) is not None
        return self.head_sent

    def awaits_answer(self) -> bool:
        """The client has sent something to its copy, and the copy nothing back yet: the
        one moment the router may still answer in its place (502, 504)."""
        request, reply = self.flows
        return self.upstream is not None and request.received and not reply.received


class Watches:
    """A selector, and our own record of the events it watches each socket for: asking the
    selector (`get_map()`) about a socket it does not watch costs two system calls, and the
    relay would ask on every step."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.events: dict[socket.socket, int] = {}

    def watch(self, sock: socket.socket, events: int, data=None) -> None:
        """Watch `sock` for `events` from now on (0: not at all), with `data` to tell."""
        registered = self.events.get(sock, 0)
        if events == registered:
            return
        if events and registered:
            self.selector.modify(sock, events, data)
        elif events:
            self.selector.register(sock, events, data)
        else:
            self.selector.unregister(sock)
            del self.events[sock]
            return
        self.events[sock] = events


class Router:
    """The front door: one thread, one `selectors` loop, plain non-blocking sockets.

    Each client goes to the next address of `rotation` (round-robin; `sticky`: see
    `first_choice`). A copy that refuses, or has not taken the connection within
    CONNECT_TIMEOUT (frozen, its backlog full), is skipped for the next, each tried once;
    with none left the client gets a 503, not a hang. Then bytes are relayed both ways. A
    side is not read while the other side's buffer is full (backpressure: a slow client
    slows its copy, it does not fill our memory), and an end of file is passed on as a
    half-close, as HTTP/1.0 reads until the close.

    Deadlines, checked four times a second by `sweep`, so that the relay never looks at a
    clock: a copy that has not begun to answer `upstream_timeout` after the client's last
    byte gets its client a 504 (as Heroku's router does at 30 s); a connection with no byte
    either way for `idle_timeout` is closed, and so is one that has waited on its client for
    `request_timeout` (HAProxy's `timeout http-request`): for the rest of its request's
    head, or, its answer out, for its hang-up. At most `max_connections` clients are held at
    once (HAProxy's maxconn), so that the supervisor's descriptors are never taken; then a
    newcomer takes the place of the one that has waited longest on its client (a copy's
    receiver does the same), so that an idle crowd delays a real client by a moment, never
    shuts it out; with none waiting, newcomers wait in the listen backlog. A copy that hangs
    up without answering gets its client a 502.

    The supervisor replaces `rotation` whole (storing a tuple is atomic), so no lock.
    """

    def __init__(self, listener: socket.socket, log: Callable[[str], None],
                 idle_timeout: float = IDLE_TIMEOUT, upstream_timeout: float = UPSTREAM_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, sticky: bool = False,
                 request_timeout: float = REQUEST_TIMEOUT):
        self.listener = listener
        self.log = log  # one line in the platform's output, for the router's rare events
        self.idle_timeout = idle_timeout
        self.upstream_timeout = upstream_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.sticky = sticky
        self.rotation: tuple[Address, ...] = ()
        self.turn = 0
        self.watches = Watches()
        self.connections: set[Relay] = set()
        self.waiting_on_client: dict[Relay, float] = {}  # -> its deadline; oldest first
        self.next_sweep = 0.0

    def start(self) -> None:
        threading.Thread(target=self.serve, name="router", daemon=True).start()

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.listen(True)
        while True:
            for key, events in self.watches.selector.select(SWEEP_EVERY):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.handle(key.data, key.fileobj, events)
            self.sweep()

    def listen(self, on: bool) -> None:
        """Watch the listener, or stop: clients then wait in the backlog, and the loop does
        not spin on a listener that stays readable while it cannot take anyone."""
        self.watches.watch(self.listener, selectors.EVENT_READ if on else 0)

    def accept(self) -> None:
        """Take the clients in the backlog: under load, one wake-up brings many (a backlog's
        worth at most: a flood of them must not stop the relay). See the class's docstring
        for what happens when every place is taken."""
        for _ in range(BACKLOG):
            full = len(self.connections) >= self.max_connections
            if full and not self.waiting_on_client:
                self.listen(False)  # every place busy: until a connection closes
                return
            try:
                client, (client_host, _) = self.listener.accept()
            except OSError as error:  # none left (EAGAIN), or one gave up already
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    self.listen(False)  # out of descriptors: until the next sweep
                return
            if full:
                self.close(next(iter(self.waiting_on_client)))
            try:
                self.forward(client, client_host)
            except OSError:  # no descriptor left for its copy's side: this client only
                client.close()

    def forward(self, client: socket.socket, client_host: str) -> None:
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rotation = self.rotation
        first = self.first_choice(client_host, len(rotation)) if rotation else 0
        conn = Relay(client, list(rotation[first:] + rotation[:first]))
        self.waiting_on_client[conn] = conn.last_active + self.request_timeout
        self.connect_next(conn)
        self.connections.add(conn)

    def first_choice(self, client_host: str, copies: int) -> int:
        """Round-robin: the next copy. Sticky: the one the client's address picks while the
        rotation is the same (nginx's `ip_hash`): Factor VI's trap, a memory session that
        seems safe until a restart or `web=8` (and every local client is 127.0.0.1)."""
        if self.sticky:
            return zlib.crc32(client_host.encode()) % copies  # not hash(): salted per run
        self.turn += 1
        return (self.turn - 1) % copies

    def connect_next(self, conn: Relay) -> None:
        """Start connecting to the next candidate copy; with none left, answer 503."""
        while conn.candidates:
            upstream = socket.socket()
            upstream.setblocking(False)
            conn.address = conn.candidates.pop(0)
            code = upstream.connect_ex(conn.address)
            if code in (0, errno.EINPROGRESS):
                conn.upstream = upstream
                self.watches.watch(upstream, selectors.EVENT_WRITE, conn)  # connect ended
                return
            upstream.close()  # refused at once: a copy that is gone or restarting
        self.answer(conn, NO_COPY)

    def finish_connect(self, conn: Relay) -> None:
        upstream = conn.upstream
        if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.drop_upstream(conn)
            self.connect_next(conn)
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.flows = (Flow(conn.client, upstream), Flow(upstream, conn.client))
        self.update(conn)

    def drop_upstream(self, conn: Relay) -> None:
        self.watches.watch(conn.upstream, 0)
        conn.upstream.close()
        conn.upstream = None

    def answer(self, conn: Relay, response: bytes) -> None:
        """Answer the client in the copy's place; what it sends from now on is dropped."""
        if conn.upstream is not None:
            self.drop_upstream(conn)
        conn.flows = (Flow(conn.client, None), Flow(None, conn.client, response, ended=True))
        self.update(conn)

    def handle(self, conn: Relay, sock: socket.socket, events: int) -> None:
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
        except Exception:  # a bug: its traceback in the log; the other connections go on
            for line in traceback.format_exc().splitlines():
                self.log(f"router: {line}")
            self.close(conn)

    def receive(self, conn: Relay, flow: Flow) -> None:
        try:
            data = flow.source.recv(CHUNK)
        except ConnectionResetError:  # an end too, abrupt: what came before it is passed on
            data = b""
        if not conn.head_sent and flow.source is conn.client and conn.head_ends_with(data):
            self.waiting_on_client.pop(conn, None)  # it waits on its copy now
        if data:
            flow.received = True
            if flow.target is not None:
                flow.pending += data
            return
        if flow.source is conn.upstream and conn.awaits_answer():
            # The copy hung up, or died, before a byte of its answer: say so (nginx: 502),
            # rather than leave the client an empty reply it cannot tell from a bug.
            self.log(f"router: the copy at {at(conn.address)} hung up without answering: "
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

    def update(self, conn: Relay) -> None:
        """Close a finished connection, or watch each socket for what its flows need next."""
        if all(flow.done for flow in conn.flows):
            self.close(conn)
            return
        if conn.flows[1].done and conn not in self.waiting_on_client:
            # Its whole answer is out: what is left is its client's to end, and soon.
            self.waiting_on_client[conn] = conn.last_active + self.request_timeout
        for sock in conn.sockets():
            events = 0
            for flow in conn.flows:
                if flow.source is sock and not flow.ended and len(flow.pending) < CHUNK:
                    events |= selectors.EVENT_READ
                if flow.target is sock and flow.pending:
                    events |= selectors.EVENT_WRITE
            self.watches.watch(sock, events, conn)

    def close(self, conn: Relay) -> None:
        for sock in conn.sockets():
            self.watches.watch(sock, 0)
            sock.close()
        self.connections.discard(conn)
        self.waiting_on_client.pop(conn, None)
        self.listen(True)  # a place is free (and descriptors): take the next client

    def sweep(self) -> None:
        """Every SWEEP_EVERY: act on the connections past a deadline, and listen again if
        running out of descriptors made us stop."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_EVERY
        for conn in list(self.connections):
            try:
                self.enforce_deadlines(conn, now)
            except OSError:  # no descriptor left to try the next copy: this client only
                self.close(conn)
        self.listen(True)

    def enforce_deadlines(self, conn: Relay, now: float) -> None:
        idle, waiting_until = now - conn.last_active, self.waiting_on_client.get(conn)
        if waiting_until is not None and now > waiting_until:
            self.close(conn)  # silent, slow, or answered and not hanging up: no more waiting
        elif not conn.flows:
            if idle > CONNECT_TIMEOUT:  # a frozen copy's full backlog: try the next one
                conn.last_active = time.monotonic()
                self.drop_upstream(conn)
                self.connect_next(conn)
        elif idle > self.upstream_timeout and conn.awaits_answer():
            self.log(f"router: the copy at {at(conn.address)} sent no answer in "
                     f"{self.upstream_timeout:g}s: 504 to its client")
            self.answer(conn, GATEWAY_TIMEOUT)
        elif idle > self.idle_timeout:
            self.close(conn)


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


# --- The command line: the routing options, and the router on its own ---------------------

MAX_SECONDS = 3600     # for every duration: more is a typo (and select() overflows at 24 days)
ROUTING_MINIMUMS = {"idle_timeout": 0.1, "request_timeout": 0.1, "upstream_timeout": 0.1,
                    "check_every": 0.1}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, with exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake costs one line on stderr (the usage is one `-h` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def add_routing_options(parser: argparse.ArgumentParser) -> None:
    """The options of the front door, the same for the launcher and the router alone."""
    parser.add_argument("--port", help="the front port (default: $PORT, else 5000)")
    parser.add_argument("--sticky", action="store_true",
                        help="send each client to the same copy while the rotation is "
                             "unchanged, by its address (the trap of sticky sessions)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="seconds the router keeps a silent connection (default: 60)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                        help="seconds a client has to send its request's head whole, and to "
                             "hang up once answered (default: 10, as the copies' own)")
    parser.add_argument("--upstream-timeout", type=float, default=UPSTREAM_TIMEOUT,
                        help="seconds a copy has to begin its answer, else 504 (default: 30)")
    parser.add_argument("--check-every", type=float, default=CHECK_EVERY,
                        help=f"seconds between GET /healthz to each copy, and to answer; "
                             f"{CHECKS_FAILED} failed in a row take it out (default: 1)")


def check_seconds(args: argparse.Namespace, minimums: dict[str, float]) -> None:
    for option, least in minimums.items():
        value = getattr(args, option)
        if not least <= value <= MAX_SECONDS:  # NaN fails every comparison: it lands here too
            raise UsageError(f"--{option.replace('_', '-')} must be from {least:g} to "
                             f"{MAX_SECONDS} seconds, got {value:.10g}")


def port_number(text: str, what: str, last: int = 65535) -> int:
    if not (re.fullmatch(r"[0-9]{1,5}", text) and 0 < int(text) <= last):
        raise UsageError(f"{what} must be a number from 1 to {last}, got {text!r}")
    return int(text)


def upstream(text: str) -> Address:
    """`HOST:PORT`, the address of one host's front port (or of a single copy). IPv4 only:
    the router's sockets and lookups are, so an IPv6 address is refused here, not looked
    up in vain forever."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise UsageError(f"an upstream is HOST:PORT, like 10.0.0.2:5000, got {text!r}")
    if ":" in host or "[" in host:
        raise UsageError(f"upstream {text!r} is IPv6, which the router does not speak: give an "
                         f"IPv4 address or a name")
    return host, port_number(port, f"the port of upstream {text!r}")


def wake_on_signals(selector: selectors.BaseSelector, signals: tuple[int, ...],
                    on_signal: Callable[[int], None]) -> None:
    """Handlers that do nothing: `signal.set_wakeup_fd` writes each signal's number to a
    pipe that wakes the loop's `select`, and the loop acts on it (logging inside a
    handler deadlocked gunicorn: #3198)."""
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    for signum in signals:
        signal.signal(signum, lambda signum, frame: None)

    def read_signals() -> None:
        for signum in os.read(reader, 512):
            on_signal(signum)

    selector.register(reader, selectors.EVENT_READ, read_signals)


def main(argv: list[str] | None = None) -> int:
    """`python router.py --port 5000 10.0.0.2:5000 10.0.0.3:5000`: one front door for
    several hosts, each a launcher (or a single copy) answering on its own front port."""
    parser = OneLineParser(prog="router.py",
                           description="Spread connections over upstreams, round-robin.")
    parser.add_argument("upstreams", nargs="+", metavar="HOST:PORT")
    add_routing_options(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    host = os.environ.get("HOST", "127.0.0.1")
    try:
        check_seconds(args, ROUTING_MINIMUMS)
        names = [upstream(text) for text in args.upstreams]
        listener = bind_front_port(host, port_number(args.port or os.environ.get("PORT", "5000"),
                                                     "the front port"))
    except (UsageError, OSError) as error:
        print(f"router.py: error: {error}", file=sys.stderr)
        return 2
    printer = LogPrinter()  # the platform speaks as it does in a launcher: as `system`
    router = Router(listener, printer.system, args.idle_timeout, args.upstream_timeout,
                    connection_limit(), args.sticky, args.request_timeout)
    router.start()
    printer.system(f"front port http://{host}:{listener.getsockname()[1]}, upstreams "
                   f"{' '.join(args.upstreams)}{', sticky' if args.sticky else ''}")
    upstreams = Upstreams(names, args.check_every, partial(setattr, router, "rotation"),
                          printer.system)
    wake_on_signals(upstreams.selector, (signal.SIGINT, signal.SIGTERM), upstreams.stop)
    upstreams.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
