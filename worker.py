"""The worker process: background jobs, scaled by running more copies (Factors VIII and VI).

Factor VIII says you scale a process type by running more copies of it, and Factor VI says
each copy keeps nothing it cannot lose. The terrible day this module prevents: a web
request runs a slow job inside itself, the copy is killed half-way (a deploy, a crash, an
out-of-memory kill), and the job is silently gone; or one client's flood of hour-long jobs
holds every worker, and a user's job, and the session purge, wait for days. Here the web
process only records the job in the shared queue (`job_queue.py`) and answers at once;
any number of `worker` copies take jobs from it, and any copy can be killed at any moment:
another copy runs its job once the job's lease is seen to run out.

A worker runs one claim loop per lane (`housekeeping`, `users`, `public`; WORKER_LANES),
each on a thread of its own and one job at a time: a flood in the public lane occupies
the public loop only, so even one worker copy still runs users' jobs and the clock's
housekeeping beside it. More throughput comes from more copies, not from more threads.

What a loop does with a job: claim it, run the task (from `tasks.py`) on a thread of its
own while another thread renews the job's lease every third of it, then record how it
ended: `done`, failed and retried later with exponential backoff and jitter, or `dead`
after `max_attempts` (an unknown task name, or arguments that cannot be decoded, are dead
at once). Every record goes through the queue's fence, so a worker that lost the job
never overwrites the new owner's result.

A store that cannot answer is a wait, not a crash: SQLite locked past the busy timeout or
its disk full, Redis down, frozen or out of memory. Every claim, renewal and record waits
it out (`keep_trying`): the copy logs one line for the whole wait, however many of its
threads wait, and carries on by itself once the store answers. A store busy for everyone
costs no one a job: its slow answers stop the lease watch's clocks (`leases.py`). But a
store that only this copy cannot reach (its host cut off) lets the others see its leases
run out: another worker may run the job again, and the fence then discards this worker's
late result.

Stopping has a deadline of its own. SIGTERM or SIGINT: take no new job, wait for the jobs
in hand up to STOP_TIMEOUT seconds, and give back to the queue any not finished by then
(`queued` again, the attempt not counted, as Sidekiq does on shutdown), then exit 0; a
second signal stops waiting at once. A task runs on its own thread precisely so that the
worker can stop waiting for it; the abandoned thread ends with the process. Nobody needs
to SIGKILL the worker, which matters when the process manager itself was killed. If the
store still cannot answer at the deadline, the worker exits anyway and the job returns to
the queue through its lease. A claim loop that dies of a bug ends the copy (exit 1) so
that the platform restarts it, rather than leave a lane that nobody serves.

Configuration, read once in `main()`: DATABASE_URL and what `database.py` reads with it,
SESSION_STORE (the tasks read uploads through it: with `memory` the worker has its own
empty dict, never the web copy's, so a `wordcount` cannot find the upload and ends dead;
that is Factor VI's lesson again), the queue's limits (`job_queue.limits_from_env`), the
copy's name (DYNO, HONCHO_PROCESS_NAME or PS; default `worker.1`), WORKER_LANES (default
`housekeeping,users,public`), JOB_LEASE (seconds, default 30, from 0.2 to 3600),
POLL_INTERVAL (idle sleep, default 0.5, from 0.01 to 60; never more than a quarter of
JOB_LEASE), RETRY_BACKOFF (base seconds, default 2, at most 300), STOP_TIMEOUT (default
25, under Heroku's 30 s before SIGKILL; at most 3600), WORKER_BURST=1 (exit 0 when no
lane has a job ready, like rq's burst mode).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from database import (ConfigError, Outage, StillLocked, database_from_env, keep_trying, log,
                      positive_number, process_name, stop_timeout)
from job_queue import LANES, Job, JobQueue, decoded, queue_from_env
from leases import SLOW_CALL_SHARE
from session_store import SessionStore, store_from_env
from tasks import TASKS, TaskContext

MAX_RETRY_DELAY = 300.0  # seconds; backoff grows no further
WAKE_EVERY = 0.1         # seconds: how soon a waiting worker notices a stop signal
MIN_LEASE = 0.2          # seconds: renewed every third of it, never a busy loop


@dataclass(frozen=True)
class WorkerConfig:
    dyno: str
    lanes: tuple[str, ...]
    lease: float
    poll_interval: float
    retry_backoff: float
    stop_timeout: float
    burst: bool


def config_from_env(environ: Mapping[str, str]) -> WorkerConfig:
    return WorkerConfig(
        dyno=process_name(environ, "worker.1"),
        lanes=lanes_from_env(environ),
        lease=positive_number(environ, "JOB_LEASE", 30, 3600, minimum=MIN_LEASE),
        poll_interval=positive_number(environ, "POLL_INTERVAL", 0.5, 60, minimum=0.01),
        retry_backoff=positive_number(environ, "RETRY_BACKOFF", 2, MAX_RETRY_DELAY),
        stop_timeout=stop_timeout(environ),
        burst=environ.get("WORKER_BURST", "") == "1")


def lanes_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """WORKER_LANES: the lanes this copy serves, comma-separated, each at most once."""
    text = environ.get("WORKER_LANES", ",".join(LANES))
    lanes = tuple(lane.strip() for lane in text.split(","))
    if not set(lanes) <= set(LANES) or len(set(lanes)) != len(lanes):
        raise ConfigError(f"WORKER_LANES must name some of {', '.join(LANES)}, each once, "
                          f"separated by commas, got {text!r}")
    return lanes


class StopRequest:
    """Set by the signal handler, read by the loops. The handler does nothing else: work in
    a handler can deadlock on a lock the interrupted code holds (gunicorn #3198).

    The deadline starts when the signal arrives; a second signal moves it to now."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.signal_name: str | None = None
        self.deadline = float("inf")  # time.monotonic() by which this copy must be gone

    def record(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        self.deadline = now if self.signal_name else now + self.timeout
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signal_name is not None

    def time_is_up(self) -> bool:
        return time.monotonic() >= self.deadline

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake soon after a stop signal: a long POLL_INTERVAL must not delay it."""
        wake_at = time.monotonic() + seconds
        while not self.requested() and time.monotonic() < wake_at:
            time.sleep(min(WAKE_EVERY, max(0.0, wake_at - time.monotonic())))


@dataclass
class Worker:
    """What the claim loops of one worker copy share."""
    queue: JobQueue
    store: SessionStore
    config: WorkerConfig
    stop: StopRequest
    outage: Outage = field(default_factory=Outage)  # one line per wait, for all threads
    crashed: threading.Event = field(default_factory=threading.Event)

    def record(self, action: Callable[[], bool], what: str) -> bool:
        """Write how a job ended, waiting out a store that cannot answer, but not past
        the stop deadline (then `StillLocked`)."""
        return keep_trying(action, what, self.stop.time_is_up, self.outage)


class TaskRun:
    """One task running on a thread of its own, so that the worker can stop waiting for it.

    The thread is a daemon: one still running when the worker exits ends with the process,
    like a task cut off by SIGKILL, which at-least-once delivery already allows for."""

    def __init__(self, task: Callable, args: object, context: TaskContext, name: str):
        self.result_json: str | None = None
        self.error: str | None = None
        self.ended = threading.Event()
        threading.Thread(target=self.run, args=(task, args, context), name=name,
                         daemon=True).start()

    def run(self, task: Callable, args: object, context: TaskContext) -> None:
        try:
            self.result_json = json.dumps(task(args, context))
        except BaseException as error:  # on a thread, even SystemExit ends only the task
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.ended.set()

    def wait(self, stop: StopRequest) -> bool:
        """Wait for the task to end; False when the stop deadline comes first."""
        while not self.ended.wait(WAKE_EVERY):
            if stop.time_is_up():
                return False
        return True


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff, capped, with up to 10% jitter so that jobs that failed
    together (a database restart) do not all retry in the same instant."""
    # A job given back again and again keeps counting attempts: 2.0 ** 1024 overflows.
    delay = min(MAX_RETRY_DELAY, base * 2.0 ** min(attempt - 1, 30))
    return delay + random.uniform(0, delay / 10)


def renew_lease(worker: Worker, job: Job, finished: threading.Event) -> None:
    """Renew the lease every third of it, so that two missed renewals (a slow disk, a busy
    database) still do not lose the job; stop when the job ends or is no longer ours.
    `Event.wait` times this on the monotonic clock, as the other workers time the lease."""
    try:
        while not finished.wait(worker.config.lease / 3):
            if not keep_trying(lambda: worker.queue.extend_lease(job),
                               f"renewing the lease of job {job.id}", finished.is_set,
                               worker.outage):
                return
    except StillLocked:  # the job ended while the store could not answer
        return


@contextmanager
def lease_kept_alive(worker: Worker, job: Job) -> Iterator[None]:
    """Run the block while a background thread keeps the job's lease from running out.

    The thread is told to stop, not waited for: it may be waiting for the store, and the
    fence makes a late renewal harmless."""
    finished = threading.Event()
    threading.Thread(target=renew_lease, args=(worker, job, finished),
                     name=f"lease-{job.id}", daemon=True).start()
    try:
        yield
    finally:
        finished.set()


def log_outcome(job: Job, written: bool, line: str) -> None:
    """Log what was recorded, or that a stale worker's write was refused by the fence."""
    log(line if written else f"job {job.id} lease lost; result discarded")


def give_up(worker: Worker, job: Job, error: str) -> None:
    written = worker.record(lambda: worker.queue.mark_dead(job, error),
                            f"recording job {job.id} as dead")
    log_outcome(job, written, f"job {job.id} {job.task} dead after {job.attempt} "
                              f"attempt{'s' if job.attempt != 1 else ''}: {error}")


def record_failure(worker: Worker, job: Job, error: str) -> None:
    if job.attempt >= job.max_attempts:
        give_up(worker, job, error)
        return
    delay = retry_delay(job.attempt, worker.config.retry_backoff)
    written = worker.record(lambda: worker.queue.retry_later(job, error, delay),
                            f"recording job {job.id} as failed")
    log_outcome(job, written, f"job {job.id} {job.task} failed (attempt {job.attempt}/"
                              f"{job.max_attempts}): {error}; retry in {delay:.1f}s")


def hand_back_unfinished(worker: Worker, job: Job) -> None:
    """The stop deadline came first: the job goes back to the queue for another worker.
    The deadline has passed, so this is one try: if the store cannot answer even now,
    the worker leaves anyway (`StillLocked`) and the job's lease returns it later."""
    written = worker.record(lambda: worker.queue.give_back(job), f"giving job {job.id} back")
    log_outcome(job, written, f"job {job.id} {job.task} given back to the queue, unfinished "
                              f"after STOP_TIMEOUT={worker.config.stop_timeout:g}s; this "
                              f"attempt does not count")


def run_job(worker: Worker, job: Job) -> None:
    """Run one claimed job and record how it ended. A task's exception never ends the
    worker: it is the job's failure, retried or kept as the job's error."""
    task = TASKS.get(job.task)
    if task is None:
        give_up(worker, job, f"unknown task {job.task!r} (known: {', '.join(sorted(TASKS))})")
        return
    try:
        args = decoded(job.args_json)
    except ValueError as error:
        give_up(worker, job, f"its arguments cannot be decoded: {error}")
        return
    # The clock's ticks come every few seconds and say what they did themselves: a line
    # each for their start and end would scroll the launcher's `ps` table out of sight.
    quiet = job.lane == "housekeeping"
    if not quiet:
        log(f"job {job.id} {job.task} started (attempt {job.attempt}/{job.max_attempts})")
    started = time.monotonic()
    context = TaskContext(worker.store, job.attempt, worker.config.dyno, worker.queue)
    with lease_kept_alive(worker, job):
        run = TaskRun(task, args, context, f"job-{job.id}")
        in_time = run.wait(worker.stop)
    if not in_time:
        hand_back_unfinished(worker, job)
    elif run.error is not None:
        record_failure(worker, job, run.error)
    else:
        written = worker.record(lambda: worker.queue.finish(job, run.result_json),
                                f"recording job {job.id} as done")
        if written and quiet:
            return
        log_outcome(job, written,
                    f"job {job.id} {job.task} done in {time.monotonic() - started:.2f}s")


def idle_pause(config: WorkerConfig) -> float:
    """How long a claim loop with nothing to do sleeps: POLL_INTERVAL, but at most a
    quarter of the lease. A claim that waits that long for a busy store stops the lease
    watch's clocks (`leases.py`); a loop asleep through the whole busy spell would find,
    when it wakes, only the silence of owners that waited behind it."""
    return min(config.poll_interval, config.lease * SLOW_CALL_SHARE)


def work(worker: Worker, lane: str) -> None:
    """One job at a time from `lane` until asked to stop (or, in burst mode, until none is
    ready). The claim waits out a store that cannot answer, until a stop signal."""
    config = worker.config
    while not worker.stop.requested():
        try:
            job = keep_trying(lambda: worker.queue.claim_next_job(config.dyno, lane,
                                                                  config.lease),
                              f"{config.dyno} claiming a job", worker.stop.requested,
                              worker.outage)
        except StillLocked:  # told to stop while the store cannot answer: nothing in hand
            return
        if job is not None:
            run_job(worker, job)
        elif config.burst:
            log(f"{config.dyno} found no job ready in lane {lane} (burst mode)")
            return
        else:
            worker.stop.sleep(idle_pause(config))  # idle: poll again soon, not busily


def claim_loop(worker: Worker, lane: str) -> None:
    """A lane's thread. A store still unavailable at the stop deadline ends it; a bug
    ends the whole copy, loudly (`crashed`), never just this lane."""
    try:
        work(worker, lane)
    except StillLocked as error:  # a job in hand, the deadline passed, the store silent
        log(f"{worker.config.dyno} stops with the store still unavailable ({error}); the "
            f"job returns to the queue when its lease is seen to run out")
    except Exception:
        traceback.print_exc()
        worker.crashed.set()


def run_lanes(worker: Worker) -> int:
    """Start a claim loop per lane and wait for them all to end; the exit code."""
    loops = [threading.Thread(target=claim_loop, args=(worker, lane), name=f"lane-{lane}",
                              daemon=True) for lane in worker.config.lanes]
    for loop in loops:
        loop.start()
    announced = False
    while (alive := [loop for loop in loops if loop.is_alive()]) and not worker.crashed.is_set():
        if worker.stop.requested() and not announced:
            log(f"{worker.config.dyno} got {worker.stop.signal_name}: taking no new job, "
                f"finishing those in hand for at most {worker.config.stop_timeout:g}s")
            announced = True
        alive[0].join(WAKE_EVERY)  # back at once when it ends, or to look at the others
    if worker.crashed.is_set():
        log(f"{worker.config.dyno} stops: a claim loop failed (above); the jobs in hand "
            f"return to the queue when their leases are seen to run out")
        return 1
    return 0


def main() -> None:
    try:
        config = config_from_env(os.environ)
        db = database_from_env(os.environ)
        store = store_from_env(os.environ, db)
        queue = queue_from_env(os.environ, db)
    except ConfigError as error:
        print(f"worker: {error}", file=sys.stderr)
        sys.exit(2)
    stop = StopRequest(config.stop_timeout)
    signal.signal(signal.SIGTERM, stop.record)
    signal.signal(signal.SIGINT, stop.record)
    log(f"{config.dyno} ready (pid {os.getpid()}, lease {config.lease:g}s, "
        f"lanes {', '.join(config.lanes)}, {queue.kind} queue)")
    code = run_lanes(Worker(queue, store, config, stop))
    db.close()
    log(f"{config.dyno} stopped")
    sys.exit(code)


if __name__ == "__main__":
    main()
