"""The README's "Try it" scenarios, run the way a newcomer runs them.

Each test reads its scenario's blocks from README.md: the `sh` block that starts the
launcher (terminal 1), the `text` blocks typed at its prompt, and the other `sh` blocks
(terminal 2). It runs them as written, in a copy of the project, with two changes: the
front port is a free one instead of 5000, and scenario 6's job lease is 1 s instead of 3
(the same story, sooner). Between blocks the test does what a person
would do (wait for the copies to be up, pick a pid from the log) and then asserts what
the README says you will see.

Most of the time is waiting on timers the README sets: scenario 3's loop of requests
runs for five seconds, and scenario 6's jobs sleep five seconds once a lease has run out.
So those two stories begin on threads as the module starts (`background`), each in a
copy of the project of its own, and their tests, last, check what they found.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import REPO, Launcher, Proc, Spawner, free_port, get, selected, wait_until

README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
APP_FILES = [path.name for path in REPO.glob("*.py")] + ["Procfile", "page.html"]


@dataclass
class Scenario:
    launcher: str | None = None                      # terminal 1
    prompt: list[str] = field(default_factory=list)  # typed at the launcher's prompt
    shell: list[str] = field(default_factory=list)   # terminal 2


def scenario(number: int) -> Scenario:
    """The blocks under the README heading `### <number>. ...`."""
    section = README.split(f"\n### {number}. ", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    found = Scenario()
    for language, text in BLOCK.findall(section):
        if language == "text":
            found.prompt += text.splitlines()
        elif "launcher.py" in text:
            found.launcher = text.strip()
        else:
            found.shell.append(text)
    return found


@dataclass
class Terminals:
    """A copy of the project, and the two terminals the README talks about."""
    project: Path
    spawn: Callable[..., Proc]  # a conftest Spawner: each process ends with its owner
    launchers: list[Launcher] = field(default_factory=list)

    def env(self, port: int) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items()
               if name not in ("PORT", "HOST", "DYNO", "SESSION_STORE", "DATABASE_URL",
                               "REDIS_URL", "JOB_LEASE", "HEARTBEAT_EVERY")}
        # A failing job retries after 0.05 s, then 0.1 s, not 2 s then 4 s: the same story.
        return {**env, "PORT": str(port), "PYTHONUNBUFFERED": "1", "RETRY_BACKOFF": "0.05"}

    def start_launcher(self, command: str, web: int) -> Launcher:
        """Terminal 1: the command as written, on a free front port instead of 5000."""
        port = free_port()
        proc = self.spawn(["bash", "-c", command], self.env(port), cwd=self.project,
                          stdin=subprocess.PIPE)
        launcher = Launcher(proc, port)
        self.launchers.append(launcher)
        launcher.wait_for(" is up on port", web, timeout=15)
        return launcher

    def run(self, launcher: Launcher, block: str) -> str:
        """Terminal 2: a block as written, pointed at this launcher's front port, its
        files (/tmp/cookies.txt) in this project's folder: the runs go side by side."""
        script = block.replace("127.0.0.1:5000", f"127.0.0.1:{launcher.port}")
        script = script.replace("/tmp/", f"{self.project}/")
        done = subprocess.run(["bash", "-c", script], cwd=self.project, capture_output=True,
                              text=True, timeout=60, env=self.env(launcher.port))
        assert done.returncode == 0, f"{block}\nexit {done.returncode}: {done.stderr}"
        return done.stdout


@contextmanager
def two_terminals(folder: Path, spawn: Callable[..., Proc]) -> Iterator[Terminals]:
    """Terminals in a fresh copy of the project under `folder` (its own var/app.db and
    cookies.txt); every launcher started there, and its copies, end with the block."""
    project = folder / "project"
    project.mkdir(parents=True)
    for name in APP_FILES:
        shutil.copy(REPO / name, project)
    found = Terminals(project, spawn)
    try:
        yield found
    finally:
        for launcher in found.launchers:
            launcher.end()


@pytest.fixture
def terminals(tmp_path, spawn):
    with two_terminals(tmp_path, spawn) as found:
        yield found


def users_and_copies(output: str) -> tuple[list, set[str]]:
    sessions = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [session["user"] for session in sessions], {s["served_by"] for s in sessions}


def web_pids(launcher: Launcher) -> set[int]:
    return {pid for name, pid, _ in launcher.started() if name.startswith("web.")}


def test_try_it_4_and_5_a_killed_copy_is_replaced_and_scaling_is_a_number(terminals):
    """Scenario 2's launcher, kept running through scenarios 4 and 5 as the README does."""
    launcher = terminals.start_launcher(scenario(2).launcher, web=4)
    launcher.send(scenario(4).prompt[0])  # kill web.2
    statuses = terminals.run(launcher, scenario(4).shell[0]).split()
    assert statuses == ["200"] * 12
    launcher.wait_for("web.2 killed by SIGKILL")
    launcher.wait_for(" is up on port", 5)

    steps = scenario(5)
    launcher.send(steps.prompt[0])
    launcher.wait_for(" is up on port", 9)  # web.5 to web.8 join the first four
    counts = re.findall(r"(\d+) X-Served-By: (web\.\d+)", terminals.run(launcher, steps.shell[0]))
    assert sorted(name for _, name in counts) == [f"web.{n}" for n in range(1, 9)]
    assert {count for count, _ in counts} == {"2"}
    launcher.send("web=2")  # "Now `web=2` at the prompt and the same command"
    launcher.wait_for(" exited with code 0", 6)  # out of the rotation before they stop
    counts = re.findall(r"(\d+) X-Served-By: (web\.\d+)", terminals.run(launcher, steps.shell[0]))
    assert counts == [("8", "web.1"), ("8", "web.2")]


def test_try_it_8_sticky_routing_seems_to_work_with_memory_until_a_restart(terminals):
    steps = scenario(8)
    launcher = terminals.start_launcher(steps.launcher.replace("web=4", "web=2"), web=2)
    terminals.run(launcher, steps.shell[0])  # log in
    before = terminals.run(launcher, steps.shell[1])
    assert re.fullmatch(r'\s*12 "user": "ada", \t"served_by": "web\.\d"\n', before), before
    launcher.send(steps.prompt[0])  # restart web
    launcher.wait_for("rolling restart done")
    launcher.wait_for(" exited with code 0", 2)
    after = terminals.run(launcher, steps.shell[1])
    assert re.fullmatch(r'\s*12 "user": null, \t"served_by": "web\.\d"\n', after), after


def test_try_it_9_a_sqlite_shopper_barely_notices_chaos(terminals):
    steps = scenario(9)
    launcher = terminals.start_launcher(steps.launcher, web=3)
    launcher.send(steps.prompt[0])  # chaos 1
    counted = dict(reversed(line.split()) for line in  # "  29 1" and "   1 0": known, not
                   terminals.run(launcher, steps.shell[0]).splitlines())
    launcher.send("chaos off")
    assert int(counted.get("1", 0)) >= 0.8 * 30, counted
    launcher.wait_for("SIGKILL, by chaos")


def test_try_it_10_the_same_app_on_redis_with_one_url_changed(terminals, redis_server):
    steps = scenario(10)
    command = steps.launcher.replace("redis://127.0.0.1:6379/0", redis_server.url)
    launcher = terminals.start_launcher(command.replace("web=4", "web=2"), web=2)
    users, copies = users_and_copies(terminals.run(launcher, scenario(1).shell[0]))
    assert users == ["ada"] * 4 and len(copies) == 2
    assert steps.shell[0].startswith("redis-server")  # the test started its own instead


def test_try_it_11_a_sqlite_file_per_host_forgets_users_who_cross_hosts(terminals):
    a, b, front = free_port(), free_port(), free_port()
    lines = scenario(11).launcher.replace("5100", str(a)).replace("5200", str(b)).replace(
        "--port 5000", f"--port {front}").splitlines()
    hosts = [terminals.spawn(["bash", "-c", line], terminals.env(front), cwd=terminals.project)
             for line in lines]
    router = Launcher(hosts[-1], front)
    router.wait_for("in the rotation", 2)
    output = terminals.run(router, scenario(1).shell[0])
    sessions = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert {session["served_by"][:2] for session in sessions} == {"a.", "b."}
    assert all((session["user"] == "ada") == session["served_by"].startswith("a.")
               for session in sessions), sessions


# --- Scenarios 3 and 6, begun in the background ----------------------------------------
#
# Their tests come last, and only collect what the stories found: by then the five
# seconds of scenario 3's loop and of scenario 6's jobs have passed beside the tests above.

@dataclass
class Background:
    jobs_terminals: Terminals  # scenario 6's: its launcher runs on into scenario 7
    restarts: Future | None    # of restart_both_stores, if its test was selected
    jobs: Future | None        # of begin_scenario_6, if its test was selected


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Begins scenarios 3 and 6 on threads as the module starts, for the tests selected.
    A failure there is kept in its Future, for its own test to report."""
    spawner = Spawner(tmp_path_factory.mktemp("background"))
    try:
        with two_terminals(spawner.folder / "scenario-6", spawner) as jobs_terminals, \
                ThreadPoolExecutor(2) as threads:  # waited for before the processes end

            def begin(tests: tuple[Callable, ...], story: Callable, *args) -> Future | None:
                if any(selected(request, test) for test in tests):
                    return threads.submit(story, *args)
                return None

            yield Background(
                jobs_terminals,
                begin((test_try_it_1_memory_store_forgets_you_on_three_copies_of_four,
                       test_try_it_2_sqlite_store_knows_you_on_every_copy,
                       test_try_it_3_restart_keeps_sqlite_sessions_and_loses_memory_ones),
                      restart_both_stores, spawner.folder / "scenario-3", spawner),
                begin(SCENARIO_6_TESTS, begin_scenario_6, jobs_terminals))
    finally:
        spawner.end()


RESTART_HANGS = 60  # seconds: a rolling restart of four copies takes one, or a few when busy


def restart_both_stores(folder: Path, spawn: Callable[..., Proc]) -> dict[str, tuple]:
    """Scenario 3 with the SQLite store and with memory, side by side, each in a project of
    its own (its own cookies.txt): for each store, scenario 1's answers before the restart
    (so scenarios 1 and 2 need no launchers of their own), and the sessions after."""
    with two_terminals(folder / "sqlite", spawn) as sqlite, \
            two_terminals(folder / "memory", spawn) as memory, ThreadPoolExecutor(1) as beside:
        # The requests sent during the restart are scenario 3's point; for the memory store
        # the README asks only to "log in, `restart web`, ask again".
        forgotten = beside.submit(restart_and_ask, memory, scenario(1).launcher)
        kept = restart_and_ask(sqlite, scenario(2).launcher, during=scenario(3).shell[0])
        return {"sqlite": kept, "memory": forgotten.result()}


def restart_and_ask(terminals: Terminals, command: str, during=None) -> tuple[str, list]:
    """Log in as ada and ask four times (scenario 1's commands: what they printed), type
    `restart web` (while `during` runs), ask the new copies (the sessions they answered)."""
    launcher = terminals.start_launcher(command, web=4)
    first_answers = terminals.run(launcher, scenario(1).shell[0])
    old_pids = web_pids(launcher)
    if during:
        statuses, downloads = ask_during_restart(terminals, launcher, during)
        assert statuses == ["200"] * len(statuses) and len(statuses) >= 20, statuses
        assert downloads and set(downloads) == {"download: 200, 2000000 bytes"}, downloads
    else:
        launcher.send(scenario(3).prompt[0])
        launcher.wait_for("rolling restart done", timeout=RESTART_HANGS)
    output = terminals.run(launcher, scenario(3).shell[1])
    sessions = [json.loads(line) for line in output.splitlines()]
    assert len({s["pid"] for s in sessions} - old_pids) == 4  # four new processes answered
    launcher.end()
    return first_answers, sessions


def ask_during_restart(terminals: Terminals, launcher: Launcher,
                       loop: str) -> tuple[list[str], list[str]]:
    """Type `restart web` while terminal 2 runs `loop`, and run it again until the launcher
    says the restart is done, as a person would keep asking: every status it printed, and
    every line the slow download printed."""
    statuses, downloads = [], []
    with ThreadPoolExecutor(1) as terminal_2:
        running = terminal_2.submit(terminals.run, launcher, loop)
        launcher.send(scenario(3).prompt[0])
        deadline = time.monotonic() + RESTART_HANGS
        while True:
            printed = running.result()  # the download's line may land amid the statuses
            downloads += re.findall(r"download: \d+, \d+ bytes", printed)
            statuses += re.sub(r"download: \d+, \d+ bytes", "", printed).split()
            if "rolling restart done" in launcher.output():
                return statuses, downloads
            if time.monotonic() > deadline:
                pytest.fail(f"no rolling restart done after {RESTART_HANGS}s:\n"
                            f"{launcher.output()}")
            running = terminal_2.submit(terminals.run, launcher, loop)


def test_try_it_1_memory_store_forgets_you_on_three_copies_of_four(background):
    first_answers, _ = background.restarts.result()["memory"]
    users, copies = users_and_copies(first_answers)
    assert Counter(users) == {"ada": 1, None: 3}
    assert len(copies) == 4 and first_answers.count("X-Served-By: web.") == 4


def test_try_it_2_sqlite_store_knows_you_on_every_copy(background):
    first_answers, _ = background.restarts.result()["sqlite"]
    users, copies = users_and_copies(first_answers)
    assert users == ["ada"] * 4 and len(copies) == 4


def test_try_it_3_restart_keeps_sqlite_sessions_and_loses_memory_ones(background):
    (_, sqlite), (_, memory) = background.restarts.result().values()
    assert [session["user"] for session in sqlite] == ["ada"] * 4
    assert [session["user"] for session in memory] == [None] * 4


def begin_scenario_6(terminals: Terminals) -> tuple[Launcher, int]:
    """Scenario 6 as far as the kill: the launcher, its job lease made 1 s (the README's 3 s
    is for a person with a `ps` table to read), three jobs that sleep 5 s and, "within the
    5 seconds", kill -9 worker.2, whose job the test reads from the log."""
    jobs = scenario(6)
    launcher = terminals.start_launcher(re.sub(r"\bJOB_LEASE=\d+", "JOB_LEASE=1", jobs.launcher),
                                        web=2)
    launcher.wait_for(" ready (pid", 4)  # three workers and the clock
    terminals.run(launcher, jobs.shell[0])
    [job_id] = wait_until(lambda: re.findall(r"worker\.2 +\| job (\d+) sleep started",
                                             launcher.output()), what="worker.2's job")
    launcher.send(jobs.prompt[0])  # kill worker.2
    launcher.wait_for("worker.2 killed by SIGKILL")
    return launcher, int(job_id)


def test_try_it_6_and_7_a_killed_workers_job_is_finished_and_two_clocks_tick_once(background):
    jobs, clocks = scenario(6), scenario(7)
    terminals = background.jobs_terminals
    launcher, job_id = background.jobs.result()

    def sleep_jobs_done():
        found = get(f"http://127.0.0.1:{launcher.port}/jobs?task=sleep").json()
        return len(found) == 3 and all(job["state"] == "done" for job in found)

    wait_until(sleep_jobs_done, timeout=20, what="the three sleep jobs done")
    found = {job["id"]: job for job in json.loads(terminals.run(launcher, jobs.shell[1]))}
    assert found[job_id]["attempts"] == 2
    assert sorted(job["attempts"] for job in found.values()) == [1, 1, 2]
    failing = terminals.run(launcher, jobs.shell[2]).strip()  # fails twice, then is done
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/jobs/\d+", failing)
    wait_until(lambda: get(failing).json()["state"] == "done", timeout=20,
               what="the failing job done on its third attempt")
    assert get(failing).json()["attempts"] == 3

    launcher.send(clocks.prompt[0])
    launcher.wait_for("already enqueued (by another clock, or by this one before a restart)")
    keys = Counter(job["key"] for job in json.loads(terminals.run(launcher, clocks.shell[0])))
    assert keys and set(keys.values()) == {1}


SCENARIO_6_TESTS = (test_try_it_6_and_7_a_killed_workers_job_is_finished_and_two_clocks_tick_once,)


def test_the_readme_map_names_code_that_exists():
    """Each name in the map's last column is a def or class in the file named before it."""
    table = README.split("## The map", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for row in [line for line in table.splitlines() if line.startswith("|")][2:]:
        where = None
        for token in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[1]):
            if (REPO / token).is_file():
                where = token if token.endswith(".py") else None
            elif where and re.fullmatch(r"[A-Za-z_][\w.]*(\(\))?", token):
                name = token.removesuffix("()").split(".")[-1]
                assert re.search(rf"^\s*(def|class) {name}\b", (REPO / where).read_text(),
                                 re.MULTILINE), f"README's map: no {token} in {where}"
                checked += 1
    assert checked >= 8
