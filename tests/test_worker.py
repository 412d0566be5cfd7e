"""worker.py: the queue in-process with a fake clock, and real worker processes on it."""
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pytest

from conftest import (Proc, Spawner, app_env, get, post_form, run_each, start_webapps,
                      upload, wait_until, write_lock_held)
from database import database_from_env
from job_queue import JOB_TABLES, JobQueue
from tasks import number_arg
from worker import StopRequest

FAST = {"JOB_LEASE": 1, "POLL_INTERVAL": 0.01, "RETRY_BACKOFF": 0.01}  # each at its minimum
STARTED = re.compile(r"^job (\d+) \S+ started", re.MULTILINE)


class FakeClock:
    """The time, moved by the test: a lease expires without waiting for it."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue_on_fake_clock(tmp_path):
    """A queue whose time the test moves (`queue.clock.now += 31`), in-process only."""
    db = database_from_env(app_env(tmp_path))
    yield JobQueue(db, clock=FakeClock())
    db.close()


@pytest.fixture
def start_worker(spawn, tmp_path):
    """start_worker(DYNO=..., **env) runs `python worker.py` with short leases and waits."""

    def start(wait_ready: bool = True, **env):
        proc = spawn([sys.executable, "worker.py"], app_env(tmp_path, **{**FAST, **env}))
        if wait_ready:
            wait_until_ready(proc)
        return proc

    return start


@dataclass
class SharedWorker:
    queue: JobQueue
    proc: Proc


@pytest.fixture(scope="module")
def module_worker(tmp_path_factory) -> Iterator[SharedWorker]:
    spawner = Spawner(tmp_path_factory.mktemp("shared-worker"))
    db = database_from_env(app_env(spawner.folder))
    try:
        proc = spawner([sys.executable, "worker.py"], app_env(spawner.folder, **FAST))
        wait_until_ready(proc)
        yield SharedWorker(JobQueue(db), proc)
    finally:
        spawner.end()
        db.close()


@pytest.fixture
def shared_worker(module_worker) -> Iterator[SharedWorker]:
    """worker.1 with short leases, started once for the module's tests that only need their
    jobs run (each its own jobs) and leave it running; a test that ends it fails."""
    if module_worker.proc.popen.poll() is not None:
        pytest.fail("the shared worker died in an earlier test")
    yield module_worker
    if module_worker.proc.popen.poll() is not None:
        pytest.fail(f"the shared worker died during this test:\n{module_worker.proc.output()}")


def wait_until_ready(worker) -> None:
    wait_until(lambda: " ready (pid " in worker.output(), what="the worker to start")


def start_workers(start_worker, count: int) -> list:
    """worker.1 to worker.<count>, started at once (their start-ups overlap), all ready."""
    workers = [start_worker(wait_ready=False, DYNO=f"worker.{n}") for n in range(1, count + 1)]
    for worker in workers:
        wait_until_ready(worker)
    return workers


def wait_for_state(queue: JobQueue, job_id: int, *states: str, timeout: float = 10) -> dict:
    def reached():
        job = queue.get(job_id)
        return job if job["state"] in states else None

    return wait_until(reached, timeout, what=f"job {job_id} to be {' or '.join(states)}")


# --- The queue itself, in-process -----------------------------------------------------

def test_a_unique_key_is_enqueued_once(queue):
    first = queue.enqueue("heartbeat", {}, key="heartbeat@12:00")
    assert first is not None
    assert queue.enqueue("heartbeat", {}, key="heartbeat@12:00") is None
    assert [job["id"] for job in queue.recent("heartbeat")] == [first]


def test_a_stale_worker_cannot_extend_or_finish_a_job_it_lost(queue_on_fake_clock):
    queue = queue_on_fake_clock
    job_id = queue.enqueue("sleep", {"seconds": 1})
    stale = queue.claim_next_job("worker.1", lease=30)
    queue.clock.now += 31  # worker.1 froze: no heartbeat for longer than its lease
    fresh = queue.claim_next_job("worker.2", lease=30)
    assert (stale.id, fresh.id) == (job_id, job_id)
    assert (stale.attempt, fresh.attempt) == (1, 2)

    assert not queue.extend_lease(stale, lease=30)
    assert not queue.finish(stale, '"from worker.1"')
    assert not queue.mark_dead(stale, "worker.1 gave up")
    assert queue.finish(fresh, '"from worker.2"')
    job = queue.get(job_id)
    assert (job["state"], job["worker"], job["result"]) == ("done", "worker.2", "from worker.2")


def test_a_lease_that_runs_out_on_the_last_attempt_makes_the_job_dead(queue_on_fake_clock):
    queue = queue_on_fake_clock
    job_id = queue.enqueue("sleep", {"seconds": 1}, max_attempts=1)
    assert queue.claim_next_job("worker.1", lease=30).id == job_id
    queue.clock.now += 31
    assert queue.claim_next_job("worker.2", lease=30) is None
    job = queue.get(job_id)
    assert job["state"] == "dead"
    assert job["error"] == "lease expired: worker worker.1 stopped heartbeating"


def test_a_job_given_back_is_queued_at_once_with_its_attempt_not_counted(queue_on_fake_clock):
    queue = queue_on_fake_clock
    job_id = queue.enqueue("sleep", {"seconds": 60})
    first = queue.claim_next_job("worker.1", lease=30)
    assert queue.give_back(first)
    second = queue.claim_next_job("worker.2", lease=30)
    assert (second.id, second.attempt, second.max_attempts) == (job_id, 2, 4)
    assert not queue.extend_lease(first, lease=30)  # the token never repeats: still fenced
    assert not queue.give_back(first)


def test_a_second_stop_signal_moves_the_deadline_to_now():
    stop = StopRequest(timeout=25)
    stop.record(signal.SIGTERM, None)
    assert (stop.signal_name, stop.time_is_up()) == ("SIGTERM", False)
    stop.record(signal.SIGINT, None)
    assert stop.time_is_up()


@pytest.mark.parametrize("value, shown", [
    (1e308, "1e+308"), (float("nan"), "nan"), (-1, "-1"), (True, "True"), ("5", "'5'"),
    pytest.param(10 ** 5000, "int", id="5000-digit-int"),  # 3.11+ refuses to print it
])
def test_a_number_argument_out_of_range_is_a_clear_error(value, shown):
    with pytest.raises(ValueError, match="argument 'seconds' must be a number from 0 to 3600, "
                                         f"got .*{re.escape(shown)}"):
        number_arg({"seconds": value}, "seconds", maximum=3600)


def test_a_failed_job_waits_for_its_retry_time(queue_on_fake_clock):
    queue = queue_on_fake_clock
    job_id = queue.enqueue("fail", {})
    assert queue.retry_later(queue.claim_next_job("worker.1", lease=30), "boom", delay=5)
    assert queue.claim_next_job("worker.1", lease=30) is None
    queue.clock.now += 5
    assert queue.claim_next_job("worker.1", lease=30).attempt == 2
    assert queue.get(job_id)["error"] == "boom"


# --- Real worker processes ------------------------------------------------------------

def test_thirty_jobs_over_three_workers_each_run_exactly_once(queue, start_worker):
    workers = start_workers(start_worker, 3)
    ids = [queue.enqueue("sleep", {"seconds": 0.02 + 0.02 * (n % 4)}) for n in range(30)]
    for job_id in ids:
        wait_for_state(queue, job_id, "done")
    assert [worker.stop() for worker in workers] == [0, 0, 0]

    jobs = [queue.get(job_id) for job_id in ids]
    assert {job["attempts"] for job in jobs} == {1}
    ran_by = Counter(job["worker"] for job in jobs)
    assert set(ran_by) == {"worker.1", "worker.2", "worker.3"}, ran_by
    started = [int(job_id) for worker in workers for job_id in STARTED.findall(worker.output())]
    assert sorted(started) == sorted(ids)


def test_a_job_longer_than_its_lease_stays_with_its_live_worker(queue, start_worker):
    workers = start_workers(start_worker, 2)
    # JOB_LEASE=1: unrenewed, the lease would run out at 1 s and the idle worker, polling
    # every 10 ms, would take the job long before it ends.
    job_id = queue.enqueue("sleep", {"seconds": 1.4})
    job = wait_for_state(queue, job_id, "done", "failed", "dead")
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert sum(len(STARTED.findall(worker.output())) for worker in workers) == 1


def test_a_killed_workers_job_is_finished_by_another_after_the_lease(queue, start_worker):
    first = start_worker(DYNO="worker.1")
    job_id = queue.enqueue("sleep", {"seconds": 0.7})
    wait_for_state(queue, job_id, "running")
    first.popen.kill()  # SIGKILL: no goodbye, no more heartbeats
    second = start_worker(DYNO="worker.2")
    job = wait_for_state(queue, job_id, "done", "dead")
    assert (job["state"], job["attempts"], job["worker"]) == ("done", 2, "worker.2")
    assert f"job {job_id} sleep started (attempt 2/3)" in second.output()


def test_a_task_that_fails_twice_then_succeeds_is_done_after_three_attempts(shared_worker):
    queue = shared_worker.queue
    job_id = queue.enqueue("fail", {"times": 2})
    job = wait_for_state(queue, job_id, "done", "dead")
    assert (job["state"], job["attempts"]) == ("done", 3)
    assert job["result"] == {"succeeded_on_attempt": 3}


def test_a_task_that_always_fails_ends_dead_with_its_error(shared_worker):
    queue, worker = shared_worker.queue, shared_worker.proc
    job_id = queue.enqueue("fail", {})
    job = wait_for_state(queue, job_id, "dead", "done")
    assert (job["state"], job["attempts"]) == ("dead", 3)
    assert job["error"] == "RuntimeError: failing on purpose on attempt 3"
    assert f"job {job_id} fail failed (attempt 2/3): RuntimeError" in worker.output()
    assert f"job {job_id} fail dead after 3 attempts: RuntimeError" in worker.output()


def test_an_unknown_task_is_dead_at_once_and_the_worker_carries_on(shared_worker):
    queue, worker = shared_worker.queue, shared_worker.proc
    unknown = queue.enqueue("send_invoices", {})
    after = queue.enqueue("sleep", {"seconds": 0})
    job = wait_for_state(queue, unknown, "dead", "done")
    assert job["attempts"] == 1
    assert job["error"].startswith("unknown task 'send_invoices' (known: fail, heartbeat, ")
    assert wait_for_state(queue, after, "done")["worker"] == "worker.1"
    assert worker.popen.poll() is None


def test_sigterm_lets_the_job_in_hand_finish_then_exits_0(queue, start_worker):
    worker = start_worker()
    job_id = queue.enqueue("sleep", {"seconds": 0.5})
    wait_for_state(queue, job_id, "running")
    assert worker.stop(signal.SIGTERM) == 0
    assert queue.get(job_id)["state"] == "done"
    assert worker.output().rstrip().endswith("worker.1 stopped")


def test_a_job_unfinished_at_the_stop_deadline_is_given_back_and_run_by_another(
        queue, start_worker):
    first = start_worker(STOP_TIMEOUT=0.2)
    job_id = queue.enqueue("sleep", {"seconds": 1})
    wait_for_state(queue, job_id, "running")
    signalled = time.monotonic()
    assert first.stop(signal.SIGTERM) == 0
    assert time.monotonic() - signalled < 0.8  # the task had most of its second to go
    job = queue.get(job_id)
    assert (job["state"], job["attempts"], job["max_attempts"]) == ("queued", 1, 4)
    assert f"job {job_id} sleep given back to the queue" in first.output()

    second = start_worker(wait_ready=False, WORKER_BURST=1, HONCHO_PROCESS_NAME="worker.2")
    assert second.popen.wait(10) == 0
    job = queue.get(job_id)
    assert (job["state"], job["attempts"], job["worker"]) == ("done", 2, "worker.2")


def test_an_idle_worker_stops_at_once_whatever_its_poll_interval(start_worker):
    worker = start_worker(POLL_INTERVAL=60)
    signalled = time.monotonic()
    assert worker.stop(signal.SIGTERM) == 0
    assert time.monotonic() - signalled < 1


def test_a_database_locked_past_the_busy_timeout_is_waited_out(queue, start_worker, tmp_path):
    worker = start_worker(DATABASE_BUSY_TIMEOUT=0.2, JOB_LEASE=5)
    job_id = queue.enqueue("sleep", {"seconds": 0.5})
    wait_for_state(queue, job_id, "running")
    with write_lock_held(tmp_path / "app.db"):  # the task ends while the lock is held
        wait_until(lambda: "database is locked" in worker.output(), timeout=5,
                   what="the worker to meet the lock")
    job = wait_for_state(queue, job_id, "done")
    assert (job["attempts"], worker.popen.poll()) == (1, None)
    assert worker.output().count("database is locked") == 1
    assert f"recording job {job_id} as done: database is locked; trying again" in worker.output()


def test_arguments_no_task_can_use_fail_the_job_not_the_worker(shared_worker):
    queue, worker = shared_worker.queue, shared_worker.proc
    too_long = queue.db.execute(  # stored by an older Python, or by hand: no 4,300-digit limit
        "INSERT INTO jobs (task, args, max_attempts, run_at, created_at, updated_at) "
        "VALUES ('sleep', ?, 1, 0, 0, 0) RETURNING id", ('{"seconds": 1' + "0" * 5000 + "}",)
    )[0]["id"]
    too_big = queue.enqueue("sleep", {"seconds": 1e308}, max_attempts=1)
    after = queue.enqueue("sleep", {"seconds": 0})  # run after them: first in, first out
    assert wait_for_state(queue, after, "done")["worker"] == "worker.1"
    errors = [queue.get(job_id)["error"] for job_id in (too_long, too_big)]
    assert errors[0].startswith(("its arguments cannot be decoded: Exceeds the limit",
                                 "ValueError: argument 'seconds' must be a number from 0"))
    assert errors[1] == "ValueError: argument 'seconds' must be a number from 0 to 3600, " \
                        "got 1e+308"
    assert worker.popen.poll() is None


def test_burst_mode_exits_0_when_no_job_is_ready(queue, start_worker):
    job_id = queue.enqueue("sleep", {"seconds": 0})
    worker = start_worker(wait_ready=False, WORKER_BURST=1)
    assert worker.popen.wait(10) == 0
    assert queue.get(job_id)["state"] == "done"


def test_a_jobs_table_made_before_private_jobs_gains_the_column_once(tmp_path):
    db = database_from_env(app_env(tmp_path))
    db.create_tables(JOB_TABLES.replace(",\n    private INTEGER NOT NULL DEFAULT 0", ""))
    db.execute("INSERT INTO jobs (task, args, max_attempts, run_at, created_at, updated_at) "
               "VALUES ('sleep', '{}', 3, 0, 0, 0)")  # a job from before
    JobQueue(db)
    queue = JobQueue(db)  # a second process opening the same file changes nothing
    assert queue.get(1)["private"] is False
    assert queue.get(queue.enqueue("sleep", {}, private=True))["private"] is True
    db.close()


BAD_SETTINGS = [
    ("JOB_LEASE", "abc"), ("POLL_INTERVAL", "1e10"), ("POLL_INTERVAL", "1e-9"),
    ("JOB_LEASE", "0.001"), ("STOP_TIMEOUT", "0"),
    ("DATABASE_BUSY_TIMEOUT", "3600"),
]


@pytest.fixture(scope="module")
def bad_setting_runs(tmp_path_factory) -> dict[tuple[str, str], Proc]:
    """A worker per bad setting, all started at once."""
    with run_each(tmp_path_factory.mktemp("bad-settings"), "worker.py",
                  [{**FAST, variable: value} for variable, value in BAD_SETTINGS]) as runs:
        yield dict(zip(BAD_SETTINGS, runs))


@pytest.mark.parametrize("variable, value", BAD_SETTINGS)
def test_a_bad_setting_exits_2_with_one_line_naming_it(bad_setting_runs, variable, value):
    worker = bad_setting_runs[variable, value]
    assert worker.popen.wait(10) == 2
    lines = worker.output().splitlines()
    assert len(lines) == 1 and variable in lines[0] and f"'{value}'" in lines[0]


def test_an_upload_made_on_one_web_copy_is_counted_by_a_worker_and_seen_on_another(
        queue, spawn, start_worker):
    one, two = start_webapps(spawn, {"DYNO": "web.1"}, {"DYNO": "web.2"})
    made = upload(one.url, b"one two three\nfour five\n", "text/plain")
    assert made.status == 303
    upload_id = made.headers["location"].rsplit("/", 1)[1]
    enqueued = post_form(two.url + "/jobs",
                         {"task": "wordcount", "args": f'{{"upload": "{upload_id}"}}'})
    assert enqueued.status == 303
    location = enqueued.headers["location"]
    assert re.fullmatch(r"/jobs/\d+", location)

    worker = start_worker(wait_ready=False, WORKER_BURST=1)
    assert worker.popen.wait(10) == 0
    job = get(one.url + location).json()
    assert (job["state"], job["task"], job["worker"]) == ("done", "wordcount", "worker.1")
    assert job["result"] == {"words": 5, "lines": 2, "bytes": 24}


def test_with_the_memory_store_the_worker_cannot_see_the_upload(queue, start_web, start_worker):
    web = start_web(SESSION_STORE="memory")
    upload_id = upload(web.url, b"lost words\n").headers["location"].rsplit("/", 1)[1]
    job_id = queue.enqueue("wordcount", {"upload": upload_id}, max_attempts=1)
    start_worker(SESSION_STORE="memory")
    job = wait_for_state(queue, job_id, "dead", "done")
    assert job["state"] == "dead"
    assert f"no upload {upload_id} in the memory store" in job["error"]


def test_what_a_client_put_in_a_jobs_args_reaches_the_log_escaped(shared_worker):
    queue, worker = shared_worker.queue, shared_worker.proc
    # A wordcount of an upload that does not exist: its error quotes the id it was given.
    forged = "x\n08:00:00 system   | web.1 killed by SIGKILL\x1b]0;owned\x07"
    job_id = queue.enqueue("wordcount", {"upload": forged}, max_attempts=1)
    wait_for_state(queue, job_id, "dead")
    wait_until(lambda: f"job {job_id} wordcount dead" in worker.output(), what="its log line")
    output = worker.output()
    assert not {"\x1b", "\x07"} & set(output)
    assert not any(line.startswith("08:00:00 system") for line in output.splitlines())
