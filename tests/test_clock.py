"""clock.py: ticks aligned to the wall clock, each enqueued once however many clocks run."""
import math
import re
import signal
import sys
import time
from datetime import datetime

import pytest

from clock import Schedule, config_from_env, current_tick, tick_key
from conftest import app_env, wait_until, write_lock_held
from database import ConfigError

ENQUEUED = re.compile(r"^enqueued (\S+) as job \d+$", re.MULTILINE)
ALREADY = "already enqueued (by another clock, or by this one before a restart)"


@pytest.fixture
def start_clock(spawn, tmp_path):
    def start(**env):
        return spawn([sys.executable, "clock.py"], app_env(tmp_path, **env))

    return start


def tick_time(key: str) -> float:
    return datetime.fromisoformat(key.split("@", 1)[1]).timestamp()


def test_ticks_are_aligned_to_the_wall_clock_not_to_the_start_time():
    every_ten = Schedule("heartbeat", 10)
    assert current_tick(every_ten, 1_700_000_003.2) == current_tick(every_ten, 1_700_000_009.9)
    assert tick_key(every_ten, current_tick(every_ten, 1_700_000_003.2)) == \
        "heartbeat@2023-11-14T22:13:20+00:00"


def test_three_clocks_enqueue_each_tick_exactly_once(backing, start_clock):
    queue = backing.queue
    clocks = [start_clock(DYNO=f"clock.{n}", HEARTBEAT_EVERY=1, PURGE_EVERY=3600, **backing.env)
              for n in (1, 2, 3)]
    wait_until(lambda: len(queue.recent("heartbeat")) >= 2, what="two heartbeat ticks")
    # Each clock ready, its SIGTERM handler set: one still starting (a busy machine) would
    # die of SIGTERM's default, before it has anything to finish.
    wait_until(lambda: all(" ready (pid " in clock.output() for clock in clocks),
               what="every clock to be ready")
    assert [clock.stop(signal.SIGTERM) for clock in clocks] == [0, 0, 0]

    jobs = queue.recent()  # every schedule's
    logged = [key for clock in clocks for key in ENQUEUED.findall(clock.output())]
    assert sorted(logged) == sorted(job["key"] for job in jobs)  # one insert per job
    ticks = sorted(tick_time(job["key"]) for job in jobs if job["task"] == "heartbeat")
    assert ticks == [ticks[0] + n for n in range(len(ticks))]  # consecutive, none missing
    assert ALREADY in "".join(clock.output() for clock in clocks)


def test_a_clock_restarted_mid_interval_does_not_double_the_tick(queue, start_clock):
    day = Schedule("heartbeat", 86400)
    key = tick_key(day, current_tick(day, time.time()))
    first = start_clock(HEARTBEAT_EVERY=86400, PURGE_EVERY=86400)
    wait_until(lambda: len(ENQUEUED.findall(first.output())) == 3, what="the first ticks")
    assert first.stop(signal.SIGTERM) == 0
    second = start_clock(HEARTBEAT_EVERY=86400, PURGE_EVERY=86400)
    wait_until(lambda: second.output().count("already enqueued") == 3
               or ENQUEUED.search(second.output()), what="the restarted clock's ticks")
    assert second.stop(signal.SIGTERM) == 0
    if key != tick_key(day, current_tick(day, time.time())):
        pytest.skip("the test ran across midnight UTC, into a new tick")
    assert f"{key} {ALREADY}" in second.output()
    assert [job["key"] for job in queue.recent("heartbeat")] == [key]


def test_a_database_locked_over_a_tick_delays_it_but_neither_loses_nor_doubles_it(
        queue, start_clock, tmp_path):
    clock = start_clock(HEARTBEAT_EVERY=1, PURGE_EVERY=3600, DATABASE_BUSY_TIMEOUT=0.2,
                        HONCHO_PROCESS_NAME="clock.2")
    wait_until(lambda: "clock.2 ready" in clock.output(), what="the clock to start")
    tick = math.ceil(time.time() + 0.5)
    time.sleep(tick - 0.2 - time.time())  # not a wait for anything: where the lock must start
    with write_lock_held(tmp_path / "app.db"):  # over the tick, and past the busy timeout
        wait_until(lambda: "database is locked" in clock.output(), timeout=3,
                   what="the clock to meet the lock")
    wait_until(lambda: any(tick_time(key) > tick for key in ENQUEUED.findall(clock.output())),
               timeout=3, what="the next tick after the lock")
    assert clock.stop(signal.SIGTERM) == 0

    keys = [job["key"] for job in queue.recent("heartbeat")]
    ticks = sorted(tick_time(key) for key in keys)
    assert tick in ticks and ticks == [ticks[0] + n for n in range(len(ticks))]
    assert sorted(ENQUEUED.findall(clock.output())) == sorted(keys + [
        job["key"] for job in queue.recent() if job["task"].startswith("purge_")])
    assert clock.output().count("database is locked") == 1


def test_a_bad_interval_exits_2_with_one_line_naming_it(start_clock):
    clock = start_clock(HEARTBEAT_EVERY="soon")
    assert clock.popen.wait(10) == 2
    assert clock.output() == ("clock: HEARTBEAT_EVERY must be a number of seconds above 0 and "
                              "at most 86400, got 'soon'\n")


@pytest.mark.parametrize("variable, value", [
    ("HEARTBEAT_EVERY", "0.5"), ("PURGE_EVERY", "1e10"), ("PURGE_EVERY", "0")])
def test_every_interval_is_checked_and_named(variable, value):
    with pytest.raises(ConfigError, match=f"{variable} .*'{value}'"):
        config_from_env({variable: value})
