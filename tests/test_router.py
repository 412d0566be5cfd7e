"""The router, tested through a real launcher: it spreads connections, answers for a copy
that cannot (503, 502, 504), keeps its deadlines, and bounds what it takes on at once, so
that slow clients cannot hold the front door."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

import pytest

from conftest import (REPO, SLEEPER, WEB, Proc, Web, app_env, free_port, frozen, get, http,
                      responds, served_by, wait_until)
from health import RESOLVE_EVERY, Address, Upstreams, find_addresses

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; sets limits with bash's ulimit")


def test_front_port_spreads_requests_round_robin(launch):
    launcher = launch(WEB, "web=3")
    launcher.wait_for(" is up on port", 3)
    served = served_by(launcher, 30)
    assert set(served) == {"web.1", "web.2", "web.3"}
    assert all(9 <= count <= 11 for count in served.values()), served


def test_no_web_copy_means_503_not_a_hang(launch):
    launcher = launch(WEB + f"worker: {SLEEPER}\n", "web=0")

    def answer():
        try:
            return http("GET", launcher.url, timeout=2)
        except OSError:
            return None

    response = wait_until(answer, what="the front port to answer")
    assert response.status == 503
    assert b"no web copy" in response.body


def post_too_big(port: int, size: int = 8 << 20) -> bytes:
    """POST a body over webapp.py's limit, sending and reading at once as a browser does;
    the status line of the answer."""
    head = (b"POST /cart HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % size)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        def send_all():
            try:
                sock.sendall(head + bytes(size))
            except OSError:
                pass  # the other side may hang up before it has taken everything

        sender = threading.Thread(target=send_all)
        sender.start()
        try:
            return sock.makefile("rb").readline().strip()
        finally:
            sender.join()


def test_an_answer_sent_before_the_body_is_read_reaches_the_client(launch):
    # webapp.py answers 413 from the headers alone and closes with the body unread, which
    # resets the router's side: the router must still pass the 413 on, not a reset.
    launcher = launch(WEB, "web=1")
    launcher.wait_for("web.1 is up on port")
    statuses = [post_too_big(launcher.port).split()[:2] for _ in range(3)]
    assert statuses == [[b"HTTP/1.0", b"413"]] * 3  # the reason phrase varies by Python


def test_a_silent_connection_is_closed_after_the_idle_timeout(launch):
    launcher = launch(WEB, "web=1", "--idle-timeout", "0.5")
    launcher.wait_for("web.1 is up on port")
    with socket.create_connection(("127.0.0.1", launcher.port), timeout=10) as silent:
        began = time.monotonic()
        assert silent.recv(1) == b""  # the router hung up: a silent client holds nothing
        assert time.monotonic() - began < 5


# --- A copy that takes a request and never answers ------------------------------------------

def status_line(port: int, timeout: float = 10) -> tuple[bytes, float]:
    """GET /healthz through the front port: the answer's status line, and how long it took."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        return sock.makefile("rb").readline().strip(), time.monotonic() - began


def test_a_request_stuck_on_a_frozen_copy_gets_a_504_after_the_upstream_timeout(launch):
    # Health checks every 2 s: the copy is replaced only after three misses, long after
    # the 504, which comes from the router's own deadline.
    launcher = launch(WEB, "web=1", "--upstream-timeout", "0.5", "--check-every", "2")
    launcher.wait_for("web.1 is up on port")
    with frozen(launcher.pids("web.1")[-1]):
        status, took = status_line(launcher.port)
    assert status.split()[1:2] == [b"504"], status
    assert took < 3  # 0.5 s, checked by a sweep four times a second
    assert "sent no answer in 0.5s: 504 to its client" in launcher.output()


def test_a_copy_that_dies_before_answering_gets_its_client_a_502(launch):
    launcher = launch(WEB, "web=1", "--check-every", "2")
    launcher.wait_for("web.1 is up on port")
    pid = launcher.pids("web.1")[-1]
    with frozen(pid):
        stuck = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))  # once the request waits
        stuck.start()
        status, took = status_line(launcher.port)
        stuck.join()
    assert status.split()[1:2] == [b"502"], status  # not an empty reply
    assert took < 3


@contextmanager
def full_backlog(port: int):
    """Fill a frozen copy's listen backlog (128) and more: the next connect hangs, its SYN
    dropped. Non-blocking, so that the test does not wait for those that never complete."""
    waiting = [socket.socket() for _ in range(200)]
    try:
        for sock in waiting:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))

        def next_connect_is_not_taken() -> bool:
            # Only a connect that goes unanswered proves it: a client counts itself
            # connected at the SYN-ACK, before the kernel has queued it for accept().
            probe = socket.socket()
            probe.settimeout(0.5)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()
                return True
            waiting.append(probe)  # it got in: one more place taken, try again
            return False

        wait_until(next_connect_is_not_taken, what="the frozen copy's backlog to fill")
        yield
    finally:
        for sock in waiting:
            sock.close()


def test_a_copy_that_does_not_take_the_connection_is_skipped_for_the_next(launch):
    launcher = launch(WEB, "web=2", "--check-every", "10")  # no health check in time
    launcher.wait_for(" is up on port", 2)
    [(pid, port)] = [(pid, port) for name, pid, port in launcher.started() if name == "web.2"]
    with frozen(pid), full_backlog(port):
        answers = [status_line(launcher.port) for _ in range(2)]  # one goes to web.2 first
    assert [status.split()[1] for status, _ in answers] == [b"200", b"200"]
    assert max(took for _, took in answers) < 5  # 1 s to give up on web.2, by a sweep


# --- Many clients, slow clients, and running out of descriptors -----------------------------

@contextmanager
def clients(port: int, count: int, first_bytes: bytes = b""):
    """Up to `count` connections to `port` (fewer if a connect times out: the backlog is
    full, nobody takes connections any more), each having sent `first_bytes`. All are
    closed at the end, whatever happens."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
            held[-1].sendall(first_bytes)
        yield held
    finally:
        for sock in held:
            sock.close()


# The start of a request head, and then nothing, as a slowloris client that sends a byte
# now and then: each holds a connection of the router and a thread of a copy.
SLOW_START = b"GET /healthz HTTP/1.1\r\nX-Slow: a"
# A whole head, then a body that does not come: its copy waits for it, and so do we. The
# copy's `100 Continue` says the head went through the router.
SLOW_BODY = (b"POST /cart HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@linux_only
def test_300_slow_clients_do_not_stop_healthz_through_the_router(launch):
    # A soft limit of 256 descriptors, as a cautious system hands out (1024 is common):
    # the launcher raises it towards the hard limit for the router's clients.
    launcher = launch(WEB, "web=2", ulimit="-Sn 256")
    launcher.wait_for(" is up on port", 2)
    with clients(launcher.port, 300, SLOW_START) as slow:
        status, took = status_line(launcher.port, timeout=2)
        assert status.split()[1:2] == [b"200"] and took < 2
        assert len(slow) == 300


def hung_up(sock: socket.socket) -> bool:
    """Has the other side closed this connection (after what it sent, which is read)?"""
    try:
        while data := sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


@linux_only
def test_past_its_limit_a_newcomer_takes_the_place_of_the_longest_silent(launch):
    # 64 descriptors: room for 16 clients (two descriptors each, half kept for the
    # supervisor), here 16 that send nothing, as 4,096 would by default.
    launcher = launch(WEB, "web=1", ulimit="-n 64")
    launcher.wait_for("web.1 is up on port")
    with clients(launcher.port, 16) as silent:
        status, took = status_line(launcher.port, timeout=5)
        assert status.split()[1:2] == [b"200"] and took < 2
        silent[0].settimeout(2)
        assert hung_up(silent[0])  # the oldest: its place went to the newcomer
        silent[-1].settimeout(0.1)
        assert not hung_up(silent[-1])


@linux_only
def test_past_its_limit_the_router_lets_clients_wait_and_does_not_spin(launch):
    # As above, but the 16 have sent their heads and wait for their copy: the 17th waits in
    # the listen backlog, as past HAProxy's maxconn, and is served as soon as one leaves.
    launcher = launch(WEB, "web=1", ulimit="-n 64")
    launcher.wait_for("web.1 is up on port")
    with clients(launcher.port, 16, SLOW_BODY) as slow:
        assert all(sock.recv(64).startswith(b"HTTP/1.0 100 Continue") for sock in slow)
        waiting = socket.create_connection(("127.0.0.1", launcher.port), timeout=0.5)
        slow.append(waiting)  # closed with them
        waiting.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        cpu_before = cpu_seconds(launcher.proc.pid)
        with pytest.raises(TimeoutError):
            waiting.recv(1)  # not taken: the router holds its 16 clients
        assert cpu_seconds(launcher.proc.pid) - cpu_before < 0.3  # it waited, it did not spin
        slow.pop(0).close()
        waiting.settimeout(5)
        assert waiting.makefile("rb").readline().split()[1:2] == [b"200"]


@linux_only
def test_running_out_of_descriptors_pauses_the_router_but_does_not_stop_it(launch):
    # 48 descriptors, 24 kept for the supervisor: twenty more copies' pipes eat into those,
    # so the router's clients find none left before its own limit stops it.
    launcher = launch(WEB + f"nap: {SLEEPER}\n", "web=1", "nap=20", ulimit="-n 48")
    launcher.wait_for("web.1 is up on port")
    launcher.wait_for("nap.20 started")
    descriptors = f"/proc/{launcher.proc.pid}/fd"
    with clients(launcher.port, 40):
        wait_until(lambda: len(os.listdir(descriptors)) >= 47, timeout=5,
                   what="the launcher to run out of descriptors")
    wait_until(lambda: responds(launcher.url), what="the router answering again")
    assert launcher.proc.popen.poll() is None


def test_a_client_gets_the_request_timeout_to_send_its_head_and_to_hang_up_after(launch):
    launcher = launch(WEB, "web=1", "--request-timeout", "0.5")
    launcher.wait_for("web.1 is up on port")
    with socket.create_connection(("127.0.0.1", launcher.port), timeout=5) as slow, \
            socket.create_connection(("127.0.0.1", launcher.port), timeout=5) as lingering:
        slow.sendall(SLOW_START)  # and never the rest
        lingering.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        began = time.monotonic()
        assert hung_up(slow) and time.monotonic() - began < 3  # the copy's own is 10 s
        assert hung_up(lingering)  # its whole answer, then the end of it
        began = time.monotonic()

        def router_hung_up() -> bool:
            try:
                lingering.sendall(b"x")  # a byte now and then: not idle, and not leaving
            except OSError:
                return True
            return False

        wait_until(router_hung_up, timeout=5, what="the router to hang up on a lingering client")
        assert time.monotonic() - began < 3


# --- The router on its own, in front of several hosts ----------------------------------------

ROUTER = REPO / "router.py"


def start_router(spawn, tmp_path, *args: str) -> tuple[Proc, str]:
    """`python router.py --port P ARGS`, once its front port is bound: (process, url)."""
    port = free_port()
    proc = spawn([sys.executable, str(ROUTER), "--port", str(port), *args], app_env(tmp_path))
    wait_until(lambda: "front port" in proc.output(), what=f"router.py to start:\n{proc.output()}")
    return proc, f"http://127.0.0.1:{port}/healthz"


def two_hosts(start_web) -> list[Web]:
    return [start_web(DYNO=f"{host}.web.1") for host in ("a", "b")]


def upstreams(hosts: list[Web]) -> list[str]:
    return [f"127.0.0.1:{host.port}" for host in hosts]


def test_the_router_alone_spreads_over_its_upstreams_and_skips_a_frozen_one(spawn, tmp_path,
                                                                           start_web):
    hosts = two_hosts(start_web)
    router, url = start_router(spawn, tmp_path, "--check-every", "0.15", *upstreams(hosts))
    wait_until(lambda: router.output().count("in the rotation") == 2, what="both upstreams up")
    assert Counter(get(url).headers["x-served-by"] for _ in range(8)) == {"a.web.1": 4,
                                                                          "b.web.1": 4}
    os.kill(hosts[0].proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: "out of the rotation" in router.output(), what="a taken out")
        assert {get(url).headers["x-served-by"] for _ in range(6)} == {"b.web.1"}
    finally:
        os.kill(hosts[0].proc.pid, signal.SIGCONT)
    wait_until(lambda: router.output().count("in the rotation") == 3, what="a back in")
    assert {get(url).headers["x-served-by"] for _ in range(6)} == {"a.web.1", "b.web.1"}


def test_the_router_alone_answers_503_when_no_upstream_answers(spawn, tmp_path):
    router, url = start_router(spawn, tmp_path, f"127.0.0.1:{free_port()}")
    response = http("GET", url)
    assert response.status == 503 and b"no web copy" in response.body


@pytest.mark.parametrize("args, problem", [
    ([], "the following arguments are required: HOST:PORT"),
    (["localhost"], "an upstream is HOST:PORT"),
    (["localhost:0"], "the port of upstream 'localhost:0' must be a number from 1 to 65535"),
    (["localhost:99999"], "must be a number from 1 to 65535"),
    (["--check-every", "0", "localhost:5000"], "--check-every must be from 0.1"),
    (["--port", "x", "localhost:5000"], "the front port must be a number"),
    (["[::1]:5000"], "upstream '[::1]:5000' is IPv6, which the router does not speak"),
    (["::1:5000"], "is IPv6"),
])
def test_the_router_alone_refuses_bad_arguments_in_one_line(args, problem):
    done = subprocess.run([sys.executable, str(ROUTER), *args], capture_output=True,
                          text=True, timeout=10)
    assert done.returncode == 2
    assert problem in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


@contextmanager
def upstreams_running(names: list[Address], find, resolve_every: float = RESOLVE_EVERY):
    """The router's Upstreams, run in this process on a thread of its own, with `find` for
    its lookups: (the rotations it published, the lines it logged). Stopped at the end."""
    published: list[tuple[Address, ...]] = []
    lines: list[str] = []
    upstreams = Upstreams(names, 0.1, published.append, lines.append, find, resolve_every)
    loop = threading.Thread(target=upstreams.run)
    loop.start()
    try:
        yield published, lines
    finally:
        upstreams.stop(signal.SIGTERM)
        loop.join(5)


def test_a_name_slow_to_look_up_keeps_no_other_upstream_out(web):
    dns_answers = threading.Event()
    slow_lookups = []

    def find(host: str, port: int) -> list[Address]:
        if host != "slow.example":
            return find_addresses(host, port)
        slow_lookups.append(host)
        dns_answers.wait(10)  # glibc, its DNS server out of reach, gives up after seconds
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    fine = ("127.0.0.1", web.port)
    try:
        with upstreams_running([fine, ("slow.example", 80)], find, 0.05) as (published, _):
            wait_until(lambda: published and published[-1] == (fine,), timeout=3,
                       what="the upstream that is found at once to join the rotation")
            assert slow_lookups == ["slow.example"]  # one lookup of a name at a time
    finally:
        dns_answers.set()


def test_a_name_that_cannot_be_found_for_a_while_keeps_its_last_addresses(web):
    lookups = []

    def find(host: str, port: int) -> list[Address]:
        lookups.append(host)
        if len(lookups) > 1:  # a DNS hiccup, after the first answer
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [("127.0.0.1", port)]

    address = ("127.0.0.1", web.port)
    with upstreams_running([("flaky.example", web.port)], find, 0.02) as (published, lines):
        wait_until(lambda: len(lookups) >= 5 and published and published[-1] == (address,),
                   what="several lookups failed, with flaky.example's address in the rotation")
    assert [line for line in lines if "flaky" in line or "upstream" in line] == [
        "router: cannot find flaky.example: Temporary failure in name resolution; "
        "keeping its last addresses"]  # once, and the address was never dropped


@linux_only  # the whole of 127.0.0.0/8 is loopback on Linux, only 127.0.0.1 on macOS
def test_sticky_sends_one_client_address_to_one_upstream(spawn, tmp_path, start_web):
    hosts = two_hosts(start_web)
    router, url = start_router(spawn, tmp_path, "--sticky", *upstreams(hosts))
    wait_until(lambda: router.output().count("in the rotation") == 2, what="both upstreams up")
    port = int(url.split(":")[2].split("/")[0])

    def served_from(source: str) -> set[str]:
        seen = set()
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", port), timeout=5,
                                          source_address=(source, 0)) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                head = sock.makefile("rb").read().decode()
            seen.add(head.split("X-Served-By: ")[1].split("\r\n")[0])
        return seen

    # Loopback is all of 127.0.0.0/8 on Linux: each source address is another client.
    per_client = {source: served_from(source) for source in
                  [f"127.0.0.{n}" for n in range(1, 9)]}
    assert all(len(seen) == 1 for seen in per_client.values()), per_client
    assert set.union(*per_client.values()) == {"a.web.1", "b.web.1"}  # clients still spread
