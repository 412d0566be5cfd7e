"""The platform: N copies of each process type behind one front port (Factor VIII).

Factor VIII: an app scales out, by running more copies of its processes, not up, by
growing one. The terrible day it prevents: traffic doubles, the only answer is a bigger
server, and when `web=4` is finally tried, users are logged out at random because each copy
kept sessions in its own memory. Here `web=4` is a number you type, from the first day.

What a platform (Heroku, foreman, Kubernetes) does for a stateless app, and so what
`python launcher.py web=4 worker=2` does: it runs each Procfile type as N foreground
children named by `DYNO` (web.1, worker.2), each web copy on a `PORT` of its own; puts one
front port before the web copies (the router: each TCP connection to the next live copy,
round-robin, a 503 when none is live); prints all their output as one stream of lines;
restarts a copy that dies, with backoff; scales and restarts copies from stdin (`web=6`,
`ps`, `restart`, `quit`); and on SIGINT or SIGTERM stops them: SIGTERM, grace, SIGKILL.

What it leaves out on purpose: it never imports the app, never daemonizes, writes no PID
file, reads no HTTP (the router moves bytes), takes "the port accepts a connection" for
health, and runs on one machine. The app in turn does none of this itself: it binds $PORT,
logs to stdout, keeps its state in a backing service, and exits on SIGTERM.

How the pieces fit: `main()` reads the command line and binds the front port, so that bad
input ends with one line and exit code 2 before any child starts. The `Router` runs in a
thread of its own. Everything else happens on the main thread in the `Supervisor`'s loop,
which waits in one `selectors` call for output (printed by the `LogPrinter`), commands and
signals, and runs its timers (restarts, start-up probes, grace periods) through its timeout.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import math
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
SCALE_ITEM = re.compile(r"^([A-Za-z0-9_-]+)=(.*)$")
COPY_HOST = "127.0.0.1"  # copies are reached only through the router, on loopback
BACKLOG = 128            # a backlog of 5 overflows under a burst of clients: slow SYN retries
CHUNK = 65536
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0      # a copy up this long that crashes starts its backoff again
PROBE_EVERY = 0.05
PROBE_TIMEOUT = 0.05
DRAIN_PAUSE = 0.1        # out of the rotation this long before SIGTERM: see stop_copy
IDLE_TIMEOUT = 60.0      # a connection with no byte either way this long is closed (nginx: 60)
SWEEP_EVERY = 1.0        # how often the router looks for idle connections
MAX_COPIES = 100         # of one type: this is one machine
LAST_FRONT_PORT = 65000  # the copies take the ports after the front port
HELP = "commands: TYPE=N (scale, e.g. web=3), ps, restart [TYPE], quit"
NO_COPY_BODY = b"503: no web copy is running; try again in a moment\n"
NO_COPY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(NO_COPY_BODY),
                                                                  NO_COPY_BODY))


# --- Command line, Procfile and .env ------------------------------------------------------

class UsageError(Exception):
    """Bad input: reported as one line on stderr, with exit code 2."""


@dataclass(frozen=True)
class Config:
    commands: dict[str, str]   # process type -> shell command, in Procfile order
    formation: dict[str, int]  # process type -> copies to run at start
    dotenv: dict[str, str]
    workdir: Path              # the Procfile's folder: where the commands run
    host: str
    port: int
    grace: float
    idle_timeout: float


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake costs one line on stderr (the usage is one `-h` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def read_config(argv: list[str]) -> Config:
    parser = OneLineParser(prog="launcher.py",
                           description="Run the Procfile's process types, N copies each.")
    parser.add_argument("scale", nargs="*", metavar="TYPE=N",
                        help="copies of a type, e.g. web=4 worker=2 (unnamed types: 1)")
    parser.add_argument("--procfile", type=Path, default=Path("Procfile"))
    parser.add_argument("--port", help="the front port (default: $PORT, else 5000)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds a stopping copy gets before SIGKILL (default: 10)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="seconds the router keeps a silent connection (default: 60)")
    args = parser.parse_args(argv)
    if not 0 <= args.grace < math.inf:  # NaN fails every comparison, so it lands here too
        raise UsageError(f"--grace must be 0 or more seconds, got {args.grace:g}")
    if not 0 < args.idle_timeout < math.inf:
        raise UsageError(f"--idle-timeout must be more than 0 seconds, got {args.idle_timeout:g}")
    commands = read_procfile(args.procfile)
    formation = dict.fromkeys(commands, 1)
    formation.update(parse_scale(args.scale, commands))
    port = args.port or os.environ.get("PORT", "5000")
    if not (re.fullmatch(r"[0-9]+", port) and 0 < int(port) <= LAST_FRONT_PORT):
        raise UsageError(f"the front port must be a number from 1 to {LAST_FRONT_PORT}, "
                         f"got {port!r}")
    return Config(commands, formation, read_dotenv(args.procfile.parent / ".env"),
                  args.procfile.resolve().parent, os.environ.get("HOST", "127.0.0.1"),
                  int(port), args.grace, args.idle_timeout)


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {what} {path}: it is not UTF-8 text") from None


def read_procfile(path: Path) -> dict[str, str]:
    """The Procfile's `type: command` lines, in order (honcho and foreman read the same)."""
    commands: dict[str, str] = {}
    for number, line in enumerate(read_text(path, "the Procfile").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PROCFILE_LINE.match(line)
        if not match:
            raise UsageError(f"{path}, line {number}: expected 'type: command', got {line!r}")
        name, command = match.groups()
        if name in commands:
            raise UsageError(f"{path}, line {number}: process type {name!r} is declared twice")
        commands[name] = command
    if not commands:
        raise UsageError(f"the Procfile {path} declares no process type")
    return commands


def parse_scale(words: list[str], commands: dict[str, str]) -> dict[str, int]:
    """`web=4 worker=2` or `web=4,worker=2` -> {"web": 4, "worker": 2}."""
    counts = {}
    for item in ",".join(words).split(","):
        if not item:
            continue
        match = SCALE_ITEM.match(item)
        if not match:
            raise UsageError(f"expected TYPE=N, like web=2, got {item!r}")
        name, count = match.groups()
        if name not in commands:
            raise UsageError(f"process type {name!r} is not in the Procfile "
                             f"(it declares {', '.join(commands)})")
        if not (re.fullmatch(r"[0-9]+", count) and int(count) <= MAX_COPIES):
            raise UsageError(f"{item!r}: the number of copies must be a whole number "
                             f"from 0 to {MAX_COPIES}")
        counts[name] = int(count)
    return counts


def read_dotenv(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines of a .env file (the foreman and honcho convention), if there is one."""
    if not path.exists():
        return {}
    values = {}
    for number, line in enumerate(read_text(path, "the .env file").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.removeprefix("export ").partition("=")
        if not equals or not key.strip():
            raise UsageError(f"{path}, line {number}: expected KEY=VALUE, got {line!r}")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def bind_front_port(host: str, port: int) -> socket.socket:
    """Listen on the front port before any child starts, so that a busy port costs nothing."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise UsageError(f"cannot listen on the front port {host}:{port}: {error.strerror} "
                         f"(choose another with --port)") from None
    listener.listen(BACKLOG)
    return listener


# --- The log printer -----------------------------------------------------------------------

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
    """
    COLOURS = ("36", "33", "32", "35", "34", "31")

    def __init__(self):
        self.colourful = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.width = len("system")
        self.colours: dict[str, str] = {"system": "1"}
        self.unfinished: dict[int, bytes] = {}  # pipe -> the start of its next line
        self.lock = threading.Lock()

    def make_room(self, name: str) -> None:
        self.width = max(self.width, len(name))

    def lines(self, name: str, texts: list[str]) -> None:
        prefix = f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | "
        if self.colourful:
            colour = self.colours.setdefault(name, self.COLOURS[len(self.colours) % 6])
            prefix = f"\033[{colour}m{prefix}\033[0m"
        with self.lock:  # one write for all the lines of a chunk
            sys.stdout.write("".join(prefix + text + "\n" for text in texts))
            sys.stdout.flush()

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


# --- The router ----------------------------------------------------------------------------

class Flow:
    """Bytes going one way: read from `source`, held, written to `target`. For a 503, the
    answer is a flow with no source, and the client's request one with no target."""

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

    def __init__(self, listener: socket.socket, printer: LogPrinter,
                 idle_timeout: float = IDLE_TIMEOUT):
        self.listener = listener
        self.printer = printer
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
            self.printer.system(f"router: closed a connection after {error!r}")
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


# --- Starting a copy ---------------------------------------------------------------------

# When the launcher dies, even by SIGKILL, its copies must not live on holding their ports
# (foreman's oldest complaint). Linux lets a child ask "send me SIGTERM when my parent
# dies" (prctl PR_SET_PDEATHSIG), which the child does between fork and exec. preexec_fn
# is unsafe in a program with threads (the router is one), so the hook makes only that one
# system call and the check after it, nothing that could wait on a lock. Two fine points:
# the signal fires when the *thread* that forked the child exits, which is why only the
# main thread starts copies; and a launcher that died before prctl ran already gave the
# child a new parent, so it exits at once. macOS and the BSDs have no equivalent: there a
# copy outlives a SIGKILLed launcher (it only notices when its output pipe breaks). SIGINT
# and SIGTERM are fine everywhere, because then the launcher stops its copies itself.
# A copy's SIGTERM handler then runs with its stdout already broken: it must not let a
# failed log line stop it from exiting.
PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with(launcher_pid: int) -> Callable[[], None] | None:
    if LIBC is None:
        return None

    def in_child() -> None:
        LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != launcher_pid:
            os._exit(1)

    return in_child


def start_child(command: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Run one Procfile command, its stdout and stderr piped to the launcher."""
    return subprocess.Popen(
        # `exec`: the app replaces the shell, so the pid we watch and signal is the app's,
        # not that of a shell that would die alone or wait deaf to SIGTERM (container PID 1).
        # `env` after it lets a line start with assignments (`FOO=1 python x.py`), which
        # `exec` alone would take for the program's name. So a line is one command, as in
        # a container's CMD: for `cd app && ...`, use a script.
        ["/bin/sh", "-c", "exec env " + command], cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        # A group of its own: Ctrl-C on the terminal reaches only the launcher, which then
        # stops each copy in order, and os.killpg reaches whatever the copy forked too.
        start_new_session=True, preexec_fn=die_with(os.getpid()))


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


def signal_name(signum: int) -> str:
    """SIGKILL, or `signal 40` for one Python has no name for (a real-time signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- The supervisor ------------------------------------------------------------------------

@dataclass(eq=False)
class Copy:
    """One copy of a process type (web.3): its process, its port, its place in the cycle."""
    type: str
    number: int
    port: int | None                  # web copies only; kept when it is restarted
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    state: str = "starting"           # starting, up, backoff (waiting to restart), stopping
    backoff: float = 0.0              # the wait before the next restart after a crash
    restart_at: float | None = None
    term_at: float | None = None      # while stopping: when to send SIGTERM,
    kill_at: float | None = None      # ... and SIGKILL if it is still running then

    @property
    def name(self) -> str:
        return f"{self.type}.{self.number}"


class Supervisor:
    """The arbiter: one loop on the main thread, the only place where decisions are made.

    Signal handlers do nothing: `signal.set_wakeup_fd` writes each signal's number to a
    pipe that wakes the loop, and the loop acts on it (logging inside a handler deadlocked
    gunicorn: #3198). The loop waits for that pipe, the copies' output and stdin; its
    timers run through the wait's timeout.
    """

    def __init__(self, config: Config, router: Router, printer: LogPrinter):
        self.config = config
        self.router = router
        self.printer = printer
        self.copies: list[Copy] = []    # the formation: restarted when they die
        self.retiring: list[Copy] = []  # out of the formation, running until they stop
        self.handover: tuple[Copy, Copy] | None = None  # rolling restart: (old, new)
        self.restart_queue: list[str] = []
        self.rolling = False            # a rolling restart is under way
        self.shutting_down = False
        self.unfinished_command = b""
        self.selector = selectors.DefaultSelector()

    def run(self) -> int:
        self.catch_signals()
        for type, count in self.config.formation.items():
            self.printer.make_room(f"{type}.{count}")  # the longest name of each type
        formation = ", ".join(f"{type}={count}" for type, count in self.config.formation.items())
        self.printer.system(f"front port http://{self.config.host}:{self.config.port}, "
                            f"formation {formation}")
        self.listen_to_stdin()
        for type, count in self.config.formation.items():
            self.scale(type, count)
        while not (self.shutting_down and not self.retiring):
            for key, _ in self.selector.select(self.seconds_to_next_timer()):
                key.data()
            self.run_timers()
        self.printer.system("every copy has stopped")
        return 0

    # Events: signals, output, commands.

    def catch_signals(self) -> None:
        reader, writer = os.pipe()
        os.set_blocking(reader, False)
        os.set_blocking(writer, False)
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, lambda signum, frame: None)
        self.selector.register(reader, selectors.EVENT_READ, partial(self.read_signals, reader))

    def read_signals(self, reader: int) -> None:
        for signum in os.read(reader, 512):
            if signum == signal.SIGCHLD:
                self.reap()
            elif signum == signal.SIGINT and self.shutting_down:
                self.printer.system("a second interrupt: SIGKILL to every copy now")
                for copy in self.retiring:
                    copy.term_at, copy.kill_at = None, 0.0
            else:
                self.shut_down()

    def read_output(self, name: str, pipe) -> bool:
        """Print what a copy wrote; True if there was something (or its end) to read."""
        if pipe.closed:  # its copy exited earlier in this round of events: nothing left
            return False
        count = self.printer.print_output(name, pipe.fileno())
        if count == 0:
            self.close_output(name, pipe)
        return count is not None

    def close_output(self, name: str, pipe) -> None:
        if not pipe.closed:
            self.printer.finish(name, pipe.fileno())
            self.selector.unregister(pipe)
            pipe.close()

    def listen_to_stdin(self) -> None:
        """Take commands from stdin if there is one; none (closed, /dev/null, CI) is fine."""
        try:
            stdin = sys.stdin.fileno()
            if os.isatty(stdin) and os.tcgetpgrp(stdin) != os.getpgrp():
                return  # started in the background with `&`: reading would stop us (SIGTTIN)
            self.selector.register(stdin, selectors.EVENT_READ, partial(self.read_commands, stdin))
        except (AttributeError, ValueError, OSError):
            return  # no stdin, or one that cannot be waited on (/dev/null under epoll)
        if os.isatty(stdin):
            self.printer.system(HELP)

    def read_commands(self, stdin: int) -> None:
        chunk = os.read(stdin, 4096)
        if not chunk:
            self.selector.unregister(stdin)  # end of input: run on, without commands
            return
        lines, self.unfinished_command = split_lines(self.unfinished_command + chunk)
        for line in lines:
            self.run_command(line.decode(errors="replace").split())

    def run_command(self, words: list[str]) -> None:
        if not words or self.shutting_down:
            return
        try:
            if words == ["ps"]:
                self.print_table()
            elif words == ["quit"]:
                self.shut_down()
            elif words[0] == "restart" and len(words) <= 2:
                self.rolling_restart(words[1:])
            elif "=" in words[0]:
                for type, count in parse_scale(words, self.config.commands).items():
                    self.scale(type, count)
            else:
                self.printer.system(f"unknown command {' '.join(words)!r}; {HELP}")
        except UsageError as error:
            self.printer.system(str(error))

    # The formation: start, scale, restart, stop.

    def everyone(self) -> list[Copy]:
        return self.copies + self.retiring

    def scale(self, type: str, count: int) -> None:
        """Keep the `count` lowest-numbered copies of a type, adding or stopping the rest."""
        current = sorted((c for c in self.copies if c.type == type), key=lambda c: c.number)
        for copy in current[count:]:
            self.stop_copy(copy)
        numbers = {copy.number for copy in current[:count]}
        number = 1
        while len(numbers) < count:
            if number not in numbers:
                numbers.add(number)
                self.copies.append(Copy(type, number, self.free_port() if type == "web" else None))
                self.start_process(self.copies[-1])
            number += 1

    def free_port(self) -> int:
        """The first port after the front port that no copy holds and nothing listens on."""
        held = {copy.port for copy in self.everyone()}
        port = self.config.port + 1
        while port in held or not port_is_free(port):
            port += 1
        return port

    def start_process(self, copy: Copy) -> None:
        if copy.port is not None and not port_is_free(copy.port):
            # A restarted copy keeps its port, unless something else took it meanwhile (an
            # outgoing connection may use any port): then it would never start again.
            copy.port = self.free_port()
        env = {**self.config.dotenv, **os.environ}  # the launcher's own environment wins
        env.pop("PORT", None)                      # only web copies get a PORT, as on Heroku
        env.update(DYNO=copy.name, PYTHONUNBUFFERED="1",
                   # the Procfile's `python` is the Python running the launcher
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        if copy.port is not None:
            env.update(PORT=str(copy.port), HOST=COPY_HOST)
        copy.popen = start_child(self.config.commands[copy.type], env, self.config.workdir)
        os.set_blocking(copy.popen.stdout.fileno(), False)
        self.selector.register(copy.popen.stdout, selectors.EVENT_READ,
                               partial(self.read_output, copy.name, copy.popen.stdout))
        self.printer.make_room(copy.name)
        copy.started_at = time.monotonic()
        copy.state = "starting" if copy.port is not None else "up"
        port = f", port={copy.port}" if copy.port is not None else ""
        self.printer.system(f"{copy.name} started (pid={copy.popen.pid}{port})")

    def reap(self) -> None:
        for copy in self.everyone():
            if copy.popen is not None and copy.popen.poll() is not None:
                self.on_exit(copy)

    def on_exit(self, copy: Copy) -> None:
        while self.read_output(copy.name, copy.popen.stdout):
            pass  # its last lines come before the news of its end
        self.close_output(copy.name, copy.popen.stdout)
        code = copy.popen.returncode
        self.printer.system(f"{copy.name} killed by {signal_name(-code)}" if code < 0
                            else f"{copy.name} exited with code {code}")
        copy.popen = None
        if copy in self.retiring:
            self.retiring.remove(copy)
        else:
            self.restart_with_backoff(copy)
        self.publish_rotation()

    def restart_with_backoff(self, copy: Copy) -> None:
        """The first crash restarts at once, then waits 1, 2, 4 ... 30 s: a crash loop
        cannot spin the CPU. A copy that stayed up a while starts again from 'at once'."""
        now = time.monotonic()
        if now - copy.started_at >= STABLE_AFTER:
            copy.backoff = 0.0
        delay = copy.backoff
        copy.backoff = 1.0 if delay == 0 else min(MAX_BACKOFF, delay * 2)
        copy.restarts += 1
        if delay == 0:
            self.printer.system(f"restarting {copy.name} now")
            self.start_process(copy)
        else:
            self.printer.system(f"restarting {copy.name} in {delay:g}s")
            copy.state = "backoff"
            copy.restart_at = now + delay

    def stop_copy(self, copy: Copy, kill_at: float | None = None) -> None:
        """Out of the formation; out of the rotation; SIGTERM a moment later; SIGKILL at kill_at.

        That moment matters: the router may have just sent it a connection, and what waits
        in its listen queue when it closes its socket is reset, a request lost.
        """
        now = time.monotonic()
        if kill_at is None:
            kill_at = now + DRAIN_PAUSE + self.config.grace
        if copy in self.copies:
            self.copies.remove(copy)
        if copy.popen is None:  # waiting to restart: nothing runs, nothing to stop
            return
        if copy.state == "stopping":  # a second stop (shutdown): only bring SIGKILL forward
            copy.kill_at = min(copy.kill_at or kill_at, kill_at)
            return
        if copy not in self.retiring:
            self.retiring.append(copy)
        copy.state = "stopping"
        self.publish_rotation()
        copy.term_at, copy.kill_at = now + DRAIN_PAUSE, kill_at

    def rolling_restart(self, types: list[str]) -> None:
        if types and types[0] not in self.config.commands:
            raise UsageError(f"process type {types[0]!r} is not in the Procfile")
        names = [copy.name for copy in self.in_order(self.copies)
                 if not types or copy.type == types[0]]
        self.printer.system(f"rolling restart, one copy at a time: {', '.join(names) or 'none'}")
        self.restart_queue += names
        self.rolling = True
        self.continue_rolling_restart()

    def continue_rolling_restart(self) -> None:
        """Replace one copy at a time: the new one starts first; the old one stops only once
        the new one is up, so even a single web copy never leaves the front door empty."""
        while True:
            if self.handover:
                old, new = self.handover
                if new.state != "up" and new in self.copies:
                    return
                self.handover = None
                self.stop_copy(old)
            if not self.restart_queue:
                if self.rolling:
                    self.rolling = False
                    self.printer.system("rolling restart done: the old copies are stopping")
                return
            name = self.restart_queue.pop(0)
            old = next((c for c in self.copies if c.name == name and c.state == "up"), None)
            if old is not None:  # one that is not up (crashed, restarting) gets new code anyway
                new = Copy(old.type, old.number, self.free_port() if old.port else None)
                self.copies[self.copies.index(old)] = new
                self.retiring.append(old)  # still up, and in the rotation, until new is
                self.start_process(new)
                self.handover = (old, new)

    def shut_down(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.printer.system(f"stopping every copy: SIGTERM, then SIGKILL after "
                            f"{self.config.grace:g}s")
        self.restart_queue.clear()
        self.handover = None
        self.rolling = False
        kill_at = time.monotonic() + self.config.grace  # the deadline runs from the signal
        for copy in self.everyone():
            self.stop_copy(copy, kill_at)

    # Timers, the rotation and the table.

    def seconds_to_next_timer(self) -> float | None:
        if any(c.state == "starting" and c.port is not None for c in self.everyone()):
            return PROBE_EVERY
        times = [when for copy in self.everyone()
                 for when in (copy.restart_at, copy.term_at, copy.kill_at) if when is not None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def run_timers(self) -> None:
        now = time.monotonic()
        for copy in self.everyone():
            if copy.state == "starting" and copy.port is not None and port_accepts(copy.port):
                copy.state = "up"
                self.printer.system(f"{copy.name} is up on port {copy.port}")
                self.publish_rotation()
            if copy.restart_at is not None and now >= copy.restart_at:
                copy.restart_at = None
                self.start_process(copy)
            if copy.term_at is not None and now >= copy.term_at:
                copy.term_at = None
                self.signal_group(copy, signal.SIGTERM)
            if copy.kill_at is not None and now >= copy.kill_at:
                copy.kill_at = None
                self.signal_group(copy, signal.SIGKILL)
        self.continue_rolling_restart()

    def signal_group(self, copy: Copy, signum: signal.Signals) -> None:
        with suppress(ProcessLookupError, PermissionError):  # gone already: reap() will tell
            os.killpg(copy.popen.pid, signum)

    def publish_rotation(self) -> None:
        """Hand the router the ports of the web copies that are up, in one atomic store."""
        live = [c for c in self.in_order(self.everyone()) if c.port and c.state == "up"]
        self.router.rotation = tuple(copy.port for copy in live)

    def in_order(self, copies: list[Copy]) -> list[Copy]:
        types = list(self.config.commands)
        return sorted(copies, key=lambda c: (types.index(c.type), c.number, c.started_at))

    def print_table(self) -> None:
        rows = [("name", "pid", "port", "uptime", "restarts", "state")]
        now = time.monotonic()
        for copy in self.in_order(self.everyone()):
            running = copy.popen is not None
            rows.append((copy.name, copy.popen.pid if running else "-", copy.port or "-",
                         f"{now - copy.started_at:.0f}s" if running else "-",
                         copy.restarts, copy.state))
        widths = [max(len(str(row[column])) for row in rows) for column in range(6)]
        for row in rows:
            self.printer.system("  ".join(f"{str(value):<{width}}"
                                          for value, width in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    try:
        config = read_config(sys.argv[1:] if argv is None else argv)
        listener = bind_front_port(config.host, config.port)
    except UsageError as error:
        print(f"launcher.py: error: {error}", file=sys.stderr)
        return 2
    printer = LogPrinter()
    router = Router(listener, printer, config.idle_timeout)
    router.start()
    return Supervisor(config, router, printer).run()


if __name__ == "__main__":
    sys.exit(main())
