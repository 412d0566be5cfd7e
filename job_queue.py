"""The job queue: a backing service for background work (Factors VI and VIII).

Factor VI keeps state out of the processes, and a job waiting to run is state. The
terrible day this module prevents: a job lives only in the memory of the process that
took it, that process is killed half-way (a deploy, a crash, an out-of-memory kill), and
the job is silently gone; or two copies of a naive worker both run the same job; or one
client's flood of jobs leaves everyone else's, and the clock's housekeeping, waiting for
days. Here the web process and the clock put jobs in (`enqueue`), any number of `worker`
copies take them out (`claim_next_job`), and any copy can die at any moment.

One contract, `JobQueue` (read it first: delivery, leases, the fence, retries, give-back),
and a class per backing service side by side, as `session_store.py` holds sessions:
`SQLiteJobQueue` makes each step one `BEGIN IMMEDIATE` transaction, `RedisJobQueue` one
Lua script (`job_scripts.py`). `open_queue` picks the one for the service DATABASE_URL
names (`database.py`). The design is Solid Queue's, GoodJob's and Oban's; BullMQ's on Redis.

**Lanes.** Every job is in one: `housekeeping` (the clock's ticks), `users` (a logged-in
session's) or `public` (anyone else's). A worker runs one job at a time per lane, so a
flood of hour-long public jobs delays neither a user's job nor the session purge. In the
same atomic step `enqueue` refuses (429) what would pass a quota: MAX_OWN_QUEUED
unfinished jobs per owner (a hash of a session id), MAX_PUBLIC_QUEUED waiting in the
public lane, MAX_QUEUED in all. A unique `key` (a clock's tick) goes in once, however many
clocks ask; keyed ticks pass the quotas and the ceiling: they make room (the purges).

**Leases on no one's wall clock.** No time is stored with a lease: each claiming process
watches the running jobs renew, on its own monotonic clock (`leases.py`), and recovers a
job whose renewals it has seen stop for longer than the job's lease, by a write fenced on
what it saw. No two clocks are ever compared.

What still reads the wall clock: `run_at`, when a retry is due, and the ages retention
compares. A step forward runs retries and purges early, a step back delays them; between
hosts whose clocks disagree a retry runs early or late by the difference. None of that
runs a job twice at once. The clock's ticks are the clock's business (`clock.py`).

**Retention.** Done and dead jobs are kept JOB_RETENTION seconds, at most MAX_FINISHED
of each; `purge_finished_jobs` (a clock's schedule) deletes the rest in small batches. The
clock alone finishes 5,760 jobs a day (a heartbeat every 30 s, two purges a minute): kept
to 10,000 of each state, plus those since the last purge.

Delivery is **at-least-once**, never exactly-once: a worker may finish the work and be
killed before it records `done`, and the job runs again elsewhere. So a task must be
idempotent (compute and store a result, delete what has expired, upsert rather than
append; don't send "one more" email blindly). Tasks are in `tasks.py`, run by `worker.py`.
"""
from __future__ import annotations

import json
import math
import secrets
import sqlite3
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from database import (BackingService, ConfigError, Database, Refused, Room, room_from_env,
                      waits_recognised, whole_number, whole_seconds)
from job_scripts import CLAIM, END_ATTEMPT, ENQUEUE, EXTEND, PURGE, SIGHTINGS
from leases import LeaseWatch, Sighting
from redis_client import Redis

LANES = ("housekeeping", "users", "public")  # a worker's claim loops, in this order
MAX_ATTEMPTS = 3
MAX_COUNT, MAX_RETENTION = 1_000_000, 400 * 86400  # settings above these are typos


@dataclass(frozen=True)
class Limits:
    """What the queue holds at most (the settings of the same names, upper case)."""
    max_own_queued: int = 10          # unfinished (queued, failed, running) per owner
    max_public_queued: int = 100      # waiting (queued or failed) in the public lane
    max_queued: int = 10_000          # waiting in all lanes
    max_finished: int = 10_000        # done jobs kept at most, and dead jobs
    job_retention: int = 7 * 86400    # seconds a done or dead job is kept


def limits_from_env(environ: Mapping[str, str]) -> Limits:
    """Each limit from the setting of its name, upper case; the defaults are `Limits`'."""
    default = Limits()
    counts = (whole_number(environ, name.upper(), getattr(default, name), MAX_COUNT)
              for name in ("max_own_queued", "max_public_queued", "max_queued", "max_finished"))
    return Limits(*counts, whole_seconds(environ, "JOB_RETENTION", default.job_retention,
                                         MAX_RETENTION))


@dataclass(frozen=True)
class NewJob:  # what `enqueue` hands the store
    task: str
    args_json: str
    lane: str
    owner: str | None
    private: bool
    key: str | None
    max_attempts: int


@dataclass(frozen=True)
class Job:
    """A job as the worker that claimed it holds it. `token` is its claim's fencing token.
    `args_json` is left as stored: decoding it can fail (`decoded`), and that is the job's
    failure, for the worker to record, not a crash of the claim."""
    id: int
    task: str
    args_json: str
    attempt: int
    max_attempts: int
    lane: str
    token: str


def refusal(limit: str, limits: Limits) -> Refused:
    """Refused(429), saying which limit and what to do."""
    messages = {
        "own": f"you have {limits.max_own_queued} jobs queued or running, the most one "
               f"session may have (MAX_OWN_QUEUED); wait until one is done, then try again",
        "public": f"the public lane holds {limits.max_public_queued} waiting jobs, its most "
                  f"(MAX_PUBLIC_QUEUED); log in to use the users' lane, or try again later",
        "queued": f"the queue holds {limits.max_queued} waiting jobs, its most (MAX_QUEUED); "
                  f"try again later"}
    return Refused(429, messages[limit])


class JobQueue:
    """The contract every store fills in; the web process, the clock and workers use it.

    * Delivery is at-least-once: a claimed job not recorded as ended (its worker killed,
      frozen, cut off) is recovered by another worker's claim and runs again.
    * A claim holds a lease: the worker renews it every third of `lease` seconds. A job
      whose renewals a claiming process has seen stop for longer than its lease, on that
      process's monotonic clock, is recovered: `queued` again, or `dead` if it had used
      its last attempt. Never sooner, whatever the wall clocks do, nor while the store
      was too busy to take a renewal (`LeaseWatch`).
    * Each claim draws a fencing token, random (`secrets`), stored with the job. Every
      write about a claimed job (renew, finish, retry, dead, give back) happens only while
      the job runs under that token, else returns False, writing nothing: a stale worker's
      late result is discarded. Not the id and attempt: a store that lost its data (Redis
      restarted without persistence, a file put back from a backup) hands them out again,
      to another job.
    * A failed attempt is retried at `run_at` (the worker's backoff); after `max_attempts`
      the job is dead, its last error kept.
    * A job given back at a stop deadline is queued at once, and that attempt does not
      count: `max_attempts` grows by one.
    * Each method is one atomic step of the store (a transaction, a script): any process
      can open a queue and see the same jobs; the object keeps only its notes of running
      jobs. A store that cannot answer raises one of `database.WAITS`: callers wait.
      Every step in the store is `timed`: a slow one stops the lease watch's clocks.
      `clock` is the wall clock (`run_at`, retention), `monotonic` times the leases.
    """
    kind = "abstract"

    def __init__(self, limits: Limits, room: Room | None, clock: Callable[[], float],
                 monotonic: Callable[[], float]):
        self.limits, self.room, self.clock, self.monotonic = limits, room, clock, monotonic
        self.watches = {lane: LeaseWatch(monotonic) for lane in LANES}

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Time a call to the store. One that took long says the store was busy for every
        process (SQLite's write lock held, Redis frozen), and one that failed that it was
        out of reach (Redis restarting) however soon it failed: no owner could renew
        meanwhile either, so each watch counts silence again from its end."""
        began = self.monotonic()
        took = math.inf  # until the call returns
        try:
            yield
            took = self.monotonic() - began
        finally:
            ended = self.monotonic()
            for watch in self.watches.values():
                watch.store_was_slow(took, ended)

    def enqueue(self, task: str, args: dict, lane: str = "public", owner: str | None = None,
                private: bool = False, key: str | None = None,
                max_attempts: int = MAX_ATTEMPTS) -> int | None:
        """New job id; None when a job with this unique key already exists.

        `owner`: an opaque string, the same for the jobs of one session (a hash of its id,
        never the id). `private`: who may read the job's args and result is the web
        process's business; the queue only keeps the mark. Raises Refused(429) beyond a
        quota, StoreFull (507) when the store has no room."""
        if lane not in LANES:
            raise ValueError(f"lane must be one of {', '.join(LANES)}, got {lane!r}")
        exempt = lane == "housekeeping" and key is not None  # the clock's ticks
        if not exempt and self.room is not None:
            self.room.check()
        new = NewJob(task, json.dumps(args), lane, owner, private, key, max_attempts)
        outcome = self._insert(new, exempt)
        if isinstance(outcome, str):
            raise refusal(outcome, self.limits)
        return outcome

    def get(self, job_id: int) -> dict | None:
        """{id, task, args, state, attempts, max_attempts, worker, result, error, key,
        private} (args and result decoded), or None when there is no such job."""
        raise NotImplementedError

    def recent(self, task: str | None = None, before: int | None = None,
               limit: int = 100) -> list[dict]:
        """Newest first, the same dicts as `get`: only `task`'s jobs when it is given,
        only ids below `before` when it is given (the next page starts at the last id)."""
        raise NotImplementedError

    def claim_next_job(self, worker: str, lane: str, lease: float) -> Job | None:
        """Recover the lane's jobs whose renewals stopped, then take its oldest ready job
        for `worker`, leased for `lease` seconds; None when none is ready."""
        with self.timed():
            expired = self.watches[lane].expired(lambda: self._running(lane))
        return self._recover_and_claim(lane, expired, worker, lease, secrets.token_hex(16))

    def extend_lease(self, job: Job) -> bool:
        """Renew the lease (one more heartbeat); False when the job is no longer ours."""
        raise NotImplementedError

    def finish(self, job: Job, result_json: str) -> bool:
        """Record success; False (nothing written) when the job was lost meanwhile."""
        return self._end_attempt(job, "done", result=result_json)

    def retry_later(self, job: Job, error: str, delay: float) -> bool:
        """Record a failure to be retried after `delay` seconds; False if the job was lost."""
        return self._end_attempt(job, "failed", error=error, run_at=self.clock() + delay)

    def mark_dead(self, job: Job, error: str) -> bool:
        """Give up on the job, keeping its error; False if the job was lost."""
        return self._end_attempt(job, "dead", error=error)

    def give_back(self, job: Job) -> bool:
        """Queue an unfinished job again at once, this attempt not counted (a worker at its
        stop deadline); False if the job was lost meanwhile."""
        return self._end_attempt(job, "queued", run_at=self.clock(), more_attempts=1,
                                 error="given back unfinished at its worker's stop deadline; "
                                       "this attempt does not count")

    def purge_finished(self, batch: int = 500) -> int:
        """Delete the done and dead jobs past JOB_RETENTION or beyond the newest
        MAX_FINISHED of each, `batch` at a time; how many went."""
        total = 0
        for state in ("done", "dead"):
            deleted = batch
            while deleted == batch:  # a batch short of full was the last
                deleted = self.purge_batch(state, batch)
                total += deleted
        return total

    def purge_batch(self, state: str, batch: int) -> int:
        """One short step of the purge: at most `batch` of the oldest `state` jobs that
        are past keeping; how many went."""
        raise NotImplementedError

    # Each store's own steps: `_insert` (the id; None for a key already there; the name of
    # a quota it would pass), `_running`, `_recover_and_claim` (given the new claim's
    # token), `_end_attempt` (fenced).


# --- SQLite: one file, transactions that take the write lock first ------------------------

JOB_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    key TEXT UNIQUE,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    run_at REAL NOT NULL,
    worker TEXT, result TEXT, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task, id)
"""
# Columns added since the first release: every file gains those it lacks (`add_columns`).
# A file from before heartbeats held `lease_until` (a wall-clock time); it is left unused.
ADDED_COLUMNS = {
    "private": "INTEGER NOT NULL DEFAULT 0",
    "lane": "TEXT NOT NULL DEFAULT 'public'",
    "owner": "TEXT",
    "heartbeat": "INTEGER NOT NULL DEFAULT 0",
    "lease": "REAL NOT NULL DEFAULT 30",  # JOB_LEASE's default, for jobs running at upgrade
    "token": "TEXT",  # the running claim's; NULL for jobs claimed before tokens
}
# Partial indexes hold only the rows a question is about: waiting jobs (claims in run_at
# order, quotas), running ones (the lease watch), an owner's unfinished. By age: the purge.
JOB_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (lane, run_at)
    WHERE state IN ('queued', 'failed');
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (lane) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_unfinished_by_owner ON jobs (owner)
    WHERE state IN ('queued', 'failed', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, updated_at)
"""
JOB_COLUMNS = "id, task, args, state, attempts, max_attempts, worker, result, error, key, private"
COUNTS = """SELECT
    (SELECT count(*) FROM jobs WHERE state IN ('queued', 'failed')),
    (SELECT count(*) FROM jobs WHERE lane = 'public' AND state IN ('queued', 'failed')),
    (SELECT count(*) FROM jobs WHERE owner = ? AND state IN ('queued', 'failed', 'running'))"""


class SQLiteJobQueue(JobQueue):
    """The queue in the shared SQLite file. Each step is one transaction that starts with
    `BEGIN IMMEDIATE` (`Database.write`), which takes the write lock before the first
    read: two workers can never both read a job as ready and both take it, and two web
    copies can never both count a quota as unreached and both pass it."""
    kind = "sqlite"

    def __init__(self, db: Database, limits: Limits = Limits(), room: Room | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise ConfigError(f"SQLite {sqlite3.sqlite_version} is too old for the job queue: "
                              f"it needs 3.35 or newer (UPDATE ... RETURNING); use a Python "
                              f"built with a newer SQLite")
        super().__init__(limits, room, clock, monotonic)
        self.db = db
        db.create_tables(JOB_TABLE)  # a file that is not ours fails here: ConfigError
        add_columns(db)
        db.create_tables(JOB_INDEXES)

    def _insert(self, new, exempt):
        now = self.clock()
        with self.timed(), self.db.write() as conn:
            if new.key is not None and conn.execute("SELECT 1 FROM jobs WHERE key = ?",
                                                    (new.key,)).fetchall():
                return None
            if not exempt and (limit := self._quota_reached(conn, new)):
                return limit
            return conn.execute(
                "INSERT INTO jobs (task, args, key, lane, owner, private, max_attempts, run_at, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (new.task, new.args_json, new.key, new.lane, new.owner, new.private,
                 new.max_attempts, now, now, now)).fetchone()[0]

    def _quota_reached(self, conn: sqlite3.Connection, new: NewJob) -> str | None:
        queued, public, own = conn.execute(COUNTS, (new.owner,)).fetchone()
        if queued >= self.limits.max_queued:
            return "queued"
        if new.lane == "public" and public >= self.limits.max_public_queued:
            return "public"
        if new.owner is not None and own >= self.limits.max_own_queued:
            return "own"
        return None

    def get(self, job_id):
        rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return job_as_dict(rows[0]) if rows else None

    def recent(self, task=None, before=None, limit=100):
        where = " AND ".join(test for test, value in (("task = ?", task), ("id < ?", before))
                             if value is not None)
        params = tuple(value for value in (task, before) if value is not None)
        rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs {'WHERE ' if where else ''}"
                             f"{where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [job_as_dict(row) for row in rows]

    def claim_next_job(self, worker, lane, lease):
        # One transaction for the lease watch's read, the recovery and the claim: the
        # write lock is taken once, and no other claim runs in between. The wait for the
        # lock is timed alone, before the watch reads: the owners' renewals waited too.
        with ExitStack() as transaction:
            with self.timed():
                transaction.enter_context(self.db.write())
            return super().claim_next_job(worker, lane, lease)

    def _running(self, lane):
        rows = self.db.query("SELECT id, coalesce(token, ''), heartbeat, lease FROM jobs "
                             "WHERE lane = ? AND state = 'running'", (lane,))
        return [Sighting(*row) for row in rows]

    def _recover_and_claim(self, lane, expired, worker, lease, token):
        now = self.clock()
        for job in expired:  # fenced on the pair seen: a renewal since then wins
            self.db.execute(
                "UPDATE jobs SET state = CASE WHEN attempts >= max_attempts "
                "THEN 'dead' ELSE 'queued' END, "
                "error = 'lease expired: worker ' || worker || ' stopped heartbeating', "
                "updated_at = ? WHERE id = ? AND state = 'running' "
                "AND coalesce(token, '') = ? AND heartbeat = ?",
                (now, job.id, job.token, job.heartbeat))
        rows = self.db.execute(
            "UPDATE jobs SET state = 'running', worker = ?, lease = ?, token = ?, "
            "heartbeat = 0, attempts = attempts + 1, updated_at = ? "
            "WHERE id = (SELECT id FROM jobs WHERE lane = ? AND state IN ('queued', 'failed') "
            "AND run_at <= ? ORDER BY run_at, id LIMIT 1) "
            "RETURNING id, task, args, attempts, max_attempts, lane, token",
            (worker, lease, token, now, lane, now))
        return Job(*rows[0]) if rows else None

    def extend_lease(self, job):
        return self._update_if_still_ours(job, "heartbeat = heartbeat + 1", ())

    def _end_attempt(self, job, state, result=None, error=None, run_at=None,
                     more_attempts=0):
        return self._update_if_still_ours(
            job, "state = ?, result = ?, error = ?, run_at = coalesce(?, run_at), "
                 "max_attempts = max_attempts + ?, updated_at = ?",
            (state, result, storable(error), run_at, more_attempts, self.clock()))

    def _update_if_still_ours(self, job: Job, assignments: str, params: tuple) -> bool:
        """The fence: write only while the job is running under *this* claim's token."""
        with self.timed():
            rows = self.db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND token = ? "
                f"AND state = 'running' RETURNING id", (*params, job.id, job.token))
        return bool(rows)

    def purge_batch(self, state, batch):
        cutoff = self.clock() - self.limits.job_retention
        with self.timed(), self.db.write() as conn:
            count, old = conn.execute("SELECT count(*), total(updated_at < ?) FROM jobs "
                                      "WHERE state = ?", (cutoff, state)).fetchone()
            # Both rules pick the oldest: those past retention, those beyond the newest
            # MAX_FINISHED. The newest id of all stays, so that SQLite never hands it out
            # again (it takes max(id) + 1): a session that listed it must not see another.
            return conn.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = ? "
                "AND id < (SELECT max(id) FROM jobs) ORDER BY updated_at LIMIT ?)",
                (state, max(0, min(batch, max(int(old), count - self.limits.max_finished))))
            ).rowcount


def add_columns(db: Database) -> None:
    """A jobs table made by an earlier release gains the columns it lacks, once: the check
    and the change are one transaction, so two processes starting at once cannot both add
    them. Its unique-keyed jobs were the clock's ticks: they join the housekeeping lane."""
    with db.write() as conn:
        columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        for name, definition in ADDED_COLUMNS.items():
            if name not in columns:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        if "lane" not in columns:
            conn.execute("UPDATE jobs SET lane = 'housekeeping' WHERE key IS NOT NULL")
        conn.execute("DROP INDEX IF EXISTS jobs_ready")  # (state, run_at): now jobs_waiting


def job_as_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["private"] = bool(job["private"])
    job["args"], job["result"] = shown(job["args"]), shown(job["result"])
    return job


# --- Redis: a hash per job, sets that say where it is, a script per step ----------------

class RedisJobQueue(JobQueue):
    """The queue in Redis. Where SQLite takes its write lock, Redis runs a script whole
    (`job_scripts.py`). Nothing blocks: a worker polls as on SQLite, so no call waits
    longer than the client's reply timeout (a blocking BLMOVE would have to)."""
    kind = "redis"

    def __init__(self, redis: Redis, limits: Limits = Limits(), room: Room | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        super().__init__(limits, room, clock, monotonic)
        self.redis = redis

    def _script(self, script: str, *args: str | int | float):
        with self.timed(), waits_recognised():
            return self.redis.eval(script, (), args)

    def _insert(self, new, exempt):
        limits = self.limits
        outcome = self._script(
            ENQUEUE, new.task, new.args_json, new.lane, new.owner or "", int(new.private),
            new.key or "", new.max_attempts, repr(self.clock()), int(exempt),
            limits.max_own_queued, limits.max_public_queued, limits.max_queued, *LANES)
        return outcome.decode() if isinstance(outcome, bytes) else outcome

    def get(self, job_id):
        with waits_recognised():
            values = self.redis.execute("HMGET", f"job:{int(job_id)}", *SHOWN)
        return job_from_hash(int(job_id), values)

    def recent(self, task=None, before=None, limit=100):
        index = "jobs:all" if task is None else f"jobs:task:{task}"
        newest = "+inf" if before is None else f"({int(before)}"
        with waits_recognised(), self.redis.connection() as conn:
            ids = conn.execute("ZRANGE", index, newest, "-inf", "BYSCORE", "REV", "LIMIT", 0,
                               limit)
            replies = conn.pipeline([("HMGET", b"job:" + job_id, *SHOWN) for job_id in ids])
        jobs = [job_from_hash(int(job_id), values) for job_id, values in zip(ids, replies)]
        return [job for job in jobs if job]  # a job purged meanwhile is left out

    def _running(self, lane):
        return [Sighting(int(job_id), token.decode(), int(heartbeat), float(lease))
                for job_id, token, heartbeat, lease in self._script(SIGHTINGS, lane)]

    def _recover_and_claim(self, lane, expired, worker, lease, token):
        pairs = [value for job in expired for value in (job.id, job.token, job.heartbeat)]
        reply = self._script(CLAIM, lane, worker, repr(float(lease)), repr(self.clock()),
                             token, *pairs)
        if reply is None:
            return None
        job_id, task, args_json, attempt, max_attempts = reply
        return Job(int(job_id), task.decode(), args_json.decode(), attempt, int(max_attempts),
                   lane, token)

    def extend_lease(self, job):
        return self._script(EXTEND, job.id, job.token) == 1

    def _end_attempt(self, job, state, result=None, error=None, run_at=None,
                     more_attempts=0):
        now = self.clock()
        return self._script(END_ATTEMPT, job.id, job.token, state, repr(now),
                            repr(now if run_at is None else run_at), more_attempts,
                            result or "", storable(error) or "") == 1

    def purge_batch(self, state, batch):
        return self._script(PURGE, state, repr(self.clock() - self.limits.job_retention),
                            self.limits.max_finished, batch)


# What a job shows of its hash: HMGET of these, not HGETALL of all 18 (a page lists 100).
SHOWN = ("task", "args", "state", "attempts", "max_attempts", "worker", "result", "error",
         "key", "private")


def job_from_hash(job_id: int, values: list[bytes | None]) -> dict | None:
    """HMGET's values of SHOWN as the same dict `job_as_dict` makes; None for no such job."""
    job = {name: value.decode() for name, value in zip(SHOWN, values) if value is not None}
    if not job:
        return None
    return {"id": job_id, "task": job["task"], "args": shown(job["args"]),
            "state": job["state"], "attempts": int(job["attempts"]),
            "max_attempts": int(job["max_attempts"]), "worker": job.get("worker"),
            "result": shown(job.get("result")), "error": job.get("error"),
            "key": job.get("key"), "private": job["private"] == "1"}


def open_queue(service: BackingService, limits: Limits = Limits(), room: Room | None = None,
               clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] = time.monotonic) -> JobQueue:
    """The queue in the backing service `database_from_env` opened: SQLite or Redis."""
    if isinstance(service, Redis):
        return RedisJobQueue(service, limits, room, clock, monotonic)
    return SQLiteJobQueue(service, limits, room, clock, monotonic)


def queue_from_env(environ: Mapping[str, str], service: BackingService) -> JobQueue:
    """The queue, with its limits (`limits_from_env`) and the store's ceiling, STORE_MAX_MB."""
    return open_queue(service, limits_from_env(environ), room_from_env(environ, service))


def storable(text: str | None) -> str | None:
    """An error's text as either store can keep it: a lone surrogate (from a client's JSON
    "\\ud800", quoted in an error) cannot be encoded as UTF-8; it is written as \\ud800."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode()


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
