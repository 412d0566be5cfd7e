"""The tasks: what a background job can do, by name (Factor VIII).

Factor VIII gives slow work a process type of its own, the worker, so that a web request
never runs it. The terrible day this module prevents: the web process imports the worker
to learn the task names, and nobody can tell any more which process runs jobs. The tasks
live here instead: `worker.py` runs them, `webapp.py` only names them, and neither process
imports the other.

A task is a plain function `(args, context) -> result`: `args` is the job's JSON object,
the result must be JSON-able, and an exception is the job's failure (retried, then kept
as its error). Delivery is at-least-once (`job_queue.py`), so every task is idempotent.
The worker runs each task on a thread of its own, so that it can stop waiting for one at
its stop deadline; a task still running then is cut off when the worker exits, as by a
SIGKILL, and runs again elsewhere. Arguments come from users: check them (`number_arg`),
so that a bad one fails the job with a clear error.
"""
from __future__ import annotations

import math
import reprlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable

from database import log
from job_queue import JobQueue
from session_store import SessionStore


@dataclass(frozen=True)
class TaskContext:
    store: SessionStore
    attempt: int  # 1 on the first run; a task can see that it is being retried
    worker: str
    queue: JobQueue  # for the housekeeping of the queue itself


WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() splits on
MAX_SLEEP = 3600  # seconds: ample for a stand-in, and `time.sleep(1e308)` would overflow


def number_arg(args: dict, name: str, default: float | None = None,
               maximum: float = math.inf) -> float:
    """`args[name]` as a number from 0 to `maximum`, or a clear error (the job fails with it)."""
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= maximum:  # false for NaN too
        limit = f"from 0 to {maximum:g}" if maximum < math.inf else ">= 0"
        raise ValueError(f"argument {name!r} must be a number {limit}, got {brief(value)}")
    return value


def brief(value: object) -> str:
    """A short repr for an error message. Python 3.11+ refuses to print an integer of more
    than 4,300 digits (a guard against slow conversions), so such a value is only named."""
    try:
        return reprlib.repr(value)
    except ValueError:
        return f"a {type(value).__name__} too large to print"


def sleep(args: dict, ctx: TaskContext) -> dict:
    """Sleep `seconds`: a stand-in for slow work, to watch jobs spread and to kill workers."""
    seconds = number_arg(args, "seconds", maximum=MAX_SLEEP)
    time.sleep(seconds)
    return {"slept": seconds}


def wordcount(args: dict, ctx: TaskContext) -> dict:
    """Count the words, lines and bytes of an upload, read from the backing store a piece
    at a time (a 10 MiB upload never sits whole in the worker's memory)."""
    upload_id = args.get("upload")
    if not isinstance(upload_id, str):
        raise ValueError(f"argument 'upload' must be an upload id (a string), "
                         f"got {brief(upload_id)}")
    if ctx.store.upload_info(upload_id) is None and ctx.store.kind == "memory":
        raise LookupError(f"no upload {upload_id} in the memory store: it lives in the "
                          f"memory of the web copy that took it, which no worker can see")
    if ctx.store.upload_info(upload_id) is None:
        raise LookupError(f"no upload {upload_id} in the {ctx.store.kind} store")
    return count_words(ctx.store.upload_chunks(upload_id))


def count_words(chunks: Iterable[bytes]) -> dict:
    """What `wc` counts, over pieces: a word that spans two pieces is counted once."""
    words = lines = size = 0
    in_word = False  # the last byte so far belongs to a word
    for chunk in chunks:
        if not chunk:
            continue
        words += len(chunk.split()) - (in_word and chunk[0] not in WHITESPACE)
        in_word = chunk[-1] not in WHITESPACE
        lines += chunk.count(b"\n")
        size += len(chunk)
    return {"words": words, "lines": lines, "bytes": size}


def purge_expired_sessions(args: dict, ctx: TaskContext) -> dict:
    """Delete expired sessions and the uploads they held (Redis expires them itself)."""
    purged = ctx.store.purge_expired()
    if purged:
        log(f"purged {purged} expired session{'s' if purged != 1 else ''} and their uploads")
    return {"purged": purged}


def purge_finished_jobs(args: dict, ctx: TaskContext) -> dict:
    """Delete done and dead jobs past JOB_RETENTION or beyond MAX_FINISHED, in batches."""
    purged = ctx.queue.purge_finished()
    if purged:
        log(f"purged {purged} finished job{'s' if purged != 1 else ''} past keeping")
    return {"purged": purged}


def heartbeat(args: dict, ctx: TaskContext) -> str:
    """A visible sign that the clock and the workers are alive."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log(f"heartbeat at {now}: the clock enqueued it, {ctx.worker} ran it")
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
    "purge_finished_jobs": purge_finished_jobs,
    "heartbeat": heartbeat,
    "fail": fail,
}
