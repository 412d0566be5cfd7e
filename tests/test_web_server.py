"""web_server.py: what a copy answers when a route fails, what it logs, how it stops."""
import contextlib
import os
import select
import socket
import sqlite3
import threading
import time

import pytest

from conftest import (WEB, free_port, get, http, multipart, post_form, session_cookie,
                      upload, wait_until, write_lock_held)
import web_receiver
import web_server


def test_a_database_locked_past_the_busy_timeout_answers_503_come_back_in_a_second(
        start_web, tmp_path):
    web = start_web(DATABASE_BUSY_TIMEOUT="0.2")
    with write_lock_held(tmp_path / "app.db"):  # another process, in a long write
        refused = post_form(web.url + "/cart", {"item": "tea"})
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert refused.body == b"the store is not answering; try again\n"
    wait_until(lambda: "backing store unavailable: database is locked" in web.proc.output(),
               what="the 503's reason in the log")
    assert "Traceback" not in web.proc.output()  # a wait, not a bug
    assert post_form(web.url + "/cart", {"item": "tea"}).status == 303  # it came back


def test_a_database_error_that_is_not_a_lock_is_a_500_with_its_traceback_in_the_log(
        start_web, tmp_path):
    web = start_web()
    # A newer release's migration renames a column while this copy still serves: its
    # queries name a column that is gone. Retrying will never help: it is a bug to see.
    migration = sqlite3.connect(tmp_path / "app.db")
    migration.execute("ALTER TABLE jobs RENAME COLUMN state TO status")
    migration.close()
    response = get(web.url + "/jobs")
    assert response.status == 500 and "retry-after" not in response.headers
    wait_until(lambda: "OperationalError: no such column: state" in web.proc.output(),
               what="the bug's traceback in the log")
    assert "Traceback (most recent call last):" in web.proc.output()
    assert get(web.url + "/healthz").status == 200


def test_a_health_check_answered_well_is_not_logged_whoever_asks(start_web):
    web = start_web()  # the fixture itself asked /healthz until the copy answered
    for user_agent in ("curl/8.5.0", "kube-probe/1.29", "any platform at all"):
        response = http("GET", web.url + "/healthz", headers={"User-Agent": user_agent})
        assert response.status == 200
    assert http("POST", web.url + "/healthz").status == 405
    http("GET", web.url + "/healthz?from=a-person")
    wait_until(lambda: "GET /healthz?from=a-person" in web.proc.output(),
               what="the request with a query string in the log")
    assert "POST /healthz" in web.proc.output()  # anything but the check itself is logged
    assert '"GET /healthz HTTP/' not in web.proc.output()


def test_shutdown_ends_a_started_server_as_socketserver_promises():
    server = web_server.Server(("127.0.0.1", free_port()), web_server.Handler, 10, "web.1")
    server.start()
    try:
        stopping = threading.Thread(target=server.shutdown, daemon=True)
        stopping.start()
        stopping.join(5)
        assert not stopping.is_alive(), "shutdown() did not return"
        with pytest.raises(ConnectionRefusedError):  # it no longer accepts
            socket.create_connection(server.server_address, timeout=1)
    finally:
        server.stop(time.monotonic() + 5)
        server.server_close()


# --- Slow bodies (issue "Hostile input, third round", item 1) -------------------------

FORM_HEAD = (b"POST /login HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             b"Content-Length: %d\r\n\r\n")
UPLOAD_HEAD = (b"POST /uploads HTTP/1.0\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: %d\r\n\r\n")


def reply_or_none(sock: socket.socket, wait: float) -> bytes | None:
    """What the copy answered, if it has begun to answer within `wait` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None


def test_slow_bodies_through_the_router_leave_the_logins_answered(launch):
    launcher = launch(WEB, "web=2")
    launcher.wait_for(" is up on port", 2)
    slow = []
    try:
        for number in range(60):  # 30 a copy: more than MAX_TRANSFERS, the old bound
            slow.append(socket.create_connection(("127.0.0.1", launcher.port)))
            head = UPLOAD_HEAD % (10 << 20) if number % 2 else FORM_HEAD % 1000
            slow[-1].sendall(head + b"--")  # ... and then nothing for a long while
        # The router relays in order, and each copy accepts in order: once these are
        # answered, both copies hold every slow body.
        assert all(get(launcher.url).status == 200 for _ in range(4))
        answered = 0
        for number in range(20):
            try:
                login = http("POST", launcher.url.replace("/healthz", "/login"),
                             b"name=ada%d" % number,
                             {"Content-Type": "application/x-www-form-urlencoded"}, timeout=2)
                answered += login.status == 303
            except TimeoutError:
                pass
        assert answered >= 19, f"{answered} of 20 logins answered"
        assert get(launcher.url).status == 200
    finally:
        for sock in slow:
            sock.close()


def test_a_trickling_body_is_cut_at_its_deadline_whatever_length_it_declares(start_web):
    web = start_web(CLIENT_TIMEOUT="1")
    declared = {"form": FORM_HEAD % 4000, "upload": UPLOAD_HEAD % (10 << 20)}
    socks = {name: socket.create_connection(("127.0.0.1", web.port)) for name in declared}
    cut_after = {}
    try:
        started = time.monotonic()
        for name, head in declared.items():
            socks[name].sendall(head)
        while len(cut_after) < 2 and time.monotonic() - started < 4:
            for name, sock in socks.items():  # 4 bytes every 0.1 s: 40 bytes a second
                if name not in cut_after:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"abcd")
            ready, _, _ = select.select([s for n, s in socks.items() if n not in cut_after],
                                        [], [], 0.1)
            for sock in ready:
                name = next(name for name, known in socks.items() if known is sock)
                cut_after[name] = (time.monotonic() - started, reply_or_none(sock, 1))
    finally:
        for sock in socks.values():
            sock.close()
    # CLIENT_TIMEOUT plus a second per MIN_BODY_RATE bytes received: 1 s plus 0.01 s.
    for name in declared:
        assert name in cut_after, f"the {name} body was not cut within 4 s"
        seconds, reply = cut_after[name]
        assert reply.startswith(b"HTTP/1.0 408") and seconds < 2, (name, seconds, reply)
    assert get(web.url + "/healthz").status == 200


# --- Requests from other sites (item 2) -----------------------------------------------

def test_a_request_from_another_site_changes_nothing_and_sets_no_cookie(start_web):
    web = start_web()
    cases = [  # (headers, status): a browser's Sec-Fetch-Site first, else its Origin
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),  # another port of this host is one too
        ({"Sec-Fetch-Site": "same-origin"}, 303),
        ({"Sec-Fetch-Site": "none"}, 303),  # typed in the address bar, or a bookmark
        ({"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"}, 303),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": f"http://127.0.0.1:{web.port + 1}"}, 403),
        ({"Origin": "null"}, 403),  # a sandboxed frame, a data: URL
        ({"Origin": f"http://127.0.0.1:{web.port}"}, 303),
        ({}, 303),  # curl, a script: no browser, no ambient cookie to abuse
    ]
    for headers, status in cases:
        response = http("POST", web.url + "/cart", b"item=tea", {
            "Content-Type": "application/x-www-form-urlencoded", **headers})
        assert response.status == status, headers
        assert ("set-cookie" in response.headers) == (status == 303), headers
    sid = session_cookie(post_form(web.url + "/login", {"name": "ada"}))
    for path, fields in (("/logout", b""), ("/login", b"name=mallory"),
                         ("/cart", b"item=x"), ("/jobs", b"task=sleep")):
        refused = http("POST", web.url + path, fields, {
            "Content-Type": "application/x-www-form-urlencoded", "Cookie": f"sid={sid}",
            "Sec-Fetch-Site": "cross-site"})
        assert refused.status == 403 and "set-cookie" not in refused.headers, path
    assert get(web.url + "/session", sid).json() | {"pid": 0, "served_by": ""} == {
        "user": "ada", "cart": [], "uploads": [], "pid": 0, "served_by": "",
        "store": "sqlite"}
    page = http("GET", web.url + "/", headers={"Sec-Fetch-Site": "cross-site"})
    assert page.status == 200  # reading is safe: a link from anywhere still works


def test_forged_headers_no_browser_sends_are_refused_too(start_web):
    web = start_web()
    form = b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 8\r\n"
    cases = [  # no browser sends these; a request made by hand can
        b"POST /cart HTTP/1.0\r\nOrigin: null\r\n",  # no Host to match: no origin does
        b"POST /cart HTTP/1.1\r\nHost: h\r\nSec-Fetch-Site: none\r\n"
        b"Sec-Fetch-Site: cross-site\r\n",
        b"POST /cart HTTP/1.1\r\nHost: h\r\nOrigin: http://h\r\nOrigin: http://evil\r\n",
    ]
    for head in cases:
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
            sock.sendall(head + form + b"\r\nitem=tea")
            reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.0 403") and b"Set-Cookie" not in reply, head


# --- Uploads in pieces (item 8) -------------------------------------------------------

def peak_memory_mib(pid: int) -> float:
    """The most resident memory the process has used so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_sixteen_concurrent_8_mib_uploads_keep_a_copy_under_300_mib(start_web):
    web = start_web()
    data = os.urandom(8 << 20)
    body, headers = multipart({"file": ("big.bin", "application/octet-stream", data)})
    statuses = []

    def send():
        statuses.append(http("POST", web.url + "/uploads", body, headers, timeout=60).status)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = peak_memory_mib(web.proc.pid)
    print(f"peak resident memory: {peak:.0f} MiB")
    assert statuses == [303] * 16 and peak <= 300, (statuses, peak)


def test_the_largest_upload_comes_back_byte_exact_and_one_byte_more_is_refused(start_web):
    web = start_web()
    framing = len(multipart({"file": ("notes.bin", "application/octet-stream", b"")})[0])
    data = os.urandom((10 << 20) - framing)  # the body is exactly the 10 MiB limit
    made = upload(web.url, data)
    assert made.status == 303
    fetched = get(web.url + made.headers["location"], session_cookie(made))
    assert fetched.status == 200 and fetched.body == data
    assert fetched.headers["content-length"] == str(len(data))
    head = http("HEAD", web.url + made.headers["location"],
                headers={"Cookie": f"sid={session_cookie(made)}"})
    assert head.body == b"" and head.headers["content-length"] == str(len(data))
    with socket.create_connection(("127.0.0.1", web.port), timeout=5) as sock:
        sock.sendall(UPLOAD_HEAD % ((10 << 20) + 1))  # refused before a byte is sent
        assert sock.recv(100).startswith(b"HTTP/1.0 413 ")


class CountingApp:
    """Routes for an in-process server: every path answers how many bytes its body had."""

    def find_route(self, method, path):
        return (lambda request: web_server.plain_text(200, f"{request.body.size} bytes")), None

    def body_limit(self, method, path):
        return 10 << 20


def scratch_files_open() -> int:
    """Files this process holds open that have no name: TemporaryFile's, like a body's
    scratch file (Linux shows each as the temporary directory's, deleted)."""
    deleted = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            deleted += os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
    return deleted


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux's /proc")
def test_past_max_spooled_a_large_body_gets_503_at_once_and_a_small_form_is_still_answered(
        monkeypatch):
    monkeypatch.setattr(web_receiver, "MAX_SPOOLED", 2)
    handler = type("CountingHandler", (web_server.Handler,), {"app": CountingApp()})
    server = web_server.Server(("127.0.0.1", free_port()), handler, 10, "web.1")
    server.start()
    before = scratch_files_open()  # pytest's own, capturing output
    slow = [socket.create_connection(server.server_address, timeout=5) for _ in range(3)]
    try:
        for sock in slow:  # 100 KiB bodies: each one's scratch file, until none is left
            sock.sendall(UPLOAD_HEAD % (100 << 10) + b"--")
        [answered], _, _ = select.select(slow, [], [], 5)  # whichever came last
        refused = answered.recv(1000)
        assert refused.startswith(b"HTTP/1.0 503 ") and b"Retry-After: 1" in refused
        url = f"http://127.0.0.1:{server.server_address[1]}/login"
        assert http("POST", url, b"name=ada", timeout=2).body == b"8 bytes\n"
        assert scratch_files_open() == before + 2
        next(sock for sock in slow if sock is not answered).close()  # a client hangs up:
        # its request ends, and its scratch file with it
        wait_until(lambda: scratch_files_open() == before + 1, what="its scratch file to go")
        assert http("POST", url, b"x" * (100 << 10), timeout=2).body == b"102400 bytes\n"
    finally:
        for sock in slow:
            sock.close()
        server.stop(time.monotonic() + 5)
        server.server_close()
    assert scratch_files_open() == before
