"""The router, tested through a real launcher: it spreads connections, answers when no
copy can (503), keeps its deadlines, and survives running out of descriptors."""
from __future__ import annotations

import socket
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import http, responds, wait_until
from test_launcher import SLEEPER, WEB, launch, served_by  # noqa: F401 (launch: a fixture)

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


@linux_only
def test_running_out_of_descriptors_pauses_the_router_but_does_not_stop_it(launch):
    launcher = launch(WEB, "web=1", ulimit="-n 48")
    launcher.wait_for("web.1 is up on port")
    with clients(launcher.port, 40):  # and their copies' sides: more than 48 descriptors
        pass
    wait_until(lambda: responds(launcher.url), what="the router answering again")
