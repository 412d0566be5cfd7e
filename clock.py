"""The clock process: periodic jobs, safe to run more than once (Factor VIII).

Factor VIII runs each kind of work as its own process type; the clock is the one that puts
periodic jobs in the queue. The terrible day this module prevents: the docs say "run
exactly one scheduler", a deploy briefly runs two (or a restart lands mid-minute), and
every periodic job runs twice; or nobody runs one at all, because everyone was afraid to.
Celery beat has lived with these duplicates for years.

The fix, from Rails' Solid Queue: every tick of every schedule is enqueued under a unique
key, `task@tick-time` (a unique index on SQLite, a key set in the same script on Redis).
Whichever clock copy gets there first inserts the job; the others' inserts do nothing. The
ticks go in the `housekeeping` lane, which no user's job can hold up, and pass the queue's
quotas: a flood of users' jobs never stops the purges (`job_queue.py`). Ticks are aligned
to the wall clock (`floor(now / every) * every`), not to each clock's start time, so every
copy computes the same key for the same tick, and a restart mid-interval finds its tick
already enqueued. A tick missed while no clock was running is skipped, not caught up.

A store that cannot answer is a wait, not a crash: SQLite locked past the busy timeout or
its disk full, Redis down, frozen or out of memory. The clock logs one line and tries
again (`keep_trying`) until its tick is in. The unique key makes the retry safe: a tick is
enqueued once, never twice. A wait shorter than the interval loses no tick; ticks that
pass during a longer one are skipped, as when no clock runs. The clock wakes at least
every second and reads the wall clock afresh: stepped back an hour, it does not sleep for
an hour; stepped forward, it enqueues the tick it lands in.

The clock only enqueues (through `job_queue.py`); `worker.py` runs the jobs.
Configuration, read once in `main()`: DATABASE_URL and what `database.py` reads with it,
PURGE_EVERY (whole seconds, default 60, at most 86400: expired sessions, and finished jobs
past keeping, each on a schedule of its own), HEARTBEAT_EVERY (default 30, at most 86400),
the copy's name (DYNO, HONCHO_PROCESS_NAME or PS; default `clock.1`). SIGTERM or SIGINT:
exit 0 at once, or, if a statement is waiting for a locked database, as soon as it returns
(at most DATABASE_BUSY_TIMEOUT, which is capped below the default STOP_TIMEOUT:
`database.MAX_BUSY_TIMEOUT`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from database import (ConfigError, database_from_env, keep_trying, log, process_name,
                      whole_seconds)
from job_queue import JobQueue, queue_from_env

MAX_INTERVAL = 86400  # a day: a longer schedule belongs to a cron, not to this clock
LONGEST_SLEEP = 1.0   # seconds: the wall clock is read again at least this often


@dataclass(frozen=True)
class Schedule:
    task: str
    every: int  # whole seconds, so that tick keys are plain ISO-8601 times


@dataclass(frozen=True)
class ClockConfig:
    dyno: str
    schedules: tuple[Schedule, ...]


def config_from_env(environ: Mapping[str, str]) -> ClockConfig:
    purge_every = whole_seconds(environ, "PURGE_EVERY", 60, MAX_INTERVAL)
    return ClockConfig(dyno=process_name(environ, "clock.1"), schedules=(
        Schedule("purge_expired_sessions", purge_every),
        Schedule("purge_finished_jobs", purge_every),
        Schedule("heartbeat", whole_seconds(environ, "HEARTBEAT_EVERY", 30, MAX_INTERVAL))))


def current_tick(schedule: Schedule, now: float) -> int:
    """The start of the interval `now` falls in, the same for every clock copy."""
    return int(now // schedule.every) * schedule.every


def tick_key(schedule: Schedule, tick: int) -> str:
    return f"{schedule.task}@{datetime.fromtimestamp(tick, timezone.utc).isoformat()}"


def enqueue_tick(queue: JobQueue, schedule: Schedule, tick: int) -> None:
    """Enqueue one tick; the unique key makes a second attempt, from anyone, do nothing."""
    key = tick_key(schedule, tick)
    job_id = keep_trying(lambda: queue.enqueue(schedule.task, {}, "housekeeping", key=key),
                         f"enqueuing {key}")
    if job_id is None:
        log(f"{key} already enqueued (by another clock, or by this one before a restart)")
    else:
        log(f"enqueued {key} as job {job_id}")


def run_clock(queue: JobQueue, schedules: tuple[Schedule, ...]) -> None:
    """Enqueue each schedule's current tick (at start too), then sleep until the next one."""
    enqueued: dict[str, int] = {}  # schedule's task -> last tick this copy enqueued
    while True:
        now = time.time()
        for schedule in schedules:
            tick = current_tick(schedule, now)
            if enqueued.get(schedule.task) != tick:
                enqueue_tick(queue, schedule, tick)
                enqueued[schedule.task] = tick
        next_tick = min(current_tick(schedule, now) + schedule.every for schedule in schedules)
        time.sleep(min(LONGEST_SLEEP, max(0.0, next_tick - time.time())))


def exit_now(signum: int, frame: object) -> None:
    # Unlike the worker, the clock has nothing to finish. Its only write is one insert (a
    # transaction, a script), which the store makes whole or not at all, and Python runs
    # this handler between statements, never inside one. A tick left out is enqueued by
    # another copy, or by this one if it is restarted within the interval (the same key):
    # raising loses nothing.
    raise SystemExit(0)


def main() -> None:
    try:
        config = config_from_env(os.environ)
        queue = queue_from_env(os.environ, database_from_env(os.environ))
    except ConfigError as error:
        print(f"clock: {error}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, exit_now)
    signal.signal(signal.SIGINT, exit_now)
    every = ", ".join(f"{schedule.task} every {schedule.every}s" for schedule in config.schedules)
    log(f"{config.dyno} ready (pid {os.getpid()}): {every}")
    try:
        run_clock(queue, config.schedules)
    finally:
        log(f"{config.dyno} stopped")


if __name__ == "__main__":
    main()
