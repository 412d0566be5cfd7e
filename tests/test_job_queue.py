"""The queue's contract, the same on SQLite and on Redis: exclusive claims, leases timed
by the watcher's own monotonic clock, the fence, lanes, quotas, retention, paging.

Each `open_one()` is the queue as another process opens it: its own connection, its own
notes of the running jobs, its own clocks. The clocks are fakes the test moves, so a
30-second lease runs out in no time at all."""
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import REPO, write_lock_held
from database import Database, Refused, Room, StoreFull, StoreUnavailable
from job_queue import Limits, open_queue
from leases import LeaseWatch, Sighting
from redis_client import Redis

LEASE = 30
BUSY_LEASE = 0.3  # real seconds, where a store is kept busy for longer than a lease


class FakeClock:
    """The time, moved by the test."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
def service(request, tmp_path):
    """A factory of handles on one store, each as another process would open it."""
    opened = []

    def open_service():
        url = request.getfixturevalue("fresh_redis") if request.param == "redis" else None
        opened.append(Redis(url) if url else Database(tmp_path / "app.db"))
        return opened[-1]

    yield open_service
    for handle in opened:
        handle.close()


@pytest.fixture
def open_one(service):
    """open_one(limits=..., wall=..., monotonic=...): a queue on the shared store."""

    def open_queue_here(limits: Limits = Limits(), wall: FakeClock | None = None,
                        monotonic: FakeClock | None = None, room: Room | None = None):
        return open_queue(service(), limits, room, wall or FakeClock(), monotonic or FakeClock(0))

    return open_queue_here


@pytest.fixture
def queue(open_one):
    return open_one()


def test_eight_threads_claiming_at_once_each_get_different_jobs(open_one):
    ids = set(open_one().enqueue("sleep", {}) for _ in range(40))
    claimed, queues = [], [open_one() for _ in range(8)]

    def claim_all(queue):
        while (job := queue.claim_next_job("worker", "public", LEASE)) is not None:
            claimed.append((job.id, job.attempt))

    threads = [threading.Thread(target=claim_all, args=(queue,)) for queue in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == [(job_id, 1) for job_id in sorted(ids)]


def test_a_job_that_stops_renewing_is_taken_after_its_lease_as_watched_never_before(open_one):
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    job_id = first.enqueue("sleep", {})
    stale = first.claim_next_job("worker.1", "public", LEASE)
    assert second.claim_next_job("worker.2", "public", LEASE) is None  # first sight
    watched.now = LEASE  # exactly one lease: not yet
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    watched.now = LEASE + 0.01
    fresh = second.claim_next_job("worker.2", "public", LEASE)
    assert (fresh.id, fresh.attempt, stale.attempt) == (job_id, 2, 1)
    assert first.get(job_id)["error"] == "lease expired: worker worker.1 stopped heartbeating"


def test_a_worker_that_renews_keeps_its_job_however_long_it_runs(open_one):
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    first.enqueue("sleep", {})
    job = first.claim_next_job("worker.1", "public", LEASE)
    for _ in range(10):  # five leases long, renewed every half lease
        assert second.claim_next_job("worker.2", "public", LEASE) is None
        assert first.extend_lease(job)
        watched.now += LEASE / 2
    assert first.finish(job, '"done"')


def test_the_lease_watched_is_the_jobs_own_not_the_watchers(open_one):
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    first.enqueue("sleep", {})
    first.claim_next_job("worker.1", "public", lease=5)  # a worker with JOB_LEASE=5
    assert second.claim_next_job("worker.2", "public", lease=300) is None
    watched.now = 6
    assert second.claim_next_job("worker.2", "public", lease=300).attempt == 2


def test_a_wall_clock_step_forward_does_not_let_a_second_worker_take_a_running_job(open_one):
    wall, watched = FakeClock(), FakeClock(0)
    first, second = open_one(wall=wall), open_one(wall=wall, monotonic=watched)
    first.enqueue("sleep", {})
    job = first.claim_next_job("worker.1", "public", LEASE)
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    wall.now += 3600  # NTP, a resumed VM: an hour, in an instant, on both
    watched.now += 1
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    assert first.finish(job, "1")  # still worker.1's


def test_a_stale_workers_renewal_and_records_are_discarded(open_one):
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    job_id = first.enqueue("sleep", {})
    stale = first.claim_next_job("worker.1", "public", LEASE)
    second.claim_next_job("worker.2", "public", LEASE)
    watched.now = LEASE + 1  # worker.1 froze: no renewal for longer than its lease
    fresh = second.claim_next_job("worker.2", "public", LEASE)
    assert not first.extend_lease(stale)
    assert not first.finish(stale, '"from worker.1"')
    assert not first.retry_later(stale, "worker.1 failed", delay=0)
    assert not first.mark_dead(stale, "worker.1 gave up")
    assert not first.give_back(stale)
    assert second.finish(fresh, '"from worker.2"')
    job = first.get(job_id)
    assert (job["state"], job["worker"], job["result"]) == ("done", "worker.2", "from worker.2")


def lose_every_job(queue) -> None:
    """What a Redis restarted without persistence does, or a SQLite file put back from an
    empty backup: every job gone, and ids (and attempts) that start over."""
    if queue.kind == "redis":
        queue.redis.execute("FLUSHALL")
    else:
        queue.db.execute("DELETE FROM jobs")


def test_a_stale_worker_never_writes_into_a_new_job_that_got_its_id_after_data_loss(open_one):
    first, second = open_one(), open_one()
    job_id = first.enqueue("sleep", {"who": "A"}, private=True)
    stale = first.claim_next_job("worker.1", "public", LEASE)
    lose_every_job(first)
    assert second.enqueue("sleep", {"who": "B"}, private=True) == job_id  # the same id again
    fresh = second.claim_next_job("worker.2", "public", LEASE)
    assert (fresh.id, fresh.attempt) == (stale.id, stale.attempt)  # and the same attempt
    assert not first.extend_lease(stale)
    assert not first.finish(stale, '{"slept": 8}')  # A's result, into B's job
    assert not first.retry_later(stale, "worker.1 failed", delay=0)
    assert not first.mark_dead(stale, "worker.1 gave up")
    assert not first.give_back(stale)
    assert second.finish(fresh, '{"slept": 20}')
    job = second.get(job_id)
    assert (job["args"], job["result"]) == ({"who": "B"}, {"slept": 20})


def test_a_watchers_note_from_before_data_loss_does_not_expire_the_new_job(open_one):
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    first.enqueue("sleep", {})
    first.claim_next_job("worker.1", "public", LEASE)
    assert second.claim_next_job("worker.2", "public", LEASE) is None  # notes job 1 running
    lose_every_job(first)
    first.enqueue("sleep", {})
    fresh = first.claim_next_job("worker.3", "public", LEASE)  # job 1, attempt 1, no renewal
    watched.now = LEASE + 1  # worker.2 was busy elsewhere for longer than a lease
    assert second.claim_next_job("worker.2", "public", LEASE) is None  # a new claim: no silence
    assert first.finish(fresh, "null")


def test_on_redis_a_renewal_between_the_watchers_read_and_its_recovery_wins(fresh_redis):
    # On SQLite the read and the recovery are one transaction; on Redis two scripts, and
    # the recovery is fenced on the pair that was read.
    first, watched = open_queue(Redis(fresh_redis)), FakeClock(0)
    second = open_queue(Redis(fresh_redis), monotonic=watched)
    first.enqueue("sleep", {})
    job = first.claim_next_job("worker.1", "public", LEASE)
    second.claim_next_job("worker.2", "public", LEASE)
    watched.now = LEASE + 1  # worker.1 looks gone...
    read_running = second._running

    def read_then_renew(lane):  # ...but its renewal lands right after the watcher's read
        seen = read_running(lane)
        assert first.extend_lease(job)
        return seen

    second._running = read_then_renew
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    assert first.finish(job, "null")


def test_a_slow_call_to_the_store_restarts_the_silence_of_the_leases_it_is_a_share_of():
    clock = FakeClock(0)
    watch = LeaseWatch(clock)
    short, long = Sighting(1, "a", 0, lease=4), Sighting(2, "b", 0, lease=40)
    assert watch.expired(lambda: [short, long]) == []  # both first seen at 0
    watch.store_was_slow(took=2, ended=50)  # half of one lease, a twentieth of the other
    clock.now = 50.5
    assert watch.expired(lambda: [short, long]) == [long]
    clock.now = 54.1  # the busy store stopped the short lease's clock, not for ever
    assert watch.expired(lambda: [short]) == [short]


def test_on_sqlite_a_claim_that_waited_for_the_write_lock_spares_an_owner_that_waited_too(
        tmp_path):
    path = tmp_path / "app.db"
    owner, watcher = open_queue(Database(path)), open_queue(Database(path))
    owner.enqueue("sleep", {})
    job = owner.claim_next_job("worker.1", "public", BUSY_LEASE)
    assert watcher.claim_next_job("worker.2", "public", BUSY_LEASE) is None  # notes the job
    claimed = []
    with write_lock_held(path):  # another process writes for longer than the lease
        claim = threading.Thread(target=lambda: claimed.append(
            watcher.claim_next_job("worker.2", "public", BUSY_LEASE)))
        claim.start()  # waits for the lock, as the owner's renewal would
        time.sleep(1.5 * BUSY_LEASE)  # how long the store stays busy
    claim.join()
    assert claimed == [None]  # the watcher got the lock first: still worker.1's job
    assert owner.extend_lease(job) and owner.finish(job, "null")
    owner.db.close()
    watcher.db.close()


@contextmanager
def store_busy(queue, request):
    """Another process holds the store: SQLite's write lock taken, or Redis frozen."""
    if queue.kind == "sqlite":
        with write_lock_held(queue.db.path):
            yield
        return
    server = request.getfixturevalue("shared_redis")
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


def test_a_store_busy_while_the_watcher_renewed_its_own_job_is_no_owners_silence(
        open_one, request):
    owner, watcher = open_one(), open_one(monotonic=time.monotonic)
    owner.enqueue("sleep", {})
    watcher.enqueue("sleep", {})
    job = owner.claim_next_job("worker.1", "public", BUSY_LEASE)
    own = watcher.claim_next_job("worker.2", "public", BUSY_LEASE)  # and notes worker.1's
    with store_busy(watcher, request):
        renewal = threading.Thread(target=watcher.extend_lease, args=(own,))
        renewal.start()  # waits for the store, as worker.1's renewal would
        time.sleep(1.5 * BUSY_LEASE)  # how long the store stays busy
    renewal.join()
    assert watcher.finish(own, "null")
    assert watcher.claim_next_job("worker.2", "public", BUSY_LEASE) is None
    assert owner.extend_lease(job) and owner.finish(job, "null")


def test_a_store_out_of_reach_is_no_owners_silence_however_soon_it_refused(
        open_one, monkeypatch):
    """A restarting Redis refuses at once: the watcher's failed claim took no time, but
    no owner's renewal got through meanwhile either."""
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    first.enqueue("sleep", {})
    job = first.claim_next_job("worker.1", "public", LEASE)
    assert second.claim_next_job("worker.2", "public", LEASE) is None  # first sight

    def out_of_reach(lane):
        raise StoreUnavailable("connection refused")

    watched.now = LEASE  # the store goes away for a while
    monkeypatch.setattr(second, "_running", out_of_reach)
    with pytest.raises(StoreUnavailable):
        second.claim_next_job("worker.2", "public", LEASE)
    monkeypatch.undo()
    watched.now = LEASE + 1  # back, before the owner's next renewal got through
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    assert first.extend_lease(job)


def test_a_lease_that_runs_out_on_the_last_attempt_makes_the_job_dead(open_one):
    first, watched = open_one(), FakeClock(0)
    second = open_one(monotonic=watched)
    job_id = first.enqueue("sleep", {}, max_attempts=1)
    first.claim_next_job("worker.1", "public", LEASE)
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    watched.now = LEASE + 1
    assert second.claim_next_job("worker.2", "public", LEASE) is None
    job = first.get(job_id)
    assert (job["state"], job["attempts"]) == ("dead", 1)
    assert job["error"] == "lease expired: worker worker.1 stopped heartbeating"


def test_the_watch_forgets_jobs_that_no_longer_run(queue):
    jobs = [queue.enqueue("sleep", {}) for _ in range(3)]
    claimed = [queue.claim_next_job("worker.1", "public", LEASE) for _ in jobs]
    assert len(queue.watches["public"].first_seen) == 2  # saw the first two running
    for job in claimed:
        queue.finish(job, "null")
    assert queue.claim_next_job("worker.1", "public", LEASE) is None
    assert queue.watches["public"].first_seen == {}


def test_a_job_given_back_is_queued_at_once_its_attempt_not_counted_its_token_not_reused(queue):
    job_id = queue.enqueue("sleep", {"seconds": 60})
    first = queue.claim_next_job("worker.1", "public", LEASE)
    assert queue.give_back(first)
    second = queue.claim_next_job("worker.2", "public", LEASE)
    assert (second.id, second.attempt, second.max_attempts) == (job_id, 2, 4)
    assert not queue.extend_lease(first)  # the token never repeats: still fenced
    assert not queue.give_back(first)


def test_a_failed_job_waits_for_its_retry_time(queue):
    job_id = queue.enqueue("fail", {})
    assert queue.retry_later(queue.claim_next_job("worker.1", "public", LEASE), "boom", delay=5)
    assert queue.get(job_id)["state"] == "failed"
    assert queue.claim_next_job("worker.1", "public", LEASE) is None
    queue.clock.now += 5
    assert queue.claim_next_job("worker.1", "public", LEASE).attempt == 2
    assert queue.get(job_id)["error"] == "boom"


def test_a_unique_key_is_enqueued_once(queue):
    first = queue.enqueue("heartbeat", {}, "housekeeping", key="heartbeat@12:00")
    assert first is not None
    assert queue.enqueue("heartbeat", {}, "housekeeping", key="heartbeat@12:00") is None
    assert [job["id"] for job in queue.recent("heartbeat")] == [first]


def test_a_claim_in_one_lane_never_takes_another_lanes_job(queue):
    ids = {lane: queue.enqueue("sleep", {}, lane) for lane in ("public", "users")}
    assert queue.claim_next_job("worker.1", "housekeeping", LEASE) is None
    assert queue.claim_next_job("worker.1", "users", LEASE).id == ids["users"]
    assert queue.claim_next_job("worker.1", "users", LEASE) is None
    assert queue.claim_next_job("worker.1", "public", LEASE).id == ids["public"]
    with pytest.raises(ValueError, match="lane must be one of"):
        queue.enqueue("sleep", {}, "vip")


def refused(enqueue) -> str:
    with pytest.raises(Refused) as refusal:
        enqueue()
    assert refusal.value.status == 429
    return str(refusal.value)


def test_each_quota_refuses_with_429_at_its_limit_and_ticks_pass_them_all(open_one):
    queue = open_one(Limits(max_own_queued=2, max_public_queued=3, max_queued=6))
    queue.enqueue("sleep", {}, "users", owner="alice")
    job = queue.claim_next_job("worker.1", "users", LEASE)  # running counts against alice
    queue.enqueue("sleep", {}, "users", owner="alice")
    assert "(MAX_OWN_QUEUED)" in refused(lambda: queue.enqueue("sleep", {}, "users", "alice"))
    queue.finish(job, "null")  # done: no longer counts
    queue.enqueue("sleep", {}, "users", owner="alice")
    for _ in range(3):
        queue.enqueue("sleep", {})
    assert "(MAX_PUBLIC_QUEUED); log in" in refused(lambda: queue.enqueue("sleep", {}))
    queue.enqueue("sleep", {}, "users", owner="bob")  # the sixth job waiting
    assert "(MAX_QUEUED)" in refused(lambda: queue.enqueue("sleep", {}, "users", owner="eve"))
    for second in range(3):
        assert queue.enqueue("heartbeat", {}, "housekeeping", key=f"heartbeat@{second}")


def test_concurrent_enqueues_never_pass_a_quota(open_one):
    limits = Limits(max_own_queued=10)
    queues = [open_one(limits) for _ in range(8)]
    accepted = []

    def enqueue_five(queue):
        for _ in range(5):
            try:
                accepted.append(queue.enqueue("sleep", {}, "users", owner="alice"))
            except Refused:
                pass

    threads = [threading.Thread(target=enqueue_five, args=(queue,)) for queue in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 10


ENQUEUER = """
import os, sys
from database import database_from_env
from job_queue import Limits, open_queue
from database import Refused
queue = open_queue(database_from_env(os.environ), Limits(max_own_queued=10))
sys.stdin.read(1)  # every process is released at the same instant
for _ in range(5):
    try:
        queue.enqueue("sleep", {}, "users", owner="alice")
    except Refused:
        pass
"""


def test_enqueues_from_processes_at_once_never_pass_a_quota_on_sqlite(tmp_path):
    env = dict(os.environ, DATABASE_URL=f"sqlite:///{tmp_path}/app.db")
    db = Database(tmp_path / "app.db")
    queue = open_queue(db)
    for _ in range(5):
        queue.enqueue("sleep", {}, "users", owner="alice")
    processes = [subprocess.Popen([sys.executable, "-c", ENQUEUER], cwd=REPO, env=env,
                                  stdin=subprocess.PIPE, text=True) for _ in range(4)]
    for process in processes:
        process.stdin.write("x")
    for process in processes:
        process.stdin.close()
    assert [process.wait(30) for process in processes] == [0] * 4
    assert len(queue.recent()) == 10  # 5 before, and 5 of the 20 that raced
    db.close()


def test_a_store_with_no_room_refuses_a_job_with_507_but_not_a_tick(service):
    handle = service()
    queue = open_queue(handle, room=Room(handle, max_bytes=1))
    with pytest.raises(StoreFull) as refusal:
        queue.enqueue("sleep", {})
    assert refusal.value.status == 507
    assert queue.enqueue("purge_finished_jobs", {}, "housekeeping", key="purge@0")


def test_purging_keeps_the_newest_and_the_young_and_goes_in_batches(open_one):
    queue = open_one(Limits(job_retention=100, max_finished=4))
    done = []
    for second in range(10):  # one done job a second, and a dead one at the start
        queue.enqueue("sleep", {}, "users" if second else "public")
        job = queue.claim_next_job("worker.1", "users" if second else "public", LEASE)
        (queue.finish(job, "null") if second else queue.mark_dead(job, "boom"))
        done.append(job.id)
        queue.clock.now += 1
    assert queue.purge_batch("done", batch=2) == 2  # 9 done, 4 kept: 5 to go
    assert queue.purge_finished(batch=2) == 3
    assert [job["id"] for job in queue.recent()] == done[:-5:-1] + [done[0]]
    queue.clock.now += 98.5  # the three oldest of the four are now past retention
    assert queue.purge_finished(batch=2) == 4  # and the dead one too
    assert [job["id"] for job in queue.recent()] == [done[-1]]


def test_ids_count_up_even_when_every_job_is_past_keeping(queue):
    ids = [queue.enqueue("sleep", {}) for _ in range(3)]
    for _ in ids:
        queue.finish(queue.claim_next_job("worker.1", "public", LEASE), "null")
    queue.clock.now += 8 * 86400  # a quiet week: all past JOB_RETENTION
    queue.purge_finished()
    assert queue.enqueue("sleep", {}) > max(ids)  # never an id a session may still list


def test_paging_goes_back_by_id_and_a_job_looks_the_same_on_both_stores(queue):
    ids = [queue.enqueue("sleep", {"seconds": n}) for n in range(5)]
    queue.enqueue("heartbeat", {}, "housekeeping", key="heartbeat@0")
    assert [job["id"] for job in queue.recent("sleep", limit=2)] == ids[:-3:-1]
    assert [job["id"] for job in queue.recent("sleep", before=ids[3], limit=2)] == ids[2:0:-1]
    assert [job["id"] for job in queue.recent(before=ids[1])] == ids[:1]
    queue.enqueue("sleep", {"x": "\u00e9"}, "users", owner="alice", private=True)
    job = queue.claim_next_job("worker.1", "users", LEASE)
    queue.finish(job, json.dumps({"words": 2}))
    assert queue.get(job.id) == {
        "id": job.id, "task": "sleep", "args": {"x": "\u00e9"}, "state": "done",
        "attempts": 1, "max_attempts": 3, "worker": "worker.1", "result": {"words": 2},
        "error": None, "key": None, "private": True}
    assert queue.get(ids[0])["key"] is None and queue.get(ids[-1] + 1)["key"] == "heartbeat@0"
    assert queue.get(10 ** 6) is None


def test_redis_out_of_memory_refuses_new_jobs_but_lets_the_queue_drain(fresh_redis):
    redis = Redis(fresh_redis)
    queue = open_queue(redis)
    running, waiting = (queue.enqueue("sleep", {}) for _ in range(2))
    job = queue.claim_next_job("worker.1", "public", LEASE)
    redis.execute("CONFIG", "SET", "maxmemory", "1")  # Redis full, and refusing to grow
    try:
        with pytest.raises(StoreFull, match="out of memory"):
            queue.enqueue("heartbeat", {}, "housekeeping", key="heartbeat@0")
        assert queue.extend_lease(job) and queue.finish(job, "null")  # no lease is lost
        assert queue.claim_next_job("worker.1", "public", LEASE).id == waiting
        assert queue.get(running)["state"] == "done"
    finally:
        redis.execute("CONFIG", "SET", "maxmemory", "0")
    assert queue.enqueue("heartbeat", {}, "housekeeping", key="heartbeat@0")


def test_a_full_sqlite_disk_is_a_full_store(tmp_path):
    db = Database(tmp_path / "app.db")
    queue = open_queue(db)
    pages = db.query("PRAGMA page_count")[0][0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # the writer's file can grow no more
    with pytest.raises(StoreFull, match="database or disk is full"):
        for _ in range(1000):
            queue.enqueue("sleep", {"padding": "x" * 1000})
    db.close()


OLD_JOBS = """
CREATE TABLE jobs (id INTEGER PRIMARY KEY, task TEXT NOT NULL, args TEXT NOT NULL,
    key TEXT UNIQUE, state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    run_at REAL NOT NULL, worker TEXT, lease_until REAL, result TEXT, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX jobs_ready ON jobs (state, run_at);
CREATE INDEX jobs_by_task ON jobs (task, id);
INSERT INTO jobs (task, args, key, max_attempts, run_at, created_at, updated_at)
    VALUES ('heartbeat', '{}', 'heartbeat@0', 3, 0, 0, 0), ('sleep', '{}', NULL, 3, 0, 0, 0)
"""


def test_a_jobs_table_from_the_first_release_gains_its_columns_once(tmp_path):
    db = Database(tmp_path / "app.db")
    db.create_tables(OLD_JOBS)  # as a file made before private jobs, lanes and heartbeats
    open_queue(db)
    queue = open_queue(db)  # a second process opening the same file changes nothing
    assert queue.get(1)["private"] is False
    assert queue.claim_next_job("worker.1", "housekeeping", LEASE).task == "heartbeat"
    assert queue.claim_next_job("worker.1", "public", LEASE).id == 2
    assert queue.get(queue.enqueue("sleep", {}, private=True))["private"] is True
    assert not db.query("SELECT * FROM sqlite_master WHERE name = 'jobs_ready'")
    db.close()
