"""A small Redis client that never hands one caller another's reply (Factors IV and VI).

Factor IV treats a backing service as an attached resource named by one URL: the same code
talks to a Redis on this laptop or a managed one across the network, and only the URL
changes (`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS). Factor VI
keeps the app's state there, where every copy of every process sees it. The terrible day
this module prevents is redis-py's CVE-2023-28858: a command was cancelled after it was
sent, its reply stayed on the connection, and the next caller (another user's request)
read it: users were shown other users' data. Here a connection is reused only when every
reply sent to it was read whole; a timeout, an error or an interrupt in between closes it.

How the pieces fit:
* `parse_url` reads the URL into a `RedisURL`. Only its `masked` form
  (`redis://:***@host:6379/0`) is ever printed: no message, repr or exception of this
  module contains the password.
* `Connection` is one socket, for one thread at a time. It sends commands as RESP2 arrays
  of bulk strings and reads their replies within one deadline per round trip, so a server
  that dribbles a byte a second cannot hold a caller past it.
* `Redis` is what the app holds: a pool of connections shared by a process's threads.
  `execute(*args)` borrows a connection for one command; `with redis.connection() as conn:`
  lends one for several (WATCH ... MULTI ... EXEC). A connection goes back only clean.
  After a failure, new connections fail at once for a short, doubling time (`Backoff`):
  a retry loop cannot hammer a dead server, and the first call after it is back succeeds.
* `eval` runs a Lua script by its SHA1, and sends the script itself only when Redis has
  forgotten it (a restart empties its script cache).

Values: arguments are bytes, str (sent as UTF-8), int or float. Replies are bytes (bulk
strings), str (status replies such as "OK", "PONG", "QUEUED": never user data), int, list,
or None (nil). An error reply is raised, wherever it is: alone, in a pipeline, or inside
EXEC's replies. A pipeline first reads every reply, so the connection stays in step; then
it raises the first error. A write Redis refused can never pass for one it made.

Failures: `RedisUnavailable` when Redis does not answer (down, frozen, unreachable), within
the connect and reply timeouts, or answers that it cannot yet (`NOT_READY`: loading its
data after a restart, busy with a script): a web copy answers 503, a worker waits.
`RedisAuthError` when it refuses the password (a process exits 2 at start); `RedisError`
when it refuses a command (its `code` says why: "OOM" when it is out of memory).

Deliberately left out: RESP3 and HELLO; cluster and sentinel; pub/sub, and every command
that changes what a connection is (SELECT, SUBSCRIBE...: a connection that ran one is
closed instead of reused); retrying a failed command (an INCR that timed out may or may
not have run: only the caller knows whether it may run again); pipelining beyond "send
these, read those".
"""
from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

CONNECT_TIMEOUT = 2.0  # seconds for TCP, TLS, AUTH and SELECT of a new connection, in all
REPLY_TIMEOUT = 5.0    # seconds from sending a command to the last byte of its reply
                       # (so a blocking command, BLMOVE, must ask to block for less)
# At most 7 s together: a web copy answers 503 within 10 s when Redis is down or frozen.
IDLE_CONNECTIONS = 32  # kept open for the next caller: as many as a web copy has threads
FIRST_BACKOFF = 0.1    # seconds new connections fail at once after a failure, doubling
MAX_BACKOFF = 1.0      # up to this with each failed try in a row
CHUNK = 65536          # bytes asked of the socket per read

# Commands after which a connection is not the one the next caller expects (another
# database, another user, a subscriber receiving messages nobody asked for): closed, not reused.
CHANGES_THE_CONNECTION = {"SELECT", "AUTH", "HELLO", "RESET", "MONITOR", "SUBSCRIBE",
                          "PSUBSCRIBE", "SSUBSCRIBE", "READONLY", "READWRITE"}

# Error replies that mean "not now" rather than "no": Redis is loading its data after a
# restart (LOADING), running a script past busy-reply-threshold (BUSY), a replica cut off
# from its master (MASTERDOWN), or moving a cluster slot (TRYAGAIN). The command did not
# run, and will once Redis is ready: a wait, like a Redis that does not answer.
NOT_READY = {"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN"}

Arg = bytes | str | int | float


class RedisError(Exception):
    """Redis answered with an error (`-ERR ...`, `-WRONGTYPE ...`); the connection is fine.

    `code` is the error's first word: "ERR", "WRONGTYPE", "NOSCRIPT"..."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class RedisAuthError(RedisError):
    """Redis refused our password, or wants one: a configuration error (exit 2 at start)."""


class RedisUnavailable(Exception):
    """Redis did not answer (refused, timed out, reset, or closed mid-reply), or answered
    that it cannot yet (`NOT_READY`). Try later."""


# --- The URL -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RedisURL:
    """Where Redis is and how to log in; its repr leaves the password out."""
    tls: bool
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def masked(self) -> str:
        """The URL with its password as ***: the only form fit for a log."""
        user = urllib.parse.quote(self.username or "", safe="")
        secret = f"{user}:***@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{secret}{self.address}/{self.db}"


def parse_url(url: str) -> RedisURL:
    """Read `redis://[[user]:password@]host[:port][/db]` (or `rediss://`, TLS).

    A malformed URL raises ValueError saying what is wrong, never quoting the URL: it may
    hold the password."""
    credentials = url.partition("://")[2].rpartition("@")[0]
    if any(character in credentials for character in "/?#"):
        # urlsplit would end the host at that character and blame a port or a path.
        raise malformed("has a '/', '?' or '#' in its password or user name: write them "
                        "percent-encoded, as %2F, %3F, %23")
    try:
        parts = urllib.parse.urlsplit(url)
        port = 6379 if parts.port is None else parts.port
    except ValueError:
        raise malformed("has a port that is not a number below 65536, or a bad [IPv6]") from None
    if parts.scheme not in ("redis", "rediss"):
        raise malformed("must start with redis:// or rediss://")
    if not parts.hostname or not port:
        raise malformed("must name a host, and a port from 1 to 65535 if any")
    db = parts.path.removeprefix("/") or "0"
    if not (db.isascii() and db.isdigit()) or parts.query or parts.fragment:
        raise malformed("may end only with a database number")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if username and not password:
        raise malformed("names a user but no password")
    return RedisURL(parts.scheme == "rediss", parts.hostname, port, int(db),
                    username, password)


def malformed(what: str) -> ValueError:
    return ValueError(f"the Redis URL {what}; the form is redis://[[user]:password@]host"
                      f"[:port][/db] (rediss:// for TLS; percent-encode / ? # @ in the password)")


# --- RESP2 ---------------------------------------------------------------------------------

def as_bytes(arg: Arg) -> bytes:
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return bytes(arg)  # a bytes object itself, not a copy
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int) and not isinstance(arg, bool):  # True is not "1"
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(float(arg)).encode()  # reads back as the same float
    raise TypeError(f"a Redis argument is bytes, str, int or float, not {type(arg).__name__}")


def encode_command(args: Sequence[Arg]) -> bytes:
    """A command as RESP2 sends it: an array of bulk strings, so any byte may be in a value."""
    if not args:
        raise ValueError("a Redis command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = as_bytes(arg)
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def command_name(args: Sequence[Arg]) -> str:
    return as_bytes(args[0]).decode("ascii", "replace").upper()


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def unavailable(address: str, error: BaseException, timeout: float) -> RedisUnavailable:
    """One message for every way Redis fails to answer, naming its address and not its URL."""
    if isinstance(error, TimeoutError):
        why = f"timed out after {timeout:.1f}s"
    elif isinstance(error, EOFError):
        why = "it closed the connection"
    elif isinstance(error, OSError):  # refused, reset, unknown host, a certificate refused
        why = error.strerror or str(error)
    else:
        why = f"its reply is not RESP2: {error}"
    return RedisUnavailable(f"redis at {address} is not answering ({why})")


class Connection:
    """One socket to Redis, for one thread at a time: send commands, read their replies.

    `in_flight` is set before the first byte of a command is sent and cleared after the
    last byte of its reply is read. If anything goes wrong in between (a timeout, a reset,
    a reply we cannot parse, Ctrl-C), the socket is closed at once: its reply may still
    come, and must never be read as the answer to someone else's command. The connection
    also remembers what its caller left that the next one must not inherit: an open MULTI
    or a WATCH (`undo`), or a command that changed the connection itself (`changed`).
    """

    def __init__(self, sock: socket.socket, address: str, reply_timeout: float):
        self.sock: socket.socket | None = sock
        self.address = address
        self.reply_timeout = reply_timeout
        self.pid = os.getpid()
        self.in_flight = False
        self.undo: str | None = None  # "DISCARD" inside MULTI, "UNWATCH" after a WATCH
        self.changed = False
        self.failure: RedisUnavailable | None = None  # why it was closed, for the pool
        self._buffer = bytearray()  # bytes received and not yet parsed

    def execute(self, *args: Arg):
        """Send one command and return its reply; an error reply raises RedisError."""
        return self.pipeline([args])[0]

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list:
        """Send several commands in one write and return their replies. If any of them is
        an error (EXEC's own replies included), raise the first, once all are read."""
        request = b"".join(map(encode_command, commands))  # a bad argument: nothing is sent
        names = [command_name(command) for command in commands]
        replies = self._round_trip(request, len(commands), self.reply_timeout, names)
        error = first_error(replies)
        if error is not None:
            raise error
        return replies

    def transaction(self, commands: Sequence[Sequence[Arg]]) -> list | None:
        """MULTI, the commands, EXEC, in one round trip: their replies, or None when a key
        this connection WATCHes changed and EXEC ran nothing. An error is raised: one Redis
        refused as it queued the commands (out of memory, loading: then EXEC ran none of
        them), or one that failed inside EXEC (the others ran: Redis has no rollback)."""
        return self.pipeline([("MULTI",), *commands, ("EXEC",)])[-1]

    def log_in(self, url: RedisURL, timeout: float) -> None:
        """AUTH and SELECT as the URL says, in one round trip."""
        commands: list[tuple] = []
        if url.password:
            commands.append(("AUTH", url.username, url.password) if url.username
                            else ("AUTH", url.password))
        if url.db:
            commands.append(("SELECT", url.db))
        if not commands:
            return
        replies = self._round_trip(b"".join(map(encode_command, commands)), len(commands),
                                   timeout)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if not errors:
            return
        self.close()
        if isinstance(errors[0], RedisUnavailable):  # not ready: a wait, not a refusal
            raise errors[0]
        refusal = str(errors[0])
        if url.password:  # Redis never repeats it, but a proxy or a renamed AUTH answers
            # "unknown command 'AUTH', with args beginning with: '<the password>'".
            refusal = refusal.replace(url.password, "***")
        if isinstance(errors[0], RedisAuthError) or errors[0] is replies[0] and url.password:
            raise RedisAuthError(f"redis at {self.address} refused to log us in: {refusal}")
        raise RedisError(f"redis at {self.address} refused SELECT {url.db}: {refusal}")

    def is_clean(self) -> bool:
        """Fit for the next caller: open, ours, nothing in flight, pending or changed."""
        return (self.sock is not None and self.pid == os.getpid() and not self.in_flight
                and self.undo is None and not self.changed and not self._buffer)

    def nothing_arrived(self) -> bool:
        """True if Redis sent nothing since the last reply. Anything else (a reply nobody
        asked for, or the end of the connection after Redis restarted) makes it unfit."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def clean_up(self) -> None:
        """Send the DISCARD or UNWATCH a caller left pending. A block that WATCHes a key,
        then finds nothing to change, returns without EXEC: one UNWATCH is cheaper than a
        new connection (TCP, TLS, AUTH). If it fails, the connection is closed instead."""
        if self.undo and self.sock is not None and not self.in_flight:
            try:
                self.execute(self.undo)
            except (RedisError, RedisUnavailable):
                self.close()

    def close(self) -> None:
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close()

    def _round_trip(self, request: bytes, count: int, timeout: float,
                    names: Sequence[str] = ()) -> list:
        if self.sock is None or self.pid != os.getpid():
            raise RuntimeError("this Redis connection was closed, or opened by another "
                               "process before a fork: take a new one")
        deadline = time.monotonic() + timeout
        self.in_flight = True
        try:
            self.sock.settimeout(remaining(deadline))
            self.sock.sendall(request)  # the timeout bounds the whole sendall (Python 3.5+)
            replies = [self._read_reply(deadline) for _ in range(count)]
            for name in names:  # still in flight: an interrupt here cannot lose a MULTI
                self._remember(name)
        except (OSError, EOFError, ValueError) as error:
            self.close()
            self.failure = unavailable(self.address, error, timeout)
            raise self.failure from error
        except BaseException:  # Ctrl-C, a signal handler's exception: the reply may still come
            self.close()
            raise
        self.in_flight = False
        return replies

    def _remember(self, name: str) -> None:
        if name in ("EXEC", "DISCARD"):  # both also forget every WATCH
            self.undo = None
        elif name == "MULTI":
            self.undo = "DISCARD"
        elif name == "WATCH" and self.undo is None:
            self.undo = "UNWATCH"
        elif name == "UNWATCH" and self.undo == "UNWATCH":  # inside MULTI it is only queued
            self.undo = None
        elif name in CHANGES_THE_CONNECTION:
            self.changed = True

    def _read_reply(self, deadline: float):
        line = self._take(self._buffer.find(b"\r\n"), deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return error_reply(rest.decode("utf-8", "replace"), self.address)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return self._read_bulk(int(rest), deadline)
        if kind == b"*":
            count = int(rest)
            return None if count == -1 else [self._read_reply(deadline) for _ in range(count)]
        raise ValueError(f"a reply starts with {kind!r}")

    def _read_bulk(self, length: int, deadline: float) -> bytes | None:
        if length == -1:
            return None
        if length < 0:
            raise ValueError(f"a bulk string of length {length}")
        missing = length + 2 - len(self._buffer)
        if missing > 0:
            self._receive_into_place(missing, deadline)
        if self._buffer[length:length + 2] != b"\r\n":
            raise ValueError("a bulk string longer than it said")
        return self._take(length, deadline)

    def _take(self, end: int, deadline: float) -> bytes:
        """The buffer's bytes up to `end`, with the CRLF after them; -1: up to the next CRLF."""
        while end < 0:
            self._receive(deadline)
            end = self._buffer.find(b"\r\n")
        with memoryview(self._buffer) as view:  # one copy: bytes(buffer[:end]) makes two
            data = bytes(view[:end])
        del self._buffer[:end + 2]
        return data

    def _receive_into_place(self, size: int, deadline: float) -> None:
        """Receive `size` more bytes straight into the end of the buffer, grown once: a
        10 MiB upload is neither copied chunk by chunk nor regrown in small steps."""
        start = len(self._buffer)
        self._buffer += bytes(size)
        with memoryview(self._buffer) as view:
            while start < len(self._buffer):
                self.sock.settimeout(remaining(deadline))
                received = self.sock.recv_into(view[start:])
                if not received:
                    raise EOFError("closed")
                start += received

    def _receive(self, deadline: float) -> None:
        self.sock.settimeout(remaining(deadline))  # one deadline for the whole reply
        data = self.sock.recv(CHUNK)
        if not data:
            raise EOFError("closed")
        self._buffer += data


def error_reply(message: str, address: str) -> Exception:
    """The exception an error reply stands for; read in its place, raised by `pipeline`."""
    code = message.split(" ", 1)[0]
    if code in ("NOAUTH", "WRONGPASS"):
        return RedisAuthError(message)
    if code in NOT_READY:
        return RedisUnavailable(f"redis at {address} cannot answer yet ({message})")
    return RedisError(message)


def first_error(replies: list) -> Exception | None:
    """The first error among the replies, looking inside arrays (EXEC's replies)."""
    for reply in replies:
        if isinstance(reply, list):
            reply = first_error(reply)
        if isinstance(reply, Exception):
            return reply
    return None


def open_connection(url: RedisURL, tls: ssl.SSLContext | None, connect_timeout: float,
                    reply_timeout: float) -> Connection:
    """A new connection, through TLS if asked, logged in and on its database, all within
    `connect_timeout`."""
    deadline = time.monotonic() + connect_timeout
    sock = None
    try:
        sock = socket.create_connection((url.host, url.port), timeout=connect_timeout)
        # Each command is one write: do not let Nagle hold it back waiting for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock.settimeout(remaining(deadline))
            sock = tls.wrap_socket(sock, server_hostname=url.host)
        conn = Connection(sock, url.address, reply_timeout)
        conn.log_in(url, remaining(deadline))
        return conn
    except OSError as error:
        if sock is not None:
            sock.close()
        raise unavailable(url.address, error, connect_timeout) from error


# --- The pool ------------------------------------------------------------------------------

class Backoff:
    """After a failure, new connections fail at once with the same error for `delay`
    seconds: a retry loop above cannot hammer a dead server. The delay doubles with each
    failed try in a row, up to `cap`, and a clean reply ends it.

    Failures reported while the delay runs (commands that were already waiting when Redis
    froze) are not new tries: they do not double it."""

    def __init__(self, first: float = FIRST_BACKOFF, cap: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic):
        self.first, self.cap, self.clock = first, cap, clock
        self.delay = 0.0
        self.until = 0.0
        self.error: RedisUnavailable | None = None
        self._lock = threading.Lock()

    def failed(self, error: RedisUnavailable) -> None:
        with self._lock:
            now = self.clock()
            if now >= self.until:
                self.delay = min(self.delay * 2, self.cap) if self.delay else self.first
                self.until = now + self.delay
            self.error = error

    def succeeded(self) -> None:
        if self.error is not None:  # no lock on the way every command takes
            with self._lock:
                self.delay, self.until, self.error = 0.0, 0.0, None

    def check(self) -> None:
        """Raise the last failure again while the delay runs."""
        with self._lock:
            if self.error is not None and self.clock() < self.until:
                raise RedisUnavailable(str(self.error))


class Redis:
    """The app's handle on Redis: a pool of connections for a process's threads.

    A connection is taken from the pool (or opened) for one command or one `with` block,
    and given back only if clean (`Connection.is_clean`); one that is not is closed. A
    pooled connection on which anything arrived since its last reply is closed too, and so
    is one a forked child finds there: it belongs to the parent. (Closing it in the child
    closes only the child's copy of the descriptor; the parent's connection lives on.)
    """

    def __init__(self, url: str, connect_timeout: float = CONNECT_TIMEOUT,
                 reply_timeout: float = REPLY_TIMEOUT):
        self.url = parse_url(url)
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        # Made once, not per connection: loading the CAs costs more than a handshake. It
        # checks the server's certificate and name against the system's CAs; Python's ssl
        # reads SSL_CERT_FILE instead when it is set.
        self._tls = ssl.create_default_context() if self.url.tls else None
        self.backoff = Backoff()
        self._lock = threading.Lock()  # guards the idle list only
        self._idle: list[Connection] = []
        self._script_shas: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Redis {self.url.masked}>"

    def execute(self, *args: Arg):
        """Run one command on a pooled connection and return its reply. An error reply
        raises RedisError; a Redis that does not answer, RedisUnavailable."""
        with self.connection() as conn:
            return conn.execute(*args)

    def eval(self, script: str, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()):
        """Run a Lua script (atomically, in Redis) by its SHA1; send its text only if
        Redis answers NOSCRIPT, as it does after a restart or SCRIPT FLUSH."""
        sha = self._script_shas.get(script)
        if sha is None:  # the app's scripts are a few constants: the cache stays small
            sha = self._script_shas[script] = hashlib.sha1(script.encode()).hexdigest()
        try:
            return self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RedisError as error:
            if error.code != "NOSCRIPT":
                raise
        return self.execute("EVAL", script, len(keys), *keys, *args)

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """One connection for several commands (WATCH, MULTI, EXEC), given back clean."""
        conn = self._take()
        try:
            yield conn
        finally:
            self._give_back(conn)

    def close(self) -> None:
        """Close the idle connections (those in use close when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> Connection:
        while (conn := self._pop_idle()) is not None:
            if conn.is_clean() and conn.nothing_arrived():
                return conn
            conn.close()
        self.backoff.check()
        try:
            return open_connection(self.url, self._tls, self.connect_timeout,
                                   self.reply_timeout)
        except RedisUnavailable as error:
            self._failed(error)
            raise

    def _give_back(self, conn: Connection) -> None:
        conn.clean_up()
        if conn.failure is not None:
            self._failed(conn.failure)
        elif conn.is_clean():
            self.backoff.succeeded()
            with self._lock:
                if len(self._idle) < IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    return
        conn.close()

    def _failed(self, error: RedisUnavailable) -> None:
        """One connection failed: the idle ones lead to the same server, frozen or gone.
        Closing them makes the next callers fail fast, not each wait out its own timeout."""
        self.backoff.failed(error)
        self.close()

    def _pop_idle(self) -> Connection | None:
        with self._lock:
            return self._idle.pop() if self._idle else None
