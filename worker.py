"""The worker process: background jobs, scaled by running more copies (Factors VIII and VI).

Factor VIII says you scale a process type by running more copies of it, and Factor VI says
each copy keeps nothing it cannot lose. The terrible day this module prevents: a web
request runs a slow job inside itself, the copy is killed half-way (a deploy, a crash, an
out-of-memory kill), and the job is silently gone. Here the web process only records the
job in the shared queue (`job_queue.py`) and answers at once; any number of `worker`
copies take jobs from it, one job per copy at a time, and any copy can be killed at any
moment: its lease runs out and another copy runs the job.

What a worker does with a job: claim it, keep its lease alive from a second thread while
the task (from `tasks.py`) runs, then record how it ended: `done`, failed and retried
later with exponential backoff and jitter, or `dead` after `max_attempts` (an unknown
task name, or arguments that cannot be decoded, are dead at once). Every record goes
through the queue's fence, so a worker that lost its lease never overwrites the new
owner's result.

Configuration, read once in `main()`: DATABASE_URL, DATABASE_BUSY_TIMEOUT, SESSION_STORE
(the tasks read uploads through it: with `memory` the worker has its own empty dict, never
the web copy's, so a `wordcount` cannot find the upload and ends dead; that is Factor VI's
lesson again), the copy's name (DYNO, HONCHO_PROCESS_NAME or PS; default `worker.1`),
JOB_LEASE (seconds, default 30, at most 3600), POLL_INTERVAL (idle sleep, default 0.5, at
most 60), RETRY_BACKOFF (base seconds, default 2, at most 300), WORKER_BURST=1 (exit 0 when
nothing is ready, like rq's burst mode). SIGTERM or SIGINT: finish the job in hand, then exit 0.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

from database import ConfigError, database_from_env, positive_number, process_name
from job_queue import Job, JobQueue, decoded
from session_store import SessionStore, store_from_env
from tasks import TASKS, TaskContext

MAX_RETRY_DELAY = 300.0  # seconds; backoff grows no further


@dataclass(frozen=True)
class Config:
    dyno: str
    lease: float
    poll_interval: float
    retry_backoff: float
    burst: bool


def config_from_env(environ: Mapping[str, str]) -> Config:
    return Config(dyno=process_name(environ, "worker.1"),
                  lease=positive_number(environ, "JOB_LEASE", 30, 3600),
                  poll_interval=positive_number(environ, "POLL_INTERVAL", 0.5, 60),
                  retry_backoff=positive_number(environ, "RETRY_BACKOFF", 2, MAX_RETRY_DELAY),
                  burst=environ.get("WORKER_BURST", "") == "1")


def log(line: str) -> None:
    print(line, flush=True)


class StopRequest:
    """Set by the signal handler, read by the loop. The handler does nothing else: work in
    a handler can deadlock on a lock the interrupted code holds (gunicorn #3198)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def record(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff, capped, with up to 10% jitter so that jobs that failed
    together (a database restart) do not all retry in the same instant."""
    delay = min(MAX_RETRY_DELAY, base * 2 ** (attempt - 1))
    return delay + random.uniform(0, delay / 10)


def renew_lease(queue: JobQueue, job: Job, lease: float, finished: threading.Event) -> None:
    """Extend the lease every third of it, so that two missed renewals (a slow disk, a busy
    database) still do not lose the job; stop when the job ends or is no longer ours."""
    while not finished.wait(lease / 3):
        try:
            if not queue.extend_lease(job, lease):
                return
        except sqlite3.OperationalError as error:  # busy past its timeout: try next time
            log(f"job {job.id} could not extend its lease ({error}); trying again")


@contextmanager
def lease_kept_alive(queue: JobQueue, job: Job, lease: float) -> Iterator[None]:
    """Run the block while a background thread keeps the job's lease from running out."""
    finished = threading.Event()
    thread = threading.Thread(target=renew_lease, args=(queue, job, lease, finished),
                              name=f"lease-{job.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()


def log_outcome(job: Job, written: bool, line: str) -> None:
    """Log what was recorded, or that a stale worker's write was refused by the fence."""
    log(line if written else f"job {job.id} lease lost; result discarded")


def give_up(queue: JobQueue, job: Job, error: str) -> None:
    log_outcome(job, queue.mark_dead(job, error),
                f"job {job.id} {job.task} dead after {job.attempt} "
                f"attempt{'s' if job.attempt != 1 else ''}: {error}")


def record_failure(queue: JobQueue, job: Job, error: str, config: Config) -> None:
    if job.attempt >= job.max_attempts:
        give_up(queue, job, error)
        return
    delay = retry_delay(job.attempt, config.retry_backoff)
    log_outcome(job, queue.retry_later(job, error, delay),
                f"job {job.id} {job.task} failed (attempt {job.attempt}/{job.max_attempts}): "
                f"{error}; retry in {delay:.1f}s")


def run_job(queue: JobQueue, job: Job, store: SessionStore, config: Config) -> None:
    """Run one claimed job and record how it ended. A task's exception never ends the
    worker: it is the job's failure, retried or kept as the job's error."""
    task = TASKS.get(job.task)
    if task is None:
        give_up(queue, job, f"unknown task {job.task!r} (known: {', '.join(sorted(TASKS))})")
        return
    try:
        args = decoded(job.args_json)
    except ValueError as error:
        give_up(queue, job, f"its arguments cannot be decoded: {error}")
        return
    log(f"job {job.id} {job.task} started (attempt {job.attempt}/{job.max_attempts})")
    started = time.monotonic()
    with lease_kept_alive(queue, job, config.lease):
        try:
            result_json = json.dumps(task(args, TaskContext(store, job.attempt, config.dyno)))
        except Exception as error:
            record_failure(queue, job, f"{type(error).__name__}: {error}", config)
            return
    log_outcome(job, queue.finish(job, result_json),
                f"job {job.id} {job.task} done in {time.monotonic() - started:.2f}s")


def work(queue: JobQueue, store: SessionStore, config: Config, stop: StopRequest) -> None:
    """One job at a time until asked to stop (or, in burst mode, until nothing is ready).
    More throughput comes from more worker copies, not from threads in this one."""
    while stop.signal_name is None:
        job = queue.claim_next_job(config.dyno, config.lease)
        if job is not None:
            run_job(queue, job, store, config)
        elif config.burst:
            log(f"{config.dyno} found no job ready (burst mode)")
            return
        else:
            time.sleep(config.poll_interval)  # idle: poll again soon, without a busy loop
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
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop.record)
    signal.signal(signal.SIGINT, stop.record)
    log(f"{config.dyno} ready (pid {os.getpid()}, lease {config.lease:g}s)")
    work(queue, store, config, stop)
    db.close()
    log(f"{config.dyno} stopped")


if __name__ == "__main__":
    main()
