"""The platform: N copies of each process type behind one front port (Factor VIII).

Factor VIII: an app scales out, by running more copies of its processes, not up, by
growing one. The terrible day it prevents: traffic doubles, the only answer is a bigger
server, and when `web=4` is finally tried, users are logged out at random because each copy
kept sessions in its own memory. Here `web=4` is a number you type, from the first day.

What a platform (Heroku, foreman, Kubernetes) does for a stateless app, and so what
`python launcher.py web=4 worker=2` does: it runs each Procfile type as N children named
by `DYNO` (web.1, worker.2; a.web.1 with `--name a`), each web copy on a `PORT` of its
own, behind one front port (`router.py`); prints all their output as one stream; restarts
a copy that dies, with backoff, and replaces a web copy that stops answering
`GET /healthz` (or has not begun to by `--start-timeout`); takes commands at its prompt
(`web=6`, `ps`, `restart`, `kill web.2`, `freeze web.2`, `chaos 2`, `quit`); and on
SIGINT or SIGTERM, or once nobody reads its output (`launcher.py | head`), stops them:
SIGTERM, grace, SIGKILL. It never imports the app, never daemonizes, and runs on one
machine. The app in turn binds $PORT, answers `/healthz`, logs to stdout, keeps its state
in a backing service, and exits on SIGTERM, within STOP_TIMEOUT.

The rules (what a crash, a missed health check, `web=2` or `restart` lead to) are not
here: they are a table of states and events in `formation.py`, tested without a process.
This file is the shell around them, and reads in that order: the `Supervisor` turns
signals, exits, output and health checks into events for the formation and carries out
the actions it returns (start a child, signal one, print a line), in one `selectors` loop
on the main thread; the `Prompt` turns typed commands into the formation's methods; then
how a copy is started, and last `main()`, which reads the command line, the Procfile and
`.env` and binds the front port, so that bad input ends with one line and exit code 2
before any child starts.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from formation import (SERVING, START_TIMEOUT, Action, Answered, Copy, Event, Exited,
                       Formation, Missed, Say, Signal, Spawn, Spawned, SpawnFailed, State)
from logs import LogPrinter, split_lines
from health import HealthCheck, seconds_until
from router import (COPY_HOST, MAX_SECONDS, ROUTING_MINIMUMS, OneLineParser, Router,
                    UsageError, add_routing_options, bind_front_port, check_seconds,
                    connection_limit, port_number, wake_on_signals)

OUTPUT_PAUSE = 0.01        # after printing the copies' output, let more gather: see run
COPY_SHARE_OF_GRACE = 5 / 6  # a copy's own STOP_TIMEOUT: Heroku gives 25 s of its 30
MAX_COMMAND = 4096         # bytes: a longer line at the prompt is refused, memory bounded
MIN_CHAOS_EVERY = 0.1      # seconds between chaos's kills, at the least
HELP = ("commands: TYPE=N (scale, e.g. web=3), ps, restart [TYPE], kill NAME, freeze NAME, "
        "chaos [TYPE] SECONDS, chaos off, quit")


# --- The supervisor: the shell around the formation ----------------------------------------

class Supervisor:
    """The arbiter's shell: it forks, signals, reads pipes and sockets, keeps the time, and
    decides nothing. Every decision is the formation's (`formation.py`): the supervisor
    turns what happens into events for it, and carries out the actions it returns.

    One loop on the main thread waits in one `selectors` call for signals, the copies'
    output, their health checks and commands; the timers run through the wait's timeout.
    What happens becomes an event in `events`, one queue, which the loop hands to the
    formation in order: one place where decisions are made (honcho's manager has the same
    shape). Signal handlers do nothing: `signal.set_wakeup_fd` writes each signal's number
    to a pipe that wakes the loop, and the loop acts on it (logging inside a handler
    deadlocked gunicorn: #3198).
    """

    def __init__(self, config: LauncherConfig, router: Router, printer: LogPrinter):
        self.config = config
        self.router = router
        self.printer = printer
        self.formation = Formation(list(config.commands), config.grace, config.prefix,
                                   config.start_timeout)
        self.events: deque[tuple[int, Event]] = deque()  # (a copy's serial, what happened)
        self.processes: dict[int, subprocess.Popen] = {}  # serial -> its running process
        self.checks: dict[int, tuple[int, HealthCheck]] = {}  # serial -> (pid, its check)
        self.selector = selectors.DefaultSelector()
        self.printed_output = False  # in this round of events

    def run(self) -> int:
        wake_on_signals(self.selector, (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD),
                        self.on_signal)
        for process_type, count in self.config.formation.items():
            self.printer.make_room(f"{self.config.prefix}{process_type}.{count}")
        formation = ", ".join(f"{name}={count}" for name, count in self.config.formation.items())
        self.printer.system(f"front port http://{self.config.host}:{self.config.port}, "
                            f"formation {formation}")
        Prompt(self).listen()
        for process_type, count in self.config.formation.items():
            self.carry_out(self.formation.scale(process_type, count, time.monotonic()))
        while not self.formation.stopped:
            self.printed_output = False
            for key, _ in self.selector.select(self.seconds_to_next_timer()):
                key.data()
            now = time.monotonic()
            for _, check in list(self.checks.values()):
                check.run_timer(now)
            self.carry_out(self.formation.run_timers(now))
            if self.printer.reader_gone and not self.formation.shutting_down:
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

    # Decisions in, actions out.

    def carry_out(self, actions: list[Action]) -> None:
        """Do what the formation decided, one action at a time, handing it what happened
        before the next (a spawned copy's port is known before the next copy needs one),
        until nothing is left; then bring the health checks and the rotation up to date."""
        pending = deque(actions)
        while pending or self.events:
            if not self.events:
                self.act(pending.popleft())
                continue
            serial, event = self.events.popleft()
            if serial in self.formation.copies:  # else: gone meanwhile, nothing to decide
                pending.extendleft(reversed(self.formation.handle(serial, event,
                                                                  time.monotonic())))
        self.update_health_checks()
        self.update_rotation()

    def update_rotation(self) -> None:
        # The router's thread reads it: a tuple stored whole is atomic, so no lock.
        self.router.rotation = tuple((COPY_HOST, port) for port in self.formation.rotation())

    def act(self, action: Action) -> None:
        # The rotation first: a copy the log says is up takes requests by then, and one
        # about to get its SIGTERM takes no more.
        self.update_rotation()
        if isinstance(action, Spawn):
            self.spawn(action.copy)
        elif isinstance(action, Signal):
            self.signal_group(action.copy, action.signum)
        else:
            self.printer.system(action.text)

    def spawn(self, copy: Copy) -> None:
        try:
            port = self.port_for(copy) if copy.is_web else None
            popen = start_child(self.config.commands[copy.process_type],
                                self.environment(copy.name, port), self.config.workdir)
        except OSError as error:  # no descriptor, process or port left: not the copy's fault
            self.events.append((copy.serial, SpawnFailed(str(error))))
            return
        self.processes[copy.serial] = popen
        os.set_blocking(popen.stdout.fileno(), False)
        self.selector.register(popen.stdout, selectors.EVENT_READ,
                               partial(self.read_output, copy.name, popen.stdout))
        self.printer.make_room(copy.name)
        self.events.append((copy.serial, Spawned(popen.pid, port)))

    def port_for(self, copy: Copy) -> int:
        """Its old port, if it is still free (a restart); else the first one after the front
        port that no copy holds and nothing listens on (an outgoing connection may take
        any port meanwhile, and then the copy would never start again)."""
        if copy.port is not None and port_is_free(copy.port):
            return copy.port
        held = {other.port for other in self.formation.copies.values()}
        port = self.config.port + 1
        while port in held or not port_is_free(port):
            port += 1
            if port > LAST_PORT:
                raise OSError(f"no free port left after the front port {self.config.port}")
        return port

    def environment(self, name: str, port: int | None) -> dict[str, str]:
        env = {**self.config.dotenv, **os.environ}  # the launcher's own environment wins
        env.pop("PORT", None)                      # only web copies get a PORT, as on Heroku
        env.update(DYNO=name, PYTHONUNBUFFERED="1",
                   # the Procfile's `python` is the Python running the launcher
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        if self.config.grace > 0:  # the copy's own deadline to stop (Heroku: 25 s of 30),
            # so it hands back its work before our SIGKILL, or alone if we were SIGKILLed
            env.setdefault("STOP_TIMEOUT", f"{self.config.grace * COPY_SHARE_OF_GRACE:g}")
        if port is not None:
            env.update(PORT=str(port), HOST=COPY_HOST)
        return env

    def signal_group(self, copy: Copy, signum: int) -> None:
        with suppress(ProcessLookupError, PermissionError):  # gone already: reap() will tell
            os.killpg(copy.pid, signum)

    def update_health_checks(self) -> None:
        """A web copy is asked `GET /healthz` while its process runs and the formation may
        still want it: starting (is it up yet?), up or outgoing (is it still alive?)."""
        wanted = {copy.serial: copy for copy in self.formation.copies.values()
                  if copy.is_web and copy.pid is not None
                  and copy.state in (State.STARTING, *SERVING)}
        for serial, (pid, check) in list(self.checks.items()):
            if serial not in wanted or wanted[serial].pid != pid:
                check.stop()
                del self.checks[serial]
        for serial, copy in wanted.items():
            if serial not in self.checks:
                report = partial(self.report_health, serial)
                check = HealthCheck((COPY_HOST, copy.port), self.config.check_every,
                                    self.selector, report)
                self.checks[serial] = (copy.pid, check)

    def report_health(self, serial: int, healthy: bool) -> None:
        self.events.append((serial, Answered() if healthy else Missed()))
        self.carry_out([])

    def shut_down(self) -> None:
        if not self.formation.shutting_down:
            self.carry_out(self.formation.shut_down(time.monotonic()))

    def seconds_to_next_timer(self) -> float | None:
        times = [check.due for _, check in self.checks.values() if check.due is not None]
        formation_timer = self.formation.next_timer()
        if formation_timer is not None:
            times.append(formation_timer)
        return seconds_until(times)

    # Events: signals, exits, output, commands.

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum == signal.SIGINT and self.formation.shutting_down:
            self.carry_out(self.formation.kill_now(time.monotonic()))
        else:
            self.shut_down()

    def reap(self) -> None:
        for serial, popen in list(self.processes.items()):
            if popen.poll() is not None:
                name = self.formation.copies[serial].name
                while self.read_output(name, popen.stdout):
                    pass  # its last lines come before the news of its end
                self.close_output(name, popen.stdout)
                del self.processes[serial]
                self.events.append((serial, Exited(popen.returncode)))
        self.carry_out([])

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


class Prompt:
    """The launcher's prompt: commands typed on stdin, turned into the formation's methods.

    `web=3` scales (Heroku's `ps:scale`), `restart [TYPE]` replaces copies one at a time,
    `kill NAME` and `freeze NAME` fail a copy on purpose (SIGKILL; SIGSTOP), `chaos [TYPE]
    SECONDS` kills a random copy every SECONDS until `chaos off`, `ps` prints the table,
    `quit` stops everything. A mistake is one line, and nothing happens.
    """

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.formation = supervisor.formation
        self.unfinished = b""

    def listen(self) -> None:
        """Take commands from stdin if there is one; none (closed, /dev/null, CI) is fine."""
        try:
            stdin = sys.stdin.fileno()
            if os.isatty(stdin) and os.tcgetpgrp(stdin) != os.getpgrp():
                return  # started in the background with `&`: reading would stop us (SIGTTIN)
            self.supervisor.selector.register(stdin, selectors.EVENT_READ,
                                              partial(self.read, stdin))
        except (AttributeError, ValueError, OSError):
            return  # no stdin, or one that cannot be waited on (/dev/null under epoll)
        if os.isatty(stdin):
            self.supervisor.printer.system(HELP)

    def read(self, stdin: int) -> None:
        try:
            chunk = os.read(stdin, MAX_COMMAND)
        except OSError as error:  # the terminal went away (EIO): say so, run on without it
            self.supervisor.printer.system(f"cannot read commands any more "
                                           f"({error.strerror}); running on without them")
            chunk = b""
        if not chunk:
            self.supervisor.selector.unregister(stdin)  # end of input: run on, without
            return
        lines, unfinished = split_lines(self.unfinished + chunk)
        # Memory stays bounded: of a line still arriving, keep one byte more than a command
        # may have, so that once its end comes it is refused whole, not cut to its head and
        # tail: those could make a command nobody typed (`quit`, then 9,000 spaces).
        self.unfinished = unfinished[:MAX_COMMAND + 1]
        for line in lines:
            if len(line) > MAX_COMMAND:
                self.supervisor.printer.system(
                    f"refused a line of over {MAX_COMMAND} bytes, as no command is that long: "
                    f"{line[:40].decode(errors='replace')!r}...")
                continue
            words = line.decode(errors="replace").split()
            if words and not self.formation.shutting_down:
                try:
                    self.supervisor.carry_out(self.run(words, time.monotonic()))
                except UsageError as error:
                    self.supervisor.printer.system(str(error))

    def run(self, words: list[str], now: float) -> list[Action]:
        command, args = words[0], words[1:]
        if words == ["ps"]:
            return [Say(line) for line in self.table(now)]
        if words == ["quit"]:
            return self.formation.shut_down(now)
        if command == "restart" and len(args) <= 1:
            return self.formation.restart(self.known_type(args), now)
        if command in ("kill", "freeze") and len(args) == 1:
            strike = self.formation.kill if command == "kill" else self.formation.freeze
            return strike(args[0])
        if words == ["chaos", "off"]:
            return self.formation.stop_chaos()
        if command == "chaos" and len(args) in (1, 2):
            return self.formation.start_chaos(self.known_type(args[:-1]),
                                              chaos_every(args[-1]), now)
        if "=" in command:
            counts = parse_scale(words, self.supervisor.config.commands)
            return [action for process_type, count in counts.items()
                    for action in self.formation.scale(process_type, count, now)]
        return [Say(f"unknown command {' '.join(words)!r}; {HELP}")]

    def known_type(self, words: list[str]) -> str | None:
        if words and words[0] not in self.supervisor.config.commands:
            raise UsageError(f"process type {words[0]!r} is not in the Procfile")
        return words[0] if words else None

    def table(self, now: float) -> list[str]:
        width = max(9, *(len(copy.name) for copy in self.formation.copies.values()))
        lines = [f"{'name':<{width}} {'pid':<7} {'port':<5} {'uptime':<7} restarts  state"]
        for copy in self.formation.in_order():
            pid, uptime = ((copy.pid, f"{now - copy.started_at:.0f}s") if copy.pid
                           else ("-", "-"))
            lines.append(f"{copy.name:<{width}} {pid:<7} {copy.port or '-':<5} {uptime:<7} "
                         f"{copy.restarts:<9} {copy.state.value}")
        return lines


def chaos_every(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not MIN_CHAOS_EVERY <= seconds <= MAX_SECONDS:  # NaN fails every comparison too
        raise UsageError(f"chaos takes seconds from {MIN_CHAOS_EVERY:g} to {MAX_SECONDS}, "
                         f"got {text!r}")
    return seconds


# --- Starting a copy ---------------------------------------------------------------------

# When the launcher dies, even by SIGKILL, its copies must not live on holding their ports
# (foreman's oldest complaint). On Linux a child can ask for SIGTERM when its parent dies
# (prctl PR_SET_PDEATHSIG), between fork and exec. The signal fires when the *thread* that
# forked the child exits, so only the main thread starts copies; a launcher that died
# before prctl ran already gave the child a new parent, so it exits at once. macOS has no
# equivalent: there a copy outlives a SIGKILLed launcher until its output pipe breaks.
#
# A frozen copy cannot act on that SIGTERM: it stays pending while the process is stopped.
# POSIX has a rule for it. Each copy leads a process group of its own, so that Ctrl-C on the
# terminal reaches only the launcher (which then stops each copy in order) and os.killpg
# reaches whatever the copy forked too; that group stays in the launcher's session (no
# setsid). When the launcher dies, the group is orphaned, and the kernel sends an orphaned
# group that holds a stopped process SIGHUP, then SIGCONT: the frozen copy ends. In a
# session of its own, a copy's group would be orphaned from the start, and never be sent it.
#
# preexec_fn is unsafe in a program with threads (the router is one), so the hook makes
# those few system calls and nothing that could wait on a lock.
PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def in_own_group_dying_with(launcher_pid: int) -> Callable[[], None]:
    def in_child() -> None:
        os.setpgid(0, 0)
        if LIBC is not None:
            LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != launcher_pid:
                os._exit(1)

    return in_child


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
        # A process group of its own, in the launcher's session: see above.
        preexec_fn=in_own_group_dying_with(os.getpid()))


# --- Command line, Procfile and .env ------------------------------------------------------

PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
SCALE_ITEM = re.compile(r"^([A-Za-z0-9_-]+)=(.*)$")
HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,20}")  # no dot: a.web.1 must stay readable
MAX_COPIES = 100         # of one type: this is one machine
LAST_PORT = 65535
LAST_FRONT_PORT = 65000  # the copies take the ports after the front port


@dataclass(frozen=True)
class LauncherConfig:
    commands: dict[str, str]   # process type -> shell command, in Procfile order
    formation: dict[str, int]  # process type -> copies to run at start
    dotenv: dict[str, str]
    workdir: Path              # the Procfile's folder: where the commands run
    host: str
    port: int
    grace: float
    start_timeout: float       # a web copy not answering /healthz by then is replaced
    idle_timeout: float
    request_timeout: float
    upstream_timeout: float
    check_every: float
    sticky: bool               # each client to one copy, by its address: the trap, shown
    prefix: str                # `a.` for --name a: its copies are a.web.1, a.worker.1


def read_config(argv: list[str]) -> LauncherConfig:
    parser = OneLineParser(prog="launcher.py",
                           description="Run the Procfile's process types, N copies each.")
    parser.add_argument("scale", nargs="*", metavar="TYPE=N",
                        help="copies of a type, e.g. web=4 worker=2 (unnamed types: 1)")
    parser.add_argument("--procfile", type=Path, default=Path("Procfile"))
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds a stopping copy gets before SIGKILL (default: 30, as "
                             "Heroku; the copies get 5/6 of it as STOP_TIMEOUT, unless set)")
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT,
                        help="seconds a web copy has to answer GET /healthz after it starts, "
                             "else SIGKILL and a restart (default: 60, as Heroku)")
    add_routing_options(parser)
    parser.add_argument("--name", default="",
                        help="this host's name, before each copy's (a.web.1): for several "
                             "hosts behind one router")
    args = parser.parse_args(argv)
    if args.name and not HOST_NAME.fullmatch(args.name):
        raise UsageError(f"--name must be 1 to 20 letters, digits, '_' or '-', "
                         f"got {args.name!r}")
    check_seconds(args, {"grace": 0, "start_timeout": 0.1, **ROUTING_MINIMUMS})
    commands = read_procfile(args.procfile)
    formation = dict.fromkeys(commands, 1)
    formation.update(parse_scale(args.scale, commands))
    port = port_number(args.port or os.environ.get("PORT", "5000"), "the front port",
                       LAST_FRONT_PORT)
    return LauncherConfig(
        commands, formation, dotenv=read_dotenv(args.procfile.parent / ".env"),
        workdir=args.procfile.resolve().parent, host=os.environ.get("HOST", "127.0.0.1"),
        port=port, grace=args.grace, start_timeout=args.start_timeout,
        idle_timeout=args.idle_timeout, request_timeout=args.request_timeout,
        upstream_timeout=args.upstream_timeout, check_every=args.check_every,
        sticky=args.sticky, prefix=f"{args.name}." if args.name else "")


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
                    connection_limit(), config.sticky, config.request_timeout)
    router.start()
    return Supervisor(config, router, printer).run()


if __name__ == "__main__":
    sys.exit(main())
