"""Shared test helpers: start real processes on free ports, talk HTTP to them, clean up.

Every process a test starts goes through the `spawn` fixture, which starts it in its own
process group and, whatever happens in the test, kills that whole group at teardown. So a
failing test never leaves a web copy, a worker or a launcher behind.

Starting a copy costs a Python start-up (a tenth of a second, more on a busy machine), so
a module whose tests only need "a copy" shares one: `web` is web.1 of `shared_copies`,
two copies on one SQLite file started once per module. Such tests make their own sessions
(each its own cookie), so they cannot see each other's; a test that needs other settings,
or stops or kills its copy, starts its own with `start_web`. In the same spirit the
session has one Chromium (`browser`).
"""
from __future__ import annotations

from http.client import HTTPConnection
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pytest

from browser import Browser
from database import database_from_env
from job_queue import JobQueue, open_queue

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["side_by_side"]
sys.path.insert(0, str(REPO / "benchmarks"))  # not a package; tests run its scripts too
# One free_port for tests and benchmarks: below the ports the OS gives outgoing
# connections (a port bind(0) picks, and those after it, could be taken by any client
# before a copy binds it), within this run's share, BENCH_PORTS (`port_range`).
from bench import free_port  # noqa: E402


POLL_EVERY = 0.01  # seconds: what wait_until polls is cheap (a file, a row, a refused connect)


def wait_until(condition: Callable, timeout: float = 10.0, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_EVERY)


@dataclass
class Response:
    status: int
    headers: dict  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> Response:
    """One HTTP request with a fresh connection; redirects are returned, not followed."""
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


def post_form(url: str, fields: dict, cookie: str | None = None) -> Response:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = f"sid={cookie}"
    return http("POST", url, urllib.parse.urlencode(fields).encode(), headers)


def get(url: str, cookie: str | None = None) -> Response:
    return http("GET", url, headers={"Cookie": f"sid={cookie}"} if cookie else {})


def session_cookie(response: Response) -> str | None:
    """The session id a response sets, or None."""
    header = response.headers.get("set-cookie", "")
    if header.startswith("sid="):
        return header.split(";", 1)[0][len("sid="):]
    return None


def multipart(fields: dict, boundary: str = "b0undary") -> tuple[bytes, dict]:
    """Encode {name: (filename, content_type, bytes)} as a browser's form would."""
    body = b""
    for name, (filename, content_type, data) in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                 f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(url: str, data: bytes, content_type: str = "application/octet-stream",
           cookie: str | None = None, filename: str = "notes.bin"):
    body, headers = multipart({"file": (filename, content_type, data)})
    if cookie:
        headers["Cookie"] = f"sid={cookie}"
    return http("POST", url + "/uploads", body, headers)


def responds(url: str) -> bool:
    try:
        return http("GET", url, timeout=1).status == 200
    except OSError:
        return False


class Proc:
    """A child process started in its own process group, its output going to a file.

    Output goes to a file, not a pipe: a pipe nobody reads fills up and blocks the child.
    """

    def __init__(self, args: list, env: dict, cwd: Path, log: Path, stdin=subprocess.DEVNULL):
        self.log = log
        self.args = args
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=stdin, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `signum` and wait for the process to exit; returns its exit code."""
        self.send_signal(signum)
        return self.popen.wait(timeout)

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


def app_env(tmp_path: Path, **overrides) -> dict:
    """The environment for an app process: a private database, unbuffered output."""
    env = dict(os.environ)
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/app.db", PYTHONUNBUFFERED="1")
    for name in ("PORT", "HOST", "SESSION_STORE", "DYNO", "SESSION_TTL", "COOKIE_SECURE"):
        env.pop(name, None)
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class Spawner:
    """Starts processes, their logs in `folder`; `end()` kills every group it started.
    A test may start processes from two threads at once: each gets a log of its own."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[Proc] = []
        self.lock = threading.Lock()

    def __call__(self, args: list, env: dict, cwd: Path = REPO,
                 stdin=subprocess.DEVNULL) -> Proc:
        with self.lock:
            proc = Proc(args, env, cwd, self.folder / f"proc-{len(self.started)}.log", stdin)
            self.started.append(proc)
        return proc

    def end(self) -> None:
        for proc in self.started:
            proc.kill_group()


def selected(request: pytest.FixtureRequest, test: Callable) -> bool:
    """Will this session run `test`? A story begun in the background for a test that was
    not selected would only cost time."""
    return any(getattr(item, "function", None) is test for item in request.session.items)


@pytest.fixture
def spawn(tmp_path):
    """spawn(args, env) starts a process; every one is killed (whole group) at teardown."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.end()


@pytest.fixture
def queue(tmp_path):
    """The queue the worker processes of this test use (the same DATABASE_URL)."""
    db = database_from_env(app_env(tmp_path))
    yield open_queue(db)
    db.close()


@dataclass
class Backing:
    env: dict         # what puts a test's processes on this store (DATABASE_URL)
    queue: JobQueue   # the test's own handle on it


@pytest.fixture(params=["sqlite", "redis"])
def backing(request, tmp_path) -> Backing:
    """The same test on each backing service: a SQLite file, or the shared Redis emptied."""
    url = (request.getfixturevalue("fresh_redis") if request.param == "redis"
           else f"sqlite:///{tmp_path}/app.db")
    service = database_from_env({"DATABASE_URL": url})
    yield Backing({"DATABASE_URL": url}, open_queue(service))
    service.close()


@dataclass
class Web:
    proc: Proc
    port: int
    env: dict  # its environment: `database_from_env(web.env)` opens its database

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_webapps(spawn: Spawner, *envs: dict) -> list[Web]:
    """Run `python webapp.py` once per environment, each on a free port, all at once (so
    their start-ups overlap), and wait until every one answers /healthz."""
    webs = []
    for overrides in envs:
        port = free_port()
        env = app_env(spawn.folder, PORT=port, **overrides)
        webs.append(Web(spawn([sys.executable, "webapp.py"], env), port, env))
    for web in webs:
        wait_until(partial(serving, web), what="webapp.py to answer /healthz")
    return webs


def serving(web: Web) -> bool:
    """Does the copy answer /healthz yet? A copy that exited fails the test at once."""
    if web.proc.popen.poll() is not None:
        pytest.fail(f"webapp.py exited early:\n{web.proc.output()}")
    return responds(web.url + "/healthz")


@pytest.fixture
def start_web(spawn):
    """start_web(**env) runs `python webapp.py` on a free port and waits for /healthz."""
    return lambda **env: start_webapps(spawn, env)[0]


@pytest.fixture(scope="module")
def shared_copies(tmp_path_factory):
    """web.1 and web.2 on one SQLite file, started once for the module's tests that only
    need copies with the default settings and leave them running."""
    spawner = Spawner(tmp_path_factory.mktemp("shared-copies"))
    try:
        yield start_webapps(spawner, {"DYNO": "web.1"}, {"DYNO": "web.2"})
    finally:
        spawner.end()


@pytest.fixture
def web(shared_copies):
    """web.1 of the module's shared copies; a test that ends one fails in its teardown."""
    check_alive(shared_copies, "in an earlier test")
    yield shared_copies[0]
    check_alive(shared_copies, "during this test")


def check_alive(copies: list[Web], when: str) -> None:
    for copy in copies:
        if copy.proc.popen.poll() is not None:
            pytest.fail(f"the shared copy {copy.env['DYNO']} died {when}:\n"
                        f"{copy.proc.output()[-2000:]}")


STARTED = re.compile(r"\| (\S+) started \(pid=(\d+)(?:, port=(\d+))?\)")  # system lines


@dataclass
class Launcher:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    def output(self) -> str:
        return self.proc.output()

    def started(self) -> list[tuple[str, int, int | None]]:
        """(name, pid, port) of every copy started so far, from the launcher's log."""
        return [(name, int(pid), int(port) if port else None)
                for name, pid, port in STARTED.findall(self.output())]

    def pids(self, name: str) -> list[int]:
        return [pid for started, pid, _ in self.started() if started == name]

    def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        # A launcher starts several Python processes at once: on two cores, as the
        # suite's runs start side by side, its first lines have taken over 10 s.
        wait_until(lambda: self.output().count(text) >= count, timeout,
                   what=f"{count} x {text!r} in the launcher's log:\n{self.output()}")

    def send(self, command: str) -> None:
        self.proc.popen.stdin.write(command.encode() + b"\n")
        self.proc.popen.stdin.flush()

    def end(self) -> None:
        """The launcher's group, then every copy it started (each leads a group of its own),
        even if the test failed half-way."""
        self.proc.kill_group()
        for _, pid, _ in self.started():
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)

    def ps(self) -> dict[str, list[str]]:
        """Type `ps` and read the table it prints: name -> the row's columns."""
        tables = self.output().count("| name")
        self.send("ps")
        self.wait_for("| name", tables + 1)
        rows = self.output().rsplit("| name", 1)[1].splitlines()[1:]
        cells = [row.split("| ", 1)[1].split() for row in rows if "system" in row]
        return {cell[0]: cell for cell in cells if re.fullmatch(r"\w+\.\d+", cell[0])}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an orphan that init has not reaped yet is a zombie: gone for our purpose
        return thread_state(f"/proc/{pid}/stat") != "Z"
    except OSError:
        return True


def thread_state(stat_path: str) -> str:
    """The state in a /proc stat file: R running, S sleeping, T stopped, Z zombie."""
    with open(stat_path) as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]  # the name, in (), may hold spaces


def stopped(pid: int) -> bool:
    """Has every thread of `pid` stopped? Linux lists each thread in /proc; elsewhere ps
    reports the process as a whole."""
    if not os.path.isdir("/proc/self/task"):
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)],
                               capture_output=True, text=True).stdout
        return state.strip().startswith("T")
    states = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        with suppress(FileNotFoundError):  # a thread that ended meanwhile
            states.append(thread_state(f"/proc/{pid}/task/{thread}/stat"))
    return all(state == "T" for state in states)


@contextmanager
def write_lock_held(path: Path, at_most: float = 5.0):
    """Hold SQLite's write lock from a connection of our own, as another busy process
    would, until the block ends; `at_most` bounds it so that a failing test cannot hang."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        taken.set()
        release.wait(at_most)
        conn.execute("ROLLBACK")
        conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10), "could not take the write lock"
    try:
        yield
    finally:
        release.set()
        holder.join()


@pytest.fixture(scope="session", autouse=True)
def bytecode_kept(tmp_path_factory):
    """The suite starts some 400 Python processes, and most of its CPU goes to their
    start-ups. Where PYTHONDONTWRITEBYTECODE is set (in many containers), each compiled
    the app's modules afresh, a sixth of its start-up: the processes this run starts keep
    their bytecode instead, in this run's temp folder (pytest removes old ones)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.getbasetemp() / "bytecode")


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (browser.py) for every test that drives a page: starting one
    takes most of a second. Each test opens pages of its own."""
    with Browser() as chromium:
        yield chromium


# --- Launchers and their copies, for the launcher and router tests -----------------------

WEBAPP = REPO / "webapp.py"
WEB = f"web: python {WEBAPP}\n"
SLEEPER = 'python -c "import time; time.sleep(60)"'


def served_by(launcher: Launcher, requests: int) -> Counter:
    return Counter(get(launcher.url).headers["x-served-by"] for _ in range(requests))


@pytest.fixture
def launch(spawn, tmp_path):
    """launch(procfile_text, *args) runs the launcher on a free front port (None: no Procfile)."""
    launched: list[Launcher] = []

    def start(procfile: str | None, *args: str, env: dict | None = None,
              stdin=subprocess.DEVNULL, port: int | None = None,
              ulimit: str | None = None) -> Launcher:
        if procfile is not None:
            (tmp_path / "Procfile").write_text(procfile)
        port = port or free_port()
        command = [sys.executable, str(REPO / "launcher.py"), "--port", str(port),
                   "--grace", "5", *args]
        if ulimit:  # a descriptor limit, e.g. "-n 48", set by the shell that execs the launcher
            command = ["bash", "-c", f'ulimit {ulimit} && exec "$@"', "bash", *command]
        proc = spawn(command, env or app_env(tmp_path), cwd=tmp_path, stdin=stdin)
        launched.append(Launcher(proc, port))
        return launched[-1]

    yield start
    for launcher in launched:
        launcher.end()


@contextmanager
def frozen(pid: int):
    """SIGSTOP a copy: alive, its port still accepting, answering nothing (a deadlock or a
    long pause looks the same from outside). It is SIGKILLed at the end, whatever happens.

    The block begins once every thread has stopped, not when kill() returns: the signal is
    only queued then, and each thread stops when it next runs (on two busy cores, up to
    0.86 s later, measured). Until then the copy may still accept. A test that filled its
    backlog meanwhile saw the queue full, then the copy's last accepts made room again,
    and the router's next connection waited in the backlog of a copy that never read it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(pid), what=f"pid {pid} to stop after SIGSTOP")
        yield
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a stopped process dies of it too


# --- A real redis-server, for the Redis client, store and queue tests --------------------

REDIS_SERVER = shutil.which("redis-server")


@dataclass
class RedisServer:
    """A redis-server of our own on a free port, with a password, its files in `dir`.

    `restart()` kills it (SIGKILL: a crash, not a shutdown) and starts it again on the same
    port and directory: with `--appendonly yes` among its args, it keeps what it was told.
    `freeze()`/`thaw()` SIGSTOP/SIGCONT it: its port still accepts, nothing answers."""
    spawn: Callable
    port: int
    password: str
    dir: Path
    args: tuple[str, ...]
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://:{urllib.parse.quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = self.spawn([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                "--requirepass", self.password, "--dir", str(self.dir),
                                "--save", "", "--appendonly", "no", *self.args], os.environ.copy())

        def ready():
            if self.proc.popen.poll() is not None:
                pytest.fail(f"redis-server exited early:\n{self.proc.output()}")
            return redis_answers_ping(self.port, self.password)

        wait_until(ready, what="redis-server to answer PING")

    def stop(self) -> None:
        self.proc.kill_group()

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def redis_answers_ping(port: int, password: str) -> bool:
    """PONG to AUTH + PING, spoken by hand, so that the fixture does not rely on the client
    under test. While it loads its data, Redis answers -LOADING instead."""
    command = b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in (b"AUTH", password.encode()))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"*2\r\n" + command + b"*1\r\n$4\r\nPING\r\n")
            received = b""
            while received.count(b"\r\n") < 2 and (data := sock.recv(1024)):
                received += data
            return received == b"+OK\r\n+PONG\r\n"
    except OSError:
        return False


@pytest.fixture
def start_redis(spawn, tmp_path):
    """start_redis(*args) runs a redis-server with extra arguments (e.g. --appendonly yes)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")

    def start(*args: str) -> RedisServer:
        folder = Path(tempfile.mkdtemp(prefix="redis-", dir=tmp_path))
        server = RedisServer(spawn, free_port(), f"pw@:/%{secrets.token_hex(4)}", folder, args)
        server.start()
        return server

    return start


@pytest.fixture
def redis_server(start_redis) -> RedisServer:
    """A redis-server with a password (one that must be percent-encoded in the URL)."""
    return start_redis()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory) -> RedisServer:
    """One redis-server for every test that only needs "a Redis" (stores, queues): a start
    per test would cost more than most of those tests. `fresh_redis` empties it first."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    started: list[Proc] = []

    def spawn(args: list, env: dict) -> Proc:
        started.append(Proc(args, env, REPO, tmp_path_factory.mktemp("redis") / "log", ))
        return started[-1]

    server = RedisServer(spawn, free_port(), f"pw@:/%{secrets.token_hex(4)}",
                         tmp_path_factory.mktemp("redis-data"), ())
    server.start()
    yield server
    for proc in started:
        proc.kill_group()


@pytest.fixture
def fresh_redis(shared_redis) -> str:
    """The shared redis-server, emptied: its URL."""
    return emptied(shared_redis)


def emptied(server: RedisServer) -> str:
    """FLUSHALL, spoken by hand; the server's URL."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        password = server.password.encode()
        sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$8\r\nFLUSHALL\r\n"
                     % (len(password), password))
        received = b""
        while received.count(b"\r\n") < 2 and (data := sock.recv(1024)):
            received += data
    assert received == b"+OK\r\n+OK\r\n", received
    return server.url
