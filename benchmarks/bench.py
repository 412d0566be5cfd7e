"""Measure what scaling out buys: requests/second, p50 and p99 for each way to serve the app.

Factor VIII promises that more copies serve more, and the launcher promises that its front
door is cheap. This script checks both with figures it measures itself, beside what a user
would run instead: nginx in front of the same copies, Flask on gunicorn, and two copies
sharing one port with no front door at all (`shared_port.py`: SO_REUSEPORT, or one
listening socket inherited by both, as gunicorn's workers share theirs).

How it measures: C clients each send one request at a time on a fresh connection
(`Connection: close`: webapp.py and the router speak HTTP/1.0), for a fixed time. Two
workloads: `session` (each client logs in once, keeps its cookie, then every request is
`POST /cart`, a read and a write of its session through the store's `edit`) and `healthz`
(the cheapest request: what the front door itself costs). Errors (refused, reset or
timed-out connections, statuses of 400 and more, a session the server forgot) are counted
apart from the answers. A cart grows by an item a request and every round logs in anew,
so in a 3 s round a cart reaches a few hundred items: what costs by the item (decoding,
encoding and storing the session) weighs more in longer rounds.

The load generator is wrk when it is installed (`apt-get install wrk`), with `wrk.lua`:
written in C, it leaves the cores to the servers it measures. Its p99 is "corrected" for
coordinated omission (a stall counts as if requests had kept coming), so a few stalls
raise it. Without wrk, Python clients (threads in two load processes) do the same
workloads and keep every raw latency; but they take about a core of their own, which
starves every configuration alike and hides what a second copy buys. The report says
which one ran.

Every configuration is started first, on free loopback ports with its own SQLite file
(or its own redis-server: the same app with one URL changed), and warmed up; then they
are measured in turns, a few rounds each, and each one's best round is kept (others' work
on the machine only ever takes from a round, never adds).
Read the ratios, not the absolute figures: the machine and whatever else runs on it
weigh on every configuration of a run alike, so ratios within one run hold where
absolute figures drift.

Not measured: other machines, keep-alive, overload. wrk, nginx and Flask+gunicorn are
optional, replaced or skipped with a note when absent (`pip install flask gunicorn`).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import itertools
import multiprocessing
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Iterator

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TIMEOUT = 10            # seconds: a request slower than this counts as an error
MAX_REQUESTS = 200_000  # per round of the Python clients, whatever --seconds says
START_TIMEOUT = 20.0
BACKLOG = 128           # every listening socket's, as in webapp.py, the launcher and nginx
ROUNDS = 3
WARMUP = 1              # seconds, once for each configuration and workload
WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
WRK_FIGURES = re.compile(r"(\w+)=([0-9.]+)")  # `name=value` in the line wrk.lua prints
STARTED = re.compile(r"(\S+) started \(pid=(\d+)")  # the launcher's line for a new copy
FORM = "application/x-www-form-urlencoded"


# --- The load generators -----------------------------------------------------------------

@dataclass(frozen=True)
class Round:
    """What one round of load measured, whichever load generator ran it."""
    answered: int  # requests answered with a status below 400
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


def wrk_round(port: int, workload: str, clients: int, seconds: int) -> Round:
    """One round by wrk, one thread per client: wrk.lua keeps a client's cookie per thread."""
    args = [shutil.which("wrk"), f"--threads={clients}", f"--connections={clients}",
            f"--duration={seconds}s", f"--timeout={TIMEOUT}s", f"--script={WRK_SCRIPT}",
            f"http://{HOST}:{port}", "--", workload]
    output = subprocess.run(args, capture_output=True, text=True, check=True,
                            timeout=seconds + 2 * TIMEOUT).stdout
    line = next(line for line in output.splitlines() if line.startswith("bench:"))
    figures = {name: float(value) for name, value in WRK_FIGURES.findall(line)}
    errors = {kind: int(figures[kind])
              for kind in ("connect", "read", "write", "timeout", "status", "lost")
              if figures[kind]}
    # wrk's count of requests includes those answered with an error status
    return Round(int(figures["requests"] - figures["status"]), figures["seconds"],
                 figures["p50_ms"], figures["p99_ms"], errors)


@dataclass
class Tally:
    """What clients saw: one latency (seconds) per answered request, errors by kind."""
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0

    def merge(self, other: Tally) -> None:
        self.latencies += other.latencies
        self.errors.update(other.errors)
        self.elapsed = max(self.elapsed, other.elapsed)

    def summary(self) -> Round:
        ordered = sorted(self.latencies)
        return Round(len(ordered), self.elapsed, percentile(ordered, 0.50) * 1000,
                     percentile(ordered, 0.99) * 1000, dict(self.errors))


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank: the latency that `fraction` of the requests did not exceed."""
    return ordered[max(0, int(len(ordered) * fraction + 0.999999) - 1)] if ordered else 0.0


def send(port: int, path: str, form: str | None = None, cookie: str | None = None,
         host: str = HOST) -> http.client.HTTPResponse:
    """One request on a fresh connection (POST if there is a form); the body is read."""
    return exchange(port, path, None if form is None else form.encode(), FORM, cookie, host)[0]


def exchange(port: int, path: str, body: bytes | None = None, content_type: str = FORM,
             cookie: str | None = None,
             host: str = HOST) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection (POST if there is a body): the response, its body."""
    # "Connection: close" makes nginx and gunicorn close first, as webapp.py does: the side
    # that closes first keeps the TIME_WAIT, so the client's ports never run out.
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = content_type
    if cookie:
        headers["Cookie"] = f"sid={cookie}"
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET" if body is None else "POST", path, body, headers)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def session_cookie(response: http.client.HTTPResponse, cookie: str | None) -> str | None:
    """The session id a response hands out, kept as a browser keeps it; else `cookie`."""
    set_cookie = response.getheader("Set-Cookie") or ""
    if set_cookie.startswith("sid="):
        return set_cookie.split(";", 1)[0][len("sid="):] or None
    return cookie


def request_once(tally: Tally, port: int, path: str, form: str | None = None,
                 cookie: str | None = None) -> str | None:
    """Send one request and record its latency or its error; returns the session cookie."""
    began = time.perf_counter()
    try:
        response = send(port, path, form, cookie)
    except (OSError, http.client.HTTPException) as error:
        tally.errors[type(error).__name__] += 1
        return cookie
    if 200 <= response.status < 400:
        tally.latencies.append(time.perf_counter() - began)
    else:
        tally.errors[f"HTTP {response.status}"] += 1
    new_cookie = session_cookie(response, cookie)
    if cookie and new_cookie != cookie:  # a new session: the server forgot ours (as wrk.lua)
        tally.errors["lost"] += 1
    return new_cookie


def hammer(port: int, workload: str, clients: int, seconds: float, max_requests: int) -> Tally:
    """Run `clients` threads here, each one request at a time until time or count runs out."""
    total, lock, tickets, window = Tally(), threading.Lock(), itertools.count(), {}
    # The clock starts once every client has logged in: logging in is not what we measure.
    gate = threading.Barrier(clients, action=lambda: window.update(start=time.monotonic()))

    def client(number: int) -> None:
        mine, cookie = Tally(), None
        if workload == "session":
            cookie = request_once(mine, port, "/login", f"name=client{number}")
        gate.wait()
        deadline = window["start"] + seconds
        while time.monotonic() < deadline and next(tickets) < max_requests:
            if workload == "session":
                cookie = request_once(mine, port, "/cart", f"item=i{number}", cookie)
            else:
                request_once(mine, port, "/healthz")
        with lock:
            total.merge(mine)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total.elapsed = time.monotonic() - window["start"]
    return total


def python_round(pool: ProcessPoolExecutor | None, processes: int, port: int, workload: str,
                 clients: int, seconds: float) -> Round:
    """Python clients split over `processes` load processes, or all in this one (pool None).

    Why processes: a Python client spends about a quarter of a millisecond of CPU per
    request, so one process of 16 threads hits its own GIL before the fastest server
    (nginx) runs out of work. Two processes raised that figure by 5%; on the slowest
    configurations they cost a little, taking CPU from the server. The reference wins.
    """
    if pool is None:
        return hammer(port, workload, clients, seconds, MAX_REQUESTS).summary()
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    futures = [pool.submit(hammer, port, workload, share, seconds, MAX_REQUESTS // processes)
               for share in shares if share]
    total = Tally()
    for future in futures:
        total.merge(future.result())
    return total.summary()


def ignore_ctrl_c() -> None:
    """In a load process: Ctrl-C is the runner's, which stops everything in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- Starting and stopping what is measured ----------------------------------------------

class StartError(Exception):
    """A configuration did not come up: noted in the report, and the run goes on."""


@dataclass
class Target:
    port: int                  # where the clients connect
    copies: list[int] = field(default_factory=list)  # the ports of the copies behind it


# A port is checked free here and bound later, by a process still starting: two threads
# asking at once (a test starts two configurations side by side) must not get the same
# one, nor one among the ports after it, which a launcher gives its copies.
HANDED_OUT: deque[int] = deque(maxlen=32)  # lately, with the lock held
HANDING_OUT = threading.Lock()
SPACING = 10


def free_port() -> int:
    """A free port below the outgoing-connection range (Linux 32768+), where no client can
    take a copy's P+1: 20000-31999, or the range BENCH_PORTS names ("first-last"), as the
    test suite sets it for each of its runs side by side, so that they never meet."""
    first, last = map(int, os.environ.get("BENCH_PORTS", "20000-31999").split("-"))
    while True:
        port = random.randint(first, last)
        with HANDING_OUT, socket.socket() as sock:
            if any(abs(port - given) < SPACING for given in HANDED_OUT):
                continue
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            HANDED_OUT.append(port)
        return port


def app_env(workdir: Path, store: str, **extra) -> dict[str, str]:
    """The children's environment: this configuration's database and store, unbuffered.
    `store` is `sqlite` or `memory` (a SQLite file of its own: its sessions or not), or
    the URL of a redis-server of its own (`on_redis`)."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PORT", "HOST", "DYNO", "SESSION_STORE", "SESSION_TTL")}
    if store.startswith("redis://"):
        env.update(DATABASE_URL=store, SESSION_STORE="redis")
    else:
        env.update(DATABASE_URL=f"sqlite:///{workdir / 'app.db'}", SESSION_STORE=store)
    env.update(PYTHONUNBUFFERED="1", **{name: str(value) for name, value in extra.items()})
    return env


@contextlib.contextmanager
def on_redis(start: Callable[..., ContextManager[Target]], workdir: Path,
             **kwargs) -> Iterator[Target]:
    """`start` (direct, behind_router...) with its sessions and jobs in a redis-server of
    its own, as a networked store would be: on loopback here, with a password."""
    port, password, log = free_port(), secrets.token_hex(8), workdir / "redis.log"
    args = [shutil.which("redis-server"), "--port", str(port), "--bind", HOST,
            "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    with running(args, dict(os.environ), log) as proc:
        deadline = time.monotonic() + START_TIMEOUT
        while "Ready to accept connections" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"redis-server did not come up (exit code {proc.poll()})")
            time.sleep(0.05)
        with start(workdir, store=f"redis://:{password}@{HOST}:{port}/0", **kwargs) as target:
            yield target


@contextlib.contextmanager
def running(args: list[str], env: dict, log: Path, stdin: int = subprocess.DEVNULL,
            pass_fds: tuple[int, ...] = ()) -> Iterator[subprocess.Popen]:
    """A child in a process group of its own, output to a file; the group ends on exit."""
    with open(log, "wb") as out:  # a file, not a pipe: a pipe nobody reads blocks the child
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdin=stdin, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=pass_fds)
    try:
        yield proc
    finally:
        # The group is signalled only while its leader is unreaped: its id is still ours.
        for signum, patience in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(patience)
                break


def wait_until_served(port: int, copies: int, proc: subprocess.Popen, log: Path,
                      host: str = HOST) -> None:
    """Poll /healthz until `copies` distinct copies have answered: the rotation is full."""
    deadline, seen = time.monotonic() + START_TIMEOUT, set()
    while len(seen) < copies:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = " / ".join(log.read_text(errors="replace").splitlines()[-3:])
            raise StartError(f"{log.stem} did not come up (exit code {proc.poll()}): {tail}")
        try:
            response = send(port, "/healthz", host=host)
            if response.status == 200:
                seen.add(response.getheader("X-Served-By"))
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)


@contextlib.contextmanager
def copies(workdir: Path, store: str, ports: list[int], program: list[str],
           pass_fds: tuple[int, ...] = ()) -> Iterator[Target]:
    """A copy of `program` (web.1, web.2...) on each of `ports`, which may repeat."""
    with contextlib.ExitStack() as stack:
        for number, port in enumerate(ports, 1):
            log = workdir / f"web.{number}.log"
            env = app_env(workdir, store, PORT=port, DYNO=f"web.{number}")
            proc = stack.enter_context(running(program, env, log, pass_fds=pass_fds))
            # Up once every copy started so far on this port has answered, itself included.
            wait_until_served(port, ports[:number].count(port), proc, log)
        yield Target(ports[0], sorted(set(ports)))


def direct(workdir: Path, store: str, count: int = 1) -> ContextManager[Target]:
    """`count` copies of `python webapp.py` on ports of their own, no front door."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return copies(workdir, store, sorted(ports), [sys.executable, str(REPO / "webapp.py")])


@contextlib.contextmanager
def sharing_port(workdir: Path, store: str, count: int, how: str) -> Iterator[Target]:
    """`count` copies on one port, no front door: the kernel spreads the connections.

    `how` is `reuseport` (a socket each, SO_REUSEPORT) or `inherit` (one socket, bound
    and listening here, that every copy inherits): see shared_port.py.
    """
    port, program = free_port(), [sys.executable, str(REPO / "benchmarks" / "shared_port.py")]
    with contextlib.ExitStack() as stack:
        if how == "inherit":
            listener = stack.enter_context(socket.create_server((HOST, port), backlog=BACKLOG))
            program, fds = [*program, how, str(listener.fileno())], (listener.fileno(),)
        else:
            program, fds = [*program, how], ()
        yield stack.enter_context(copies(workdir, store, [port] * count, program, fds))


@contextlib.contextmanager
def behind_router(workdir: Path, store: str, count: int,
                  copies_log: bool = True) -> Iterator[Target]:
    """`launcher.py web=N`: our router on the front port, N copies behind it.

    `copies_log=False` sends the copies' output to /dev/null instead of the launcher, which
    would read each log line, prefix it and write it again, on the router's GIL: measuring
    both shows what that costs (a copy still formats and writes its line).
    """
    procfile, log, front = workdir / "Procfile", workdir / "launcher.log", free_port()
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'webapp.py'))}"
    if not copies_log:
        command += " >/dev/null"
    procfile.write_text(f"web: {command}\n")  # only `web`: unnamed types would run 1 copy
    args = [sys.executable, str(REPO / "launcher.py"), f"web={count}", "--port", str(front),
            "--procfile", str(procfile)]
    try:
        with running(args, app_env(workdir, store, HOST=HOST), log) as proc:
            wait_until_served(front, count, proc, log)
            yield Target(front)
    finally:
        end_leftover_copies(log, workdir)


def end_leftover_copies(log: Path, workdir: Path) -> None:
    """Kill any copy our launcher started that outlived it (a launcher that hung).

    The launcher stops its copies on SIGTERM, and the kernel signals them if it is killed
    (PR_SET_PDEATHSIG): this is the belt to those braces.
    """
    for _, pid in started_copies(log):
        if is_ours(pid, workdir):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # a copy leads its own process group


def started_copies(log: Path) -> list[tuple[str, int]]:
    """(name, pid) of every copy the launcher started, in order, from its log."""
    return [(name, int(pid))
            for name, pid in STARTED.findall(log.read_text(errors="replace"))]


def is_ours(pid: int, workdir: Path) -> bool:
    """A running process whose environment names this configuration's folder: so a pid
    that was reused by someone else's process is never touched (a zombie has none).
    Without /proc (macOS) a live pid from our launcher's log is taken at its word."""
    if not Path("/proc/self/environ").exists():
        with contextlib.suppress(OSError):
            os.kill(pid, 0)
            return True
        return False
    try:
        return str(workdir).encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


NGINX_CONF = """worker_processes 1;
pid {workdir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    upstream copies {{ {servers} }}
    server {{
        listen {host}:{port} backlog={backlog};
        location / {{ proxy_pass http://copies; proxy_http_version 1.0; }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@contextlib.contextmanager
def behind_nginx(workdir: Path, store: str, count: int) -> Iterator[Target]:
    """The same copies behind nginx round-robin: what a routing layer costs, done well."""
    with direct(workdir, store, count) as backends:
        front, log, conf = free_port(), workdir / "nginx.log", workdir / "nginx.conf"
        servers = " ".join(f"server {HOST}:{port};" for port in backends.copies)
        conf.write_text(NGINX_CONF.format(workdir=workdir, servers=servers, host=HOST,
                                          port=front, backlog=BACKLOG))
        args = [find_nginx(), "-p", str(workdir), "-e", str(log), "-c", str(conf),
                "-g", "daemon off;"]
        with running(args, dict(os.environ), log) as proc:
            wait_until_served(front, count, proc, log)
            yield Target(front, backends.copies)


@contextlib.contextmanager
def on_gunicorn(workdir: Path, store: str, count: int) -> Iterator[Target]:
    """benchmarks/flask_app.py on gunicorn, `count` sync workers, the same listen backlog."""
    port, log = free_port(), workdir / "gunicorn.log"
    args = [sys.executable, "-m", "gunicorn", "--workers", str(count), "--backlog", str(BACKLOG),
            "--bind", f"{HOST}:{port}", "--chdir", str(REPO / "benchmarks"), "flask_app:app"]
    with running(args, app_env(workdir, store), log) as proc:
        wait_until_served(port, 1, proc, log)
        yield Target(port)


# --- The plan, the rounds and the report -------------------------------------------------

@dataclass(frozen=True)
class Setup:
    name: str
    start: Callable[[Path], ContextManager[Target]]
    workloads: tuple[str, ...]
    in_quick: bool = False
    needs: str = ""  # "nginx", "gunicorn" or "redis": skipped with a note when it is missing


BOTH, SESSION = ("session", "healthz"), ("session",)
ROUTER, NGINX, GUNICORN = "router web=2", "nginx web=2", "flask+gunicorn 2 sync"
REUSEPORT, INHERITED = "reuseport web=2", "shared socket web=2"
REDIS_ROUTER = "router web=2 (redis)"
PLAN = [
    Setup("direct", partial(direct, store="sqlite"), BOTH, True),
    Setup("direct (memory)", partial(direct, store="memory"), SESSION),
    Setup("direct (redis)", partial(on_redis, direct), SESSION, False, "redis"),
    Setup("router web=1", partial(behind_router, store="sqlite", count=1), BOTH),
    Setup(ROUTER, partial(behind_router, store="sqlite", count=2), BOTH, True),
    Setup(REDIS_ROUTER, partial(on_redis, behind_router, count=2), SESSION, True, "redis"),
    Setup("router web=2 (logs to /dev/null)",
          partial(behind_router, store="sqlite", count=2, copies_log=False), SESSION),
    Setup("router web=4", partial(behind_router, store="sqlite", count=4), BOTH),
    Setup(NGINX, partial(behind_nginx, store="sqlite", count=2), BOTH, True, "nginx"),
    Setup(REUSEPORT, partial(sharing_port, store="sqlite", count=2, how="reuseport"), BOTH),
    Setup(INHERITED, partial(sharing_port, store="sqlite", count=2, how="inherit"), BOTH),
    Setup(GUNICORN, partial(on_gunicorn, store="sqlite", count=2), BOTH, True, "gunicorn"),
]
RATIOS = [  # label, numerator, denominator, the floor (if any) each workload must reach
    (f"{ROUTER} / {NGINX}", ROUTER, NGINX, {"session": 0.95, "healthz": 0.95}),
    (f"{ROUTER} / {GUNICORN}", ROUTER, GUNICORN, {"session": 0.8}),
    (f"{ROUTER} / direct", ROUTER, "direct", {}),
    (f"{REUSEPORT} / {GUNICORN}", REUSEPORT, GUNICORN, {}),
    (f"{INHERITED} / {GUNICORN}", INHERITED, GUNICORN, {}),
    (f"{ROUTER} / {REUSEPORT}", ROUTER, REUSEPORT, {}),
    (f"{ROUTER}: logs through the launcher / to /dev/null", ROUTER,
     "router web=2 (logs to /dev/null)", {}),
    ("router web=4 / router web=1", "router web=4", "router web=1", {}),
    ("sqlite / memory, direct", "direct", "direct (memory)", {}),
    (f"redis / sqlite, {ROUTER}", REDIS_ROUTER, ROUTER, {"session": 1.0}),
    ("redis / sqlite, direct", "direct (redis)", "direct", {}),
]


@dataclass(frozen=True)
class Result:
    config: str
    workload: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: Counter  # by kind


@dataclass(frozen=True)
class Options:
    quick: bool
    clients: int
    seconds: int
    load: str  # "wrk" or "python"
    load_processes: int


def missing_tools() -> dict[str, str]:
    missing = {}
    if find_nginx() is None:
        missing["nginx"] = "nginx not installed: apt-get install nginx"
    if not all(importlib.util.find_spec(name) for name in ("flask", "gunicorn")):
        missing["gunicorn"] = "flask or gunicorn not installed: pip install flask gunicorn"
    if shutil.which("redis-server") is None:
        missing["redis"] = "redis-server not installed: apt-get install redis-server"
    return missing


def summarize(name: str, workload: str, warmup: Round, rounds: list[Round]) -> Result:
    """The best round's figures; errors count from every round, the warm-up too."""
    best = max(rounds, key=lambda one: one.rate)
    return Result(name, workload, best.rate, best.p50_ms, best.p99_ms,
                  sum((Counter(one.errors) for one in [warmup, *rounds]), Counter()))


def run_plan(options: Options, load: Callable[[int, str, int, float], Round]
             ) -> tuple[list[Result], dict[str, int], list[str]]:
    """Start every configuration, then measure them in turns: (results, locked lines, notes).

    In turns (round 1 of each, then round 2 of each...) rather than one configuration after
    the other: whatever else runs on the machine comes and goes over minutes, and turns
    spread it over every configuration alike. Idle, the others cost next to nothing.
    """
    missing, notes, started = missing_tools(), [], []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, contextlib.ExitStack() as stack:
        for number, setup in enumerate(PLAN):
            if options.quick and not setup.in_quick:
                continue
            if setup.needs in missing:
                notes.append(f"{setup.name} skipped: {missing[setup.needs]}")
                continue
            workdir = Path(tmp) / str(number)
            workdir.mkdir()
            try:
                started.append((setup, stack.enter_context(setup.start(workdir)), workdir))
            except StartError as error:
                notes.append(f"{setup.name} failed to start: {error}")
        pairs = [(setup.name, target.port, workload)
                 for setup, target, _ in started for workload in setup.workloads]
        warmups = {(name, workload): load(port, workload, options.clients, WARMUP)
                   for name, port, workload in pairs}
        rounds = {(name, workload): [] for name, _, workload in pairs}
        for number in range(1, ROUNDS + 1):
            print(f"  round {number} of {ROUNDS}", file=sys.stderr, flush=True)
            for name, port, workload in pairs:
                rounds[name, workload].append(load(port, workload, options.clients,
                                                   options.seconds))
        stack.close()  # stopped first, so that the launchers have passed on every last line
        locked = {setup.name: sum(log.read_text(errors="replace").count("locked")
                                  for log in workdir.glob("*.log"))
                  for setup, _, workdir in started}
    results = [summarize(name, workload, warmups[name, workload], rounds[name, workload])
               for name, _, workload in pairs]
    return results, locked, notes


def report(results: list[Result], locked: dict[str, int], clients: int) -> None:
    print("| config | workload | req/s | p50 ms | p99 ms | errors |\n|---|---|--:|--:|--:|--:|")
    for r in results:
        print(f"| {r.config} | {r.workload} | {r.rate:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
              f"| {r.errors.total()} |")
    rate = {(r.config, r.workload): r.rate for r in results}
    print("\n| ratio of req/s | session | healthz | floor | met |\n|---|--:|--:|---|---|")
    for label, top, bottom, floors in RATIOS:
        values = {workload: rate[top, workload] / rate[bottom, workload] for workload in BOTH
                  if rate.get((top, workload)) and rate.get((bottom, workload))}
        if values:
            cells = " | ".join(f"{values[w]:.2f}" if w in values else "-" for w in BOTH)
            floor = ", ".join(f"{w} >= {value:.2f}" for w, value in floors.items()) or "-"
            met = "-" if not floors else (
                "yes" if all(values.get(w, 0) >= value for w, value in floors.items()) else "NO")
            print(f"| {label} | {cells} | {floor} | {met} |")
    slow = [f"{r.config} {r.p99_ms:.0f} ms" for r in results
            if r.workload == "session" and r.p99_ms >= 50]
    failed = [f"{r.config} {r.workload}: " + ", ".join(f"{count} {kind}" for kind, count
                                                         in r.errors.items())
              for r in results if r.errors]
    locks = [f"{name}: {count}" for name, count in locked.items() if count]
    print(f"\np99 < 50 ms, session workload, {clients} clients: "
          f"{'NO: ' + ', '.join(slow) if slow else 'yes, in every configuration'}")
    print(f"errors: {', '.join(failed) if failed else 'none'}")
    print(f"'database is locked' in the logs: {', '.join(locks) if locks else 'never'}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def read_options(argv: list[str]) -> Options:
    parser = OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="four configurations, 1 s rounds: under a minute "
                             "(full: 3 s rounds, about 4 min)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--seconds", type=int, help="length of a round (3; quick: 1)")
    parser.add_argument("--load", choices=("wrk", "python"),
                        default="wrk" if shutil.which("wrk") else "python",
                        help="the load generator (wrk when installed, else python)")
    parser.add_argument("--load-processes", type=int, default=2,
                        help="processes the Python clients are spread over; 0: this one (2)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (1 if args.quick else 3)
    if not 1 <= args.clients <= 256:
        parser.error(f"--clients must be from 1 to 256, got {args.clients}")
    if not 1 <= seconds <= 60:
        parser.error(f"--seconds must be from 1 to 60, got {seconds}")
    if args.load == "wrk" and not shutil.which("wrk"):
        parser.error("--load wrk: wrk is not installed (apt-get install wrk)")
    if not 0 <= args.load_processes <= min(args.clients, 8):
        parser.error(f"--load-processes must be from 0 to 8 and at most --clients, "
                     f"got {args.load_processes}")
    return Options(args.quick, args.clients, seconds, args.load, args.load_processes)


def describe_load(options: Options) -> str:
    if options.load == "wrk":
        return f"wrk, {options.clients} connections, a thread each"
    return (f"Python clients, {options.clients} threads in {options.load_processes or 1} "
            f"load process(es) on the same CPUs (install wrk to leave the CPUs to the servers)")


def main(argv: list[str] | None = None) -> int:
    options = read_options(sys.argv[1:] if argv is None else argv)
    # SIGTERM ends the run as Ctrl-C does: through every `finally`, leaving nothing running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    print(f"bench.py{' --quick' if options.quick else ''}, {time.strftime('%Y-%m-%d %H:%M')}: "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the start; load generator: {describe_load(options)}; "
          f"best of {ROUNDS} rounds of {options.seconds} s\n", flush=True)
    pool = None
    if options.load == "python" and options.load_processes:
        pool = ProcessPoolExecutor(options.load_processes, multiprocessing.get_context("spawn"),
                                   initializer=ignore_ctrl_c)
    load = wrk_round if options.load == "wrk" else partial(python_round, pool,
                                                           options.load_processes)
    try:
        results, locked, notes = run_plan(options, load)
    except KeyboardInterrupt:
        print("bench.py: interrupted; what it started has been stopped", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report(results, locked, options.clients)
    for note in notes:
        print(f"note: {note}")
    print(f"note: load average {os.getloadavg()[0]:.2f} at the end; compare the ratios, "
          f"not the absolute figures")
    return 1 if any("failed to start" in note for note in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
