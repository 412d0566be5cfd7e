"""Where one copy of webapp.py spends its CPU time, by function, under bench.py's load.

    python benchmarks/profile_copy.py                  # session workload, 3 rounds of 3 s
    python benchmarks/profile_copy.py --workload healthz --top 40

The profiler is the standard library's cProfile, in every thread. `python -m cProfile
webapp.py` would profile the main thread only, and webapp.py's main thread only waits for
SIGTERM: requests run on the server's threads (one accepts and receives requests whole,
a pool of workers answers them; see web_server.Server). So the copy runs here as
`profile_copy.py --copy OUT`: before webapp.main() starts, `threading.Thread.run` is
wrapped so that each thread runs under a profiler of its own, and each finished thread's
figures are added to one `pstats.Stats`, written to OUT when webapp.py returns from main()
on SIGTERM.

The clock is each thread's CPU time (`time.thread_time`), not the wall clock: time spent
waiting for the GIL, a lock, SQLite or a CPU that another process holds does not count,
so a machine shared with other work distorts the shares less. Waiting is what bench.py
measures; this shows what the copy does when it runs. cProfile makes every Python call
slower, deep recursions most (deepcopy): read the shares as an upper bound for such code.

Each round logs in anew (wrk.lua, or the Python clients without wrk), as in bench.py.
"""
from __future__ import annotations

import argparse
import atexit
import cProfile
import pstats
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from bench import REPO, ROUNDS, OneLineParser, copies, free_port, python_round, wrk_round

CLIENTS = 16


def profile_every_thread() -> pstats.Stats:
    """Wrap Thread.run: each thread is profiled on its own CPU clock, then added to one Stats."""
    total, lock, run = pstats.Stats(), threading.Lock(), threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profiler = cProfile.Profile(time.thread_time)
        try:
            profiler.runcall(run, thread)
        finally:
            with lock:
                total.add(profiler)

    threading.Thread.run = profiled_run
    return total


def run_copy(out: str) -> None:
    """The copy: webapp.main() with every thread profiled; the figures go to `out` at exit."""
    sys.path.insert(0, str(REPO))
    import webapp  # only now: webapp.py is in the folder above this one
    total = profile_every_thread()
    # atexit runs after main() has returned, and main() returns once server.stop() has
    # joined every server thread: each has added its figures to `total` by then.
    atexit.register(total.dump_stats, out)
    webapp.main()


def profile(workload: str, seconds: int, top: int) -> None:
    """Start a profiled copy, load it for ROUNDS rounds, stop it, print its top functions."""
    load = wrk_round if shutil.which("wrk") else partial(python_round, None, 0)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        out = Path(tmp) / "copy.prof"
        program = [sys.executable, __file__, "--copy", str(out)]
        with copies(Path(tmp), "sqlite", [free_port()], program) as target:
            for _ in range(ROUNDS):
                result = load(target.port, workload, CLIENTS, seconds)
                print(f"{workload}: {result.rate:,.0f} req/s under the profiler, errors "
                      f"{result.errors or 'none'}", file=sys.stderr)
        stats = pstats.Stats(str(out))  # written when the copy stopped, above
    for order in ("tottime", "cumulative"):
        stats.sort_stats(order).print_stats(top)


def main() -> None:
    parser = OneLineParser(prog="profile_copy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("session", "healthz"), default="session")
    parser.add_argument("--seconds", type=int, default=3, help="length of a round (3)")
    parser.add_argument("--top", type=int, default=25, help="functions to list (25)")
    parser.add_argument("--copy", metavar="OUT", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60:
        parser.error(f"--seconds must be from 1 to 60, got {args.seconds}")
    if args.copy:
        run_copy(args.copy)
    else:
        profile(args.workload, args.seconds, args.top)


if __name__ == "__main__":
    main()
