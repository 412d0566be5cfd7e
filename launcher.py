"""The platform: N copies of each process type behind one front port (Factor VIII).

Factor VIII: an app scales out, by running more copies of its processes, not up, by
growing one. The terrible day it prevents: traffic doubles, the only answer is a bigger
server, and when `web=4` is finally tried, users are logged out at random because each copy
kept sessions in its own memory. Here `web=4` is a number you type, from the first day.

What a platform (Heroku, foreman, Kubernetes) does for a stateless app, and so what
`python launcher.py web=4 worker=2` does: it runs each Procfile type as N children named
by `DYNO` (web.1, worker.2), each web copy on a `PORT` of its own, behind one front port
(`router.py`); prints all their output as one stream; restarts a copy that dies, with
backoff, and replaces a web copy that stops answering `GET /healthz`; scales and restarts
copies from stdin (`web=6`, `ps`, `restart`, `quit`); and on SIGINT or SIGTERM, or once
nobody reads its output (`launcher.py | head`), stops them: SIGTERM, grace, SIGKILL. It
never imports the app, never daemonizes, and runs on one machine. The app in turn binds
$PORT, answers `/healthz`, logs to stdout, keeps its state in a backing service, and exits
on SIGTERM, within STOP_TIMEOUT.

This file reads in that order: the `Supervisor` keeps the formation (start, scale,
restart, stop) in one loop on the main thread; that loop waits in one `selectors` call
for signals, the copies' output, their health checks and commands, and runs its timers
(restarts, health checks, grace periods) through its timeout. Then how a copy is
started, and last `main()`, which reads the command line, the Procfile and `.env` and
binds the front port, so that bad input ends with one line and exit code 2 before any
child starts.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from router import (CHECK_EVERY, CHECKS_FAILED, COPY_HOST, IDLE_TIMEOUT, UPSTREAM_TIMEOUT,
                    HealthCheck, LogPrinter, Router, bind_front_port, connection_limit,
                    port_is_free, split_lines)

MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0      # a copy up this long that crashes starts its backoff again
DRAIN_PAUSE = 0.1        # out of the rotation this long before SIGTERM: see stop_copy
OUTPUT_PAUSE = 0.01      # after printing the copies' output, let more gather: see run
HELP = "commands: TYPE=N (scale, e.g. web=3), ps, restart [TYPE], quit"


# --- The supervisor ------------------------------------------------------------------------

@dataclass(eq=False)
class Copy:
    """One copy of a process type (web.3): its process, its port, its place in the cycle."""
    process_type: str
    number: int
    port: int | None                  # web copies only; kept when it is restarted
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    state: str = "starting"           # starting, up, unresponsive, backoff, stopping
    backoff: float = 0.0              # the wait before the next restart after a crash
    restart_at: float | None = None
    term_at: float | None = None      # while stopping: when to send SIGTERM,
    kill_at: float | None = None      # ... and SIGKILL if it is still running then
    health: HealthCheck | None = None  # web copies, while running: is it up, still alive?

    @property
    def name(self) -> str:
        return f"{self.process_type}.{self.number}"


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
        self.restart_queue: list[str] = []  # rolling restart: the copies still to replace
        self.shutting_down = False
        self.printed_output = False  # in this round of events
        self.unfinished_command = b""
        self.selector = selectors.DefaultSelector()

    def run(self) -> int:
        self.catch_signals()
        for process_type, count in self.config.formation.items():
            self.printer.make_room(f"{process_type}.{count}")  # the longest name of each type
        formation = ", ".join(f"{name}={count}" for name, count in self.config.formation.items())
        self.printer.system(f"front port http://{self.config.host}:{self.config.port}, "
                            f"formation {formation}")
        self.listen_to_stdin()
        for process_type, count in self.config.formation.items():
            self.scale(process_type, count)
        while not (self.shutting_down and not self.retiring):
            self.printed_output = False
            for key, _ in self.selector.select(self.seconds_to_next_timer()):
                key.data()
            self.run_timers()
            if self.printer.reader_gone:
                self.shut_down()  # `launcher.py | head`: nobody can read the logs any more
            if self.printed_output:
                # Under load, each request's log line alone would wake this loop, and each
                # wake-up takes the GIL from the router's thread: measured, 30-60 us of the
                # launcher's CPU per request. Pausing a moment lets the next wake-up bring
                # the lines of dozens of requests (a copy's pipe holds them meanwhile), at
                # the price of a log line printed up to OUTPUT_PAUSE later.
                time.sleep(OUTPUT_PAUSE)
        self.printer.system("every copy has stopped")
        return 1 if self.printer.reader_gone else 0

    # The formation: start, scale, restart, stop.

    def everyone(self) -> list[Copy]:
        return self.copies + self.retiring

    def scale(self, process_type: str, count: int) -> None:
        """Keep the `count` lowest-numbered copies of a type, adding or stopping the rest."""
        current = sorted((c for c in self.copies if c.process_type == process_type),
                         key=lambda c: c.number)
        for copy in current[count:]:
            self.stop_copy(copy)
        numbers = {copy.number for copy in current[:count]}
        number = 1
        while len(numbers) < count:
            if number not in numbers:
                numbers.add(number)
                port = self.free_port() if process_type == "web" else None
                self.copies.append(Copy(process_type, number, port))
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
        if self.config.grace > 0:  # the copy's own deadline to stop (Heroku: 25 s of 30),
            # so it hands back its work before our SIGKILL, or alone if we were SIGKILLed
            env.setdefault("STOP_TIMEOUT", f"{self.config.grace * 5 / 6:g}")
        if copy.port is not None:
            env.update(PORT=str(copy.port), HOST=COPY_HOST)
        try:
            copy.popen = start_child(self.config.commands[copy.process_type], env,
                                     self.config.workdir)
        except OSError as error:  # no descriptor or process left: the machine's trouble
            self.printer.system(f"cannot start {copy.name}: {error}")
            copy.started_at = time.monotonic()
            self.restart_with_backoff(copy)  # ... not a reason to stop the others
            return
        os.set_blocking(copy.popen.stdout.fileno(), False)
        self.selector.register(copy.popen.stdout, selectors.EVENT_READ,
                               partial(self.read_output, copy.name, copy.popen.stdout))
        self.printer.make_room(copy.name)
        copy.started_at = time.monotonic()
        copy.state = "starting" if copy.port is not None else "up"
        if copy.port is not None:
            copy.health = HealthCheck(copy.port, self.config.check_every, self.selector,
                                      partial(self.on_up, copy), partial(self.on_dead, copy))
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
        self.stop_checking(copy)
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
        self.stop_checking(copy)
        copy.state = "stopping"
        self.publish_rotation()
        copy.term_at, copy.kill_at = now + DRAIN_PAUSE, kill_at

    def rolling_restart(self, types: list[str]) -> None:
        if types and types[0] not in self.config.commands:
            raise UsageError(f"process type {types[0]!r} is not in the Procfile")
        names = [copy.name for copy in self.in_order(self.copies)
                 if not types or copy.process_type == types[0]]
        self.printer.system(f"rolling restart, one copy at a time: {', '.join(names) or 'none'}")
        self.restart_queue += names
        self.continue_rolling_restart()

    def continue_rolling_restart(self) -> None:
        """Replace the copies in `restart_queue` one at a time: the new copy starts first,
        and the old one stops only once the new one is up, so even a single web copy never
        leaves the front door empty. Called again by the timers until the queue is empty."""
        while self.restart_queue:
            if self.handover is None:
                self.handover = self.start_replacement(self.restart_queue[0])
            if self.handover is not None:
                old, new = self.handover
                if new.state != "up" and new in self.copies:
                    return  # not up yet: the old copy keeps serving
                self.handover = None
                self.stop_copy(old)
            self.restart_queue.pop(0)
            if not self.restart_queue:
                self.printer.system("rolling restart done: the old copies are stopping")

    def start_replacement(self, name: str) -> tuple[Copy, Copy] | None:
        """Start a new copy in the place of `name`; (old, new), or None when `name` is not
        up (crashed, restarting): it gets the new code when it starts again anyway."""
        old = next((c for c in self.copies if c.name == name and c.state == "up"), None)
        if old is None:
            return None
        new = Copy(old.process_type, old.number, self.free_port() if old.port else None)
        self.copies[self.copies.index(old)] = new
        self.retiring.append(old)  # still up, and in the rotation, until the new one is
        self.start_process(new)
        return old, new

    def shut_down(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.printer.system(f"stopping every copy: SIGTERM, then SIGKILL after "
                            f"{self.config.grace:g}s")
        self.restart_queue.clear()
        self.handover = None
        kill_at = time.monotonic() + self.config.grace  # the deadline runs from the signal
        for copy in self.everyone():
            self.stop_copy(copy, kill_at)

    # Timers, the rotation and the table.

    def seconds_to_next_timer(self) -> float | None:
        times = [when for copy in self.everyone()
                 for when in (copy.restart_at, copy.term_at, copy.kill_at,
                              copy.health and copy.health.due) if when is not None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def run_timers(self) -> None:
        now = time.monotonic()
        for copy in self.everyone():
            if copy.health is not None:
                copy.health.run_timer(now)
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

    # Health: a web copy is up once it answers `GET /healthz`, and dead once it stops.

    def on_up(self, copy: Copy) -> None:
        copy.state = "up"
        self.printer.system(f"{copy.name} is up on port {copy.port}")
        self.publish_rotation()

    def on_dead(self, copy: Copy) -> None:
        """Alive but not answering is dead: a frozen or deadlocked copy would hold every
        request the router gives it. A stopped process never acts on SIGTERM, so SIGKILL;
        reap() then restarts it, as after a crash."""
        self.printer.system(f"{copy.name} failed {CHECKS_FAILED} health checks in a row: "
                            f"replacing it (SIGKILL: a frozen copy cannot act on SIGTERM)")
        copy.state = "unresponsive"
        self.publish_rotation()
        self.signal_group(copy, signal.SIGKILL)

    def stop_checking(self, copy: Copy) -> None:
        if copy.health is not None:
            copy.health.stop()
            copy.health = None

    def signal_group(self, copy: Copy, signum: signal.Signals) -> None:
        with suppress(ProcessLookupError, PermissionError):  # gone already: reap() will tell
            os.killpg(copy.popen.pid, signum)

    def publish_rotation(self) -> None:
        """Hand the router the ports of the web copies that are up, in one atomic store."""
        live = [c for c in self.in_order(self.everyone()) if c.port and c.state == "up"]
        self.router.rotation = tuple(copy.port for copy in live)

    def in_order(self, copies: list[Copy]) -> list[Copy]:
        types = list(self.config.commands)
        return sorted(copies, key=lambda c: (types.index(c.process_type), c.number, c.started_at))

    def print_table(self) -> None:
        now = time.monotonic()
        self.printer.system(f"{'name':<9} {'pid':<7} {'port':<5} {'uptime':<7} restarts  state")
        for copy in self.in_order(self.everyone()):
            pid, uptime = ((copy.popen.pid, f"{now - copy.started_at:.0f}s") if copy.popen
                           else ("-", "-"))
            self.printer.system(f"{copy.name:<9} {pid:<7} {copy.port or '-':<5} {uptime:<7} "
                                f"{copy.restarts:<9} {copy.state}")

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
        if count:
            self.printed_output = True
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
        lines, unfinished = split_lines(self.unfinished_command + chunk)
        self.unfinished_command = unfinished[:4096]  # no command is longer: memory stays bounded
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
                for process_type, count in parse_scale(words, self.config.commands).items():
                    self.scale(process_type, count)
            else:
                self.printer.system(f"unknown command {' '.join(words)!r}; {HELP}")
        except UsageError as error:
            self.printer.system(str(error))


# --- Starting a copy ---------------------------------------------------------------------

# When the launcher dies, even by SIGKILL, its copies must not live on holding their ports
# (foreman's oldest complaint). On Linux a child can ask for SIGTERM when its parent dies
# (prctl PR_SET_PDEATHSIG), between fork and exec. preexec_fn is unsafe in a program with
# threads (the router is one), so the hook makes that one system call and nothing that
# could wait on a lock. The signal fires when the *thread* that forked the child exits, so
# only the main thread starts copies; a launcher that died before prctl ran already gave
# the child a new parent, so it exits at once. macOS has no equivalent: there a copy
# outlives a SIGKILLed launcher until its output pipe breaks.
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


def signal_name(signum: int) -> str:
    """SIGKILL, or `signal 40` for one Python has no name for (a real-time signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- Command line, Procfile and .env ------------------------------------------------------

PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
SCALE_ITEM = re.compile(r"^([A-Za-z0-9_-]+)=(.*)$")
MAX_COPIES = 100         # of one type: this is one machine
LAST_FRONT_PORT = 65000  # the copies take the ports after the front port
MAX_SECONDS = 3600       # for every duration: more is a typo (and select() overflows at 24 days)


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
    upstream_timeout: float
    check_every: float


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
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds a stopping copy gets before SIGKILL (default: 30, as "
                             "Heroku; the copies get 5/6 of it as STOP_TIMEOUT, unless set)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="seconds the router keeps a silent connection (default: 60)")
    parser.add_argument("--upstream-timeout", type=float, default=UPSTREAM_TIMEOUT,
                        help="seconds a copy has to begin its answer, else 504 (default: 30)")
    parser.add_argument("--check-every", type=float, default=CHECK_EVERY,
                        help=f"seconds between GET /healthz to each web copy, and to answer; "
                             f"{CHECKS_FAILED} failed in a row replace it (default: 1)")
    args = parser.parse_args(argv)
    for option, least in (("grace", 0), ("idle_timeout", 0.1), ("upstream_timeout", 0.1),
                          ("check_every", 0.1)):
        value = getattr(args, option)
        if not least <= value <= MAX_SECONDS:  # NaN fails every comparison: it lands here too
            raise UsageError(f"--{option.replace('_', '-')} must be from {least:g} to "
                             f"{MAX_SECONDS} seconds, got {value:.10g}")
    commands = read_procfile(args.procfile)
    formation = dict.fromkeys(commands, 1)
    formation.update(parse_scale(args.scale, commands))
    port = args.port or os.environ.get("PORT", "5000")
    if not (re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) <= LAST_FRONT_PORT):
        raise UsageError(f"the front port must be a number from 1 to {LAST_FRONT_PORT}, "
                         f"got {port!r}")
    return Config(commands, formation, read_dotenv(args.procfile.parent / ".env"),
                  args.procfile.resolve().parent, os.environ.get("HOST", "127.0.0.1"),
                  int(port), args.grace, args.idle_timeout, args.upstream_timeout,
                  args.check_every)


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
        if not (re.fullmatch(r"[0-9]{1,3}", count) and int(count) <= MAX_COPIES):
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


def main(argv: list[str] | None = None) -> int:
    try:
        config = read_config(sys.argv[1:] if argv is None else argv)
        listener = bind_front_port(config.host, config.port)
    except (UsageError, OSError) as error:  # OSError: the front port, said in one line
        print(f"launcher.py: error: {error}", file=sys.stderr)
        return 2
    printer = LogPrinter()
    router = Router(listener, printer.system, config.idle_timeout, config.upstream_timeout,
                    connection_limit())
    router.start()
    return Supervisor(config, router, printer).run()


if __name__ == "__main__":
    sys.exit(main())
