"""The chaos drill: with the SQLite store nothing is lost while copies are killed, with the
memory store sessions are (Factor VI, measured); across two hosts, nothing is lost on a
shared Redis while one host is cut off and the other killed whole, and a SQLite file per
host loses whoever crosses hosts; every namespace, link and process is removed after; and
its detectors do detect.

A drill spends most of its time starting and stopping processes and waiting out leases,
so the drills of the tests selected among `BACKGROUND` run on threads from the start of
the module (`background`), beside the one run in the foreground; each test collects what
its drill printed. As root the two-host drills make network namespaces; without root
(or where namespaces cannot be made) they share loopback, say so, and must pass as well.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import (REDIS_SERVER, REPO, SLEEPER, Spawner, alive, app_env, emptied,
                      free_port, selected, stopped, wait_until)

import bench  # the benchmarks' scripts (on sys.path by conftest)
import drill
import hosts
from shoppers import Failure, User, cart_intact

DRILL = [sys.executable, str(REPO / "benchmarks" / "drill.py")]
# Near the shortest two-host run a lease of 3 s allows (drill.shortest_run): a 0.75 s cut.
HOSTS = ["--hosts", "2", "--seconds", "3", "--lease", "3"]


def port_share(number: int) -> str:
    """The drills run side by side, each a process that draws its ports from BENCH_PORTS
    (and its launchers give their copies the ports after those). Two drawing at once from
    one range could both find a port free, and one of them would serve the other's users:
    so each drill draws from a share of this run's range of its own (0: the foreground's),
    with a gap after it."""
    first, last = map(int, os.environ["BENCH_PORTS"].split("-"))
    size = (last - first + 1) // (1 + len(BACKGROUND))
    start = first + number * size
    return f"{start}-{start + size - 100}"


def run_drill(spawn, tmp_path, *args: str, **env) -> tuple[int, str]:
    """Run the drill to its end. Stopped by SIGTERM, not the fixture's SIGKILL, if it
    hangs: then it stops its launchers and copies, and removes its namespaces, itself."""
    env.setdefault("BENCH_PORTS", port_share(0))
    proc = spawn([*DRILL, *args], app_env(tmp_path, **env))
    try:
        code = proc.popen.wait(60)
    finally:
        if proc.popen.poll() is None:
            proc.stop(signal.SIGTERM, timeout=30)
    return code, proc.output()


def drill_in(spawner: Spawner, name: str, args: list[str], env: dict) -> tuple[int, str, Path]:
    """Run a drill whose every file and process is in a folder of its own (TMPDIR), so that
    the test can then look for what it left behind: (exit code, output, the folder)."""
    folder = spawner.folder / name
    folder.mkdir()
    return (*run_drill(spawner, folder, *args, TMPDIR=folder, **env), folder)


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory) -> Iterator[dict[Callable, Future]]:
    """Each selected test of BACKGROUND -> its drill, run to its end on a thread. Without
    a redis-server, the Redis drill is not run (its test says why)."""
    on_redis = test_on_redis_two_hosts_lose_nothing_as_one_is_cut_off_and_one_killed
    wanted = {test: settings(request) for test, settings in BACKGROUND.items()
              if selected(request, test) and (test is not on_redis or REDIS_SERVER)}
    spawner = Spawner(tmp_path_factory.mktemp("drills"))
    try:
        with ThreadPoolExecutor(max(1, len(wanted))) as threads:  # waited for before the end
            yield {test: threads.submit(drill_in, spawner, test.__name__, args,
                                        {**env, "BENCH_PORTS": port_share(number)})
                   for number, (test, (args, env)) in enumerate(wanted.items(), 1)}
    finally:
        spawner.end()


def figure(output: str, pattern: str) -> int:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, f"no {pattern!r} in:\n{output}"
    return int(match[1].replace(",", ""))


def left_behind(folder: Path, names: str) -> list[str]:
    """The drill's namespaces and links that still exist, and its processes still running
    (each has its folder in its environment; a zombie has no environment left)."""
    found = []
    if shutil.which("ip"):
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout.split()
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        found += [f"tfp-{name}" for name in names if f"tfp-{name}" in namespaces
                  or f"tfp-{name}0" in links]
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if str(folder).encode() in environ.read_bytes():
                found.append(f"pid {environ.parent.name}")
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


# --- One launcher --------------------------------------------------------------------------

def test_nothing_is_lost_while_copies_are_killed_and_restarted(spawn, tmp_path):
    # 2.5 s: the rolling restart at 1.25 s and one round of kills at 2 s; a killed worker's
    # job waits out a lease of 1 s, not 5. Eight users enqueue a job now and then (2% of
    # their requests): about ten in 2.5 s, and fewer users sometimes enqueued none. The
    # README shows a full 30 s drill.
    code, output = run_drill(spawn, tmp_path, "--seconds", "2.5", "--lease", "1")
    assert code == 0, output
    assert figure(output, r"^sessions +[\d,]+ users, ([\d,]+) lost") == 0
    enqueued = figure(output, r"^jobs +([\d,]+) enqueued")
    assert enqueued > 0
    assert figure(output, r"^jobs .* ([\d,]+) done") == enqueued
    assert figure(output, r"^jobs .* ([\d,]+) lost") == 0
    assert figure(output, r"^copies +([\d,]+) web") > 0
    assert figure(output, r"^copies .* \+ ([\d,]+) worker killed") > 0
    assert "rolling restart of web done" in output
    assert "verdict    nothing lost" in output


def test_with_the_memory_store_the_drill_reports_sessions_lost(background):
    code, output, _ = background[test_with_the_memory_store_the_drill_reports_sessions_lost
                                 ].result()
    assert code == 1, output
    assert figure(output, r"^sessions +[\d,]+ users, ([\d,]+) lost") > 0
    assert "with SESSION_STORE=memory each copy keeps its own sessions" in output


def test_a_bad_argument_costs_one_line_and_exit_code_2(spawn, tmp_path):
    code, output = run_drill(spawn, tmp_path, "--users", "0")
    assert code == 2
    assert output == "drill.py: error: --users must be from 1 to 64, got 0 (see -h)\n"


# --- Two hosts -----------------------------------------------------------------------------

def test_on_redis_two_hosts_lose_nothing_as_one_is_cut_off_and_one_killed(background):
    test = test_on_redis_two_hosts_lose_nothing_as_one_is_cut_off_and_one_killed
    if test not in background:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    code, output, folder = background[test].result()
    assert code == 0, output
    assert "verdict    nothing lost" in output
    enqueued = figure(output, r"^jobs +([\d,]+) enqueued")
    assert figure(output, r"^jobs .* ([\d,]+) done") == enqueued
    assert re.search(r"host b (cut off \(link tfp-b1 down\)|frozen) .* router\.py took it out "
                     r"of the rotation and back in;", output), output
    assert re.search(r"host a killed whole .* router\.py took it out of the rotation$",
                     output, re.MULTILINE), output
    # Redis on 127.0.0.1: from a namespace, through the relay; on loopback, directly.
    namespaces = "hosts      network namespaces tfp-a (10.213.1.2), tfp-b (10.213.2.2)" in output
    assert ("through the drill's relay on this side of each host's link: a at 10.213.1.1:"
            if namespaces else "hosts      loopback") in output, output
    assert left_behind(folder, "ab") == []


def test_with_a_sqlite_file_per_host_whoever_crosses_hosts_is_forgotten(background):
    code, output, folder = background[
        test_with_a_sqlite_file_per_host_whoever_crosses_hosts_is_forgotten].result()
    assert code == 1, output
    assert "store      a SQLite file per host, as two machines would have" in output
    assert figure(output, r"^sessions +[\d,]+ users, ([\d,]+) lost") > 0
    assert "host c killed whole" in output and "host d " in output
    assert "a SQLite file is one machine's" in output
    assert left_behind(folder, "cd") == []


BACKGROUND = {  # test -> (the drill's arguments, its environment), made when selected
    # 1 s: no round of kills yet (the first comes at 2 s): Factor VI needs no kill to fail.
    test_with_the_memory_store_the_drill_reports_sessions_lost:
        lambda request: (["--seconds", "1"], {"SESSION_STORE": "memory"}),
    # The shared redis-server, on 127.0.0.1: the newcomer's URL, which the relay serves.
    test_on_redis_two_hosts_lose_nothing_as_one_is_cut_off_and_one_killed:
        lambda request: ([*HOSTS, "--names", "a,b"],
                         {"DATABASE_URL": emptied(request.getfixturevalue("shared_redis"))}),
    # Names of its own: it runs beside a and b.
    test_with_a_sqlite_file_per_host_whoever_crosses_hosts_is_forgotten:
        lambda request: ([*HOSTS, "--names", "c,d"], {}),
}


def test_a_namespace_that_exists_already_is_neither_reused_nor_removed(spawn, tmp_path):
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("making network namespaces needs root and iproute2")
    made = subprocess.run(["ip", "netns", "add", "tfp-y"], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot make network namespaces here: {made.stderr.strip()}")
    try:
        code, output = run_drill(spawn, tmp_path, *HOSTS, "--names", "x,y")
        assert code == 2, output
        assert output.startswith("drill.py: the network namespace tfp-y or the link tfp-y0 "
                                 "exists already") and output.count("\n") == 1, output
        assert left_behind(tmp_path, "x") == []  # tfp-x was made first: removed
        assert "tfp-y" in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout.split()
    finally:
        subprocess.run(["ip", "netns", "del", "tfp-y"], capture_output=True)


def test_on_loopback_a_cut_host_freezes_whole_and_a_killed_one_dies_whole(tmp_path):
    # What the drill does without root, tried as root too: two sleepers and their launcher.
    network = hosts.Loopback("a test")
    host = network.add_host("a", tmp_path / "a")
    host.port = free_port()  # this run's share of the ports (side_by_side)
    (tmp_path / "Procfile").write_text(f"sleeper: {SLEEPER}\n")
    args = [sys.executable, str(REPO / "launcher.py"), "sleeper=2", "--port", str(host.port),
            "--procfile", str(tmp_path / "Procfile"), "--name", "a"]
    with bench.running(args, app_env(tmp_path, TMPDIR=host.folder), host.log) as launcher:
        host.launcher = launcher
        pids = wait_until(lambda: len(network.processes(host)) == 3 and network.processes(host))
        network.cut(host)
        wait_until(lambda: all(stopped(pid) for pid in pids), what="the host to freeze")
        network.heal(host)
        wait_until(lambda: not any(stopped(pid) for pid in pids), what="the host to thaw")
        assert hosts.kill_whole(network, host) == 3
        wait_until(lambda: not any(alive(pid) for pid in pids), what="the host to die")
        assert "stopping" not in host.log.read_text()  # nobody was asked: all died at once


# --- The parts, without processes ----------------------------------------------------------

@pytest.mark.parametrize("args, environ, message", [
    (["--hosts", "3"], {}, "--hosts must be 1 or 2, got 3"),
    (["--hosts", "2", "--names", "a,a"], {}, "--names must be two different letters"),
    (["--hosts", "2", "--names", "ab,c"], {}, "--names must be two different letters"),
    (["--hosts", "2", "--lease", "2"], {}, "--hosts 2 needs --lease of at least 3, got 2"),
    (["--hosts", "2", "--lease", "3", "--seconds", "2.5"], {},
     "--hosts 2 with --lease 3 needs --seconds of at least 2.9, got 2.5"),
    ([], {"DATABASE_URL": "postgres://db/app"}, "DATABASE_URL must name a Redis"),
    ([], {"DATABASE_URL": "redis://127.0.0.1", "SESSION_STORE": "sqlite"},
     "SESSION_STORE must be 'memory' or the kind of store DATABASE_URL names (redis)"),
])
def test_bad_options_cost_one_line_and_exit_code_2(monkeypatch, capsys, args, environ,
                                                   message):
    for name in ("DATABASE_URL", "REDIS_URL", "SESSION_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped_with:
        drill.read_options(args)
    error = capsys.readouterr().err
    assert stopped_with.value.code == 2
    assert error.startswith(f"drill.py: error: {message}") and error.count("\n") == 1, error


def test_the_drill_takes_the_redis_database_url_names(monkeypatch):
    monkeypatch.delenv("SESSION_STORE", raising=False)
    monkeypatch.setenv("DATABASE_URL", "redis://:secret@127.0.0.1:6379/2")
    options = drill.read_options(["--hosts", "2"])
    assert (options.store, options.redis, options.hosts) == (
        "redis", "redis://:secret@127.0.0.1:6379/2", ("a", "b"))


@pytest.mark.parametrize("lease", [3, 4, 5, 8, 12, 30, 600])
def test_a_host_is_cut_off_for_less_than_its_jobs_leases_can_bear(lease):
    # A third of a lease between two renewals, the cut, then TCP's backed-off retransmission
    # (about as long again) or the Redis client's backoff (1 s): under a lease, or its jobs
    # would run twice at once.
    cut = hosts.cut_seconds(lease)
    assert lease / 3 + cut + max(cut, 1.0) < lease and cut >= drill.SHORTEST_CUT
    seconds = drill.shortest_run(lease)
    cut_at, heal_at, kill_at = drill.host_schedule(seconds, lease)
    assert 0 < cut_at < heal_at and heal_at + drill.REJOIN <= kill_at
    assert kill_at <= seconds - drill.ALONE + 1e-9  # b then serves alone a while


def test_two_hosts_logs_replayed_as_one_find_a_job_run_twice_but_not_a_rerun(tmp_path):
    a, b = (hosts.Host(name, tmp_path / name, "127.0.0.1", 5000) for name in "ab")
    for host in (a, b):
        host.folder.mkdir()
    a.log.write_text(
        "23:59:57 system     | a.worker.1 started (pid=101)\n"
        "23:59:57 a.worker.1 | job 6 sleep started (attempt 1/3)\n"
        "23:59:58 a.worker.1 | job 5 sleep started (attempt 1/3)\n"
        "23:59:59 a.worker.1 | job 7 sleep started (attempt 1/3)\n")  # then host a dies
    b.log.write_text(
        "23:59:58 b.worker.1 | job 6 sleep started (attempt 2/3)\n"  # a still runs it: twice
        "23:59:59 b.worker.1 | job 6 sleep done in 0.30s\n"
        "23:59:59 b.worker.1 | job 7 sleep started (attempt 2/3)\n"  # the death's second: after
        "00:00:03 b.worker.1 | job 5 sleep started (attempt 2/3)\n"  # after it, past midnight
        "00:00:03 b.worker.1 | job 5 sleep done in 0.30s\n")
    killed_at = time.mktime((2026, 12, 31, 23, 59, 59, 0, 0, -1))
    lines = drill.replay_order([a, b], a, killed_at)
    death = lines.index(("system", "a.worker.1 killed by SIGKILL, with its host"))
    assert lines[death - 1] == ("a.worker.1", "job 7 sleep started (attempt 1/3)")
    assert drill.concurrent_runs(lines) == 1  # job 6; jobs 5 and 7 are reruns after a kill


def test_a_failure_is_explained_only_while_a_host_is_struck():
    cut = drill.Incident("host b", "cut off (link tfp-b1 down) for 1 s", 10.0, 11.0)
    during = Failure("POST /cart", 10.9, 12.0, "HTTP 503")
    after = Failure("POST /cart", 11.6, 11.7, "HTTP 503")
    hung = Failure("POST /cart", 10.5, 20.5, "TimeoutError")
    assert drill.in_flight_on_a_strike(during, [cut])
    assert not drill.in_flight_on_a_strike(after, [cut])
    assert not drill.in_flight_on_a_strike(hung, [cut])


def test_a_relayed_url_keeps_its_password_and_database():
    assert hosts.relayed("redis://:pw%40%3A%2F@127.0.0.1:6379/2", ("10.213.1.1", 40000)) \
        == "redis://:pw%40%3A%2F@10.213.1.1:40000/2"
    assert hosts.relayed("redis://user:pw@[::1]/0", ("10.213.2.1", 5)) \
        == "redis://user:pw@10.213.2.1:5/0"
    assert hosts.relayed("redis://localhost", ("10.213.1.1", 5)) == "redis://10.213.1.1:5"


def test_the_log_replay_finds_a_job_run_by_two_workers_at_once(tmp_path):
    log = tmp_path / "launcher.log"
    log.write_text(
        "05:00:01 worker.1 | job 5 sleep started (attempt 1/3)\n"
        "05:00:02 system   | worker.1 killed by SIGKILL\n"
        "05:00:07 worker.2 | job 5 sleep started (attempt 2/3)\n"  # after a kill: fine
        "05:00:08 worker.2 | job 5 sleep done in 0.30s\n"
        "05:00:09 worker.3 | job 6 sleep started (attempt 1/3)\n"
        "05:00:09 worker.1 | job 6 sleep started (attempt 2/3)\n"  # worker.3 still runs it
        "05:00:10 worker.3 | job 6 lease lost; result discarded\n"  # a stale owner
        "05:00:10 worker.1 | job 6 sleep done in 0.30s\n")
    assert drill.concurrent_runs(drill.read_log(log)) == 2


def test_a_cart_may_keep_or_drop_an_unanswered_item_but_nothing_else():
    user = User("ada", items=["a", "b", "c"], added={"a", "c"})  # b's POST failed
    assert cart_intact(["a", "c"], user)
    assert cart_intact(["a", "b", "c"], user)
    assert not cart_intact(["a"], user)            # an answered item lost
    assert not cart_intact(["c", "a"], user)       # out of order
    assert not cart_intact(["a", "a", "c"], user)  # twice
    assert not cart_intact(["a", "c", "x"], user)  # never sent
