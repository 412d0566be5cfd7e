"""The platform, tested with real processes: a launcher, its copies, and requests through
its front port. Each test writes a Procfile of its own in a temp folder: the real
webapp.py for `web`, tiny inline commands for everything else."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from types import SimpleNamespace

import pytest

from conftest import (REPO, SLEEPER, WEB, Launcher, alive, app_env, free_port, get, http,
                      post_form, served_by, session_cookie, stopped, wait_until)
from formation import Answered, Formation, Spawned
from launcher import Supervisor, UsageError, read_config


def test_formation_starts_the_asked_copies_with_names_and_ports(launch):
    worker = ('worker: python -c "import os, time; '
              "print('I am', os.environ['DYNO'], 'port', os.environ.get('PORT')); "
              'time.sleep(60)"\n')
    launcher = launch(WEB + worker + f"clock: {SLEEPER}\n", "web=2,worker=3",
                      stdin=subprocess.PIPE)
    launcher.wait_for(" is up on port", 2)
    launcher.wait_for("port None", 3)
    table = launcher.ps()
    assert sorted(table) == ["clock.1", "web.1", "web.2", "worker.1", "worker.2", "worker.3"]
    web_ports = {int(table[name][2]) for name in ("web.1", "web.2")}
    assert len(web_ports) == 2 and min(web_ports) > launcher.port
    assert {table[name][2] for name in table if not name.startswith("web")} == {"-"}
    assert all(table[name][5] == "up" for name in table)
    for number in (1, 2, 3):
        assert f"I am worker.{number} port None" in launcher.output()
    assert set(served_by(launcher, 4)) == {"web.1", "web.2"}


def test_a_procfile_line_may_start_with_assignments_as_in_honcho(launch):
    greeter = ('greeter: GREETING="good morning" python -c "import os; '
               "print(os.environ['GREETING'], os.environ['DYNO'])\"\n")
    launcher = launch(greeter, "greeter=1")
    launcher.wait_for("greeter.1 exited with code 0")
    assert "| good morning greeter.1" in launcher.output()


def test_a_killed_web_copy_is_restarted_and_the_front_keeps_answering(launch):
    launcher = launch(WEB, "web=2")
    launcher.wait_for(" is up on port", 2)
    before, ups = launcher.started(), launcher.output().count("web.1 is up on port")
    old_pid, port = [(pid, port) for name, pid, port in before if name == "web.1"][-1]
    os.kill(old_pid, signal.SIGKILL)
    launcher.wait_for("web.1 killed by SIGKILL")
    assert all(get(launcher.url).status == 200 for _ in range(6))
    wait_until(lambda: len(launcher.started()) > len(before), what="web.1 started again")
    [restarted] = launcher.started()[len(before):]
    assert restarted[0] == "web.1" and restarted[1] != old_pid and restarted[2] == port
    launcher.wait_for("web.1 is up on port", ups + 1)
    assert set(served_by(launcher, 4)) == {"web.1", "web.2"}


def test_rolling_restart_under_load_drops_no_request(launch):
    launcher = launch(WEB, "web=2", stdin=subprocess.PIPE)
    launcher.wait_for(" is up on port", 2)
    old_pids = {pid for _, pid, _ in launcher.started()}
    results = Counter()
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            try:
                results[get(launcher.url).status] += 1
            except OSError as error:
                results[repr(error)] += 1

    client = threading.Thread(target=keep_asking)
    client.start()
    try:
        wait_until(lambda: results[200] >= 20, what="requests before the restart")
        launcher.send("restart")
        launcher.wait_for("rolling restart done")
        launcher.wait_for(" exited with code 0", 2)
        served_before_end = results[200]
        wait_until(lambda: results[200] >= served_before_end + 20, what="requests after")
    finally:
        stop.set()
        client.join()
    assert set(results) == {200}, results
    table = launcher.ps()
    assert sorted(table) == ["web.1", "web.2"] and {row[5] for row in table.values()} == {"up"}
    assert not {int(row[1]) for row in table.values()} & old_pids
    assert not any(alive(pid) for pid in old_pids)


def test_scaling_from_stdin_changes_the_counts(launch):
    launcher = launch(WEB + f"worker: {SLEEPER}\n", "web=1", "worker=0",
                      stdin=subprocess.PIPE)
    launcher.wait_for("web.1 is up on port")
    launcher.send("web=3,worker=2")
    launcher.wait_for(" is up on port", 3)
    assert sorted(launcher.ps()) == ["web.1", "web.2", "web.3", "worker.1", "worker.2"]
    assert set(served_by(launcher, 6)) == {"web.1", "web.2", "web.3"}
    launcher.send("web=1 worker=1")
    for name in ("web.2", "web.3"):
        launcher.wait_for(f"{name} exited with code 0")
    launcher.wait_for("worker.2 killed by SIGTERM")
    assert sorted(launcher.ps()) == ["web.1", "worker.1"]
    assert served_by(launcher, 4) == {"web.1": 4}


def test_sigterm_stops_every_copy_and_exits_0(launch):
    launcher = launch(WEB + f"worker: {SLEEPER}\n", "web=2")
    launcher.wait_for(" is up on port", 2)
    pids = [pid for _, pid, _ in launcher.started()]
    assert len(pids) == 3
    assert launcher.proc.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids)
    assert launcher.output().count(" exited with code 0") == 2  # web copies stop cleanly


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_copies_do_not_outlive_a_sigkilled_launcher_not_even_a_frozen_one(launch):
    launcher = launch(WEB + f"worker: {SLEEPER}\n", "web=1", "worker=2", stdin=subprocess.PIPE)
    launcher.wait_for("web.1 is up on port")
    launcher.wait_for("worker.2 started")
    pids = [pid for _, pid, _ in launcher.started()]
    launcher.send("freeze worker.2")  # deaf to the SIGTERM its launcher's death sends
    wait_until(lambda: stopped(launcher.pids("worker.2")[-1]), what="worker.2 to stop")
    launcher.proc.popen.kill()  # the launcher alone, not its copies
    wait_until(lambda: not any(alive(pid) for pid in pids),
               what="the orphaned copies to exit (each gets SIGTERM with its stdout already "
                    "broken: its shutdown must survive a failed log line; the frozen one, "
                    "SIGHUP and SIGCONT from the kernel)")


def assert_refused(launcher: Launcher, problem: str) -> None:
    assert launcher.proc.popen.wait(10) == 2
    message = launcher.output().strip()
    assert problem in message and "\n" not in message, message
    assert "started" not in message


@pytest.mark.parametrize("procfile, args, problem", [
    (None, [], "cannot read the Procfile"),
    ("web python webapp.py\n", [], "expected 'type: command'"),
    (WEB + WEB, [], "declared twice"),
    ("# nothing\n\n", [], "declares no process type"),
    (WEB, ["web=x"], "whole number"),
    (WEB, ["web=-1"], "whole number"),
    (WEB, ["db=1"], "'db' is not in the Procfile"),
    (WEB, ["web"], "expected TYPE=N"),
    (WEB, ["web=101"], "from 0 to 100"),
    (WEB, ["web=" + "9" * 5000], "from 0 to 100"),  # int() refuses over 4,300 digits
    (WEB, ["--port", "9" * 5000], "the front port must be a number"),
    (WEB, ["--port", "\u00b2"], "the front port must be a number"),  # '²'.isdigit() is True
    (WEB, ["--port", "65535"], "the front port must be a number from 1 to 65000"),
    (WEB, ["--grace", "inf"], "--grace must be from 0 to 3600 seconds, got inf"),
    (WEB, ["--grace", "nan"], "--grace must be"),
    (WEB, ["--grace", "3000000"], "--grace must be from 0 to 3600 seconds"),  # select() overflows
    (WEB, ["--start-timeout", "0"], "--start-timeout must be from 0.1 to 3600 seconds"),
    (WEB, ["--idle-timeout", "0"], "--idle-timeout must be from 0.1 to 3600 seconds"),
    (WEB, ["--idle-timeout", "1e300"], "--idle-timeout must be"),
    (WEB, ["--upstream-timeout", "-1"], "--upstream-timeout must be"),
    (WEB, ["--check-every", "0.001"], "--check-every must be from 0.1"),
    (WEB, ["--check-every", "x"], "invalid float value: 'x'"),
    (WEB, ["--name", "a.b"], "--name must be 1 to 20 letters"),
    (WEB, ["--name", "x" * 21], "--name must be 1 to 20 letters"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, procfile, args, problem):
    if procfile is not None:
        (tmp_path / "Procfile").write_text(procfile)
    try:
        read_config(["--procfile", str(tmp_path / "Procfile"), *args])
    except UsageError as error:
        message = str(error)
    except SystemExit as exit:  # argparse's own: it printed the line itself
        assert exit.code == 2
        message = capsys.readouterr().err.strip()
    else:
        pytest.fail(f"{args} accepted")
    assert problem in message and "\n" not in message, message


def test_bad_input_exits_2_with_one_line_before_any_copy_starts(launch):
    assert_refused(launch(WEB, "web=x"), "whole number")


def test_front_port_in_use_exits_2_before_any_copy_starts(launch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        launcher = launch(WEB, port=busy.getsockname()[1])
        assert_refused(launcher, "cannot listen on the front port")


def test_an_unreadable_dotenv_is_refused_in_one_line(tmp_path):
    (tmp_path / "Procfile").write_text(WEB)
    (tmp_path / ".env").mkdir()
    with pytest.raises(UsageError, match="cannot read the .env file"):
        read_config(["--procfile", str(tmp_path / "Procfile")])


def test_dotenv_reaches_the_copies_and_the_launchers_env_wins(launch, tmp_path):
    (tmp_path / ".env").write_text("# settings\nFROM_DOTENV=dotenv\nBOTH='dotenv'\n")
    command = ('python -c "import os, time; '
               "print('seen:', os.environ['FROM_DOTENV'], os.environ['BOTH']); "
               'time.sleep(60)"')
    launcher = launch(f"show: {command}\n", env=app_env(tmp_path, BOTH="launcher"))
    launcher.wait_for("seen: dotenv launcher")


def test_each_copy_is_told_its_own_deadline_to_stop_within_the_grace(launch, tmp_path):
    show = 'python -c "import os, time; print(os.environ[\'STOP_TIMEOUT\']); time.sleep(60)"'
    launcher = launch(f"show: {show}\n", "--grace", "6")
    launcher.wait_for("show.1 | 5")  # 5/6 of the grace: Heroku's 25 s of 30
    launcher = launch(None, env=app_env(tmp_path, STOP_TIMEOUT="2"))
    launcher.wait_for("show.1 | 2")  # set by the operator: kept
    launcher = launch(None, "--grace", "30")
    launcher.wait_for("show.1 | 25")  # Heroku's 30 s: the copies get their usual 25 s


def test_a_launcher_whose_reader_goes_away_stops_its_copies_without_a_traceback(tmp_path):
    # `python launcher.py | head -3`: head reads three lines and exits.
    (tmp_path / "ticker.py").write_text(
        "import signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    open('stopped', 'w').write('by SIGTERM')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "while True:\n"
        "    print('tick', flush=True)\n"
        "    time.sleep(0.05)\n")
    (tmp_path / "Procfile").write_text("ticker: python ticker.py\n")
    with open(tmp_path / "stderr", "wb") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, str(REPO / "launcher.py"), "--port", str(free_port())],
            cwd=tmp_path, env=app_env(tmp_path), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    pid = None
    try:
        lines = [launcher.stdout.readline() for _ in range(3)]
        pid = int(lines[1].split(b"pid=")[1].split(b")")[0])  # `ticker.1 started (pid=…)`
        launcher.stdout.close()  # the reader goes away; the launcher's next line breaks
        assert launcher.wait(10) == 1
        assert (tmp_path / "stderr").read_text() == ""  # no traceback
        assert (tmp_path / "stopped").read_text() == "by SIGTERM"
        assert not alive(pid)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
        launcher.wait(5)


def test_a_copy_that_cannot_start_for_lack_of_descriptors_waits_and_the_rest_run(launch):
    launcher = launch("nap: sleep 60\n", "nap=1", ulimit="-n 24", stdin=subprocess.PIPE)
    launcher.wait_for("nap.1 started")
    launcher.send("nap=30")  # a pipe each: more than 24 descriptors
    launcher.wait_for("Too many open files")
    launcher.wait_for("restarting nap.", 2)  # after 1 s, not in a loop
    assert launcher.proc.popen.poll() is None
    assert launcher.ps()["nap.1"][5] == "up"


def test_a_line_without_end_is_printed_in_pieces_not_held_without_bound(launch):
    spew = ('spew: python -c "import sys, time; sys.stdout.write(\'x\' * 300000); '
            'sys.stdout.flush(); time.sleep(60)"\n')
    launcher = launch(spew)
    # Still running, its line unfinished: what it wrote is printed all the same, in
    # pieces of 64 KiB (the rest, under that, waits for the line's end as any line does).
    wait_until(lambda: launcher.output().count("x") >= 4 * 65536, what="the spew printed")
    longest = max(len(line) for line in launcher.output().splitlines())
    assert longest < 2 * 65536 + 100  # at most what was held, and one chunk read after it


# --- Failure on purpose, at the prompt, and the sticky trap -----------------------------------

def test_kill_and_freeze_at_the_prompt_fail_a_copy_and_the_platform_replaces_it(launch):
    launcher = launch(WEB, "web=2", "--check-every", "0.4", stdin=subprocess.PIPE)
    launcher.wait_for(" is up on port", 2)
    killed, frozen_pid = launcher.pids("web.1")[-1], launcher.pids("web.2")[-1]
    launcher.send("kill web.9")
    launcher.wait_for("no running copy named 'web.9' (running: web.1, web.2)")
    launcher.send("kill web.1")
    launcher.wait_for(f"web.1 (pid {killed}): SIGKILL, as asked")
    launcher.wait_for("web.1 killed by SIGKILL")
    launcher.send("freeze web.2")
    launcher.wait_for(f"web.2 (pid {frozen_pid}): SIGSTOP, its port still accepts")
    launcher.wait_for("web.2 failed 3 health checks in a row: replacing it")
    launcher.wait_for("web.2 killed by SIGKILL")
    launcher.wait_for(" is up on port", 4)
    assert launcher.pids("web.1")[-1] != killed and not alive(frozen_pid)
    began = time.monotonic()  # the front answers at once: no request waits on a dead copy
    assert [http("GET", launcher.url, timeout=2).status for _ in range(10)] == [200] * 10
    assert time.monotonic() - began < 5
    assert set(served_by(launcher, 4)) == {"web.1", "web.2"}


def test_a_command_line_too_long_is_refused_whole_and_nothing_happens(launch):
    launcher = launch(f"nap: {SLEEPER}\n", stdin=subprocess.PIPE)
    launcher.wait_for("nap.1 started")
    launcher.send("quit" + " " * 9000)  # its head and tail alone would read `quit`
    launcher.wait_for("refused a line of over 4096 bytes, as no command is that long: "
                      "'quit     ")
    assert list(launcher.ps()) == ["nap.1"]
    assert "stopping every copy" not in launcher.output()


def test_a_web_copy_that_never_answers_is_killed_at_its_start_deadline_and_restarted(launch):
    # A copy that hangs before it listens (a deadlock at import, or frozen at once by
    # `freeze`) would otherwise stay `starting` forever, and a rolling restart wait for it.
    launcher = launch(f"web: {SLEEPER}\n", "--start-timeout", "0.5")
    launcher.wait_for("web.1 started")
    first = launcher.pids("web.1")[0]
    launcher.wait_for("web.1 did not answer GET /healthz within 0.5s of its start: "
                      "replacing it (SIGKILL)")
    launcher.wait_for("web.1 killed by SIGKILL")
    launcher.wait_for("restarting web.1 now")
    wait_until(lambda: len(launcher.pids("web.1")) == 2, what="web.1 started again")
    launcher.wait_for("restarting web.1 in 1s")  # it never came up: the backoff grows
    assert not alive(first)


def test_chaos_kills_a_copy_of_the_chosen_type_every_few_seconds_one_line_each(launch):
    # The shopper who barely notices (at least 80% of requests answered with the session,
    # at web=3 under `chaos 1`) is the README's scenario 9, run by test_scenarios.py.
    launcher = launch(WEB + f"worker: {SLEEPER}\n", "web=1", "worker=2", stdin=subprocess.PIPE)
    launcher.wait_for("web.1 is up on port")
    launcher.send("chaos worker 0.2")
    launcher.wait_for("chaos: SIGKILL to a random worker copy every 0.2s, until `chaos off`")
    launcher.wait_for("SIGKILL, by chaos", 3)
    launcher.send("chaos off")
    launcher.wait_for("chaos off\n")
    kills = re.findall(r"\| (\S+) \(pid \d+\): SIGKILL, by chaos", launcher.output())
    assert len(kills) >= 3 and set(kills) <= {"worker.1", "worker.2"}, kills
    launcher.wait_for("killed by SIGKILL", len(kills))  # each seen to die, the last too


def test_sticky_routing_makes_the_memory_store_seem_to_work_until_a_restart(launch, tmp_path):
    launcher = launch(WEB, "web=3", "--sticky", stdin=subprocess.PIPE,
                      env=app_env(tmp_path, SESSION_STORE="memory"))
    launcher.wait_for(" is up on port", 3)
    front = f"http://127.0.0.1:{launcher.port}"
    sid = session_cookie(post_form(front + "/login", {"name": "ada"}))
    answers = [get(front + "/session", sid).json() for _ in range(12)]
    assert [answer["user"] for answer in answers] == ["ada"] * 12  # it seems to work
    assert len({answer["served_by"] for answer in answers}) == 1    # ... on one copy
    launcher.send("restart web")
    launcher.wait_for("rolling restart done")
    launcher.wait_for(" exited with code 0", 3)
    assert {get(front + "/session", sid).json()["user"] for _ in range(6)} == {None}


def test_a_front_port_near_the_top_runs_out_of_copy_ports_with_one_line_not_a_crash():
    """No port past 65535: `port_is_free(65536)` would raise OverflowError in bind()."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 65535))
        shell = SimpleNamespace(config=SimpleNamespace(port=65534),
                                formation=Formation(["web"], grace=1))
        copy = shell.formation.add("web", 1)
        with pytest.raises(OSError, match="no free port left after the front port 65534"):
            Supervisor.port_for(shell, copy)


def test_the_log_says_a_copy_is_up_once_it_is_in_the_rotation():
    """A reader who sends a request the moment `is up` is printed must reach that copy: the
    rotation changes before each line and each signal, not after the whole batch."""
    router = SimpleNamespace(rotation=())
    said = []
    printer = SimpleNamespace(system=lambda text: said.append((text, router.rotation)))
    config = SimpleNamespace(commands={"web": "python webapp.py"}, grace=1, prefix="",
                             start_timeout=60)
    supervisor = Supervisor(config, router, printer)
    supervisor.update_health_checks = lambda: None  # no real copy to ask
    copy = supervisor.formation.add("web", 1)
    for event in (Spawned(pid=4321, port=5001), Answered()):
        supervisor.events.append((copy.serial, event))
        supervisor.carry_out([])
    assert said[-1] == ("web.1 is up on port 5001", (("127.0.0.1", 5001),))
