"""Leases on no one's wall clock: how a claiming worker tells a dead job from a live one
(Factors VI and VIII).

Any copy may die at any moment, so a job that a dead copy held must be taken by another;
but a job taken from a copy that is alive runs twice at once. The terrible day this module
prevents: a lease that ends at a wall-clock time (`lease_until < now`) fails the day a
clock steps forward past it (NTP, a resumed VM, two hosts that disagree): a second worker
takes the job while the first still runs it.

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

`job_queue.py` reads the running jobs (`Sighting`s) and writes the recoveries; this module
only decides, on a clock it is given, so that a test can move that clock by hand.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


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

    For each it notes the pair (token, heartbeat) and the monotonic time it first saw
    that pair. Pairs never repeat: the token is new at every claim, the heartbeat grows at
    every renewal. So a pair still the same after more than the job's lease means that
    nobody renewed it for that long, whatever any wall clock says. The note keeps only the
    jobs still running: it stays as small as the lane's running jobs.
    """

    def __init__(self, monotonic: Callable[[], float]):
        self.monotonic = monotonic
        self.first_seen: dict[int, tuple[str, int, float]] = {}  # id -> token, beat, when
        self.lock = threading.Lock()  # several threads may claim in one lane (tests do)

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
                token, heartbeat, when = self.first_seen.get(job.id, (None, 0, after))
                if (token, heartbeat) != (job.token, job.heartbeat):
                    when = after
                elif before - when > job.lease:
                    expired.append(job)
                notes[job.id] = (job.token, job.heartbeat, when)
            self.first_seen = notes
        return expired
