"""The benchmark's load generator counts what clients see, and sees no error on a healthy copy."""
import importlib.util
import sys

from conftest import REPO

# benchmarks/ is not a package on the path: load bench.py by its file name.
spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
bench = sys.modules["bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_load_generator_counts_cart_requests_without_errors(start_web):
    web = start_web()
    tally = bench.hammer(web.port, "session", clients=4, seconds=1.0, max_requests=5000)
    assert len(tally.latencies) > 20
    assert dict(tally.errors) == {}
    assert 0 < tally.rate


def test_percentile_is_the_nearest_rank():
    ordered = [float(n) for n in range(1, 101)]
    assert bench.percentile(ordered, 0.50) == 50.0
    assert bench.percentile(ordered, 0.99) == 99.0
    assert bench.percentile([], 0.99) == 0.0
