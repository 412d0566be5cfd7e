"""Leases on no one's wall clock: how a claiming worker tells a dead job from a live one
(Factors VI and VIII).

Any copy may die at any moment, so a job that a dead copy held must be taken by another;
but a job taken from a copy that is alive runs twice at once. The terrible day this module
prevents: a lease that ends at a wall-clock time (`lease_until < now`) fails the day a
clock steps forward past it (NTP, a resumed VM, two hosts that disagree); or a busy
database holds every renewal back for half a second, and live workers take one another's
jobs, again and again, until each job is dead.

So no time is stored with a lease. A running job carries its claim's token and a
`heartbeat` that its worker adds one to at every renewal, and, as in Kubernetes' leader
election (client-go's `observedTime`), each claiming process notes per running job the
pair (token, heartbeat) and when *it* first saw that pair, on its own `time.monotonic()`.
A pair unchanged for longer than the job's own lease (stored with the job: workers may run
with different JOB_LEASE) means nobody renewed it: the job is recovered by a write fenced
on that very pair. No two clocks are ever compared. The token is drawn afresh at every
claim, so a pair never comes back, not even for an id that a store which lost its data
hands out again. The price: a fresh worker recovers nothing until it has watched a job for
one lease, so a killed worker's job waits a lease after someone starts watching.

**A busy store stops every clock.** A renewal waits for the store like any other write:
for SQLite's write lock (up to DATABASE_BUSY_TIMEOUT, then again), for a frozen Redis
until it thaws. Whoever holds the store meanwhile, no owner can renew: that silence is the
store's, not the owner's. A watcher cannot see the owners wait, only its own process's
calls, which queue for the same lock; so when one of them took a noticeable share of a
job's lease (SLOW_CALL_SHARE), the store was busy for everyone, and the watcher counts
that job's silence again from the moment the call ended; so it does after a call that
failed (a Redis restarting refuses at once, and no renewal got through either). The owner's renewal, queued
behind the same lock, lands soon after. The price: while every call waits, nothing is
recovered. What a watcher cannot see is a store busy only between two of its calls, so an
idle worker looks at least four times a lease (`worker.idle_pause`); a job whose lease is
far shorter than its watcher's own (workers with different JOB_LEASE) is still watched
less closely than that.

`job_queue.py` reads the running jobs (`Sighting`s) and writes the recoveries; this module
only decides, on a clock it is given, so that a test can move that clock by hand.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

# A call to the store that took this share of a job's lease says the store was busy for
# that job's owner too. Shorter waits (another worker's claim, a commit) are everyday
# traffic: counting them would stop the clocks of a queue that is merely in use.
SLOW_CALL_SHARE = 0.25


@dataclass(frozen=True)
class Sighting:
    """A running job as a claim reads it: its claim's token ("" for a job claimed before
    tokens were stored), its renewals, its lease in seconds."""
    id: int
    token: str
    heartbeat: int
    lease: float


class LeaseWatch:
    """The running jobs of one lane, as this process has watched them renew.

    For each it notes the last sighting and the monotonic time its silence counts from:
    when this process first saw that pair (token, heartbeat), or the end of a slow call
    to the store since (`store_was_slow`). Pairs never repeat: the token is new at every
    claim, the heartbeat grows at every renewal. So a pair still the same after more than
    the job's lease means that nobody renewed it for that long while the store could take
    a renewal, whatever any wall clock says. The note keeps only the jobs still running:
    it stays as small as the lane's running jobs.
    """

    def __init__(self, monotonic: Callable[[], float]):
        self.monotonic = monotonic
        self.first_seen: dict[int, tuple[Sighting, float]] = {}  # id -> sighting, since
        self.lock = threading.Lock()  # claims in one lane (tests do it) and slow calls

    def expired(self, read: Callable[[], list[Sighting]]) -> list[Sighting]:
        """Read the lane's running jobs; those that stopped renewing. A pair is dated after
        the read that found it, and compared with the time before the read that finds it
        again: the gap measured is never longer than the real one."""
        before = self.monotonic()
        running = read()
        after = self.monotonic()
        expired, notes = [], {}
        with self.lock:
            for job in running:
                seen, since = self.first_seen.get(job.id, (None, after))
                if seen is None or (seen.token, seen.heartbeat) != (job.token, job.heartbeat):
                    since = after
                elif before - since > job.lease:
                    expired.append(job)
                notes[job.id] = (job, since)
            self.first_seen = notes
        return expired

    def store_was_slow(self, took: float, ended: float) -> None:
        """A call of this process to the store took `took` seconds (infinite: it failed),
        until `ended`. Each job whose lease that is a noticeable share of counts its
        silence again from `ended`: its owner's renewal could not get through either."""
        with self.lock:
            for job_id, (job, since) in self.first_seen.items():
                if took > job.lease * SLOW_CALL_SHARE:
                    self.first_seen[job_id] = (job, max(since, ended))
