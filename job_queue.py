"""The job queue: a backing service for background work (Factors VI and VIII).

Factor VI keeps state out of the processes, and a job waiting to run is state. The
terrible day this module prevents: a job lives only in the memory of the process that
took it, that process is killed half-way (a deploy, a crash, an out-of-memory kill), and
the job is silently gone; or two copies of a naive worker both take the same job. Here a
job is a row in the shared SQLite file: the web process and the clock put jobs in
(`enqueue`), any number of `worker` copies take them out, and any copy can die at any
moment without losing one.

How a job travels (the design of Solid Queue, GoodJob and Oban, on SQLite):

* `enqueue` inserts a row in state `queued`. A job with a unique `key` (the clock's
  ticks) is inserted at most once, whoever asks.
* `claim_next_job` takes the oldest ready job in one `BEGIN IMMEDIATE` transaction, so
  exactly one worker gets it, and gives it a *lease*: the job is ours until `lease_until`.
* While the task runs, the worker extends the lease (`extend_lease`). A worker killed with
  SIGKILL stops extending it; when the lease runs out, the next claim puts the job back
  in the queue and another worker runs it.
* A task that raises is retried later (`retry_later`), up to `max_attempts`, then marked
  `dead` with its error kept (`mark_dead`).
* A worker told to stop that cannot finish in time gives the job back (`give_back`), as
  Sidekiq does on shutdown: the job is `queued` again at once, for another worker, and
  this attempt does not count against `max_attempts`.

Delivery is therefore **at-least-once**, never exactly-once: a worker may finish the work
and be killed before it records `done`, and then the job runs again elsewhere. So write a
task to be idempotent: running it twice must do no harm (compute and store a result,
delete what has expired, upsert rather than append; don't send "one more" email blindly).

The attempt number is the *fencing token*: a worker that lost its lease (paused, then
woken) still believes it owns the job, so every write it makes about the job checks
`attempts` and `state`, and a stale worker's result is discarded, not written over the
new owner's. So `attempts` only ever grows, even on a give-back: the next owner must
never hold a token the last one held.

What a job does is not here: the tasks are in `tasks.py`, run by `worker.py`.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable

from database import ConfigError, Database

MAX_ATTEMPTS = 3

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
    updated_at REAL NOT NULL,
    private INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, run_at);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task, id)
"""
JOB_COLUMNS = "id, task, args, state, attempts, max_attempts, worker, result, error, key, private"


@dataclass(frozen=True)
class Job:
    """A job as the worker that claimed it holds it. `attempt` is also its fencing token.

    `args_json` is left as stored: decoding it can fail (`decoded`), and that is the job's
    failure, for the worker to record, not a crash of the claim."""
    id: int
    task: str
    args_json: str
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
        add_private_column(db)

    def enqueue(self, task: str, args: dict, key: str | None = None,
                max_attempts: int = MAX_ATTEMPTS, private: bool = False) -> int | None:
        """New job id; None when a job with this unique key already exists.

        `private`: the job was enqueued for a user's session, and who may read its args
        and result is the web process's business; the queue only keeps the mark."""
        now = self.clock()
        rows = self.db.execute(
            "INSERT INTO jobs (task, args, key, max_attempts, run_at, created_at, updated_at, "
            "private) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING id",
            (task, json.dumps(args), key, max_attempts, now, now, now, private))
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
        return Job(row["id"], row["task"], row["args"], row["attempts"], row["max_attempts"])

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

    def give_back(self, job: Job) -> bool:
        """Put an unfinished job back in the queue, ready at once, without counting this
        attempt (a worker at its stop deadline); False if the lease was lost meanwhile.

        The attempt is given back by allowing one more (`max_attempts + 1`), not by
        lowering `attempts`: that is the fencing token, and lowering it would hand the
        next owner the very token this worker holds, so a late write from this worker
        (its lease thread, say) would pass the fence.
        """
        now = self.clock()
        return self._update_if_still_ours(
            job, "state = 'queued', max_attempts = max_attempts + 1, run_at = ?, "
                 "lease_until = NULL, updated_at = ?", (now, now))

    def _update_if_still_ours(self, job: Job, assignments: str, params: tuple) -> bool:
        """The fence: write only while the job is running *this* attempt.

        A worker whose lease ran out may wake up and try to write. If another worker has
        claimed the job since, `attempts` has moved on; if the lease was only recovered,
        the state is no longer 'running'. Either way no row matches and nothing is written.
        """
        rows = self.db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND attempts = ? "
            f"AND state = 'running' RETURNING id", (*params, job.id, job.attempt))
        return bool(rows)


def add_private_column(db: Database) -> None:
    """A jobs table made before jobs could be private gets the column, once: the check and
    the change are one transaction, so two processes starting at once cannot both add it."""
    with db.write() as conn:
        columns = [row["name"] for row in conn.execute("PRAGMA table_info(jobs)")]
        if "private" not in columns:
            conn.execute("ALTER TABLE jobs ADD COLUMN private INTEGER NOT NULL DEFAULT 0")


def decoded(text: str) -> object:
    """Stored JSON text to a value, or ValueError when this Python cannot hold it: nested
    too deep, or an integer longer than `sys.get_int_max_str_digits()` (4,300 digits since
    Python 3.11; an older Python may have stored it)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to decode") from None


def shown(text: str | None) -> object:
    """A stored JSON value to show; one that cannot be decoded is described instead, so
    that one bad row cannot break every list it appears in."""
    if text is None:
        return None
    try:
        return decoded(text)
    except ValueError as error:
        return f"(cannot be shown: {error})"


def job_as_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["private"] = bool(job["private"])
    job["args"], job["result"] = shown(job["args"]), shown(job["result"])
    return job
