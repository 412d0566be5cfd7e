"""The chaos drill: users shop while copies are killed; then count what was lost (VI, VIII).

Factor VIII lets the platform start, stop and kill copies whenever it likes; Factor VI makes
that safe: a process keeps nothing it cannot lose. The terrible day the drill prevents: a
deploy or a dying host logs users out, drops items from carts, loses an upload, runs a job
twice or never. The tests check each promise alone; the drill checks them all at once,
under load, with real SIGKILLs.

It starts `launcher.py web=4 worker=3 clock=2` (the repo's Procfile, 5 s job leases, a
heartbeat tick every second) and `--users` simulated browsers (`shoppers.py`) that log in,
fill their carts, upload files and enqueue short jobs. Every two seconds the drill
SIGKILLs a random web copy and a random worker; halfway, it types `restart web`. Then it
waits for the jobs it was promised, and checks what the users would find:

* sessions: still logged in; the cart holds each item whose POST was answered, in order,
  once. An item whose POST failed may be there or not: its copy may have died just after
  the write committed.
* uploads and jobs: each answered upload returns the same bytes; each answered job is done,
  and none ran on two workers at once (replayed from the launcher's log). A rerun after a
  kill is at-least-once delivery working: counted, not lost. No clock tick was doubled.
* requests: one in flight on a copy as it was SIGKILLed may fail; any other is unexplained.

With `--hosts 2` it goes beyond one machine: hosts a and b, each a launcher (`web=2
worker=1 clock=1`, copies a.web.1, b.worker.1...) behind `router.py`, made by `hosts.py`
(network namespaces as root, else loopback). A fifth of the way in, b's cable is pulled
for a quarter of a lease (`hosts.cut_seconds` says why no longer); once b is back, a dies
whole, as in a power cut, and b serves alone. With Redis nothing may be lost: the jobs a's
worker held run again on b after their lease. With SQLite each host has a file of its own,
as two machines would: whoever crosses from one host to the other is forgotten, and it is
counted.

The store is what DATABASE_URL names: a Redis (shared; the drill's sessions and jobs stay
in it until they expire or are purged), or SQLite, in files of the drill's own. Run
`python benchmarks/drill.py` (30 s, 8 users, 5 s leases; `--seconds N`, `--users N`,
`--lease N`, `--hosts 2`): exit code 0 when nothing was lost, 1 otherwise, 2 for bad
arguments. Then watch Factor VI fail with `SESSION_STORE=memory python benchmarks/drill.py
--seconds 5`: each copy keeps its own sessions and uploads, and the next request lands on
one that never heard of the user.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from bench import (HOST, REPO, STARTED, OneLineParser, StartError, app_env,
                   end_leftover_copies, free_port, is_ours, running, started_copies,
                   wait_until_served)
from hosts import (Host, HostsTaken, Network, cut_seconds, kill_whole, made_hosts,
                   redis_address)
from shoppers import Address, Failure, User, browse, check_user, fetch_json

FORMATION = {"web": 4, "worker": 3, "clock": 2}
HOST_FORMATION = {"web": 2, "worker": 1, "clock": 1}  # each host's, with --hosts 2
JOB_LEASE = 5            # seconds, unless --lease: a killed worker's job is back this soon
CHAOS_EVERY = 2.0        # seconds between two rounds of kills
KILL_MARGIN = 0.5        # a killed copy's socket outlives it a moment: failures this soon, too
SETTLE = 10              # seconds beyond a lease, after the chaos, for the promised jobs
ROUTER_CHECK_EVERY = 0.1  # router.py's health checks: 3 missed take a host out in 0.3 s
SHORTEST_CUT = 0.75      # seconds: what router.py notices (3 checks missed) even on a busy day
REJOIN = 0.5             # seconds after the cut heals before host a dies: b is back by then
ALONE = 1.0              # seconds, at least, that b serves alone after a died
LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d) (\S+) +\| (.*)$")  # `HH:MM:SS web.3   | text`
JOB_STARTED = re.compile(r"job (\d+) \S+ started \(attempt")
JOB_ENDED = re.compile(r"job (\d+) (\S+ done in|\S+ failed \(attempt|\S+ dead after|lease lost)")
COPY_ENDED = re.compile(r"(\S+) (killed by|exited with code)")
TICK = re.compile(r"enqueued (heartbeat@\S+) as job \d+")
FINISHED = ("done", "dead", "lost")  # "lost": its queue died with its host (SQLite per host)


@dataclass(frozen=True)
class Options:
    seconds: float
    users: int
    store: str               # the sessions': "sqlite", "redis" (DATABASE_URL's) or "memory"
    lease: float
    hosts: tuple[str, ...]   # the hosts' names with --hosts 2 ("a", "b"); () for one launcher
    redis: str | None        # DATABASE_URL, if it names a Redis; else SQLite files of our own


@dataclass(frozen=True)
class Incident:
    """Something the drill did to the platform, and when (time.monotonic())."""
    name: str      # what it struck: "web.3", "worker.1", "host a"
    what: str      # "killed", "cut off (link tfp-b1 down) for 0.75 s"
    began: float
    ended: float   # a kill ends as it begins; a cut once the link is back


Schedule = list[tuple[float, Callable[[], list[Incident]]]]  # (seconds in, strike)


# --- The chaos ---------------------------------------------------------------------------

def kill_one(kind: str, log: Path, workdir: Path) -> list[Incident]:
    """SIGKILL a random live copy of `kind`, found by the launcher's latest pid for each name."""
    latest = dict(started_copies(log))  # name -> the pid of its current process
    live = [(name, pid) for name, pid in latest.items()
            if name.partition(".")[0] == kind and is_ours(pid, workdir)]
    if not live:  # every copy of the kind is restarting, or waiting to
        return []
    name, pid = random.choice(live)
    at = time.monotonic()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it died on its own a moment ago
        return []
    return [Incident(name, "killed", at, at)]


def copy_chaos(launcher: subprocess.Popen, log: Path, workdir: Path,
               seconds: float) -> Schedule:
    """One launcher's chaos: every CHAOS_EVERY seconds a web copy and a worker die;
    halfway, a rolling restart."""
    def restart() -> list[Incident]:
        # Our only command: with its stdin closed, the launcher runs on without one.
        launcher.stdin.write(b"restart web\n")
        launcher.stdin.close()
        return []

    def kills() -> list[Incident]:
        return [*kill_one("web", log, workdir), *kill_one("worker", log, workdir)]

    return [(seconds / 2, restart), *((CHAOS_EVERY * number, kills)  # each before the end
                                      for number in range(1, math.ceil(seconds / CHAOS_EVERY)))]


def host_schedule(seconds: float, lease: float) -> tuple[float, float, float]:
    """When host b is cut off, when its cable is back, and when host a dies (seconds in)."""
    cut_at = seconds / 5
    heal_at = cut_at + cut_seconds(lease)
    return cut_at, heal_at, max(seconds / 2, heal_at + REJOIN)


def shortest_run(lease: float) -> float:
    """The least --seconds, in tenths, with ALONE left after the kill: a fifth of the run,
    the cut, REJOIN and ALONE fit in it (and then half the run and ALONE do too)."""
    return math.ceil(10 * (cut_seconds(lease) + REJOIN + ALONE) * 5 / 4) / 10


def host_chaos(network: Network, doomed: Host, cut_off: Host, seconds: float,
               lease: float) -> Schedule:
    """One host is cut off, then the other dies whole (see `hosts.py` for how)."""
    cut_at, heal_at, kill_at = host_schedule(seconds, lease)

    def cut() -> list[Incident]:
        how, now = network.cut(cut_off), time.monotonic()
        return [Incident(f"host {cut_off.name}", f"{how} for {heal_at - cut_at:g} s",
                         now, now + heal_at - cut_at)]

    def heal() -> list[Incident]:
        network.heal(cut_off)
        return []

    def kill() -> list[Incident]:
        now = time.monotonic()
        died = kill_whole(network, doomed)
        return [Incident(f"host {doomed.name}", f"killed whole (SIGKILL to its launcher and "
                                                f"{died - 1} copies)", now, now)]

    return [(cut_at, cut), (heal_at, heal), (kill_at, kill)]


def shop_under_chaos(users: list[User], port: int, schedule: Schedule,
                     seconds: float) -> tuple[float, list[Incident]]:
    """The users shop in threads for `seconds` while this thread strikes as `schedule`
    says: when they began (time.monotonic()), and what was struck."""
    stop, incidents, began = threading.Event(), [], time.monotonic()
    shoppers = [threading.Thread(target=browse, args=(user, port, began + seconds, stop),
                                 daemon=True) for user in users]
    for thread in shoppers:
        thread.start()
    try:
        for at, strike in sorted(schedule, key=lambda event: event[0]):
            time.sleep(max(0.0, began + at - time.monotonic()))
            incidents += strike()
        for thread in shoppers:
            thread.join()
    finally:
        stop.set()  # after a Ctrl-C too: the users stop at once
    return began, incidents


# --- Afterwards: the promised jobs, and what the users find ------------------------------

def settle(promised: list[tuple[str, int]], home: Callable[[str], Address | None],
           lease: float, settled: Callable[[], bool]) -> dict[tuple[str, int], dict]:
    """Poll each promised job where its queue is (`home` of its host; None: gone with it)
    until it is done or dead, and `settled` until it is true, for at most a lease and
    SETTLE seconds: a killed worker's job waits out its lease."""
    jobs: dict[tuple[str, int], dict] = {}
    deadline = time.monotonic() + lease + SETTLE
    while time.monotonic() < deadline:
        for host, job_id in promised:
            if jobs.get((host, job_id), {}).get("state") not in FINISHED:
                address = home(host)
                jobs[host, job_id] = fetch_json(address, f"/jobs/{job_id}") if address else {
                    "id": job_id, "state": "lost", "attempts": 0,
                    "error": f"its queue was host {host}'s own SQLite file, gone with host {host}"}
        if all(job["state"] in FINISHED for job in jobs.values()) and settled():
            break
        time.sleep(0.2)
    return jobs


def web_rolled_over(log: Path, workdir: Path) -> bool:
    """Has every web process that ran before `restart web` stopped? That is what a rolling
    restart promises, checked directly rather than taken from the launcher's word."""
    before, command, _ = log.read_text(errors="replace").partition("| rolling restart,")
    return bool(command) and not any(is_ours(int(pid), workdir) for name, pid
                                     in STARTED.findall(before) if name.startswith("web."))


@dataclass
class Findings:
    """What the drill saw, for the report."""
    began: float                      # when the users began to shop (time.monotonic())
    incidents: list[Incident]
    jobs: dict[tuple[str, int], dict]  # (host, job id) -> the job, as its queue answered
    checks: list[tuple[bool, int]]    # check_user's, for each user
    heartbeats: Counter               # heartbeat tick key -> jobs in the queue
    lines: list[tuple[str, str]] = field(default_factory=list)  # the launchers' logs, in order


def exercise(users: list[User], front: int, schedule: Schedule, options: Options,
             home: Callable[[str], Address | None], settled: Callable[[], bool]) -> Findings:
    """Shop under chaos, wait for the promised jobs, and look at what the users find."""
    began, incidents = shop_under_chaos(users, front, schedule, options.seconds)
    jobs = settle([job for user in users for job in user.jobs], home, options.lease, settled)
    checks = [check_user(user, front) for user in users]
    heartbeats = Counter(job["key"] for job in fetch_json((HOST, front), "/jobs?task=heartbeat"))
    return Findings(began, incidents, jobs, checks, heartbeats)


# --- The launchers' logs -----------------------------------------------------------------

def timed_lines(log: Path) -> list[tuple[str, str, str]]:
    """(HH:MM:SS, copy name or "system", text) of every line, in the order printed."""
    matches = (LOG_LINE.match(line) for line in log.read_text(errors="replace").splitlines())
    return [(match[1], match[2], match[3]) for match in matches if match]


def read_log(log: Path) -> list[tuple[str, str]]:
    return [(name, text) for _, name, text in timed_lines(log)]  # the times left out


def replay_order(hosts: list[Host], killed: Host, killed_at: float) -> list[tuple[str, str]]:
    """Every host's log as one, in time order, with the killed host's copies ending as it
    died (its launcher never got to say so), for `concurrent_runs`.

    A line says only its second. Within a second, the killed host's lines come first (each
    came before its death), then its death, then the other hosts' lines: a job run twice
    within that very second may be missed, but none is made up."""
    day, dead = 86400, time.localtime(killed_at)
    reference = dead.tm_hour * 3600 + dead.tm_min * 60 + dead.tm_sec

    def second(clock: str) -> int:  # from the kill, on either side of midnight
        hours, minutes, seconds = map(int, clock.split(":"))
        return (hours * 3600 + minutes * 60 + seconds - reference + day // 2) % day - day // 2

    timed = [(second(clock), 0 if host is killed else 2, name, text)
             for host in hosts for clock, name, text in timed_lines(host.log)]
    timed += [(0, 1, "system", f"{name} killed by SIGKILL, with its host")
              for name, _ in started_copies(killed.log)]
    timed.sort(key=lambda line: line[:2])  # stable: each log keeps its own order
    return [(name, text) for _, _, name, text in timed]


def concurrent_runs(lines: list[tuple[str, str]]) -> int:
    """Replay the log: a job `started` by a worker while another still runs it, or a stale
    owner's `lease lost`, is a job run twice at once. A dead copy runs nothing."""
    running: dict[str, set[str]] = defaultdict(set)  # job id -> the workers running it
    doubled = 0
    for name, text in lines:
        started, ended = JOB_STARTED.match(text), JOB_ENDED.match(text)
        gone = COPY_ENDED.match(text)
        if name == "system" and gone:
            for workers in running.values():
                workers.discard(gone[1])
        elif started:
            doubled += bool(running[started[1]])
            running[started[1]].add(name)
        elif ended:
            doubled += ended[2] == "lease lost"
            running[ended[1]].discard(name)
    return doubled


def copies_started(lines: list[tuple[str, str]]) -> int:
    """How many copies the launchers started, restarts included."""
    return sum(" started (pid=" in text for name, text in lines if name == "system")


def in_flight_on_a_strike(failure: Failure, incidents: list[Incident]) -> bool:
    """Was a web copy SIGKILLed, or a host killed or cut off, while the request was in
    flight (or as it began)? Never for a timeout: a killed copy's connections are reset at
    once, and a cut is shorter than a client's patience."""
    return failure.error != "TimeoutError" and any(
        failure.began <= incident.ended + KILL_MARGIN and failure.ended >= incident.began
        for incident in incidents if incident.name.startswith(("web.", "host ")))


# --- The runs ----------------------------------------------------------------------------

def launcher_args(formation: dict[str, int], port: int) -> list[str]:
    return [sys.executable, str(REPO / "launcher.py"),
            *(f"{kind}={count}" for kind, count in formation.items()), "--port", str(port),
            "--procfile", str(REPO / "Procfile"), "--grace", "5"]


def drill_env(options: Options, folder: Path, **extra) -> dict[str, str]:
    """A launcher's environment: the store, the drill's settings, and TMPDIR, its own
    folder, which is how `is_ours` knows its processes (with Redis, no path names it)."""
    env = app_env(folder, options.store, JOB_LEASE=options.lease, POLL_INTERVAL=0.1,
                  HEARTBEAT_EVERY=1, TMPDIR=folder, **extra)
    if options.redis:
        env["DATABASE_URL"] = options.redis
    return env


def run_drill(options: Options, workdir: Path) -> int:
    """Start the formation, shop under chaos, check, stop everything; the exit code."""
    log, front = workdir / "launcher.log", free_port()
    users = [User(f"user{number}") for number in range(1, options.users + 1)]
    print(banner(options), flush=True)
    try:
        with running(launcher_args(FORMATION, front), drill_env(options, workdir), log,
                     stdin=subprocess.PIPE) as launcher:
            wait_until_served(front, FORMATION["web"], launcher, log)
            findings = exercise(users, front, copy_chaos(launcher, log, workdir, options.seconds),
                                options, lambda host: (HOST, front),
                                partial(web_rolled_over, log, workdir))
            rolled = web_rolled_over(log, workdir)  # now: once stopped, every process is gone
        findings.lines = read_log(log)  # the launcher has stopped every copy: its log is complete
    finally:
        end_leftover_copies(log, workdir)
    killed = Counter(incident.name.partition(".")[0] for incident in findings.incidents)
    return report(options, users, findings,
                  f"{killed['web']:,} web + {killed['worker']:,} worker killed, "
                  f"{copies_started(findings.lines) - sum(FORMATION.values()):,} restarted, "
                  f"rolling restart of web {'done' if rolled else 'NOT done'}")


def run_hosts_drill(options: Options, workdir: Path) -> int:
    """Make the hosts, start a launcher on each and router.py before them, shop while one
    host is cut off and the other killed, check, stop and remove everything."""
    front, router_log = free_port(), workdir / "router.log"
    users = [User(f"user{number}") for number in range(1, options.users + 1)]
    with made_hosts(options.hosts, workdir, options.redis) as network:
        # Only now: a refusal (HostsTaken) is then the only line the drill prints.
        print(banner(options), flush=True)
        print(f"hosts      {network.describe()}; router.py on {HOST}:{front}", flush=True)
        doomed, cut_off = network.hosts
        with contextlib.ExitStack() as stack:
            for host in network.hosts:
                start_host(stack, network, host, options)
            # Unwound first: a Ctrl-C during the cut must not leave the host cut off (or
            # frozen) while its launcher is asked to stop.
            stack.callback(network.heal, cut_off)
            print(f"store      {store_line(options, network)}", flush=True)
            upstreams = [f"{host.address}:{host.port}" for host in network.hosts]
            router = stack.enter_context(running(
                [sys.executable, str(REPO / "router.py"), "--port", str(front), "--check-every",
                 str(ROUTER_CHECK_EVERY), *upstreams],
                app_env(workdir, options.store, TMPDIR=workdir), router_log))
            for host in network.hosts:
                wait_until_served(host.port, HOST_FORMATION["web"], host.launcher, host.log,
                                  host.address)
            wait_until_served(front, HOST_FORMATION["web"] * len(network.hosts), router,
                              router_log)
            chaos = host_chaos(network, doomed, cut_off, options.seconds, options.lease)
            findings = exercise(users, front, chaos, options,
                                partial(job_home, options, network, front, doomed),
                                lambda: True)
        # Every launcher has stopped (a's was killed): their logs are complete.
        death = next(incident.began for incident in findings.incidents
                     if incident.name == f"host {doomed.name}")
        findings.lines = replay_order(network.hosts, doomed,
                                      time.time() - (time.monotonic() - death))
        print(f"events     {events_line(findings, network.hosts, router_log)}")
        started = copies_started(findings.lines)
        restarted = started - sum(HOST_FORMATION.values()) * len(network.hosts)
        return report(options, users, findings, f"{started:,} started on "
                      f"{len(network.hosts)} hosts, {restarted:,} restarted")


def start_host(stack: contextlib.ExitStack, network: Network, host: Host,
               options: Options) -> None:
    """Start the host's launcher, named after it, on its front port."""
    env = drill_env(options, host.folder, HOST=host.address)
    if options.redis:
        env["DATABASE_URL"] = network.reach_redis(options.redis, host)
    args = host.command([*launcher_args(HOST_FORMATION, host.port), "--name", host.name])
    host.launcher = stack.enter_context(running(args, env, host.log))


def job_home(options: Options, network: Network, front: int, doomed: Host,
             host: str) -> Address | None:
    """Where to ask about a job that `host` took: the front door when the hosts share a
    store; else that host itself, for its queue is its own file (gone, if it died)."""
    if options.redis:
        return HOST, front
    if host == doomed.name:
        return None
    home = next(candidate for candidate in network.hosts if candidate.name == host)
    return home.address, home.port


def store_line(options: Options, network: Network) -> str:
    """Where the hosts keep their state, and how they reach it."""
    memory = "; sessions in each copy's memory (SESSION_STORE=memory)" \
        if options.store == "memory" else ""
    if not options.redis:
        return f"a SQLite file per host, as two machines would have{memory}"
    return (f"Redis at {'{}:{}'.format(*redis_address(options.redis))} (DATABASE_URL), "
            f"reached by the hosts {network.how_redis_is_reached()}{memory}")


def events_line(findings: Findings, hosts: list[Host], router_log: Path) -> str:
    """What was struck when, and what router.py made of it (from its log)."""
    said = router_log.read_text(errors="replace").splitlines()
    events = []
    for incident in findings.incidents:
        host = next(host for host in hosts if incident.name == f"host {host.name}")
        upstream = f"router: {host.address}:{host.port} "
        turns = " ".join("out" if "out of the rotation" in line else "in" for line in said
                         if upstream in line and "the rotation" in line)  # "in out in"
        seen = ("took it out of the rotation" if turns.endswith("out")
                else "took it out of the rotation and back in" if "out in" in turns
                else "did not notice")
        events.append(f"at {incident.began - findings.began:.1f} s, {incident.name} "
                      f"{incident.what}, and router.py {seen}")
    return "; ".join(events)


# --- The report ----------------------------------------------------------------------------

def counted(number: int, noun: str) -> str:
    """`1 session`, `8 sessions`, `2 jobs run twice at once`: the first word takes the s."""
    first, _, rest = noun.partition(" ")
    return f"{number:,} {first}{'' if number == 1 else 's'} {rest}".rstrip()


def report(options: Options, users: list[User], findings: Findings, copies: str) -> int:
    """Print the table and the verdict; 0 when nothing was lost, else 1."""
    failures = [failure for user in users for failure in user.failures]
    unexplained = [failure for failure in failures
                   if not in_flight_on_a_strike(failure, findings.incidents)]
    sessions_lost = sum(lost for lost, _ in findings.checks)
    uploads_lost = sum(lost for _, lost in findings.checks)
    jobs = findings.jobs.values()
    undone = [job for job in jobs if job["state"] != "done"]
    twice = concurrent_runs(findings.lines)
    ticks = [(name, TICK.match(text)[1]) for name, text in findings.lines if TICK.match(text)]
    # A doubled tick, seen twice over: in the clocks' own lines, and in the queue itself.
    doubled = {key for counts in (Counter(key for _, key in ticks), findings.heartbeats)
               for key, count in counts.items() if count > 1}
    struck = "a copy or host as it was struck" if options.hosts else "a copy as it was killed"
    print(f"requests   sent {sum(user.sent for user in users):,}, failed {len(failures):,}: "
          f"{len(failures) - len(unexplained):,} in flight on {struck}, "
          f"{len(unexplained):,} unexplained")
    print(f"sessions   {len(users):,} users, {sessions_lost:,} lost")
    print(f"uploads    {sum(len(user.uploads) for user in users):,} saved, {uploads_lost:,} lost")
    print(f"jobs       {len(jobs):,} enqueued, {len(jobs) - len(undone):,} done, "
          f"{len(undone):,} lost, {twice:,} run twice at once, "
          f"{sum(job['attempts'] > 1 for job in jobs):,} rerun after a kill")
    print(f"ticks      {len({key for _, key in ticks}):,} enqueued by "
          f"{len({name for name, _ in ticks})} clocks, {len(doubled):,} doubled")
    print(f"copies     {copies}")
    losses = [counted(number, noun) for number, noun in [
        (sessions_lost, "session"), (uploads_lost, "upload"), (len(undone), "job"),
        (twice, "job run twice at once"), (len(doubled), "tick doubled"),
        (len(unexplained), "failure unexplained")] if number]
    verdict = "LOST: " + ", ".join(losses) + lesson(options) if losses else "nothing lost"
    print(f"verdict    {verdict}")
    for failure in unexplained[:5]:
        print(f"note: unexplained: {failure.what} failed with {failure.error} "
              f"({failure.ended - failure.began:.2f} s in flight)")
    for job in undone[:5]:  # asked without its owner's cookie, a job shows no error
        why = f": {job['error']}" if job.get("error") else ""
        print(f"note: job {job['id']} is {job['state']}{why}")
    return 1 if losses else 0


def lesson(options: Options) -> str:
    """What a loss teaches, when the store is what lost it."""
    if options.store == "memory":
        return "; with SESSION_STORE=memory each copy keeps its own sessions (Factor VI)"
    if options.hosts and not options.redis:
        return ("; a SQLite file is one machine's: each host kept its own sessions, uploads, "
                "jobs and ticks (Factor VI across machines: DATABASE_URL=redis://...)")
    return ""


def read_options(argv: list[str]) -> Options:
    parser = OneLineParser(prog="drill.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long the users shop under chaos (30)")
    parser.add_argument("--users", type=int, default=8, help="simulated users (8)")
    parser.add_argument("--lease", type=float, default=JOB_LEASE,
                        help=f"the workers' job lease in seconds ({JOB_LEASE}): how long a "
                             f"killed worker's job waits")
    parser.add_argument("--hosts", type=int, default=1,
                        help="1: one launcher, copies killed (1); 2: two hosts behind "
                             "router.py, one cut off a while, then the other killed whole")
    parser.add_argument("--names", default="a,b",
                        help="with --hosts 2, the hosts' names, two letters (a,b): host c "
                             "is the namespace tfp-c on 10.213.3.0/24; two drills at once "
                             "need names of their own")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL") or os.environ.get("REDIS_URL") or ""
    redis = url if url.startswith(("redis://", "rediss://")) else None
    store = os.environ.get("SESSION_STORE", "redis" if redis else "sqlite")
    names = tuple(args.names.split(","))
    if not 1 <= args.seconds <= 3600:
        parser.error(f"--seconds must be from 1 to 3600, got {args.seconds:g}")
    if not 1 <= args.users <= 64:
        parser.error(f"--users must be from 1 to 64, got {args.users}")
    if not 1 <= args.lease <= 3600:  # JOB_LEASE's own bounds
        parser.error(f"--lease must be from 1 to 3600, got {args.lease:g}")
    if url and not redis and not url.startswith("sqlite:///"):
        parser.error("DATABASE_URL must name a Redis (redis://...) or SQLite (sqlite:///..., "
                     "for which the drill makes files of its own)")
    if store not in ("memory", "redis" if redis else "sqlite"):
        parser.error(f"SESSION_STORE must be 'memory' or the kind of store DATABASE_URL "
                     f"names ({'redis' if redis else 'sqlite'}), got {store!r}")
    if args.hosts not in (1, 2):
        parser.error(f"--hosts must be 1 or 2, got {args.hosts}")
    if args.hosts == 2:
        check_hosts(parser, names, args.seconds, args.lease)
    return Options(args.seconds, args.users, store, args.lease,
                   names if args.hosts == 2 else (), redis)


def check_hosts(parser: OneLineParser, names: tuple[str, ...], seconds: float,
                lease: float) -> None:
    if len(names) != 2 or len(set(names)) != 2 or not all(
            len(name) == 1 and "a" <= name <= "z" for name in names):
        parser.error(f"--names must be two different letters from a to z, like c,d, "
                     f"got {','.join(names)!r}")
    if cut_seconds(lease) < SHORTEST_CUT:
        parser.error(f"--hosts 2 needs --lease of at least {4 * SHORTEST_CUT:g}, got "
                     f"{lease:g}: a host is cut off for a quarter of a lease, and router.py "
                     f"may not notice a cut shorter than {SHORTEST_CUT:g} s")
    if seconds < shortest_run(lease):
        parser.error(f"--hosts 2 with --lease {lease:g} needs --seconds of at least "
                     f"{shortest_run(lease):g}, got {seconds:g}: the cut, the kill, and "
                     f"{ALONE:g} s on the last host standing")


def banner(options: Options) -> str:
    store = options.store + (" (Redis at {}:{})".format(*redis_address(options.redis))
                             if options.redis else "")
    if options.hosts:
        formation = " ".join(f"{kind}={count}" for kind, count in HOST_FORMATION.items())
        shape = f"{len(options.hosts)} hosts of launcher.py {formation}, behind router.py"
    else:
        shape = "launcher.py " + " ".join(f"{kind}={count}" for kind, count in FORMATION.items())
    return (f"drill: {options.seconds:g} s, {shape}, store {store}, {options.users} users, "
            f"{options.lease:g} s leases")


def main(argv: list[str] | None = None) -> int:
    options = read_options(sys.argv[1:] if argv is None else argv)
    # SIGTERM ends the drill as Ctrl-C does: through every `finally`, leaving nothing running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix="drill-") as tmp:
            run = run_hosts_drill if options.hosts else run_drill
            return run(options, Path(tmp))
    except (StartError, HostsTaken) as error:
        print(f"drill.py: {error}", file=sys.stderr)
        return 2 if isinstance(error, HostsTaken) else 1
    except KeyboardInterrupt:
        print("drill.py: interrupted; what it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
