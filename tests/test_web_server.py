"""web_server.py: what a copy answers when a route fails, what it logs, how it stops."""
import socket
import sqlite3
import threading
import time

import pytest

from conftest import free_port, get, http, post_form, wait_until, write_lock_held
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
