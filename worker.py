"""The worker process: background jobs, scaled by running more copies (Factors VIII and VI).

Factor VIII says you scale a process type by running more copies of it, and Factor VI says
each copy keeps nothing it cannot lose. The terrible day this module prevents: a web
request runs a slow job inside itself, the copy is killed half-way (a deploy, a crash, an
out-of-memory kill), and the job is silently gone. Here the web process only records the
job in the shared queue (`job_queue.py`) and answers at once; any number of `worker`
copies take jobs from it, one job per copy at a time, and any copy can be killed at any
moment: its lease runs out and another copy runs the job.

What a worker does with a job: claim it, run the task (from `tasks.py`) on a thread of its
own while a second thread keeps the job's lease alive, then record how it ended: `done`,
failed and retried later with exponential backoff and jitter, or `dead` after
`max_attempts` (an unknown task name, or arguments that cannot be decoded, are dead at
once). Every record goes through the queue's fence, so a worker that lost its lease never
overwrites the new owner's result.

A locked database is a wait, not a crash: when another process holds the write lock past
the busy timeout, the worker logs one line and tries again (`keep_trying`), so the result
is recorded once, later. Meanwhile the lease may run out and another worker may run the
job again; the fence then discards this worker's late result.

Stopping has a deadline of its own. SIGTERM or SIGINT: take no new job, wait for the one
in hand up to STOP_TIMEOUT seconds, and if it is not finished by then, give it back to the
queue (`queued` again, the attempt not counted, as Sidekiq does on shutdown) and exit 0;
a second signal stops waiting at once. The task runs on its own thread precisely so that
the worker can stop waiting for it; the abandoned thread ends with the process. Nobody
needs to SIGKILL the worker, which matters when the process manager itself was killed.
One write already waiting for a locked database when the deadline comes can add up to
DATABASE_BUSY_TIMEOUT; if the database is still locked then, the worker exits anyway and
the job's lease returns it to the queue.

Configuration, read once in `main()`: DATABASE_URL, DATABASE_BUSY_TIMEOUT, SESSION_STORE
(the tasks read uploads through it: with `memory` the worker has its own empty dict, never
the web copy's, so a `wordcount` cannot find the upload and ends dead; that is Factor VI's
lesson again), the copy's name (DYNO, HONCHO_PROCESS_NAME or PS; default `worker.1`),
JOB_LEASE (seconds, default 30, from 1 to 3600), POLL_INTERVAL (idle sleep, default 0.5,
from 0.01 to 60), RETRY_BACKOFF (base seconds, default 2, at most 300), STOP_TIMEOUT (default 25,
under Heroku's 30 s before SIGKILL; at most 3600), WORKER_BURST=1 (exit 0 when nothing is
ready, like rq's burst mode).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from database import (ConfigError, StillLocked, StoreUnavailable, database_from_env,
                      keep_trying, log, positive_number, process_name, stop_timeout)
from job_queue import Job, JobQueue, decoded
from session_store import SessionStore, store_from_env
from tasks import TASKS, TaskContext

MAX_RETRY_DELAY = 300.0  # seconds; backoff grows no further
WAKE_EVERY = 0.1         # seconds: how soon a waiting worker notices a stop signal


@dataclass(frozen=True)
class WorkerConfig:
    dyno: str
    lease: float
    poll_interval: float
    retry_backoff: float
    stop_timeout: float
    burst: bool


def config_from_env(environ: Mapping[str, str]) -> WorkerConfig:
    return WorkerConfig(
        dyno=process_name(environ, "worker.1"),
        lease=positive_number(environ, "JOB_LEASE", 30, 3600, minimum=1),
        poll_interval=positive_number(environ, "POLL_INTERVAL", 0.5, 60, minimum=0.01),
        retry_backoff=positive_number(environ, "RETRY_BACKOFF", 2, MAX_RETRY_DELAY),
        stop_timeout=stop_timeout(environ),
        burst=environ.get("WORKER_BURST", "") == "1")


class StopRequest:
    """Set by the signal handler, read by the loop. The handler does nothing else: work in
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


def renew_lease(queue: JobQueue, job: Job, lease: float, finished: threading.Event) -> None:
    """Extend the lease every third of it, so that two missed renewals (a slow disk, a busy
    database) still do not lose the job; stop when the job ends or is no longer ours."""
    while not finished.wait(lease / 3):
        try:
            if not queue.extend_lease(job, lease):
                return
        except StoreUnavailable as error:  # locked past the busy timeout: try next time
            log(f"job {job.id} could not extend its lease ({error}); trying again")


@contextmanager
def lease_kept_alive(queue: JobQueue, job: Job, lease: float) -> Iterator[None]:
    """Run the block while a background thread keeps the job's lease from running out.

    The thread is told to stop, not waited for: it may be waiting for a locked database,
    and the fence makes a late extension harmless."""
    finished = threading.Event()
    threading.Thread(target=renew_lease, args=(queue, job, lease, finished),
                     name=f"lease-{job.id}", daemon=True).start()
    try:
        yield
    finally:
        finished.set()


def log_outcome(job: Job, written: bool, line: str) -> None:
    """Log what was recorded, or that a stale worker's write was refused by the fence."""
    log(line if written else f"job {job.id} lease lost; result discarded")


def give_up(queue: JobQueue, job: Job, error: str, stop: StopRequest) -> None:
    written = keep_trying(lambda: queue.mark_dead(job, error),
                          f"recording job {job.id} as dead", stop.time_is_up)
    log_outcome(job, written, f"job {job.id} {job.task} dead after {job.attempt} "
                              f"attempt{'s' if job.attempt != 1 else ''}: {error}")


def record_failure(queue: JobQueue, job: Job, error: str, config: WorkerConfig,
                   stop: StopRequest) -> None:
    if job.attempt >= job.max_attempts:
        give_up(queue, job, error, stop)
        return
    delay = retry_delay(job.attempt, config.retry_backoff)
    written = keep_trying(lambda: queue.retry_later(job, error, delay),
                          f"recording job {job.id} as failed", stop.time_is_up)
    log_outcome(job, written, f"job {job.id} {job.task} failed (attempt {job.attempt}/"
                              f"{job.max_attempts}): {error}; retry in {delay:.1f}s")


def hand_back_unfinished(queue: JobQueue, job: Job, config: WorkerConfig,
                         stop: StopRequest) -> None:
    """The stop deadline came first: the job goes back to the queue for another worker.
    The deadline has passed, so this is one try: if the database is locked even now,
    the worker leaves anyway (`StillLocked`) and the job's lease returns it later."""
    written = keep_trying(lambda: queue.give_back(job), f"giving job {job.id} back",
                          stop.time_is_up)
    log_outcome(job, written, f"job {job.id} {job.task} given back to the queue, unfinished "
                              f"after STOP_TIMEOUT={config.stop_timeout:g}s; this attempt "
                              f"does not count")


def run_job(queue: JobQueue, job: Job, store: SessionStore, config: WorkerConfig,
            stop: StopRequest) -> None:
    """Run one claimed job and record how it ended. A task's exception never ends the
    worker: it is the job's failure, retried or kept as the job's error."""
    task = TASKS.get(job.task)
    if task is None:
        give_up(queue, job, f"unknown task {job.task!r} (known: {', '.join(sorted(TASKS))})",
                stop)
        return
    try:
        args = decoded(job.args_json)
    except ValueError as error:
        give_up(queue, job, f"its arguments cannot be decoded: {error}", stop)
        return
    log(f"job {job.id} {job.task} started (attempt {job.attempt}/{job.max_attempts})")
    started = time.monotonic()
    with lease_kept_alive(queue, job, config.lease):
        run = TaskRun(task, args, TaskContext(store, job.attempt, config.dyno), f"job-{job.id}")
        in_time = run.wait(stop)
    if not in_time:
        hand_back_unfinished(queue, job, config, stop)
    elif run.error is not None:
        record_failure(queue, job, run.error, config, stop)
    else:
        written = keep_trying(lambda: queue.finish(job, run.result_json),
                              f"recording job {job.id} as done", stop.time_is_up)
        log_outcome(job, written,
                    f"job {job.id} {job.task} done in {time.monotonic() - started:.2f}s")


def work(queue: JobQueue, store: SessionStore, config: WorkerConfig, stop: StopRequest) -> None:
    """One job at a time until asked to stop (or, in burst mode, until nothing is ready).
    More throughput comes from more worker copies, not from threads in this one."""
    while not stop.requested():
        job = keep_trying(lambda: queue.claim_next_job(config.dyno, config.lease),
                          f"{config.dyno} claiming a job", stop.requested)
        if job is not None:
            run_job(queue, job, store, config, stop)
        elif config.burst:
            log(f"{config.dyno} found no job ready (burst mode)")
            return
        else:
            stop.sleep(config.poll_interval)  # idle: poll again soon, without a busy loop
    log(f"{config.dyno} got {stop.signal_name}: stopping between jobs")


def main() -> None:
    try:
        config = config_from_env(os.environ)
        db = database_from_env(os.environ)
        store = store_from_env(os.environ, db)
        queue = JobQueue(db)
    except ConfigError as error:
        print(f"worker: {error}", file=sys.stderr)
        sys.exit(2)
    stop = StopRequest(config.stop_timeout)
    signal.signal(signal.SIGTERM, stop.record)
    signal.signal(signal.SIGINT, stop.record)
    log(f"{config.dyno} ready (pid {os.getpid()}, lease {config.lease:g}s)")
    try:
        work(queue, store, config, stop)
    except StillLocked as error:  # raised only once told to stop
        log(f"{config.dyno} stops with the database still locked ({error}); any job it "
            f"held returns to the queue when its lease runs out")
    db.close()
    log(f"{config.dyno} stopped")


if __name__ == "__main__":
    main()
