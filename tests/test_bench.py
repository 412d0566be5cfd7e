"""The benchmark's load generators count what clients see, and see errors where there are some."""
import importlib.util
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, free_port, responds, wait_until


def load_script(name: str):
    """benchmarks/ is not a package on the path: load a script there by its file name."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script("bench")
profile_copy = load_script("profile_copy")  # after bench, which it imports

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def test_load_generator_counts_cart_requests_without_errors(web):
    tally = bench.hammer(web.port, "session", clients=4, seconds=0.5, max_requests=5000)
    assert len(tally.latencies) > 20
    assert dict(tally.errors) == {}
    assert 0 < tally.summary().rate


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_redis_configuration_serves_the_session_workload_from_its_own_redis(tmp_path):
    with bench.on_redis(bench.direct, tmp_path) as target:
        tally = bench.hammer(target.port, "session", clients=2, seconds=0.3, max_requests=500)
    assert len(tally.latencies) > 10 and dict(tally.errors) == {}
    assert "redis" in (tmp_path / "web.1.log").read_text()  # "(pid ..., redis store)"


def test_percentile_is_the_nearest_rank():
    ordered = [float(n) for n in range(1, 101)]
    assert bench.percentile(ordered, 0.50) == 50.0
    assert bench.percentile(ordered, 0.99) == 99.0
    assert bench.percentile([], 0.99) == 0.0


@needs_wrk
def test_wrk_counts_the_requests_the_copy_logged(web):
    logged_before = web.proc.output().count('"POST /')  # the module's copy: earlier tests'
    result = bench.wrk_round(web.port, "session", clients=4, seconds=1)
    assert result.errors == {}
    # One log line per login or cart request, written before its answer is sent.
    logged = web.proc.output().count('"POST /') - logged_before
    # wrk stops with up to one request in flight per connection: served, but not counted.
    assert logged - 4 <= result.answered <= logged
    assert result.answered > 20


@needs_wrk
def test_wrk_counts_answers_of_400_and_more_as_errors(spawn, tmp_path):
    port = free_port()  # Python's file server answers every POST with 501
    spawn([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], {},
          cwd=tmp_path)
    wait_until(lambda: responds(f"http://127.0.0.1:{port}/"), what="http.server")
    result = bench.wrk_round(port, "session", clients=2, seconds=1)
    assert result.answered == 0
    assert set(result.errors) == {"status"} and result.errors["status"] > 20


@needs_wrk
def test_two_copies_on_one_port_forget_memory_sessions(tmp_path):
    """Both copies serve the one port (or the sessions would survive): the kernel spreads
    a client's connections over them, and a session in one copy's memory is lost. Both
    ways of sharing the port run side by side: most of each is its copies starting and
    stopping, one after the other."""

    def errors_seen(how: str) -> dict:
        (tmp_path / how).mkdir()
        with bench.sharing_port(tmp_path / how, "memory", 2, how) as target:
            return bench.wrk_round(target.port, "session", clients=2, seconds=1).errors

    ways = ["reuseport", "inherit"]
    with ThreadPoolExecutor(len(ways)) as side_by_side:
        for how, errors in zip(ways, side_by_side.map(errors_seen, ways)):
            assert set(errors) == {"lost"} and errors["lost"] > 10, (how, errors)


def test_the_profiler_covers_threads_other_than_the_main_one():
    def work_in_a_thread():
        sum(range(10_000))

    unwrapped = threading.Thread.run
    try:
        total = profile_copy.profile_every_thread()
        thread = threading.Thread(target=work_in_a_thread)
        thread.start()
        thread.join()
    finally:
        threading.Thread.run = unwrapped
    assert "work_in_a_thread" in {function for _, _, function in total.stats}
