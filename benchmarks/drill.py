"""The chaos drill: users shop while copies are killed; then count what was lost (VI, VIII).

Factor VIII lets the platform start, stop and kill copies whenever it likes; Factor VI makes
that safe: a process keeps nothing it cannot lose. The terrible day the drill prevents: a
deploy or a dying host logs users out, drops items from carts, loses an upload, runs a job
twice or never. The tests check each promise alone; the drill checks them all at once,
under load, with real SIGKILLs.

It starts `launcher.py web=4 worker=3 clock=2` (the repo's Procfile, a SQLite file of its
own, 5 s job leases, a heartbeat tick every second) and `--users` simulated browsers
(`shoppers.py`) that log in, fill their carts, upload files and enqueue short jobs. Every
two seconds the drill SIGKILLs a random web copy and a random worker; halfway, it types
`restart web`. Then it waits for the jobs it was promised, and checks what the users
would find:

* sessions: still logged in; the cart holds each item whose POST was answered, in order,
  once. An item whose POST failed may be there or not: its copy may have died just after
  the write committed.
* uploads and jobs: each answered upload returns the same bytes; each answered job is done,
  and none ran on two workers at once (replayed from the launcher's log). A rerun after a
  kill is at-least-once delivery working: counted, not lost. No clock tick was doubled.
* requests: one in flight on a copy as it was SIGKILLed may fail; any other is unexplained.

Run `python benchmarks/drill.py` (30 s, 8 users, 5 s leases; `--seconds N`, `--users N`,
`--lease N`): exit code 0 when nothing was lost, 1 otherwise, 2 for bad arguments. Then
watch Factor VI fail with `SESSION_STORE=memory python benchmarks/drill.py --seconds 5`:
each copy keeps its own sessions and uploads, and the next request lands on one that
never heard of the user. Jobs live in SQLite whatever the store.
"""
from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

from bench import (REPO, STARTED, OneLineParser, StartError, app_env, end_leftover_copies,
                   free_port, is_ours, running, started_copies, wait_until_served)
from shoppers import Failure, User, browse, check_user, fetch_json

FORMATION = {"web": 4, "worker": 3, "clock": 2}
JOB_LEASE = 5            # seconds, unless --lease: a killed worker's job is back this soon
CHAOS_EVERY = 2.0        # seconds between two rounds of kills
KILL_MARGIN = 0.5        # a killed copy's socket outlives it a moment: failures this soon, too
SETTLE = 10              # seconds beyond a lease, after the chaos, for the promised jobs
LOG_LINE = re.compile(r"^\S+ (\S+) +\| (.*)$")  # `HH:MM:SS web.3   | text`
JOB_STARTED = re.compile(r"job (\d+) \S+ started \(attempt")
JOB_ENDED = re.compile(r"job (\d+) (\S+ done in|\S+ failed \(attempt|\S+ dead after|lease lost)")
COPY_ENDED = re.compile(r"(\S+) (killed by|exited with code)")
TICK = re.compile(r"enqueued (heartbeat@\S+) as job \d+")


@dataclass(frozen=True)
class Options:
    seconds: float
    users: int
    store: str
    lease: float


@dataclass(frozen=True)
class Kill:
    name: str    # "web.3"
    at: float    # time.monotonic()


# --- The chaos ---------------------------------------------------------------------------

def kill_one(kind: str, log: Path, workdir: Path) -> list[Kill]:
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
    return [Kill(name, at)]


def shop_under_chaos(users: list[User], port: int, launcher: subprocess.Popen, log: Path,
                     workdir: Path, seconds: float) -> list[Kill]:
    """The users shop in threads for `seconds` while this thread plays the chaos: every
    CHAOS_EVERY seconds a web copy and a worker die; halfway, a rolling restart."""
    stop, kills, began = threading.Event(), [], time.monotonic()
    restart_at, next_kills, deadline = began + seconds / 2, began + CHAOS_EVERY, began + seconds
    shoppers = [threading.Thread(target=browse, args=(user, port, deadline, stop), daemon=True)
                for user in users]
    for thread in shoppers:
        thread.start()
    try:
        while True:
            time.sleep(max(0.0, min(restart_at, next_kills, deadline) - time.monotonic()))
            if time.monotonic() >= deadline:
                break
            if time.monotonic() >= restart_at:
                # Our only command: with its stdin closed, the launcher runs on without one.
                launcher.stdin.write(b"restart web\n")
                launcher.stdin.close()
                restart_at = float("inf")
            if time.monotonic() >= next_kills:
                for kind in ("web", "worker"):
                    kills += kill_one(kind, log, workdir)
                next_kills += CHAOS_EVERY
        for thread in shoppers:
            thread.join()
    finally:
        stop.set()  # after a Ctrl-C too: the users stop at once
    return kills


# --- Afterwards: the promised jobs ---------------------------------------------------------

def settle(port: int, job_ids: list[int], log: Path, workdir: Path,
           lease: float) -> dict[int, dict]:
    """Poll each promised job until it is done or dead, and the rolling restart until it
    is done, for at most a lease and SETTLE seconds: a killed worker's job waits out its
    lease."""
    jobs: dict[int, dict] = {}
    deadline = time.monotonic() + lease + SETTLE
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if jobs.get(job_id, {}).get("state") not in ("done", "dead"):
                jobs[job_id] = fetch_json(port, f"/jobs/{job_id}")
        if (all(job["state"] in ("done", "dead") for job in jobs.values())
                and web_rolled_over(log, workdir)):
            break
        time.sleep(0.2)
    return jobs


def web_rolled_over(log: Path, workdir: Path) -> bool:
    """Has every web process that ran before `restart web` stopped? That is what a rolling
    restart promises, checked directly rather than taken from the launcher's word."""
    before, command, _ = log.read_text(errors="replace").partition("| rolling restart,")
    return bool(command) and not any(is_ours(int(pid), workdir) for name, pid
                                     in STARTED.findall(before) if name.startswith("web."))


# --- The launcher's log ------------------------------------------------------------------

def read_log(log: Path) -> list[tuple[str, str]]:
    """(copy name or "system", text) of every line, in the order the launcher printed them."""
    matches = (LOG_LINE.match(line) for line in log.read_text(errors="replace").splitlines())
    return [(match[1], match[2]) for match in matches if match]


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


def in_flight_on_a_kill(failure: Failure, kills: list[Kill]) -> bool:
    """Was a web copy SIGKILLed while the request was in flight (or as it began)? Never
    for a timeout: a killed copy's connections are reset at once, not left hanging."""
    return failure.error != "TimeoutError" and any(
        failure.began <= kill.at + KILL_MARGIN and failure.ended >= kill.at
        for kill in kills if kill.name.startswith("web."))


# --- The run and the report --------------------------------------------------------------

def counted(number: int, noun: str) -> str:
    """`1 session`, `8 sessions`, `2 jobs run twice at once`: the first word takes the s."""
    first, _, rest = noun.partition(" ")
    return f"{number:,} {first}{'' if number == 1 else 's'} {rest}".rstrip()


def run_drill(options: Options, workdir: Path) -> int:
    """Start the formation, shop under chaos, check, stop everything; the exit code."""
    log, front = workdir / "launcher.log", free_port()
    args = [sys.executable, str(REPO / "launcher.py"),
            *(f"{kind}={count}" for kind, count in FORMATION.items()), "--port", str(front),
            "--procfile", str(REPO / "Procfile"), "--grace", "5"]
    env = app_env(workdir, options.store, JOB_LEASE=options.lease, POLL_INTERVAL=0.1,
                  HEARTBEAT_EVERY=1)
    users = [User(f"user{number}") for number in range(1, options.users + 1)]
    try:
        with running(args, env, log, stdin=subprocess.PIPE) as launcher:
            wait_until_served(front, FORMATION["web"], launcher, log)
            kills = shop_under_chaos(users, front, launcher, log, workdir, options.seconds)
            jobs = settle(front, [job for user in users for job in user.jobs], log, workdir,
                          options.lease)
            rolled = web_rolled_over(log, workdir)  # now: once stopped, every process is gone
            checks = [check_user(user, front) for user in users]
            heartbeats = Counter(job["key"] for job in fetch_json(front, "/jobs?task=heartbeat"))
        lines = read_log(log)  # the launcher has stopped every copy: its log is complete
    finally:
        end_leftover_copies(log, workdir)
    return report(options, users, kills, jobs, checks, heartbeats, lines, rolled)


def report(options: Options, users: list[User], kills: list[Kill], jobs: dict[int, dict],
           checks: list[tuple[bool, int]], heartbeats: Counter, lines: list[tuple[str, str]],
           rolled: bool) -> int:
    """Print the table and the verdict; 0 when nothing was lost, else 1."""
    failures = [failure for user in users for failure in user.failures]
    unexplained = [failure for failure in failures if not in_flight_on_a_kill(failure, kills)]
    sessions_lost = sum(lost for lost, _ in checks)
    uploads_lost = sum(lost for _, lost in checks)
    undone = [job for job in jobs.values() if job["state"] != "done"]
    twice = concurrent_runs(lines)
    ticks = [(name, TICK.match(text)[1]) for name, text in lines if TICK.match(text)]
    # A doubled tick, seen twice over: in the clocks' own lines, and in the queue itself.
    doubled = {key for counts in (Counter(key for _, key in ticks), heartbeats)
               for key, count in counts.items() if count > 1}
    killed = Counter(kill.name.partition(".")[0] for kill in kills)
    started = sum(" started (pid=" in text for name, text in lines if name == "system")
    print(f"requests   sent {sum(user.sent for user in users):,}, failed {len(failures):,}: "
          f"{len(failures) - len(unexplained):,} in flight on a copy as it was killed, "
          f"{len(unexplained):,} unexplained")
    print(f"sessions   {len(users):,} users, {sessions_lost:,} lost")
    print(f"uploads    {sum(len(user.uploads) for user in users):,} saved, {uploads_lost:,} lost")
    print(f"jobs       {len(jobs):,} enqueued, {len(jobs) - len(undone):,} done, "
          f"{len(undone):,} lost, {twice:,} run twice at once, "
          f"{sum(job['attempts'] > 1 for job in jobs.values()):,} rerun after a kill")
    print(f"ticks      {len({key for _, key in ticks}):,} enqueued by "
          f"{len({name for name, _ in ticks})} clocks, {len(doubled):,} doubled")
    print(f"copies     {killed['web']:,} web + {killed['worker']:,} worker killed, "
          f"{started - sum(FORMATION.values()):,} restarted, "
          f"rolling restart of web {'done' if rolled else 'NOT done'}")
    losses = [counted(number, noun) for number, noun in [
        (sessions_lost, "session"), (uploads_lost, "upload"), (len(undone), "job"),
        (twice, "job run twice at once"), (len(doubled), "tick doubled"),
        (len(unexplained), "failure unexplained")] if number]
    lesson = ("; with SESSION_STORE=memory each copy keeps its own sessions (Factor VI)"
              if options.store == "memory" and (sessions_lost or uploads_lost) else "")
    print(f"verdict    {'LOST: ' + ', '.join(losses) + lesson if losses else 'nothing lost'}")
    for failure in unexplained[:5]:
        print(f"note: unexplained: {failure.what} failed with {failure.error} "
              f"({failure.ended - failure.began:.2f} s in flight)")
    for job in undone[:5]:
        print(f"note: job {job['id']} is {job['state']}: {job['error']}")
    return 1 if losses else 0


def read_options(argv: list[str]) -> Options:
    parser = OneLineParser(prog="drill.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long the users shop under chaos (30)")
    parser.add_argument("--users", type=int, default=8, help="simulated users (8)")
    parser.add_argument("--lease", type=float, default=JOB_LEASE,
                        help=f"the workers' job lease in seconds ({JOB_LEASE}): how long a "
                             f"killed worker's job waits")
    args = parser.parse_args(argv)
    store = os.environ.get("SESSION_STORE", "sqlite")
    if not 1 <= args.seconds <= 3600:
        parser.error(f"--seconds must be from 1 to 3600, got {args.seconds:g}")
    if not 1 <= args.users <= 64:
        parser.error(f"--users must be from 1 to 64, got {args.users}")
    if not 1 <= args.lease <= 3600:  # JOB_LEASE's own bounds
        parser.error(f"--lease must be from 1 to 3600, got {args.lease:g}")
    if store not in ("sqlite", "memory"):
        parser.error(f"SESSION_STORE must be 'sqlite' or 'memory', got {store!r}")
    return Options(args.seconds, args.users, store, args.lease)


def main(argv: list[str] | None = None) -> int:
    options = read_options(sys.argv[1:] if argv is None else argv)
    # SIGTERM ends the drill as Ctrl-C does: through every `finally`, leaving nothing running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    formation = " ".join(f"{kind}={count}" for kind, count in FORMATION.items())
    print(f"drill: {options.seconds:g} s, launcher.py {formation}, store {options.store}, "
          f"{options.users} users", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="drill-") as tmp:
            return run_drill(options, Path(tmp))
    except StartError as error:
        print(f"drill.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("drill.py: interrupted; what it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
