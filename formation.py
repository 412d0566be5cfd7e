"""The formation's rules: each copy's state, and what every event does to it (Factor VIII).

Factor VIII scales an app by running more copies of its process types, so a platform must
keep those copies running: start them, notice when one dies or freezes, restart it without
spinning, replace them one at a time on a deploy, stop them within a deadline. The
terrible day this module prevents: those rules spread over callbacks, timers and flags, a
copy is restarted twice or never, a rolling restart ends with a copy missing, and nobody
can say what happens when a copy crashes while it is being stopped. Here a copy's state is
one value, and the rules are one table, read top to bottom:

    state          event                  next state          actions
    -------------  ---------------------  ------------------  --------------------------------
    starting       spawned                starting (web), up  (web: up once /healthz answers)
    starting       spawn failed           backoff             restart later
    starting       answered               up                  (joins the router's rotation)
    starting       timer: start deadline  unresponsive        SIGKILL (web: no answer in time)
    up, outgoing   answered               (same)              misses = 0
    up             missed, 3rd in a row   unresponsive        SIGKILL (frozen: deaf to SIGTERM)
    outgoing       missed, 3rd in a row   stopping            SIGKILL
    running        exited                 starting, backoff   spawn now, or after the backoff
    backoff        timer                  starting            spawn
    up             replace                outgoing            (serves until its successor is up)
    running        stop                   draining            (out of the rotation at once)
    backoff        stop                   gone
    draining       timer                  stopping            SIGTERM (SIGKILL if past deadline)
    stopping       timer                  stopping            SIGKILL
    draining, stopping  stop              (same)              the deadline can only come sooner
    outgoing, draining, stopping  exited  gone

"running" is starting, up or unresponsive: a process of the formation that should be
running. `decide(copy, event, now)` is that table as code: it returns the copy's next
state and the actions to take, and touches nothing else. `Formation` applies it to every
copy and adds the rules of the whole: scale a type to N, replace every copy one at a
time (a rolling restart), stop everything, and chaos (a random copy killed every few
seconds). It never forks, signals, reads a socket or a clock: `now` is passed in, and its
actions (`Spawn`, `Signal`, `Say`) are carried out by the supervisor in `launcher.py`.
Which web copies may take requests is `Formation.rotation()`, which the supervisor hands
to the router (`class Router` in router.py). So every rule is tested in milliseconds with
a made-up clock (tests/test_formation.py), and the few end-to-end tests prove only that
the shell carries the actions out.
"""
from __future__ import annotations

import itertools
import random
import signal
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable, Union

MAX_BACKOFF = 30.0    # seconds: a crash loop restarts at most this often
STABLE_AFTER = 10.0   # a copy up this long that crashes starts its backoff again
START_TIMEOUT = 60.0  # a web copy not answering /healthz by then is killed (Heroku's R10)
DRAIN_PAUSE = 0.1     # out of the rotation this long before SIGTERM: see `stop`
CHECKS_FAILED = 3     # health checks missed in a row that make a web copy dead


class State(Enum):
    STARTING = "starting"          # its process runs; a web copy has not answered yet
    UP = "up"                      # running; a web copy is in the router's rotation
    UNRESPONSIVE = "unresponsive"  # missed its checks or start deadline: SIGKILLed, awaited
    BACKOFF = "backoff"            # crashed; no process until its restart is due
    OUTGOING = "outgoing"          # up, serving until the copy replacing it is up
    DRAINING = "draining"          # out of the formation and the rotation; SIGTERM is due
    STOPPING = "stopping"          # SIGTERM sent; SIGKILL at its deadline
    GONE = "gone"                  # stopped: removed from the formation


RUNNING = (State.STARTING, State.UP, State.UNRESPONSIVE)
LEAVING = (State.OUTGOING, State.DRAINING, State.STOPPING)
SERVING = (State.UP, State.OUTGOING)  # a web copy in one of these is in the rotation


@dataclass(frozen=True)
class Copy:
    """One copy of a process type (web.3). Frozen: `decide` returns a new one."""
    serial: int         # two copies of one name (a rolling restart) differ by this
    process_type: str
    number: int
    name: str           # web.3, or a.web.3 for a launcher started with --name a
    is_web: bool        # a web copy gets a port and health checks
    start_timeout: float = START_TIMEOUT  # a web copy must answer within this of its start
    state: State = State.STARTING
    pid: int | None = None
    port: int | None = None         # a web copy's; kept when it is restarted
    started_at: float = 0.0
    up_since: float | None = None   # when it was last seen up (a web copy: its first answer)
    restarts: int = 0
    backoff: float = 0.0            # the wait before the next restart after a crash
    misses: int = 0                 # health checks missed in a row
    timer: float | None = None      # when its next timed step is due
    deadline: float | None = None   # leaving: SIGKILL then, if it is still running


# --- Events: what happened to a copy ------------------------------------------------------

@dataclass(frozen=True)
class Spawned:
    pid: int
    port: int | None


@dataclass(frozen=True)
class SpawnFailed:
    reason: str  # no descriptor or process left: the machine's trouble, not the copy's


@dataclass(frozen=True)
class Answered:
    """A health check got a 2xx or 3xx."""


@dataclass(frozen=True)
class Missed:
    """A health check got a wrong answer, or none in time."""


@dataclass(frozen=True)
class Exited:
    code: int  # negative: killed by that signal, as subprocess reports it


@dataclass(frozen=True)
class Timer:
    """The copy's timer is due."""


@dataclass(frozen=True)
class Replace:
    """A rolling restart has started this copy's successor."""


@dataclass(frozen=True)
class Stop:
    deadline: float  # SIGKILL then, if it is still running


Event = Union[Spawned, SpawnFailed, Answered, Missed, Exited, Timer, Replace, Stop]


# --- Actions: what the supervisor is to do -------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    copy: Copy  # start its process, then report Spawned or SpawnFailed


@dataclass(frozen=True)
class Signal:
    copy: Copy
    signum: int  # to its whole process group


@dataclass(frozen=True)
class Say:
    text: str  # a line in the platform's log


Action = Union[Spawn, Signal, Say]
Decision = tuple[Copy, list[Action]]


# --- The table ------------------------------------------------------------------------------

def decide(copy: Copy, event: Event, now: float) -> Decision:
    """The copy's next state and the actions to take; an event the table does not name for
    this state changes nothing (a late health answer from a copy already stopping)."""
    rule = TABLE.get((copy.state, type(event)))
    return rule(copy, event, now) if rule else (copy, [])


def spawned(copy: Copy, event: Spawned, now: float) -> Decision:
    """Another process type is up once it runs: nothing asks it anything. A web copy is up
    once it answers, and has until its start deadline to do so (the timer)."""
    copy = replace(copy, pid=event.pid, port=event.port, started_at=now, misses=0)
    if copy.is_web:
        copy = replace(copy, timer=now + copy.start_timeout)
    else:
        copy = replace(copy, state=State.UP, up_since=now)
    where = f", port={event.port}" if event.port is not None else ""
    return copy, [Say(f"{copy.name} started (pid={event.pid}{where})")]


def spawn_failed(copy: Copy, event: SpawnFailed, now: float) -> Decision:
    copy, actions = restart_later(copy, now)
    return copy, [Say(f"cannot start {copy.name}: {event.reason}"), *actions]


def became_ready(copy: Copy, event: Answered, now: float) -> Decision:
    copy = replace(copy, state=State.UP, misses=0, timer=None, up_since=now)
    return copy, [Say(f"{copy.name} is up on port {copy.port}")]


def start_deadline_passed(copy: Copy, event: Timer, now: float) -> Decision:
    """A web copy that has not answered by its deadline never will: it hangs at start-up
    (a deadlock at import, a stopped process), and a rolling restart would wait for it
    forever. Heroku calls this R10, Boot timeout. SIGKILL, as for a frozen copy; its exit
    restarts it, with a backoff that grows, since it never was up."""
    copy = replace(copy, state=State.UNRESPONSIVE, timer=None)
    return copy, [
        Say(f"{copy.name} did not answer GET /healthz within {copy.start_timeout:g}s of its "
            f"start: replacing it (SIGKILL)"),
        Signal(copy, signal.SIGKILL)]


def answered(copy: Copy, event: Answered, now: float) -> Decision:
    return replace(copy, misses=0), []


def missed(copy: Copy, event: Missed, now: float) -> Decision:
    """Alive but not answering is dead: a frozen or deadlocked copy would hold every request
    the router gives it. A stopped process never acts on SIGTERM, so SIGKILL; its exit then
    restarts it, as after a crash (or, outgoing, ends it)."""
    copy = replace(copy, misses=copy.misses + 1)
    if copy.misses < CHECKS_FAILED:
        return copy, []
    if copy.state is State.UP:
        copy = replace(copy, state=State.UNRESPONSIVE)
    else:  # outgoing: its successor is on the way, so it only has to go
        copy = replace(copy, state=State.STOPPING, timer=None, deadline=now)
    return copy, [
        Say(f"{copy.name} failed {CHECKS_FAILED} health checks in a row: replacing it "
            f"(SIGKILL: a frozen copy cannot act on SIGTERM)"),
        Signal(copy, signal.SIGKILL)]


def exited(copy: Copy, event: Exited, now: float) -> Decision:
    copy, actions = restart_later(replace(copy, pid=None), now)
    return copy, [Say(exit_line(copy, event.code)), *actions]


def ended(copy: Copy, event: Exited, now: float) -> Decision:
    copy = replace(copy, state=State.GONE, pid=None, timer=None)
    return copy, [Say(exit_line(copy, event.code))]


def restart_later(copy: Copy, now: float) -> Decision:
    """The first crash restarts at once, then after 1, 2, 4 ... 30 s: a crash loop cannot
    spin the CPU. A copy that stayed up a while starts again from 'at once'; one that never
    came up (it could not start, or never answered) keeps backing off."""
    stable = copy.up_since is not None and now - copy.up_since >= STABLE_AFTER
    backoff = 0.0 if stable else copy.backoff
    copy = replace(copy, restarts=copy.restarts + 1, misses=0, up_since=None,
                   backoff=1.0 if backoff == 0 else min(MAX_BACKOFF, backoff * 2))
    if backoff == 0:
        copy = replace(copy, state=State.STARTING, timer=None)
        return copy, [Say(f"restarting {copy.name} now"), Spawn(copy)]
    return (replace(copy, state=State.BACKOFF, timer=now + backoff),
            [Say(f"restarting {copy.name} in {backoff:g}s")])


def restart_due(copy: Copy, event: Timer, now: float) -> Decision:
    copy = replace(copy, state=State.STARTING, timer=None)
    return copy, [Spawn(copy)]


def outgoing(copy: Copy, event: Replace, now: float) -> Decision:
    return replace(copy, state=State.OUTGOING), []


def stop(copy: Copy, event: Stop, now: float) -> Decision:
    """Out of the rotation at once; SIGTERM a moment later. That moment matters: the router
    may have just sent it a connection, and what waits in its listen queue when it closes
    its socket is reset, a request lost."""
    return replace(copy, state=State.DRAINING, timer=min(now + DRAIN_PAUSE, event.deadline),
                   deadline=event.deadline), []


def forget(copy: Copy, event: Stop, now: float) -> Decision:
    return replace(copy, state=State.GONE, timer=None), []


def stop_sooner(copy: Copy, event: Stop, now: float) -> Decision:
    """A second stop (shutdown after a scale-down, a second Ctrl-C) only brings SIGKILL
    forward."""
    deadline = min(copy.deadline, event.deadline)
    timer = None if copy.timer is None else min(copy.timer, deadline)
    return replace(copy, deadline=deadline, timer=timer), []


def drained(copy: Copy, event: Timer, now: float) -> Decision:
    if now >= copy.deadline:
        return replace(copy, state=State.STOPPING, timer=None), [Signal(copy, signal.SIGKILL)]
    # SIGCONT after it: a frozen copy would keep SIGTERM pending, deaf to it until SIGKILL.
    return (replace(copy, state=State.STOPPING, timer=copy.deadline),
            [Signal(copy, signal.SIGTERM), Signal(copy, signal.SIGCONT)])


def past_deadline(copy: Copy, event: Timer, now: float) -> Decision:
    return replace(copy, timer=None), [Signal(copy, signal.SIGKILL)]


TABLE: dict[tuple[State, type], Callable[..., Decision]] = {
    (State.STARTING, Spawned): spawned,
    (State.STARTING, SpawnFailed): spawn_failed,
    (State.STARTING, Answered): became_ready,
    (State.STARTING, Timer): start_deadline_passed,
    (State.UP, Answered): answered,
    (State.OUTGOING, Answered): answered,
    (State.UP, Missed): missed,
    (State.OUTGOING, Missed): missed,
    **{(state, Exited): exited for state in RUNNING},
    (State.BACKOFF, Timer): restart_due,
    (State.UP, Replace): outgoing,
    **{(state, Stop): stop for state in (*RUNNING, State.OUTGOING)},
    (State.BACKOFF, Stop): forget,
    (State.DRAINING, Stop): stop_sooner,
    (State.STOPPING, Stop): stop_sooner,
    (State.DRAINING, Timer): drained,
    (State.STOPPING, Timer): past_deadline,
    **{(state, Exited): ended for state in LEAVING},
}


def exit_line(copy: Copy, code: int) -> str:
    if code < 0:
        return f"{copy.name} killed by {signal_name(-code)}"
    return f"{copy.name} exited with code {code}"


def signal_name(signum: int) -> str:
    """SIGKILL, or `signal 40` for one Python has no name for (a real-time signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- The formation: every copy, and the rules of the whole ----------------------------------

class Formation:
    """Every copy, by serial, and the rules that move several at once.

    Each method takes `now` and returns the actions to carry out. The copies in the
    formation are those not leaving; the ones leaving stay until their process has exited.
    `prefix` names the copies of one host apart from another's (`a.` makes `a.web.1`).
    `start_timeout` is each web copy's start deadline. `pick` chooses chaos's victim
    (random; a test passes its own).
    """

    def __init__(self, types: list[str], grace: float, prefix: str = "",
                 start_timeout: float = START_TIMEOUT,
                 pick: Callable[[list[Copy]], Copy] = random.choice):
        self.types = types  # in Procfile order: the order of the table and the rotation
        self.grace = grace
        self.prefix = prefix
        self.start_timeout = start_timeout
        self.pick = pick
        self.copies: dict[int, Copy] = {}
        self.serials = itertools.count(1)
        self.restart_queue: list[str] = []    # a rolling restart: names still to replace
        self.handover: tuple[int, int] | None = None  # ... (outgoing, successor) serials
        self.chaos: tuple[str | None, float] | None = None  # (type or all, every seconds)
        self.chaos_at = 0.0
        self.shutting_down = False

    # Events and timers.

    def handle(self, serial: int, event: Event, now: float) -> list[Action]:
        """Apply one event to one copy, then carry a rolling restart on if it can move."""
        return self.apply(serial, event, now) + self.continue_restart(now)

    def apply(self, serial: int, event: Event, now: float) -> list[Action]:
        copy, actions = decide(self.copies[serial], event, now)
        if copy.state is State.GONE:
            del self.copies[serial]
        else:
            self.copies[serial] = copy
        return actions

    def next_timer(self) -> float | None:
        times = [copy.timer for copy in self.copies.values() if copy.timer is not None]
        if self.chaos is not None:
            times.append(self.chaos_at)
        return min(times, default=None)

    def run_timers(self, now: float) -> list[Action]:
        actions = []
        for copy in list(self.copies.values()):
            if copy.timer is not None and now >= copy.timer:
                actions += self.apply(copy.serial, Timer(), now)
        if self.chaos is not None and now >= self.chaos_at:
            actions += self.chaos_strikes(now)
        return actions + self.continue_restart(now)

    # Start, scale, stop.

    def members(self, process_type: str | None = None) -> list[Copy]:
        """The copies in the formation (not leaving), in the order of the table."""
        return [copy for copy in self.in_order() if copy.state not in LEAVING
                and process_type in (None, copy.process_type)]

    def in_order(self) -> list[Copy]:
        return sorted(self.copies.values(),
                      key=lambda c: (self.types.index(c.process_type), c.number, c.serial))

    def add(self, process_type: str, number: int) -> Copy:
        serial = next(self.serials)
        copy = Copy(serial, process_type, number, f"{self.prefix}{process_type}.{number}",
                    is_web=process_type == "web", start_timeout=self.start_timeout)
        self.copies[serial] = copy
        return copy

    def scale(self, process_type: str, count: int, now: float) -> list[Action]:
        """Keep the `count` lowest-numbered copies of a type, adding or stopping the rest."""
        current = self.members(process_type)
        actions: list[Action] = []
        if current[count:]:
            names = ", ".join(copy.name for copy in current[count:])
            actions.append(Say(f"scaling {process_type} from {len(current)} to {count}: "
                               f"stopping {names}"))
        for copy in current[count:]:
            actions += self.apply(copy.serial, Stop(now + DRAIN_PAUSE + self.grace), now)
        numbers = {copy.number for copy in current[:count]}
        free_numbers = (n for n in itertools.count(1) if n not in numbers)
        for number in itertools.islice(free_numbers, count - len(numbers)):
            actions.append(Spawn(self.add(process_type, number)))
        return actions

    def shut_down(self, now: float) -> list[Action]:
        """Stop every copy; the deadline for all of them runs from now (the signal)."""
        self.shutting_down = True
        self.restart_queue.clear()
        self.handover = None
        self.chaos = None
        actions: list[Action] = [Say(f"stopping every copy: SIGTERM, then SIGKILL after "
                                     f"{self.grace:g}s")]
        for copy in list(self.copies.values()):
            actions += self.apply(copy.serial, Stop(now + self.grace), now)
        return actions

    def kill_now(self, now: float) -> list[Action]:
        """A second interrupt: no more waiting."""
        actions: list[Action] = [Say("a second interrupt: SIGKILL to every copy now")]
        for copy in list(self.copies.values()):
            actions += self.apply(copy.serial, Stop(now), now)
        return actions + self.run_timers(now)

    @property
    def stopped(self) -> bool:
        return self.shutting_down and not self.copies

    # A rolling restart: the new copy first, the old one stops once the new one is up.

    def restart(self, process_type: str | None, now: float) -> list[Action]:
        names = [copy.name for copy in self.members(process_type)]
        self.restart_queue += names
        return [Say(f"rolling restart, one copy at a time: {', '.join(names) or 'none'}"),
                *self.continue_restart(now)]

    def continue_restart(self, now: float) -> list[Action]:
        """Replace the copies in `restart_queue` one at a time, so that even a single web
        copy never leaves the front door empty. Called after every event until done."""
        actions: list[Action] = []
        while self.restart_queue:
            if self.handover is None:
                outgoing = self.member_named(self.restart_queue[0], State.UP)
                if outgoing is not None:  # not up (restarting): it gets the new code anyway
                    actions += self.start_successor(outgoing)
            if self.handover is not None:
                old, new = self.handover
                successor = self.copies.get(new)
                if successor is not None and successor.state is not State.UP \
                        and successor.state not in LEAVING:
                    return actions  # not up yet: the old copy keeps serving
                self.handover = None
                if old in self.copies:
                    actions += self.apply(old, Stop(now + DRAIN_PAUSE + self.grace), now)
            self.restart_queue.pop(0)
            if not self.restart_queue:
                actions.append(Say("rolling restart done: the old copies are stopping"))
        return actions

    def start_successor(self, old: Copy) -> list[Action]:
        self.apply(old.serial, Replace(), 0.0)
        successor = self.add(old.process_type, old.number)
        self.handover = (old.serial, successor.serial)
        return [Spawn(successor)]

    def member_named(self, name: str, *states: State) -> Copy | None:
        """The copy called `name` (with or without this host's prefix), if it is in one of
        `states` (any state of a member, when none is given)."""
        for copy in self.members():
            if name in (copy.name, copy.name.removeprefix(self.prefix)) \
                    and (not states or copy.state in states):
                return copy
        return None

    # Failure on purpose: kill, freeze, chaos.

    def kill(self, name: str) -> list[Action]:
        """`kill web.2`: SIGKILL, and the copy is restarted as after any crash."""
        return self.strike(name, signal.SIGKILL, "as asked: restarted as after any crash")

    def freeze(self, name: str) -> list[Action]:
        """`freeze web.2`: SIGSTOP. Alive, its port accepting, answering nothing."""
        copy = self.member_named(name)
        if copy is None or not copy.is_web:
            why = "nothing checks its health, so it stays frozen until you kill it"
        elif copy.state is State.STARTING:
            why = (f"it has not answered yet; at its start deadline ({self.start_timeout:g}s) "
                   f"it is replaced")
        else:
            why = "its port still accepts; the health check will find it and replace it"
        return self.strike(name, signal.SIGSTOP, why)

    def strike(self, name: str, signum: int, why: str) -> list[Action]:
        """Signal a running copy of the formation; an unknown or stopped name is one line
        that says which names there are, and nothing happens."""
        copy = self.member_named(name)
        if copy is None or copy.pid is None:
            running = ", ".join(c.name for c in self.members() if c.pid is not None)
            return [Say(f"no running copy named {name!r} (running: {running or 'none'})")]
        return [Say(f"{copy.name} (pid {copy.pid}): {signal_name(signum)}, {why}"),
                Signal(copy, signum)]

    def start_chaos(self, process_type: str | None, every: float, now: float) -> list[Action]:
        self.chaos, self.chaos_at = (process_type, every), now + every
        which = f"a random {process_type} copy" if process_type else "a random copy"
        return [Say(f"chaos: SIGKILL to {which} every {every:g}s, until `chaos off`")]

    def stop_chaos(self) -> list[Action]:
        self.chaos = None
        return [Say("chaos off")]

    def chaos_strikes(self, now: float) -> list[Action]:
        process_type, every = self.chaos
        self.chaos_at = now + every
        victims = [copy for copy in self.members(process_type) if copy.pid is not None]
        if not victims:
            return []
        return self.strike(self.pick(victims).name, signal.SIGKILL, "by chaos")

    # What the router and the table see.

    def rotation(self) -> tuple[int, ...]:
        """The ports of the web copies that may take requests, in the table's order."""
        return tuple(copy.port for copy in self.in_order()
                     if copy.is_web and copy.state in SERVING and copy.port is not None)
