"""The worker process: background jobs, scaled by running more copies (Factors VIII and VI).

Factor VIII says you scale a process type by running more copies of it, and Factor VI says
each copy keeps nothing it cannot lose. The terrible day this module prevents: a web
request runs a slow job inside itself, the copy is killed half-way (a deploy, a crash, an
out-of-memory kill), and the job is silently gone; or two copies of a naive worker both
run the same job. Here the web process only records the job in the shared queue (a table
in the `DATABASE_URL` file) and answers at once; any number of `worker` copies take jobs
from it, one job per copy at a time, and any copy can be killed at any moment.

How a job travels (the design of Solid Queue, GoodJob and Oban, on SQLite):

* `JobQueue.enqueue` inserts a row in state `queued`. A job with a unique `key` (the
  clock's ticks) is inserted at most once, whoever asks.
* `claim_next_job` takes the oldest ready job in one `BEGIN IMMEDIATE` transaction, so
  exactly one worker gets it, and gives it a *lease*: the job is ours until `lease_until`.
* While the task runs, a heartbeat thread extends the lease. A worker killed with SIGKILL
  stops extending it; when the lease runs out, the next claim puts the job back in the
  queue and another worker runs it.
* A task that raises is retried later with exponential backoff, up to `max_attempts`,
  then marked `dead` with its error kept. An unknown task name is `dead` at once.

Delivery is therefore **at-least-once**, never exactly-once: a worker may finish the work
and be killed before it records `done`, and then the job runs again elsewhere. So write a
task to be idempotent: running it twice must do no harm (compute and store a result,
delete what has expired, upsert rather than append; don't send "one more" email blindly).

The attempt number is the *fencing token*: a worker that lost its lease (paused, then
woken) still believes it owns the job, so every write it makes about the job checks
`attempts` and `state`, and a stale worker's result is discarded, not written over the
new owner's.

Configuration, read once in `main()`: DATABASE_URL, SESSION_STORE (the tasks read uploads
through it: with `memory` the worker has its own empty dict, never the web copy's, so a
`wordcount` cannot find the upload and ends dead; that is Factor VI's lesson again), DYNO
(default `worker.1`), JOB_LEASE (seconds, default 30), POLL_INTERVAL (idle sleep, default
0.5), RETRY_BACKOFF (base seconds, default 2), WORKER_BURST=1 (exit 0 when nothing is ready,
like rq's burst mode). SIGTERM or SIGINT: finish the job in hand, then exit 0.
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
from datetime import datetime, timezone
from typing import Callable, Iterator, Mapping

from session_store import (ConfigError, Database, SessionStore, database_from_env,
                           positive_number, store_from_env)

MAX_ATTEMPTS = 3
MAX_RETRY_DELAY = 300.0  # seconds; backoff grows no further

JOB_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    key TEXT UNIQUE,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    run_at REAL NOT NULL,
    worker TEXT,
    lease_until REAL,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, run_at);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task, id)
"""
JOB_COLUMNS = "id, task, args, state, attempts, worker, result, error, key"


@dataclass(frozen=True)
class Job:
    """A job as the worker that claimed it holds it. `attempt` is also its fencing token."""
    id: int
    task: str
    args: dict
    attempt: int
    max_attempts: int


class JobQueue:
    """The queue in the shared SQLite file; used by the web process, the clock and workers.

    Every method is one statement or one transaction, so the queue itself holds no state:
    any process can create a `JobQueue` and see the same jobs. `clock` gives the time (a
    test passes a fake one to expire a lease without waiting).
    """

    def __init__(self, db: Database, clock: Callable[[], float] = time.time):
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise ConfigError(f"SQLite {sqlite3.sqlite_version} is too old for the job queue: "
                              f"it needs 3.35 or newer (UPDATE ... RETURNING); use a Python "
                              f"built with a newer SQLite")
        self.db, self.clock = db, clock
        db.create_tables(JOB_TABLES)

    def enqueue(self, task: str, args: dict, key: str | None = None,
                max_attempts: int = MAX_ATTEMPTS) -> int | None:
        """New job id; None when a job with this unique key already exists."""
        now = self.clock()
        rows = self.db.query(
            "INSERT INTO jobs (task, args, key, max_attempts, run_at, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING id",
            (task, json.dumps(args), key, max_attempts, now, now, now))
        return rows[0]["id"] if rows else None

    def get(self, job_id: int) -> dict | None:
        """The job as JSON-able data (result decoded), or None when there is no such job."""
        rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return job_as_dict(rows[0]) if rows else None

    def recent(self, task: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first, the same dicts as `get`; only `task`'s jobs when it is given."""
        if task is None:
            rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?",
                                 (limit,))
        else:
            rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE task = ? "
                                 f"ORDER BY id DESC LIMIT ?", (task, limit))
        return [job_as_dict(row) for row in rows]

    def claim_next_job(self, worker: str, lease: float) -> Job | None:
        """Take the oldest ready job for `worker`, leased for `lease` seconds; None if none.

        BEGIN IMMEDIATE takes SQLite's write lock before the first read, so two workers
        can never both read the same job as ready and both take it: the second waits for
        the first to commit, then sees the job running.
        """
        now = self.clock()
        with self.db.write() as conn:
            self.recover_expired_leases(conn, now)
            rows = conn.execute(
                "UPDATE jobs SET state = 'running', worker = ?, lease_until = ?, "
                "attempts = attempts + 1, updated_at = ? "
                "WHERE id = (SELECT id FROM jobs WHERE state IN ('queued', 'failed') "
                "AND run_at <= ? ORDER BY run_at, id LIMIT 1) "
                "RETURNING id, task, args, attempts, max_attempts",
                (worker, now + lease, now, now)).fetchall()
        if not rows:
            return None
        row = rows[0]
        return Job(row["id"], row["task"], json.loads(row["args"]), row["attempts"],
                   row["max_attempts"])

    def recover_expired_leases(self, conn: sqlite3.Connection, now: float) -> None:
        """Give back the jobs of workers that stopped heartbeating (killed, frozen, cut off).

        Called inside the claim's transaction, so recovery and the next claim are one step.
        A job that already used its last attempt is not run again: it is dead.
        """
        conn.execute(
            "UPDATE jobs SET state = CASE WHEN attempts >= max_attempts "
            "THEN 'dead' ELSE 'queued' END, "
            "error = 'lease expired: worker ' || worker || ' stopped heartbeating', "
            "lease_until = NULL, updated_at = ? "
            "WHERE state = 'running' AND lease_until < ?", (now, now))

    def extend_lease(self, job: Job, lease: float) -> bool:
        """Keep the job ours `lease` seconds more; False when another worker owns it now."""
        now = self.clock()
        return self._update_if_still_ours(job, "lease_until = ?, updated_at = ?",
                                          (now + lease, now))

    def finish(self, job: Job, result_json: str) -> bool:
        """Record success; False (nothing written) when the lease was lost meanwhile."""
        return self._update_if_still_ours(
            job, "state = 'done', result = ?, error = NULL, lease_until = NULL, updated_at = ?",
            (result_json, self.clock()))

    def retry_later(self, job: Job, error: str, delay: float) -> bool:
        """Record a failure to be retried after `delay` seconds; False if the lease was lost."""
        now = self.clock()
        return self._update_if_still_ours(
            job, "state = 'failed', error = ?, run_at = ?, lease_until = NULL, updated_at = ?",
            (error, now + delay, now))

    def mark_dead(self, job: Job, error: str) -> bool:
        """Give up on the job, keeping its error; False if the lease was lost."""
        return self._update_if_still_ours(
            job, "state = 'dead', error = ?, lease_until = NULL, updated_at = ?",
            (error, self.clock()))

    def _update_if_still_ours(self, job: Job, assignments: str, params: tuple) -> bool:
        """The fence: write only while the job is running *this* attempt.

        A worker whose lease ran out may wake up and try to write. If another worker has
        claimed the job since, `attempts` has moved on; if the lease was only recovered,
        the state is no longer 'running'. Either way no row matches and nothing is written.
        """
        rows = self.db.query(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND attempts = ? "
            f"AND state = 'running' RETURNING id", (*params, job.id, job.attempt))
        return bool(rows)


def job_as_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["args"] = json.loads(job["args"])
    job["result"] = json.loads(job["result"]) if job["result"] is not None else None
    return job


# --- Tasks: plain functions (args, context) -> a JSON-able result ---------------------

@dataclass(frozen=True)
class TaskContext:
    store: SessionStore
    attempt: int  # 1 on the first run; a task can see that it is being retried
    worker: str


def number_arg(args: dict, name: str, default: float | None = None) -> float:
    """`args[name]` as a number >= 0, or a clear error (the job fails with it)."""
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"argument {name!r} must be a number >= 0, got {value!r}")
    return value


def sleep(args: dict, ctx: TaskContext) -> dict:
    """Sleep `seconds`: a stand-in for slow work, to watch jobs spread and to kill workers."""
    seconds = number_arg(args, "seconds")
    time.sleep(seconds)
    return {"slept": seconds}


def wordcount(args: dict, ctx: TaskContext) -> dict:
    """Count the words, lines and bytes of an upload, read from the backing store."""
    upload_id = args.get("upload")
    if not isinstance(upload_id, str):
        raise ValueError(f"argument 'upload' must be an upload id (a string), got {upload_id!r}")
    upload = ctx.store.load_upload(upload_id)
    if upload is None and ctx.store.kind == "memory":
        raise LookupError(f"no upload {upload_id} in the memory store: it lives in the "
                          f"memory of the web copy that took it, which no worker can see")
    if upload is None:
        raise LookupError(f"no upload {upload_id} in the {ctx.store.kind} store")
    return {"words": len(upload.data.split()), "lines": upload.data.count(b"\n"),
            "bytes": len(upload.data)}


def purge_expired_sessions(args: dict, ctx: TaskContext) -> dict:
    return {"purged": ctx.store.purge_expired()}


def heartbeat(args: dict, ctx: TaskContext) -> str:
    """A visible sign that the clock and the workers are alive."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"heartbeat at {now}: the clock enqueued it, {ctx.worker} ran it", flush=True)
    return now


def fail(args: dict, ctx: TaskContext) -> dict:
    """Raise on the first `times` attempts, then succeed; without `times`, always raise."""
    times = number_arg(args, "times", float("inf"))
    if ctx.attempt <= times:
        raise RuntimeError(f"failing on purpose on attempt {ctx.attempt}")
    return {"succeeded_on_attempt": ctx.attempt}


TASKS: dict[str, Callable[[dict, TaskContext], object]] = {
    "sleep": sleep,
    "wordcount": wordcount,
    "purge_expired_sessions": purge_expired_sessions,
    "heartbeat": heartbeat,
    "fail": fail,
}


# --- The worker process -----------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    dyno: str
    lease: float
    poll_interval: float
    retry_backoff: float
    burst: bool


def config_from_env(environ: Mapping[str, str]) -> Config:
    return Config(dyno=environ.get("DYNO", "worker.1"),
                  lease=positive_number(environ, "JOB_LEASE", 30),
                  poll_interval=positive_number(environ, "POLL_INTERVAL", 0.5),
                  retry_backoff=positive_number(environ, "RETRY_BACKOFF", 2),
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
    log(f"job {job.id} {job.task} started (attempt {job.attempt}/{job.max_attempts})")
    started = time.monotonic()
    with lease_kept_alive(queue, job, config.lease):
        try:
            result_json = json.dumps(task(job.args, TaskContext(store, job.attempt, config.dyno)))
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
