"""worker.py: real worker processes, on SQLite and on Redis: jobs run once, survive a killed
or frozen worker and a frozen or restarted Redis, and lanes keep a flood from starving
anyone. (The queue's own contract is tests/test_job_queue.py.)"""
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pytest

from conftest import (Proc, Spawner, app_env, get, post_form, start_webapps, upload,
                      wait_until, write_lock_held)
from database import ConfigError, Refused, database_from_env
from job_queue import JobQueue, limits_from_env, open_queue
from tasks import number_arg
from worker import StopRequest, config_from_env, idle_pause

FAST = {"JOB_LEASE": 1, "POLL_INTERVAL": 0.01, "RETRY_BACKOFF": 0.01}
SHORT_LEASE = 0.3  # where a lease must run out (not be kept alive): the sooner the better
STARTED = re.compile(r"^job (\d+) \S+ started", re.MULTILINE)
WAITING = "; trying again until it answers"  # the one line a process logs per wait


@pytest.fixture
def start_worker(spawn, tmp_path):
    """start_worker(DYNO=..., **env) runs `python worker.py` with short leases and waits."""

    def start(wait_ready: bool = True, **env):
        proc = spawn([sys.executable, "worker.py"], app_env(tmp_path, **{**FAST, **env}))
        if wait_ready:
            wait_until_ready(proc)
        return proc

    return start


@pytest.fixture
def start_workers(start_worker):
    """start_workers(3, **env): worker.1, worker.2, worker.3, started side by side."""

    def start(count: int, **env):
        workers = {f"worker.{n}": start_worker(False, DYNO=f"worker.{n}", **env)
                   for n in range(1, count + 1)}
        wait_until(lambda: all(" ready (pid " in worker.output() for worker in workers.values()),
                   what="the workers to start")
        return workers

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
        yield SharedWorker(open_queue(db), proc)
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


def wait_for_state(queue: JobQueue, job_id: int, *states: str, timeout: float = 10) -> dict:
    def reached():
        job = queue.get(job_id)
        return job if job["state"] in states else None

    return wait_until(reached, timeout, what=f"job {job_id} to be {' or '.join(states)}")


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


# --- Real worker processes ------------------------------------------------------------

def test_thirty_jobs_over_three_workers_each_run_exactly_once(backing, start_workers):
    queue = backing.queue
    workers = start_workers(3, **backing.env).values()
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


def test_a_job_longer_than_its_lease_stays_with_its_live_worker(queue, start_workers):
    workers = start_workers(2, JOB_LEASE=0.5).values()
    # Unrenewed, the lease would run out at 0.5 s and the idle worker would take the job
    # long before it ends; renewed every third of it, it stays.
    job_id = queue.enqueue("sleep", {"seconds": 0.9})
    job = wait_for_state(queue, job_id, "done", "failed", "dead")
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert sum(len(STARTED.findall(worker.output())) for worker in workers) == 1


def test_a_killed_workers_job_is_finished_by_another_after_the_lease(backing, start_workers):
    queue, workers = backing.queue, start_workers(2, JOB_LEASE=SHORT_LEASE, **backing.env)
    job_id = queue.enqueue("sleep", {"seconds": 0.3})
    killed = wait_for_state(queue, job_id, "running")["worker"]
    workers[killed].popen.kill()  # SIGKILL: no goodbye, no more renewals
    job = wait_for_state(queue, job_id, "done", "dead")
    other = ({*workers} - {killed}).pop()  # it watched the renewals stop for a lease
    assert (job["state"], job["attempts"], job["worker"]) == ("done", 2, other)
    assert f"job {job_id} sleep started (attempt 2/3)" in workers[other].output()


def test_a_frozen_workers_job_is_run_by_another_and_its_late_result_discarded(
        fresh_redis, start_workers):
    # On Redis: a worker frozen in the instant it holds SQLite's one write lock (a lease
    # renewal) would stop every writer of the file until it thaws, the file's known limit.
    queue = open_queue(database_from_env({"DATABASE_URL": fresh_redis}))
    workers = start_workers(2, JOB_LEASE=SHORT_LEASE, DATABASE_URL=fresh_redis)
    job_id = queue.enqueue("sleep", {"seconds": 0.3})
    frozen = wait_for_state(queue, job_id, "running")["worker"]
    workers[frozen].send_signal(signal.SIGSTOP)  # paused mid-job: a long GC, a VM migrated
    job = wait_for_state(queue, job_id, "done")
    assert (job["attempts"], job["worker"]) == (2, ({*workers} - {frozen}).pop())
    workers[frozen].send_signal(signal.SIGCONT)  # it wakes, ends its sleep, tries to record
    wait_until(lambda: f"job {job_id} lease lost; result discarded" in workers[frozen].output(),
               what="the stale result to be refused")
    assert queue.get(job_id) == job


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
    # One lane: the other loops' claims would meet the lock too, and log the copy's line.
    worker = start_worker(DATABASE_BUSY_TIMEOUT=0.2, JOB_LEASE=5, WORKER_LANES="public")
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


def test_a_worker_for_some_lanes_leaves_the_other_lanes_jobs(queue, start_worker):
    public = queue.enqueue("sleep", {"seconds": 0})
    users = queue.enqueue("sleep", {"seconds": 0}, "users")
    worker = start_worker(wait_ready=False, WORKER_BURST=1, WORKER_LANES="users")
    assert worker.popen.wait(10) == 0
    assert (queue.get(users)["state"], queue.get(public)["state"]) == ("done", "queued")


def test_a_claim_loop_that_meets_a_bug_ends_the_whole_copy_loudly(queue, start_worker):
    worker = start_worker()
    queue.db.execute("DROP TABLE jobs")  # not a wait: every claim now fails the same way
    assert worker.popen.wait(10) == 1
    assert "sqlite3.OperationalError: no such table: jobs" in worker.output()
    assert "worker.1 stops: a claim loop failed (above)" in worker.output()


def test_burst_mode_exits_0_when_no_job_is_ready(queue, start_worker):
    job_id = queue.enqueue("sleep", {"seconds": 0})
    worker = start_worker(wait_ready=False, WORKER_BURST=1)
    assert worker.popen.wait(10) == 0
    assert queue.get(job_id)["state"] == "done"


def test_a_bad_setting_exits_2_with_one_line_naming_it(start_worker):
    worker = start_worker(wait_ready=False, WORKER_LANES="users,vip")
    assert worker.popen.wait(10) == 2
    assert worker.output() == ("worker: WORKER_LANES must name some of housekeeping, users, "
                               "public, each once, separated by commas, got 'users,vip'\n")


@pytest.mark.parametrize("variable, value", [
    ("JOB_LEASE", "abc"), ("POLL_INTERVAL", "1e10"), ("POLL_INTERVAL", "1e-9"),
    ("JOB_LEASE", "0.001"), ("STOP_TIMEOUT", "0"), ("DATABASE_BUSY_TIMEOUT", "3600"),
    ("WORKER_LANES", "public,public"), ("WORKER_LANES", ""), ("MAX_QUEUED", "0"),
    ("JOB_RETENTION", "1.5"), ("MAX_OWN_QUEUED", "1" + "0" * 5000),
])
def test_every_setting_the_worker_reads_is_checked_and_named(tmp_path, variable, value):
    environ = {"DATABASE_URL": f"sqlite:///{tmp_path}/app.db", variable: value}
    with pytest.raises(ConfigError, match=f"{variable} .*'{re.escape(value)}'"):
        config_from_env(environ)
        limits_from_env(environ)
        database_from_env(environ)


def test_an_idle_worker_looks_at_the_queue_at_least_four_times_a_lease():
    # A claim that waits for a busy store tells the lease watch so (leases.py): a worker
    # asleep through the whole busy spell would see only the silence it left behind.
    assert idle_pause(config_from_env({"JOB_LEASE": "0.2", "POLL_INTERVAL": "0.5"})) == 0.05
    assert idle_pause(config_from_env({})) == 0.5  # JOB_LEASE=30: POLL_INTERVAL as set


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


def heartbeats_done(queue: JobQueue) -> int:
    return sum(job["state"] == "done" for job in queue.recent("heartbeat"))


def start_clock(spawn, tmp_path, **env):
    return spawn([sys.executable, "clock.py"],
                 app_env(tmp_path, HEARTBEAT_EVERY=1, PURGE_EVERY=3600, **env))


def test_a_flood_of_public_jobs_delays_neither_a_users_job_nor_the_housekeeping(
        backing, start_worker, spawn, tmp_path):
    queue, accepted = backing.queue, 0
    for _ in range(300):  # what 300 cookieless POST /jobs of an hour's sleep become
        try:
            accepted += bool(queue.enqueue("sleep", {"seconds": 3600}))
        except Refused as refusal:
            assert refusal.status == 429
    assert accepted == 100  # MAX_PUBLIC_QUEUED
    worker = start_worker(**backing.env)  # one copy
    start_clock(spawn, tmp_path, **backing.env)
    wait_until(lambda: STARTED.search(worker.output()), what="the flood to hold the public lane")
    job_id = queue.enqueue("sleep", {"seconds": 0.1}, "users", owner="alice")
    enqueued = time.monotonic()
    wait_for_state(queue, job_id, "done")
    assert time.monotonic() - enqueued < 3
    wait_until(lambda: heartbeats_done(queue), what="a heartbeat to run meanwhile")
    assert len(STARTED.findall(worker.output())) >= 2  # public, users (a tick says less)


def test_a_frozen_then_restarted_redis_is_waited_out_by_the_worker_and_the_clock(
        start_redis, start_worker, spawn, tmp_path):
    redis = start_redis("--appendonly", "yes", "--appendfsync", "always")
    env = {"DATABASE_URL": redis.url, "DATABASE_BUSY_TIMEOUT": 0.3}  # frozen: seen soon
    queue = open_queue(database_from_env({"DATABASE_URL": redis.url}))
    worker, clock = start_worker(**env), start_clock(spawn, tmp_path, **env)
    wait_until(lambda: heartbeats_done(queue), what="a first heartbeat")

    def waited(times: int) -> bool:
        return worker.output().count(WAITING) == clock.output().count(WAITING) == times

    def carried_on() -> bool:  # each logged its work again after its last wait
        return ("heartbeat at" in worker.output().rsplit(WAITING, 1)[1]
                and "enqueued" in clock.output().rsplit(WAITING, 1)[1])

    redis.freeze()  # SIGSTOP: its port still accepts, nothing answers
    try:
        wait_until(lambda: waited(1), what="the worker and the clock to wait")
    finally:
        redis.thaw()
    wait_until(carried_on, what="both to carry on by themselves")

    job_id = queue.enqueue("sleep", {"seconds": 0.5})
    wait_for_state(queue, job_id, "running")
    redis.stop()  # SIGKILL; its append-only file keeps what it was told
    wait_until(lambda: waited(2), what="both to wait again")
    redis.start()  # on the same port and files
    job = wait_for_state(queue, job_id, "done")
    assert (job["attempts"], job["worker"]) == (1, "worker.1")  # it lived through the restart
    wait_until(carried_on, what="both to carry on after the restart")
    assert waited(2) and worker.popen.poll() is None and clock.popen.poll() is None
