"""The routing layer: requests in through one front port, log lines out as one stream.

Factor VIII scales the web process by running more copies of it, and something must then
spread the traffic over them. The terrible day this module prevents: four copies run, but
users reach only the one whose port they know, or a copy that just died, and see an
error. Here one front port takes every connection and hands it to the next live copy in
`rotation`, round-robin, as Heroku's router or kube-proxy does: one copy dies, the
others take the traffic; with none live, the client gets a 503 at once, not a hang.

It moves bytes and reads no HTTP: each TCP connection is relayed to one copy, both ways,
until both sides have finished. The supervisor in `launcher.py` decides which copies are
live and hands the router their ports; the router never starts or stops anything.

The other way out of the copies is their output (Factor XI: logs are event streams), and
Heroku routes that too, with its log router. Here `LogPrinter` merges every copy's
stdout into one stream of lines on the launcher's stdout, each named by its copy. Neither
router imports anything of the app, and the app nothing of them.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
import sys
import threading
import time
from typing import Callable

COPY_HOST = "127.0.0.1"  # copies are reached only through the router, on loopback
CHUNK = 65536            # bytes read at once, and held per direction (backpressure)
IDLE_TIMEOUT = 60.0      # a connection with no byte either way this long is closed (nginx: 60)
SWEEP_EVERY = 1.0        # how often the router looks for idle connections
PROBE_TIMEOUT = 0.05     # loopback answers at once, or not at all
NO_COPY_BODY = b"503: no web copy is running; try again in a moment\n"
NO_COPY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
           % (len(NO_COPY_BODY), NO_COPY_BODY))


class Flow:
    """One direction of a connection: bytes read from `source`, held in `pending` until
    `target` takes them. When no copy is live, the client's request becomes a flow with
    no target (read, then dropped), and the 503 answer a flow with no source, whose
    bytes are pending from the start."""

    def __init__(self, source, target, pending: bytes = b"", ended: bool = False):
        self.source, self.target = source, target
        self.pending = bytearray(pending)
        self.ended = ended   # the source has sent its end of file
        self.done = False    # ... and it was passed on: the target is shut for writing


class Connection:
    """One client, the copies still to try for it, and once connected, its two flows."""

    def __init__(self, client: socket.socket, candidates: list[int]):
        self.client = client
        self.candidates = candidates
        self.upstream: socket.socket | None = None
        self.flows: tuple[Flow, ...] = ()  # empty while connecting to a copy
        self.last_active = time.monotonic()

    def sockets(self) -> list[socket.socket]:
        return [sock for sock in (self.client, self.upstream) if sock is not None]


class Router:
    """The front door: one thread, one `selectors` loop, plain non-blocking sockets.

    Each client goes to the next port of `rotation` (round-robin). A copy that refuses is
    skipped and the next one tried, each at most once; with none left the client gets a 503,
    not a hang. Then bytes are relayed both ways. A side is not read while the other side's
    buffer is full (backpressure: a slow client slows its copy, it does not fill our memory),
    and an end of file is passed on as a half-close, as HTTP/1.0 reads until the close.
    A connection idle for `idle_timeout` is closed: a client that never hangs up must not
    hold two sockets forever, and a router out of descriptors must not stop for good.

    The supervisor replaces `rotation` whole (storing a tuple is atomic), so no lock.
    """

    def __init__(self, listener: socket.socket, log: Callable[[str], None],
                 idle_timeout: float = IDLE_TIMEOUT):
        self.listener = listener
        self.log = log  # one line in the platform's output, for the router's rare errors
        self.idle_timeout = idle_timeout
        self.rotation: tuple[int, ...] = ()
        self.turn = 0
        self.selector = selectors.DefaultSelector()
        self.watching: dict[socket.socket, int] = {}  # socket -> the events it waits for
        self.connections: set[Connection] = set()
        self.listening = True
        self.next_sweep = 0.0

    def start(self) -> None:
        threading.Thread(target=self.serve, name="router", daemon=True).start()

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        while True:
            for key, events in self.selector.select(SWEEP_EVERY):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.handle(key.data, key.fileobj, events)
            self.sweep()

    def accept(self) -> None:
        """Take every client waiting in the backlog: under load, one wake-up brings many."""
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError as error:  # none left (EAGAIN), or one gave up already
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    # Out of descriptors: the listener stays readable, so stop watching it
                    # until the next sweep rather than spin. Clients wait in the backlog.
                    self.selector.unregister(self.listener)
                    self.listening = False
                return
            try:
                self.forward(client)
            except OSError:  # no descriptor left for its copy's side: this client only
                client.close()

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
            code = upstream.connect_ex((COPY_HOST, conn.candidates.pop(0)))
            if code in (0, errno.EINPROGRESS):
                conn.upstream = upstream
                self.watch(upstream, selectors.EVENT_WRITE, conn)  # writable: connect ended
                return
            upstream.close()  # refused at once: a copy that is gone or restarting
        conn.flows = (Flow(conn.client, None), Flow(None, conn.client, NO_COPY, ended=True))
        self.update(conn)

    def finish_connect(self, conn: Connection) -> None:
        upstream = conn.upstream
        if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.watch(upstream, 0, conn)
            upstream.close()
            conn.upstream = None
            self.connect_next(conn)
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.flows = (Flow(conn.client, upstream), Flow(upstream, conn.client))
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
                    self.receive(flow)
                self.send(flow)
            self.update(conn)
        except OSError:  # a peer reset or vanished: an ordinary event in TCP
            self.close(conn)
        except Exception as error:  # a bug: say so in one line, keep the other connections
            self.log(f"router: closed a connection after {error!r}")
            self.close(conn)

    def receive(self, flow: Flow) -> None:
        try:
            data = flow.source.recv(CHUNK)
        except ConnectionResetError:  # an end too, abrupt: what came before it is passed on
            data = b""
        if not data:
            flow.ended = True
        elif flow.target is not None:
            flow.pending += data

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

    def sweep(self) -> None:
        """Once a second: close the connections idle too long, and listen again if running
        out of descriptors made us stop."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_EVERY
        for conn in [c for c in self.connections if now - c.last_active > self.idle_timeout]:
            self.close(conn)
        if not self.listening:
            self.selector.register(self.listener, selectors.EVENT_READ)
            self.listening = True


# --- The copies' ports -------------------------------------------------------------------

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


def port_accepts(port: int) -> bool:
    """A copy is live once its port accepts a connection (loopback answers at once)."""
    try:
        socket.create_connection((COPY_HOST, port), timeout=PROBE_TIMEOUT).close()
    except OSError:
        return False
    return True


# --- The log router -----------------------------------------------------------------------

def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines, and the start of a line still being written."""
    *lines, rest = data.split(b"\n")
    return lines, rest


class LogPrinter:
    """All output as one stream: `HH:MM:SS web.3   | line`, the launcher's own as `system`.

    It reads a copy's pipe in chunks (no text layer: cheaper, which leaves CPU for the
    router) and keeps each pipe's unfinished line until its end arrives. Colour only on a
    terminal, and never with NO_COLOR set. The lock is for the router's rare error line:
    every other line is printed by the main thread.

    When the reader of our stdout goes away (`launcher.py | head -3`), `reader_gone` says
    so, and what is printed after that goes to /dev/null, quietly: the supervisor then
    stops every copy, as a program in a pipeline ends once its reader has.
    """
    COLOURS = ("36", "33", "32", "35", "34", "31")

    def __init__(self):
        self.colourful = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.width = len("system")
        self.colours: dict[str, str] = {"system": "1"}
        self.unfinished: dict[int, bytes] = {}  # pipe -> the start of its next line
        self.lock = threading.Lock()
        self.reader_gone = False

    def make_room(self, name: str) -> None:
        self.width = max(self.width, len(name))

    def lines(self, name: str, texts: list[str]) -> None:
        prefix = f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | "
        if self.colourful:
            colour = self.colours.setdefault(name, self.COLOURS[len(self.colours) % 6])
            prefix = f"\033[{colour}m{prefix}\033[0m"
        with self.lock:  # one write for all the lines of a chunk
            try:
                sys.stdout.write("".join(prefix + text + "\n" for text in texts))
                sys.stdout.flush()
            except BrokenPipeError:
                self.reader_gone = True
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # the next flush, or Python's at exit
                os.close(devnull)

    def system(self, text: str) -> None:
        self.lines("system", [text])

    def print_output(self, name: str, pipe: int) -> int | None:
        """Print the complete lines of one chunk read from `pipe`.

        Returns the number of bytes read (0 at end of file), None if nothing was waiting.
        """
        try:
            chunk = os.read(pipe, CHUNK)
        except BlockingIOError:
            return None
        lines, self.unfinished[pipe] = split_lines(self.unfinished.get(pipe, b"") + chunk)
        if lines:
            self.lines(name, [line.decode(errors="replace").rstrip("\r") for line in lines])
        return len(chunk)

    def finish(self, name: str, pipe: int) -> None:
        """The pipe is closing: print its last line even if it has no newline."""
        rest = self.unfinished.pop(pipe, b"")
        if rest:
            self.lines(name, [rest.decode(errors="replace")])
