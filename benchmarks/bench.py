"""Measure what scaling out buys: requests/second, p50 and p99 for each way to serve the app.

Factor VIII promises that more copies serve more, and the launcher promises that its front
door is cheap. This script checks both with figures it measures itself, beside what a user
would run instead: nginx in front of the same copies, and Flask on gunicorn.

How it measures: C clients (threads, spread over two load processes) each send one request
at a time on a fresh connection (keep-alive off: webapp.py and the router speak HTTP/1.0),
for a fixed time and at most a fixed count. Every latency is kept raw, with no
coordinated-omission "correction" (wrk's turns a few stalls into a huge p99): these are the
latencies clients saw. Errors (refused, reset or timed-out connections, statuses other than
2xx/3xx) are counted apart. Two workloads: `session` (each client logs in once, then every
request is `POST /cart`, a read and a write of its session through the store's `edit`) and
`healthz` (the cheapest request: what the routing layer itself costs).

Every configuration is started first, on free loopback ports with its own SQLite file,
and warmed up; then they are measured in turns, a few rounds each, and each one's median
round is kept. Read the ratios, not the absolute figures: the load generator is Python
too and takes its share of the machine's cores from the servers it measures, and other
people's work may share the machine. Both weigh on every configuration of a run alike,
so ratios computed within one run hold where absolute figures drift.

Not measured: other machines, keep-alive, overload. nginx and Flask+gunicorn are optional,
skipped with a note when absent (`apt-get install nginx`, `pip install flask gunicorn`).
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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Iterator

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TIMEOUT = 10.0          # a request slower than this counts as an error, not as a latency
MAX_REQUESTS = 200_000  # per round, whatever --seconds says
START_TIMEOUT = 20.0
ROUNDS = 3
STARTED = re.compile(r"(\S+) started \(pid=(\d+)")  # the launcher's line for a new copy
FORM = "application/x-www-form-urlencoded"


# --- The load generator ------------------------------------------------------------------

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

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


def send(port: int, path: str, form: str | None = None,
         cookie: str | None = None) -> http.client.HTTPResponse:
    """One request on a fresh connection (POST if there is a form); the body is read."""
    return exchange(port, path, None if form is None else form.encode(), FORM, cookie)[0]


def exchange(port: int, path: str, body: bytes | None = None, content_type: str = FORM,
             cookie: str | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection (POST if there is a body): the response, its body."""
    # "Connection: close" makes nginx and gunicorn close first, as webapp.py does: the side
    # that closes first keeps the TIME_WAIT, so the client's ports never run out.
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = content_type
    if cookie:
        headers["Cookie"] = f"sid={cookie}"
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
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
    return session_cookie(response, cookie)


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


def run_load(pool: ProcessPoolExecutor | None, processes: int, port: int, workload: str,
             clients: int, seconds: float) -> Tally:
    """The clients split over `processes` load processes, or all in this one (pool None).

    Why processes: a Python client spends about a quarter of a millisecond of CPU per
    request, so one process of 16 threads hits its own GIL before the fastest server
    (nginx) runs out of work. Two processes raised that figure by 5%; on the slowest
    configurations they cost a little, taking CPU from the server. The reference wins.
    """
    if pool is None:
        return hammer(port, workload, clients, seconds, MAX_REQUESTS)
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    futures = [pool.submit(hammer, port, workload, share, seconds, MAX_REQUESTS // processes)
               for share in shares if share]
    total = Tally()
    for future in futures:
        total.merge(future.result())
    return total


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


def free_port() -> int:
    # Below the outgoing-connection range (Linux 32768+): no client can take a copy's P+1...
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        return port


def app_env(workdir: Path, store: str, **extra) -> dict[str, str]:
    """The children's environment: this configuration's database and store, unbuffered."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PORT", "HOST", "DYNO", "SESSION_STORE", "SESSION_TTL")}
    env.update(DATABASE_URL=f"sqlite:///{workdir / 'app.db'}", SESSION_STORE=store,
               PYTHONUNBUFFERED="1", **{name: str(value) for name, value in extra.items()})
    return env


@contextlib.contextmanager
def running(args: list[str], env: dict, log: Path,
            stdin: int = subprocess.DEVNULL) -> Iterator[subprocess.Popen]:
    """A child in a process group of its own, output to a file; the group ends on exit."""
    with open(log, "wb") as out:  # a file, not a pipe: a pipe nobody reads blocks the child
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdin=stdin, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
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


def wait_until_served(port: int, copies: int, proc: subprocess.Popen, log: Path) -> None:
    """Poll /healthz until `copies` distinct copies have answered: the rotation is full."""
    deadline, seen = time.monotonic() + START_TIMEOUT, set()
    while len(seen) < copies:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = " / ".join(log.read_text(errors="replace").splitlines()[-3:])
            raise StartError(f"{log.stem} did not come up (exit code {proc.poll()}): {tail}")
        try:
            response = send(port, "/healthz")
            if response.status == 200:
                seen.add(response.getheader("X-Served-By"))
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)


@contextlib.contextmanager
def direct(workdir: Path, store: str, count: int = 1) -> Iterator[Target]:
    """`count` copies of `python webapp.py` on free ports, no front door."""
    with contextlib.ExitStack() as stack:
        ports = []
        for number in range(1, count + 1):
            port, log = free_port(), workdir / f"web.{number}.log"
            env = app_env(workdir, store, PORT=port, DYNO=f"web.{number}")
            args = [sys.executable, str(REPO / "webapp.py")]
            wait_until_served(port, 1, stack.enter_context(running(args, env, log)), log)
            ports.append(port)
        yield Target(ports[0], ports)


@contextlib.contextmanager
def behind_router(workdir: Path, store: str, count: int) -> Iterator[Target]:
    """`launcher.py web=N`: our router on the front port, N copies behind it."""
    procfile, log, front = workdir / "Procfile", workdir / "launcher.log", free_port()
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'webapp.py'))}"
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
        listen {host}:{port} backlog=128;
        location / {{ proxy_pass http://copies; proxy_http_version 1.0; }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@contextlib.contextmanager
def behind_nginx(workdir: Path, store: str, count: int) -> Iterator[Target]:
    """The same copies behind nginx round-robin: what a routing layer costs, done well."""
    with direct(workdir, store, count) as copies:
        front, log, conf = free_port(), workdir / "nginx.log", workdir / "nginx.conf"
        servers = " ".join(f"server {HOST}:{port};" for port in copies.copies)
        conf.write_text(NGINX_CONF.format(workdir=workdir, servers=servers, host=HOST, port=front))
        args = [find_nginx(), "-p", str(workdir), "-e", str(log), "-c", str(conf),
                "-g", "daemon off;"]
        with running(args, dict(os.environ), log) as proc:
            wait_until_served(front, count, proc, log)
            yield Target(front, copies.copies)


@contextlib.contextmanager
def on_gunicorn(workdir: Path, store: str, count: int) -> Iterator[Target]:
    """benchmarks/flask_app.py on gunicorn, `count` sync workers, the same listen backlog."""
    port, log = free_port(), workdir / "gunicorn.log"
    args = [sys.executable, "-m", "gunicorn", "--workers", str(count), "--backlog", "128",
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
    needs: str = ""  # "nginx" or "gunicorn": skipped with a note when it is missing


BOTH, SESSION = ("session", "healthz"), ("session",)
PLAN = [
    Setup("direct", partial(direct, store="sqlite"), BOTH, True),
    Setup("direct (memory)", partial(direct, store="memory"), SESSION),
    Setup("router web=1", partial(behind_router, store="sqlite", count=1), BOTH),
    Setup("router web=2", partial(behind_router, store="sqlite", count=2), BOTH, True),
    Setup("router web=2 (memory)", partial(behind_router, store="memory", count=2), SESSION),
    Setup("router web=4", partial(behind_router, store="sqlite", count=4), BOTH),
    Setup("nginx web=2", partial(behind_nginx, store="sqlite", count=2), BOTH, True, "nginx"),
    Setup("flask+gunicorn 2 sync", partial(on_gunicorn, store="sqlite", count=2), SESSION,
          True, "gunicorn"),
]
RATIOS = [  # label, numerator, denominator, target (of the issue), for every workload
    ("router web=2 / nginx web=2", "router web=2", "nginx web=2", 0.75),
    ("router web=2 / direct", "router web=2", "direct", 1.0),
    ("router web=4 / router web=1", "router web=4", "router web=1", None),
    ("sqlite / memory, direct", "direct", "direct (memory)", None),
    ("sqlite / memory, router web=2", "router web=2", "router web=2 (memory)", None),
    ("router web=2 / flask+gunicorn 2 sync", "router web=2", "flask+gunicorn 2 sync", None),
]


@dataclass(frozen=True)
class Result:
    config: str
    workload: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True)
class Options:
    quick: bool
    clients: int
    seconds: float
    warmup: float
    load_processes: int


def missing_tools() -> dict[str, str]:
    missing = {}
    if find_nginx() is None:
        missing["nginx"] = "nginx not installed: apt-get install nginx"
    if not all(importlib.util.find_spec(name) for name in ("flask", "gunicorn")):
        missing["gunicorn"] = "flask or gunicorn not installed: pip install flask gunicorn"
    return missing


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank: the latency that `fraction` of the requests did not exceed."""
    return ordered[max(0, int(len(ordered) * fraction + 0.999999) - 1)] if ordered else 0.0


def summarize(name: str, workload: str, warmup: Tally, rounds: list[Tally]) -> Result:
    """The median round's figures; errors count from every round, the warm-up too."""
    median = sorted(rounds, key=lambda tally: tally.rate)[len(rounds) // 2]
    ordered = sorted(median.latencies)
    return Result(name, workload, median.rate, percentile(ordered, 0.50) * 1000,
                  percentile(ordered, 0.99) * 1000,
                  sum(sum(tally.errors.values()) for tally in [warmup, *rounds]))


def run_plan(options: Options, load: Callable[..., Tally]
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
        warmups = {(name, workload): load(port, workload, options.clients, options.warmup)
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
              f"| {r.errors} |")
    rate = {(r.config, r.workload): r.rate for r in results}
    print("\n| ratio of req/s | session | healthz | target | met |\n|---|--:|--:|--:|---|")
    for label, top, bottom, target in RATIOS:
        values = {workload: rate[top, workload] / rate[bottom, workload] for workload in BOTH
                  if rate.get((top, workload)) and rate.get((bottom, workload))}
        if values:
            cells = " | ".join(f"{values[w]:.2f}" if w in values else "-" for w in BOTH)
            met = "-" if target is None else ("yes" if min(values.values()) >= target else "NO")
            print(f"| {label} | {cells} | {f'>= {target:.2f}' if target else '-'} | {met} |")
    slow = [f"{r.config} {r.p99_ms:.0f} ms" for r in results
            if r.workload == "session" and r.p99_ms >= 50]
    failed = [f"{r.config} {r.workload}: {r.errors}" for r in results if r.errors]
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
                        help="four configurations, short rounds: under 30 s (full: under 5 min)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--seconds", type=float, help="length of a round (3; quick: 0.8)")
    parser.add_argument("--load-processes", type=int, default=2,
                        help="processes the clients are spread over; 0: this one (2)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.8 if args.quick else 3.0)
    if not 1 <= args.clients <= 256:
        parser.error(f"--clients must be from 1 to 256, got {args.clients}")
    if not 0 < seconds <= 60:
        parser.error(f"--seconds must be more than 0 and at most 60, got {seconds:g}")
    if not 0 <= args.load_processes <= min(args.clients, 8):
        parser.error(f"--load-processes must be from 0 to 8 and at most --clients, "
                     f"got {args.load_processes}")
    return Options(args.quick, args.clients, seconds, 0.3 if args.quick else 1.0,
                   args.load_processes)


def main(argv: list[str] | None = None) -> int:
    options = read_options(sys.argv[1:] if argv is None else argv)
    # SIGTERM ends the run as Ctrl-C does: through every `finally`, leaving nothing running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    print(f"bench.py{' --quick' if options.quick else ''}, {time.strftime('%Y-%m-%d %H:%M')}: "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the start; {options.clients} clients in "
          f"{options.load_processes or 1} load process(es) on the same CPUs; median of "
          f"{ROUNDS} rounds of {options.seconds:g} s\n", flush=True)
    pool = None
    if options.load_processes:
        pool = ProcessPoolExecutor(options.load_processes, multiprocessing.get_context("spawn"),
                                   initializer=ignore_ctrl_c)
    try:
        results, locked, notes = run_plan(options, partial(run_load, pool, options.load_processes))
    except KeyboardInterrupt:
        print("bench.py: interrupted; what it started has been stopped", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report(results, locked, options.clients)
    for note in notes:
        print(f"note: {note}")
    print("note: the load generator (Python, http.client) shares the CPUs with the servers: "
          "absolute figures are a floor; compare the ratios")
    return 1 if any("failed to start" in note for note in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
