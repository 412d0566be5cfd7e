"""The formation's rules, as a table of states and events, tested with a made-up clock: no
process is started and no second waited. (tests/test_launcher.py proves that the shell
carries the actions out on real processes.)"""
from __future__ import annotations

import signal

import pytest

from formation import (CHECKS_FAILED, DRAIN_PAUSE, MAX_BACKOFF, STABLE_AFTER, START_TIMEOUT,
                       Answered, Copy, Exited, Formation, Missed, Say, Signal, Spawn, Spawned,
                       SpawnFailed, State, Stop, Timer, decide, signal_name)

GRACE = 5.0


class Platform:
    """A formation and a fake OS: every Spawn gets the next pid (and a port for web), and
    what the formation said and signalled is kept for the test to read."""

    def __init__(self, types=("web", "worker", "clock"), prefix: str = "", pick=None):
        self.formation = Formation(list(types), GRACE, prefix,
                                   **({"pick": pick} if pick else {}))
        self.now = 1000.0
        self.pids = iter(range(100, 10_000))
        self.ports = iter(range(5001, 6000))
        self.said: list[str] = []
        self.signals: list[tuple[str, int]] = []
        self.failing_spawns = 0  # the next spawns that fail, as with no descriptor left

    def run(self, actions) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self.run(self.formation.handle(action.copy.serial, self.spawn(action.copy),
                                               self.now))
            elif isinstance(action, Signal):
                self.signals.append((action.copy.name, action.signum))
            else:
                self.said.append(action.text)

    def spawn(self, copy: Copy) -> Spawned | SpawnFailed:
        if self.failing_spawns:
            self.failing_spawns -= 1
            return SpawnFailed("Too many open files")
        return Spawned(next(self.pids), (copy.port or next(self.ports)) if copy.is_web else None)

    def event(self, name: str, event) -> None:
        """Hand `event` to the newest copy called `name`."""
        serial = max(c.serial for c in self.formation.copies.values() if c.name == name)
        self.run(self.formation.handle(serial, event, self.now))

    def scale(self, process_type: str, count: int) -> None:
        self.run(self.formation.scale(process_type, count, self.now))

    def wait(self, seconds: float) -> None:
        self.now += seconds
        self.run(self.formation.run_timers(self.now))

    def copy(self, name: str) -> Copy:
        return max((c for c in self.formation.copies.values() if c.name == name),
                   key=lambda c: c.serial)

    def states(self) -> dict[str, str]:
        return {c.name: c.state.value for c in self.formation.members()}

    def up(self, *names: str) -> None:
        for name in names:
            self.event(name, Answered())


def test_a_web_copy_joins_the_rotation_only_once_it_answers():
    platform = Platform()
    platform.scale("web", 1)
    assert platform.copy("web.1").state is State.STARTING
    assert platform.formation.rotation() == ()
    platform.event("web.1", Missed())  # not listening yet: no harm
    platform.up("web.1")
    assert platform.copy("web.1").state is State.UP
    assert platform.formation.rotation() == (5001,)
    assert platform.said == ["web.1 started (pid=100, port=5001)", "web.1 is up on port 5001"]


def test_other_copies_are_up_as_soon_as_they_run():
    platform = Platform()
    platform.scale("worker", 2)
    assert platform.states() == {"worker.1": "up", "worker.2": "up"}
    assert platform.formation.rotation() == ()


def test_a_crash_restarts_at_once_then_backs_off_doubling_to_a_cap():
    platform = Platform()
    platform.scale("worker", 1)
    platform.event("worker.1", Exited(1))
    assert platform.said[-2:] == ["restarting worker.1 now", "worker.1 started (pid=101)"]
    delays = []
    for _ in range(7):
        platform.event("worker.1", Exited(1))
        copy = platform.copy("worker.1")
        assert copy.state is State.BACKOFF and copy.pid is None
        delays.append(copy.timer - platform.now)
        platform.wait(delays[-1] - 0.01)
        assert platform.copy("worker.1").state is State.BACKOFF  # not a moment sooner
        platform.wait(0.01)
        assert platform.copy("worker.1").state is State.UP
    assert delays == [1, 2, 4, 8, 16, MAX_BACKOFF, MAX_BACKOFF]
    assert platform.copy("worker.1").restarts == 8


def test_a_copy_that_stayed_up_a_while_restarts_at_once_again():
    platform = Platform()
    platform.scale("worker", 1)
    for _ in range(3):
        platform.event("worker.1", Exited(1))
        platform.wait(10)
    platform.wait(STABLE_AFTER)
    platform.event("worker.1", Exited(1))
    assert platform.said[-2:] == ["restarting worker.1 now", "worker.1 started (pid=104)"]


def test_a_copy_killed_by_a_signal_without_a_name_is_reported_and_restarted():
    platform = Platform()
    platform.scale("worker", 1)
    platform.event("worker.1", Exited(-40))  # a real-time signal: Python has no name for it
    assert "worker.1 killed by signal 40" in platform.said
    assert platform.copy("worker.1").state is State.UP
    assert signal_name(signal.SIGKILL) == "SIGKILL"


def test_a_copy_that_cannot_start_waits_and_tries_again():
    platform = Platform()
    platform.failing_spawns = 2
    platform.scale("worker", 1)
    assert platform.said == ["cannot start worker.1: Too many open files",
                             "restarting worker.1 now",
                             "cannot start worker.1: Too many open files",
                             "restarting worker.1 in 1s"]
    assert platform.copy("worker.1").state is State.BACKOFF
    platform.wait(1)
    assert platform.copy("worker.1").state is State.UP


def test_three_missed_health_checks_in_a_row_kill_a_web_copy_and_it_is_replaced():
    platform = Platform()
    platform.scale("web", 1)
    platform.up("web.1")
    for _ in range(CHECKS_FAILED - 1):
        platform.event("web.1", Missed())
    platform.up("web.1")  # an answer in between starts the count again
    for _ in range(CHECKS_FAILED - 1):
        platform.event("web.1", Missed())
    assert platform.copy("web.1").state is State.UP and platform.signals == []
    platform.event("web.1", Missed())
    assert platform.copy("web.1").state is State.UNRESPONSIVE
    assert platform.formation.rotation() == ()  # no request goes to a frozen copy
    assert platform.signals == [("web.1", signal.SIGKILL)]  # SIGSTOPped: SIGTERM is not heard
    platform.event("web.1", Exited(-signal.SIGKILL))
    assert platform.copy("web.1").state is State.STARTING
    assert platform.copy("web.1").port == 5001  # a restarted copy keeps its port


def test_a_web_copy_that_does_not_answer_by_its_start_deadline_is_killed_and_restarted():
    platform = Platform()
    platform.scale("web", 1)
    platform.wait(START_TIMEOUT - 0.01)
    platform.event("web.1", Missed())  # refused: it does not listen, as when hung at import
    assert platform.copy("web.1").state is State.STARTING and platform.signals == []
    platform.wait(0.01)
    assert platform.copy("web.1").state is State.UNRESPONSIVE
    assert platform.signals == [("web.1", signal.SIGKILL)]  # a stopped process hears no other
    assert platform.said[-1] == (f"web.1 did not answer GET /healthz within {START_TIMEOUT:g}s "
                                 f"of its start: replacing it (SIGKILL)")
    platform.event("web.1", Exited(-signal.SIGKILL))
    assert platform.said[-2:] == ["restarting web.1 now", "web.1 started (pid=101, port=5001)"]
    platform.wait(START_TIMEOUT)  # longer than STABLE_AFTER, but it never was up: backoff
    platform.event("web.1", Exited(-signal.SIGKILL))
    assert platform.said[-1] == "restarting web.1 in 1s"


def test_only_a_web_copy_that_has_not_answered_has_a_start_deadline():
    platform = Platform()
    platform.scale("web", 1)
    platform.scale("worker", 1)
    platform.up("web.1")
    platform.wait(2 * START_TIMEOUT)
    assert platform.states() == {"web.1": "up", "worker.1": "up"} and platform.signals == []


def test_a_rolling_restart_replaces_a_successor_that_hangs_at_start_and_goes_on():
    platform = Platform(types=["web"])
    platform.scale("web", 1)
    platform.up("web.1")
    rolling(platform)
    platform.run(platform.formation.freeze("web.1"))  # the successor: it has not answered
    assert platform.said[-1] == (f"web.1 (pid 101): SIGSTOP, it has not answered yet; at its "
                                 f"start deadline ({START_TIMEOUT:g}s) it is replaced")
    platform.wait(START_TIMEOUT)
    assert platform.signals == [("web.1", signal.SIGSTOP), ("web.1", signal.SIGKILL)]
    assert platform.formation.rotation() == (5001,)  # the old copy serves meanwhile
    platform.event("web.1", Exited(-signal.SIGKILL))
    platform.up("web.1")
    assert platform.said[-1] == "rolling restart done: the old copies are stopping"
    assert platform.formation.rotation() == (5002,)


def test_a_stopped_copy_leaves_the_rotation_then_gets_sigterm_then_sigkill_at_its_deadline():
    platform = Platform()
    platform.scale("web", 2)
    platform.up("web.1", "web.2")
    platform.scale("web", 1)
    assert platform.copy("web.2").state is State.DRAINING
    assert platform.formation.rotation() == (5001,)  # at once, before any signal
    assert platform.said[-1] == "scaling web from 2 to 1: stopping web.2"
    platform.wait(DRAIN_PAUSE)
    assert platform.signals == [("web.2", signal.SIGTERM), ("web.2", signal.SIGCONT)]
    platform.wait(GRACE - 0.01)
    assert platform.signals[-1] == ("web.2", signal.SIGCONT)
    platform.wait(0.01)
    assert platform.signals[-1] == ("web.2", signal.SIGKILL)
    platform.event("web.2", Exited(-signal.SIGKILL))
    assert "web.2" not in {c.name for c in platform.formation.copies.values()}
    assert platform.states() == {"web.1": "up"}  # not restarted: it was asked to stop


def test_scaling_keeps_the_lowest_numbers_and_fills_the_gaps():
    platform = Platform()
    platform.scale("worker", 3)
    platform.scale("worker", 1)
    for name in ("worker.2", "worker.3"):
        platform.event(name, Exited(0))
    platform.scale("worker", 2)
    assert platform.states() == {"worker.1": "up", "worker.2": "up"}
    platform.scale("worker", 0)
    assert platform.states() == {}


def test_shutting_down_stops_everyone_with_one_deadline_and_forgets_those_waiting():
    platform = Platform()
    platform.scale("web", 1)
    platform.scale("worker", 1)
    platform.up("web.1")
    platform.event("worker.1", Exited(1))
    platform.event("worker.1", Exited(1))  # a second crash: waiting to restart
    platform.run(platform.formation.shut_down(platform.now))
    assert platform.said[-1] == f"stopping every copy: SIGTERM, then SIGKILL after {GRACE:g}s"
    assert {c.name for c in platform.formation.copies.values()} == {"web.1"}  # worker: gone
    platform.wait(DRAIN_PAUSE)
    platform.wait(GRACE - DRAIN_PAUSE)
    assert platform.signals == [("web.1", signal.SIGTERM), ("web.1", signal.SIGCONT),
                                ("web.1", signal.SIGKILL)]
    assert not platform.formation.stopped
    platform.event("web.1", Exited(-signal.SIGKILL))
    assert platform.formation.stopped


def test_a_second_interrupt_kills_everyone_at_once():
    platform = Platform()
    platform.scale("worker", 2)
    platform.run(platform.formation.shut_down(platform.now))
    platform.wait(DRAIN_PAUSE)
    platform.run(platform.formation.kill_now(platform.now))
    assert platform.signals[-2:] == [("worker.1", signal.SIGKILL), ("worker.2", signal.SIGKILL)]


def test_a_stop_can_only_bring_the_deadline_sooner():
    copy = Copy(1, "worker", 1, "worker.1", is_web=False, state=State.UP, pid=100)
    copy, _ = decide(copy, Stop(deadline=20.0), now=0.0)
    assert (copy.state, copy.timer, copy.deadline) == (State.DRAINING, DRAIN_PAUSE, 20.0)
    later, _ = decide(copy, Stop(deadline=30.0), now=0.0)
    assert later.deadline == 20.0
    sooner, _ = decide(copy, Stop(deadline=0.0), now=0.0)
    assert (sooner.timer, sooner.deadline) == (0.0, 0.0)
    killed, actions = decide(sooner, Timer(), now=0.0)
    assert actions == [Signal(sooner, signal.SIGKILL)]  # past the deadline: no SIGTERM first


def test_an_event_the_table_does_not_name_changes_nothing():
    copy = Copy(1, "web", 1, "web.1", is_web=True, state=State.DRAINING, pid=100, port=5001,
                timer=1.0, deadline=5.0)
    assert decide(copy, Answered(), now=0.0) == (copy, [])  # a late health answer
    assert decide(copy, Missed(), now=0.0) == (copy, [])


def rolling(platform: Platform) -> None:
    platform.run(platform.formation.restart("web", platform.now))


def test_a_rolling_restart_starts_each_successor_before_the_old_copy_stops():
    platform = Platform()
    platform.scale("web", 2)
    platform.up("web.1", "web.2")
    old = {name: platform.copy(name).pid for name in ("web.1", "web.2")}
    rolling(platform)
    assert platform.said[-2] == "rolling restart, one copy at a time: web.1, web.2"
    new_web_1 = platform.copy("web.1")
    assert new_web_1.pid not in old.values() and new_web_1.state is State.STARTING
    assert platform.formation.rotation() == (5001, 5002)  # the old web.1 serves meanwhile
    platform.up("web.1")
    assert platform.formation.rotation() == (5003, 5002)
    outgoing = [c.pid for c in platform.formation.copies.values() if c.state is State.OUTGOING]
    assert outgoing == [old["web.2"]]  # web.2 serves while its successor starts
    platform.up("web.2")
    assert platform.said[-1] == "rolling restart done: the old copies are stopping"
    assert platform.formation.rotation() == (5003, 5004)
    leaving = [c for c in platform.formation.copies.values() if c.state is State.DRAINING]
    assert sorted(c.pid for c in leaving) == sorted(old.values())
    for copy in leaving:
        platform.run(platform.formation.handle(copy.serial, Exited(0), platform.now))
    assert platform.states() == {"web.1": "up", "web.2": "up"}


def test_a_rolling_restart_waits_while_a_successor_crashes_and_skips_a_copy_in_backoff():
    platform = Platform()
    platform.scale("web", 2)
    platform.up("web.1", "web.2")
    platform.event("web.2", Exited(1))
    platform.event("web.2", Exited(1))  # waiting 1 s to restart
    rolling(platform)
    platform.event("web.1", Exited(1))  # the successor crashes: the old web.1 keeps serving
    assert platform.formation.rotation() == (5001,)
    platform.up("web.1")
    assert platform.said[-1] == "rolling restart done: the old copies are stopping"
    platform.wait(1)
    assert platform.states() == {"web.1": "up", "web.2": "starting"}


def test_an_outgoing_copy_that_dies_is_not_restarted():
    platform = Platform(types=["web"])
    platform.scale("web", 1)
    platform.up("web.1")
    rolling(platform)
    outgoing = next(c for c in platform.formation.copies.values() if c.state is State.OUTGOING)
    platform.run(platform.formation.handle(outgoing.serial, Exited(1), platform.now))
    assert [c.name for c in platform.formation.copies.values()] == ["web.1"]  # the successor
    platform.up("web.1")
    assert platform.said[-1] == "rolling restart done: the old copies are stopping"


def test_names_carry_the_hosts_prefix_and_commands_take_either_name():
    platform = Platform(prefix="a.")
    platform.scale("web", 2)
    assert sorted(platform.states()) == ["a.web.1", "a.web.2"]
    platform.up("a.web.1")
    platform.run(platform.formation.kill("web.2"))
    platform.run(platform.formation.freeze("a.web.1"))
    assert platform.signals == [("a.web.2", signal.SIGKILL), ("a.web.1", signal.SIGSTOP)]
    assert platform.said[-1] == ("a.web.1 (pid 100): SIGSTOP, its port still accepts; the "
                                 "health check will find it and replace it")


@pytest.mark.parametrize("name", ["web.9", "db.1", "", "web"])
def test_an_unknown_name_is_one_line_and_nothing_happens(name):
    platform = Platform()
    platform.scale("web", 1)
    assert platform.formation.kill(name) == platform.formation.freeze(name) == [
        Say(f"no running copy named {name!r} (running: web.1)")]


def test_chaos_kills_a_copy_of_the_chosen_type_every_few_seconds_until_off():
    platform = Platform(pick=lambda copies: copies[-1])
    platform.scale("web", 2)
    platform.scale("worker", 2)
    platform.run(platform.formation.start_chaos("worker", 2.0, platform.now))
    platform.wait(1.9)
    assert platform.signals == []
    platform.wait(0.1)
    assert platform.signals == [("worker.2", signal.SIGKILL)]
    assert platform.said[-1] == "worker.2 (pid 103): SIGKILL, by chaos"
    platform.event("worker.2", Exited(-signal.SIGKILL))  # restarted at once
    platform.wait(2.0)
    assert platform.signals[-1] == ("worker.2", signal.SIGKILL)
    platform.run(platform.formation.stop_chaos())
    platform.wait(10)
    assert len(platform.signals) == 2
