"""The suite in five runs side by side: a whole-suite run starts four more pytests.

A run alone leaves the cores idle much of its time, while timers run out (a lease, a
health check, a tick); side by side, the runs keep them busy, and the suite takes about
its CPU time over two cores, most of it Python start-ups. A project would reach for
pytest-xdist; here pytest is the only test dependency, so this plugin does the one thing
needed. When the run is the whole suite (`python -m pytest`, no file or test named), it
starts a pytest for each group of modules in OTHER_RUNS, with the same options, a folder
of its own and ports of its own (`port_range`), and leaves those modules out here. At the
end it prints each run's report and fails this run if one of them failed. Five runs keep
two cores busy; with fewer cores, or a module or a test named (`python -m pytest
tests/test_router.py -k frozen`), everything runs here, as usual. Ctrl-C reaches every run:
they share the terminal's process group, and each cleans up what it started.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

RUN = "TWELVE_FACTOR_TESTS_RUN"  # each run's number, in its environment: 0 is this one
# Groups of about equal time (measured side by side: 45-55 s each); the rest (Chromium's
# tests, the heaviest on the CPU) runs here.
OTHER_RUNS = (
    ("test_launcher.py", "test_job_queue.py", "test_engines.py", "test_web_server.py"),
    ("test_scenarios.py", "test_session_store.py", "test_formation.py", "test_web_input.py",
     "test_imports.py", "test_webapp.py"),
    ("test_worker.py", "test_router.py", "test_clock.py"),
    # The drills' processes start last here, after the scenarios' have started there.
    ("test_redis_client.py", "test_database.py", "test_on_redis.py", "test_bench.py",
     "test_drill.py"),
)
PORTS_EACH = 2280  # then a gap of 100: a launcher's copies take the ports after its front port
STARTED = pytest.StashKey[list]()


def port_range() -> range:
    """The ports this run's processes take: 20000-31900, or its share of it when the runs
    go side by side. Written into BENCH_PORTS ("first-last") too, which the benchmarks'
    scripts (drill.py, bench.py) read, so that a drill a test starts keeps to its share."""
    run = os.environ.get(RUN)
    ports = range(20000, 31900)
    if run is not None:
        first = 20000 + int(run) * (PORTS_EACH + 100)
        ports = range(first, first + PORTS_EACH)
    os.environ["BENCH_PORTS"] = f"{ports.start}-{ports.stop - 1}"
    return ports


def whole_suite(config: pytest.Config) -> bool:
    return (os.environ.get(RUN) is None and (os.cpu_count() or 1) >= 2
            and config.args_source is pytest.Config.ArgsSource.TESTPATHS
            and not config.option.collectonly)


def pytest_configure(config: pytest.Config) -> None:
    if whole_suite(config):
        os.environ[RUN] = "0"  # this run's ports, from here on
        config.stash[STARTED] = [start(config, number, modules)
                                 for number, modules in enumerate(OTHER_RUNS, 1)]
    port_range()  # BENCH_PORTS, for the scripts this run's tests start


def start(config: pytest.Config, number: int, modules: tuple[str, ...]) -> tuple:
    """`python -m pytest <this run's options> <modules>`, its report to a file."""
    folder = Path(tempfile.mkdtemp(prefix=f"run-{number}-"))
    report = open(folder / "report.txt", "w+b")
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", *config.invocation_params.args,
         "--basetemp", str(folder / "tmp"), *(str(config.rootpath / "tests" / name)
                                               for name in modules)],
        cwd=config.rootpath, env={**os.environ, RUN: str(number)}, stdin=subprocess.DEVNULL,
        stdout=report, stderr=subprocess.STDOUT)
    return modules, run, report, folder


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if STARTED in config.stash and any(collection_path.name in modules
                                       for modules in OTHER_RUNS):
        return True  # another run's
    return None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for modules, run, report, folder in session.config.stash.get(STARTED, []):
        code = run.wait()
        report.seek(0)
        text = report.read().decode(errors="replace")
        report.close()
        shutil.rmtree(folder, ignore_errors=True)
        writer = session.config.pluginmanager.get_plugin("terminalreporter")
        if writer is not None:
            writer.write_sep("=", f"run beside this one: {', '.join(modules)}")
            writer.write(text)
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
