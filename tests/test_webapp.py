"""webapp.py as real processes on free ports: stateless with SQLite, forgetful with memory.

Most tests talk to the module's shared copies (`web`, `shared_copies` in conftest), each
with sessions of its own; a test that needs other settings, or stops its copy, starts one.
"""
import html
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Iterator

import pytest

from conftest import (Spawner, Web, app_env, free_port, get, http, multipart, post_form,
                      responds, session_cookie, start_webapps, upload, wait_until)
import web_server
from database import ConfigError, database_from_env
from job_queue import queue_from_env
from session_store import store_from_env
from webapp import config_from_env


def login(url: str, name: str, cookie: str | None = None) -> str:
    response = post_form(url + "/login", {"name": name}, cookie)
    assert response.status == 303
    return session_cookie(response)


@pytest.fixture(scope="module")
def memory_copies(tmp_path_factory):
    """web.1 and web.2 with SESSION_STORE=memory, for this module's tests of forgetting."""
    spawner = Spawner(tmp_path_factory.mktemp("memory-copies"))
    try:
        yield start_webapps(spawner, {"SESSION_STORE": "memory", "DYNO": "web.1"},
                            {"SESSION_STORE": "memory", "DYNO": "web.2"})
    finally:
        spawner.end()


def test_two_copies_on_one_sqlite_file_serve_each_others_sessions_and_uploads(shared_copies):
    one, two = shared_copies
    sid = login(one.url, "ada")
    assert post_form(two.url + "/cart", {"item": "tea"}, sid).status == 303
    response = get(one.url + "/session", sid)
    assert response.headers["x-served-by"] == "web.1"
    assert response.json()["user"] == "ada" and response.json()["cart"] == ["tea"]

    data = bytes(range(256)) * 10
    made = upload(two.url, data, "image/png", sid)
    assert made.status == 303
    fetched = get(one.url + made.headers["location"], sid)
    assert fetched.status == 200 and fetched.body == data
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.headers["x-content-type-options"] == "nosniff"
    upload_id = made.headers["location"].rsplit("/", 1)[1]
    assert get(one.url + "/session", sid).json()["uploads"] == [upload_id]


def test_memory_store_forgets_you_on_another_copy(memory_copies):
    one, two = memory_copies
    sid = login(one.url, "ada")
    assert get(one.url + "/session", sid).json()["user"] == "ada"
    assert get(two.url + "/session", sid).json() | {"pid": 0} == {
        "user": None, "cart": [], "uploads": [], "served_by": "web.2", "pid": 0,
        "store": "memory"}
    page = get(two.url + "/", sid).text
    assert "has never heard of that session" in page and "SESSION_STORE=memory" in page
    made = upload(one.url, b"hello")
    assert get(two.url + made.headers["location"]).status == 404


def test_two_hundred_concurrent_cart_additions_across_two_copies_all_land(shared_copies):
    copies = shared_copies
    sid = login(copies[0].url, "ada")
    failures = []

    def add_items(client: int):
        for n in range(20):
            url = copies[(client + n) % 2].url
            if post_form(url + "/cart", {"item": f"{client}-{n}"}, sid).status != 303:
                failures.append((client, n))

    threads = [threading.Thread(target=add_items, args=(c,)) for c in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cart = get(copies[1].url + "/session", sid).json()["cart"]
    assert failures == []
    assert sorted(cart) == sorted(f"{c}-{n}" for c in range(10) for n in range(20))


def test_login_issues_a_new_session_id_with_safe_cookie_attributes(web):
    first = session_cookie(post_form(web.url + "/cart", {"item": "tea"}))
    response = post_form(web.url + "/login", {"name": "ada"}, first)
    second = session_cookie(response)
    assert second and second != first and len(second) >= 22  # >= 128 bits, base64
    cookie = response.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in cookie
    assert "Secure" not in cookie
    assert get(web.url + "/session", first).json()["user"] is None
    assert get(web.url + "/session", second).json() | {"pid": 0} == {
        "user": "ada", "cart": ["tea"], "uploads": [], "served_by": "web.1", "pid": 0,
        "store": "sqlite"}


def test_cookie_is_secure_when_asked(start_web):
    web = start_web(COOKIE_SECURE="1")
    assert "; Secure" in post_form(web.url + "/login", {"name": "ada"}).headers["set-cookie"]


def test_a_cookie_naming_an_unknown_session_is_replaced_not_adopted(web):
    response = post_form(web.url + "/cart", {"item": "tea"}, "made-up-by-the-client")
    assert session_cookie(response) not in (None, "made-up-by-the-client")
    assert get(web.url + "/session", "made-up-by-the-client").json()["cart"] == []


def test_reading_a_page_never_issues_a_session(web):
    assert "set-cookie" not in get(web.url + "/").headers
    assert "set-cookie" not in get(web.url + "/", "unknown-to-this-copy").headers


def test_logout_ends_the_session(web):
    sid = login(web.url, "ada")
    response = post_form(web.url + "/logout", {}, sid)
    assert response.status == 303 and "Max-Age=0" in response.headers["set-cookie"]
    assert get(web.url + "/session", sid).json()["user"] is None


def test_expired_sessions_vanish(start_web):
    web = start_web(SESSION_TTL="1")
    sid = login(web.url, "ada")
    assert get(web.url + "/session", sid).json()["user"] == "ada"
    wait_until(lambda: get(web.url + "/session", sid).json()["user"] is None,
               timeout=5, what="the session to expire")


def test_user_text_is_html_escaped(web):
    sid = login(web.url, "<script>alert(1)</script>")
    post_form(web.url + "/cart", {"item": "<b>&"}, sid)
    upload(web.url, b"x", "text/<i>", sid, filename="<img src=x onerror=alert(1)>.txt")
    page = get(web.url + "/", sid).text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;&amp;" in page and "<img" not in page and "<i>" not in page


def test_an_upload_is_served_only_to_the_session_that_made_it(web):
    owner, other = login(web.url, "ada"), login(web.url, "bob")
    location = upload(web.url, b"ada's secret", "text/plain", owner).headers["location"]
    assert get(web.url + location, owner).body == b"ada's secret"
    upload_id = location.rsplit("/", 1)[1]
    missing = get(web.url + "/uploads/no-such-upload")
    for cookie in (other, None, "made-up"):
        response = get(web.url + location, cookie)
        assert response.status == 404  # the same answer as for an id that does not exist
        assert response.body == missing.body.replace(b"no-such-upload", upload_id.encode())


def test_a_planted_session_id_never_sees_what_the_victim_uploads_or_enqueues(web):
    planted = session_cookie(post_form(web.url + "/cart", {"item": "bait"}))  # the attacker's
    made = upload(web.url, b"the victim's secret", "text/plain", planted)
    victim = session_cookie(made)
    assert victim not in (None, planted)  # the first private write moved the session
    location = made.headers["location"]
    assert get(web.url + location, victim).body == b"the victim's secret"
    assert get(web.url + location, planted).status == 404
    assert get(web.url + "/session", planted).json()["uploads"] == []
    assert get(web.url + "/session", victim).json()["cart"] == ["bait"]  # the data moved too
    job = post_form(web.url + "/jobs", {"task": "sleep", "args": '{"seconds": 1}'}, victim)
    moved = session_cookie(job)
    assert moved not in (None, victim)  # still nobody logged in: moved again
    assert get(web.url + job.headers["location"], moved).json()["args"] == {"seconds": 1}
    assert "args" not in get(web.url + job.headers["location"], victim).json()


def test_a_jobs_args_and_result_are_shown_only_to_the_session_that_enqueued_it(web):
    owner = login(web.url, "ada")
    enqueued = post_form(web.url + "/jobs", {"task": "sleep", "args": '{"seconds": 7}'}, owner)
    location = enqueued.headers["location"]
    assert get(web.url + location, owner).json()["args"] == {"seconds": 7}
    for cookie in (login(web.url, "bob"), None):
        job = get(web.url + location, cookie).json()
        assert set(job) == {"id", "task", "state", "attempts", "worker", "key", "private"}
        listed = get(web.url + "/jobs?task=sleep", cookie).json()
        assert [found for found in listed if found["id"] == job["id"]] == [job]
        assert job["private"] is True
    # Enqueued with no session at all (curl without a cookie jar): public, as before.
    public = post_form(web.url + "/jobs", {"task": "sleep", "args": '{"seconds": 8}'})
    assert "set-cookie" not in public.headers
    assert get(web.url + public.headers["location"]).json()["args"] == {"seconds": 8}


def notice(page: str) -> str | None:
    """The page's "what happened" line, as HTML with its entities decoded."""
    found = re.search(r'<p class="notice" id="notice">(.*?)</p>', page)
    return html.unescape(found[1]) if found else None


def test_a_form_from_the_page_returns_to_it_saying_what_happened_in_the_address(
        shared_copies):
    web = shared_copies[1]  # web.2: the line names the copy as it was named (DYNO)
    response = post_form(web.url + "/login", {"name": "ada", "next": "/"})
    location, sid = response.headers["location"], session_cookie(response)
    assert response.status == 303 and location == "/?did=login&by=web.2&name=ada"
    assert notice(get(web.url + location, sid).text) == (
        "web.2 logged you in as 'ada', in the sqlite store")
    page = get(web.url + "/", sid)
    assert notice(page.text) is None and "set-cookie" not in page.headers  # a GET writes nothing
    response = post_form(web.url + "/cart", {"item": "tea & <cake>", "next": "/"}, sid)
    assert notice(get(web.url + response.headers["location"], sid).text) == (
        "web.2 added 'tea & <cake>' to your cart, in the sqlite store")
    body, headers = multipart({"next": ("", "text/plain", b"/"),
                               "file": ("naive.txt", "text/plain", b"one two")})
    response = http("POST", web.url + "/uploads", body, {**headers, "Cookie": f"sid={sid}"})
    assert notice(get(web.url + response.headers["location"], sid).text) == (
        "web.2 stored 'naive.txt' (7 bytes), in the sqlite store")
    response = post_form(web.url + "/jobs", {"task": "sleep", "args": "{}", "next": "/"}, sid)
    assert re.fullmatch(r"web\.2 put job \d+ \(sleep\) in the queue; a worker will take it",
                        notice(get(web.url + response.headers["location"], sid).text))
    response = post_form(web.url + "/logout", {"next": "/"}, sid)
    assert response.headers["location"] == "/?did=logout&by=web.2"
    assert notice(get(web.url + response.headers["location"]).text) == (
        "web.2 logged you out: your session is gone.")


@pytest.mark.parametrize("address", [
    "/?did=cart&by=%3Cscript%3E&item=tea",          # not a copy's name
    "/?did=cart&by=web.1&item=" + "x" * 201,         # longer than an item can be
    "/?did=cart&by=web.1",                           # a value the sentence needs is missing
    "/?did=rm%20-rf&by=web.1",                       # not something a copy does
    "/?did=cart&by=web.1&item=%1b%5b2J",             # a terminal escape
    "/?did=upload&by=web.1&size=1&file=%E2%80%AEfdp.exe",  # right-to-left: no copy stores it
    "/?did=cart&by=web.1&item=%C2%9B2J",             # a C1 control: the 8-bit escape
])
def test_news_the_address_cannot_carry_is_not_shown(web, address):
    page = get(web.url + address).text
    assert notice(page) is None and page.count("<script>") == 1  # the page's own


def test_control_and_format_characters_are_left_out_of_what_is_stored(web):
    sid = session_cookie(post_form(web.url + "/login", {"name": "\u202eada\x1b[2J"}))
    response = post_form(web.url + "/cart", {"item": "t\u202eea\x9b", "next": "/"}, sid)
    assert response.headers["location"] == "/?did=cart&by=web.1&item=tea"
    assert get(web.url + "/session", sid).json()["user"] == "ada[2J"
    assert get(web.url + "/session", sid).json()["cart"] == ["tea"]


def test_a_return_path_that_is_not_a_plain_path_on_this_site_is_ignored(web):
    for next_path in ("//evil.example/", "/\\evil.example", "https://evil.example/",
                      "evil.example", "javascript:alert(1)", "/\tevil",
                      "/ok\r\nSet-Cookie: x=1", "/caf\u00e9", ""):
        response = post_form(web.url + "/cart", {"item": "tea", "next": next_path})
        assert response.headers["location"] == "/", next_path
        response = post_form(web.url + "/jobs", {"task": "sleep", "next": next_path})
        assert re.fullmatch(r"/jobs/\d+", response.headers["location"]), next_path
    response = post_form(web.url + "/cart", {"item": "tea", "next": "/?from=page#spread"})
    # A plain path is kept, with the news added to its query.
    assert response.headers["location"] == "/?from=page&did=cart&by=web.1&item=tea#spread"


def test_under_memory_every_page_says_which_copy_did_what_and_where_the_login_lives(
        memory_copies):
    one, two = memory_copies
    response = post_form(one.url + "/login", {"name": "ada", "next": "/"})
    location, sid = response.headers["location"], session_cookie(response)
    assert location == "/?login_on=web.1&did=login&by=web.1&name=ada"
    assert notice(get(two.url + location, sid).text) == (
        "You logged in on <b>web.1</b>. This page came from <b>web.2</b>, which has never "
        "heard of that login.")
    page = get(one.url + location, sid).text
    assert notice(page) == "web.1 logged you in as 'ada', in the memory store"
    assert 'name="next" value="/?login_on=web.1"' in page  # the forms carry it on
    # The cart add lands on web.2, which has never heard of that session: it starts one.
    response = post_form(two.url + "/cart", {"item": "tea", "next": "/?login_on=web.1"}, sid)
    assert session_cookie(response) not in (None, sid)
    assert notice(get(one.url + response.headers["location"], sid).text) == (
        "web.2 had never heard of you, so it started a new session for 'tea'; your login "
        "lives on web.1")
    forged = get(two.url + "/?login_on=%3Cscript%3Ecall+555", sid).text
    assert notice(forged) is None and "<script>call" not in forged


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        return sock.recv(65536)


@pytest.mark.parametrize("method, path, fields, status", [
    ("GET", "/no/such/page", None, 404),
    ("GET", "/uploads/", None, 404),
    ("PUT", "/cart", None, 405),
    ("GET", "/login", None, 405),
    ("POST", "/cart", {}, 400),
    ("POST", "/cart", {"item": "   "}, 400),
    ("POST", "/cart", {"item": "x" * 201}, 400),
    ("POST", "/login", {"name": "x" * 201}, 400),
    ("POST", "/jobs", {"task": "sleep", "args": "{not json"}, 400),
    ("POST", "/jobs", {"task": "sleep", "args": "[1, 2]"}, 400),
    ("POST", "/jobs", {"task": "sleep", "args": "[" * 200000}, 400),  # too deep to parse
    ("GET", "/jobs/999999", None, 404),
    ("GET", "/jobs/" + "9" * 30, None, 404),  # too big for an SQLite INTEGER
    ("GET", "/jobs/abc", None, 404),
    ("GET", "/uploads/no-such-upload", None, 404),
])
def test_bad_input_gets_a_4xx_and_the_copy_keeps_serving(web, method, path, fields, status):
    if fields is None:
        response = http(method, web.url + path)
    else:
        response = post_form(web.url + path, fields)
    assert response.status == status
    assert response.headers["x-served-by"] == "web.1"
    assert b"Traceback" not in response.body
    assert get(web.url + "/healthz").status == 200


def test_options_names_the_methods_an_address_takes_and_a_wrong_method_is_told_them(web):
    for path, allowed in (("/jobs", "GET, POST, HEAD, OPTIONS"), ("/cart", "POST, OPTIONS"),
                          ("/jobs/7", "GET, HEAD, OPTIONS")):
        answer = http("OPTIONS", web.url + path)
        assert (answer.status, answer.headers["allow"], answer.body) == (204, allowed, b"")
    refused = http("PUT", web.url + "/cart")
    assert (refused.status, refused.headers["allow"]) == (405, "POST, OPTIONS")
    assert http("OPTIONS", web.url + "/no/such/page").status == 404


def test_oversized_bodies_are_refused_before_being_read(web):
    form_head = (b"POST /cart HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 2000000\r\n\r\n")
    assert raw_request(web.port, form_head).startswith(b"HTTP/1.0 413")
    upload_head = (b"POST /uploads HTTP/1.0\r\nContent-Type: multipart/form-data; boundary=b"
                   b"\r\nContent-Length: 20000000\r\n\r\n")
    assert raw_request(web.port, upload_head).startswith(b"HTTP/1.0 413")
    assert get(web.url + "/healthz").status == 200


@pytest.mark.parametrize("head, status", [
    (b"GET /jobs/\xb2 HTTP/1.0\r\n\r\n", 404),  # '\xb2' is '²': a digit to str.isdigit()
    (b"POST /cart HTTP/1.0\r\nContent-Length: \xb2\r\n\r\n", 400),
    (b"POST /cart HTTP/1.0\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    (b"POST /cart HTTP/1.0\r\nContent-Length: 8\r\nContent-Length: 5\r\n\r\nitem=tea", 400),
], ids=["job id ²", "Content-Length ²", "Content-Length of 5000 digits", "two lengths"])
def test_only_a_few_ascii_digits_make_a_number(web, head, status):
    assert raw_request(web.port, head).startswith(b"HTTP/1.0 %d" % status)
    assert get(web.url + "/healthz").status == 200


HEADERS = b"".join(b"X-Header-%d: %d\r\n" % (number, number) for number in range(99))


@pytest.mark.parametrize("head, status", [
    (b"GET /healthz HTTP/1.0\r\nHost: a\r\n" + HEADERS + b"\r\n", 200),  # 100 headers
    (b"GET /healthz HTTP/1.0\r\nHost: a\r\nX: 1\r\n" + HEADERS + b"\r\n", 431),
    (b"GET /healthz HTTP/1.0\r\nX-Folded: a\r\n b\r\n\r\n", 400),  # obs-fold
    (b"GET /healthz HTTP/1.0\r\nNo colon here\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.0\r\nX-Space : 1\r\n\r\n", 400),  # RFC 9112 5.1: a 400
    (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
    (b"GET\r\n\r\n", 400),
    (b"POST /cart HTTP/1.1\r\ncontent-type: application/x-www-form-urlencoded\r\n"
     b"CONTENT-length:8 \r\n\r\nitem=tea", 303),
], ids=["100 headers", "101 headers", "folded", "no colon", "space before colon",
        "HTTP/2", "no version", "any case"])
def test_a_request_head_is_read_within_http_clients_limits(web, head, status):
    assert raw_request(web.port, head).startswith(b"HTTP/1.0 %d " % status)


@pytest.mark.parametrize("body, content_type", [
    (b"no boundaries here", "multipart/form-data; boundary=b0undary"),
    (b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nunterminated",
     "multipart/form-data; boundary=b0undary"),
    (b"--b\r\n\r\n--b--\r\n", "multipart/form-data"),
    (b"--b\r\n\r\n--b--\r\n", "multipart/form-data; boundary*=utf-8''b"),  # RFC 2231
    (multipart({"other": ("a.txt", "text/plain", b"hi")})[0],
     "multipart/form-data; boundary=b0undary"),
    (b"file=hello", "application/x-www-form-urlencoded"),
])
def test_malformed_uploads_get_a_4xx(web, body, content_type):
    response = http("POST", web.url + "/uploads", body, {"Content-Type": content_type})
    assert 400 <= response.status < 500
    assert get(web.url + "/healthz").status == 200


def test_sigterm_during_a_slow_request_lets_it_finish(start_web):
    web = start_web()
    body = b"item=slow-but-kept"
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(b"POST /cart HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:4])
        # The listen queue is first in, first out: once a later request is answered,
        # the slow one has been accepted and is in flight.
        assert get(web.url + "/healthz").status == 200
        web.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "finishing the requests in flight" in web.proc.output(),
                   what="the copy to start stopping")
        sock.sendall(body[4:])
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.0 303")
    assert web.proc.popen.wait(10) == 0
    assert "stopped" in web.proc.output()


BAD_CONFIGURATIONS = [
    ({"PORT": "abc"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"PORT": "²"}, "PORT"),
    ({"SESSION_STORE": "redis"}, "SESSION_STORE"),
    ({"DATABASE_URL": "sqlite:////dev/null/app.db"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgres://localhost/app"}, "DATABASE_URL"),
    ({"SESSION_TTL": "forever"}, "SESSION_TTL"),
    ({"STOP_TIMEOUT": "soon"}, "STOP_TIMEOUT"),
    ({"STOP_TIMEOUT": "1e10"}, "STOP_TIMEOUT"),
    ({"CLIENT_TIMEOUT": "0"}, "CLIENT_TIMEOUT"),
    ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL"),  # a database per connection
]


@pytest.mark.parametrize("env, variable", BAD_CONFIGURATIONS)
def test_bad_configuration_is_refused_naming_the_variable(tmp_path, env, variable):
    """What `main` reads, in its order: each bad value is a ConfigError that names it."""
    environ = {"DATABASE_URL": f"sqlite:///{tmp_path}/app.db", **env}
    with pytest.raises(ConfigError, match=variable) as refused:
        config_from_env(environ)
        service = database_from_env(environ)
        queue_from_env(environ, service)
        store_from_env(environ, service)
    assert "\n" not in str(refused.value)


def test_a_bad_configuration_exits_2_with_one_line_before_listening(spawn, tmp_path):
    proc = spawn([sys.executable, "webapp.py"], app_env(tmp_path, PORT="abc"))
    assert proc.popen.wait(10) == 2
    assert proc.output() == "webapp: PORT must be a port number from 1 to 65535, got 'abc'\n"


def test_a_port_in_use_exits_2(spawn, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn([sys.executable, "webapp.py"], app_env(tmp_path, PORT=port))
        assert proc.popen.wait(10) == 2
    assert f"PORT={port}" in proc.output() and "Traceback" not in proc.output()


def test_a_bare_webapp_binds_loopback_and_the_default_port_variable(web):
    assert "HOST" not in web.env  # given PORT and nothing else about where to listen
    assert f"listening on http://127.0.0.1:{web.port}" in web.proc.output()
    assert get(f"http://127.0.0.1:{web.port}/healthz").text == "ok\n"


# --- Bounds, deadlines and odd input (issue 10) -------------------------------------

def logged_since(web: Web, offset: int) -> str:
    """What the copy logged after the first `offset` characters of its log."""
    return web.proc.output()[offset:]


def read_reply(sock: socket.socket) -> bytes:
    """Everything the copy sends until it closes the connection."""
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


@pytest.mark.parametrize("args, limit", [
    (json.dumps({"text": "x" * (64 << 10)}), "64 KiB"),
    ('{"a":' * 17 + "1" + "}" * 17, "16 levels"),
    ('{"a":' + "[" * 979 + "]" * 979 + "}", "16 levels"),  # GET / and /jobs once gave 500
    ('{"a": NaN}', "NaN"),
    ('{"a": -Infinity}', "Infinity"),
    ('{"a": 1e400}', "1e400"),
    ('{"a": 9007199254740992}', "2**53"),
    ('{"a": ' + "9" * 5000 + "}", "2**53"),  # int() refuses it: once a 500
], ids=["65 KiB", "17 deep", "980 deep", "NaN", "-Infinity", "1e400", "2**53",
        "5000 digits"])
def test_job_args_beyond_a_limit_get_a_400_that_names_it(web, args, limit):
    response = post_form(web.url + "/jobs", {"task": "sleep", "args": args})
    assert response.status == 400 and limit in response.text, response.text
    assert get(web.url + "/jobs").status == 200 and get(web.url + "/").status == 200


def test_job_args_within_the_limits_are_kept_exactly(web):
    args = {"deep": json.loads('{"a":' * 15 + "1" + "}" * 15), "most": 2**53 - 1,
            "least": -(2**53 - 1), "pi": 3.14, "text": "x" * 60000}
    made = post_form(web.url + "/jobs", {"task": "sleep", "args": json.dumps(args)})
    assert made.status == 303
    assert get(web.url + made.headers["location"]).json()["args"] == args


def test_the_session_cookie_is_found_whatever_its_neighbours(web):
    sid = login(web.url, "ada")
    for header in [f"foo; sid={sid}", f"a=b c; sid={sid}", f'prefs={{"a":1}}; sid={sid}',
                   f"sid={sid}; sid=someone-else",
                   f'sid={sid}; x="' + "\\" * 30000 + '"']:  # 6 s of CPU for SimpleCookie
        response = http("GET", web.url + "/session", headers={"Cookie": header}, timeout=2)
        assert response.json()["user"] == "ada", header[:40]
    second_first = http("GET", web.url + "/session", headers={"Cookie": f"sid=x; sid={sid}"})
    assert second_first.json()["user"] is None  # the first sid sent wins


def test_what_a_client_sends_cannot_forge_or_garble_a_log_line(web):
    logged_before = len(web.proc.output())
    for request_line in [b"GET /\x1b]0;owned\x07 HTTP/1.0",  # would retitle the terminal
                         b"GET /x\rweb.1 killed by SIGKILL HTTP/1.0",
                         b"GET /\x1b[2K\x1b[1Gweb.1 killed by SIGKILL HTTP/1.0"]:
        assert raw_request(web.port, request_line + b"\r\n\r\n").startswith(b"HTTP/1.0 4")
    output = logged_since(web, logged_before)
    assert not {"\x1b", "\x07", "\r"} & set(output)
    new_lines = output.splitlines()  # each begins with who sent it
    assert len(new_lines) >= 3 and all(line.startswith("127.0.0.1 ") for line in new_lines)


def test_the_platforms_health_checks_are_answered_but_not_logged(web):
    logged_before = web.proc.output().count("GET /healthz")  # earlier tests' and checks
    probe = http("GET", web.url + "/healthz", headers={"User-Agent": "launcher.py health check"})
    person = http("GET", web.url + "/healthz?from=a-person")
    assert probe.status == person.status == 200
    wait_until(lambda: "from=a-person" in web.proc.output(), what="the person's log line")
    assert web.proc.output().count("GET /healthz") == logged_before + 1


@pytest.fixture(scope="module")
def impatient_copy(tmp_path_factory) -> Iterator[Web]:
    """A copy that gives a client half a second (CLIENT_TIMEOUT) for a head or a body."""
    spawner = Spawner(tmp_path_factory.mktemp("impatient-copy"))
    try:
        yield start_webapps(spawner, {"CLIENT_TIMEOUT": "0.5"})[0]
    finally:
        spawner.end()


@pytest.mark.parametrize("head, trickle", [
    (b"", b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"a" * 100),
    (b"POST /cart HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n"
     b"Content-Length: 100\r\n\r\nitem=", b"a" * 95),
], ids=["head", "body"])
def test_a_request_that_trickles_in_gets_a_408_at_its_deadline(impatient_copy, head, trickle):
    web = impatient_copy
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for byte in trickle:  # a byte every 0.05 s: each wait is short, the whole is not
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.05)[0]:
                break
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.0 408") and time.monotonic() - started < 2.5


def start_web_with_descriptors(spawn, tmp_path, limit: int) -> Web:
    """A copy whose process may open only `limit` descriptors (`ulimit -n`)."""
    port = free_port()
    command = f'ulimit -n {limit} && exec "{sys.executable}" webapp.py'
    env = app_env(tmp_path, PORT=port)
    web = Web(spawn(["sh", "-c", command], env), port, env)
    wait_until(lambda: responds(web.url + "/healthz"), what="the copy to answer /healthz")
    return web


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_three_hundred_slow_clients_do_not_stop_healthz(spawn, tmp_path):
    web = start_web_with_descriptors(spawn, tmp_path, 128)
    slow = []
    try:
        for _ in range(30):  # more bodies than may be read at once
            slow.append(socket.create_connection(("127.0.0.1", web.port)))
            slow[-1].sendall(b"POST /cart HTTP/1.0\r\nContent-Type: application/x-www-form-"
                             b"urlencoded\r\nContent-Length: 1000\r\n\r\nitem=")
        for _ in range(300):  # heads that never end, on more descriptors than the copy has
            slow.append(socket.create_connection(("127.0.0.1", web.port)))
            slow[-1].sendall(b"GET /healthz HTTP/1.0\r\nX-Slow: a")
        linux = os.path.exists(f"/proc/{web.proc.pid}/stat")
        cpu_before, started = linux and cpu_seconds(web.proc.pid), time.monotonic()
        for _ in range(5):
            assert http("GET", web.url + "/healthz", timeout=1).status == 200
        assert post_form(web.url + "/cart", {"item": "tea"}).status in (303, 503)
        time.sleep(0.5)  # to see whether the copy spins meanwhile
        if linux:  # out of descriptors, socketserver's accept loop took a whole core
            assert cpu_seconds(web.proc.pid) - cpu_before < 0.5 * (time.monotonic() - started)
    finally:
        for sock in slow:
            sock.close()


def test_a_copy_whose_workers_are_far_behind_answers_503_at_once(monkeypatch):
    """In-process: a Server never started has no worker, so its queue only grows."""
    monkeypatch.setattr(web_server, "MAX_QUEUED", 2)
    server = web_server.Server(("127.0.0.1", free_port()), web_server.Handler, 10, "web.1")
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(server.server_address))
            sock, address = server.socket.accept()
            server.hand_over(web_server.PendingRequest(sock, address, time.monotonic() + 10))
        clients[-1].settimeout(5)
        assert clients[-1].recv(100).startswith(b"HTTP/1.0 503 ")
        assert server.requests.qsize() == 2
    finally:
        for sock in clients:
            sock.close()
        server.server_close()


def test_a_copy_told_to_stop_exits_within_stop_timeout_whatever_its_clients_do(start_web):
    web = start_web(STOP_TIMEOUT="0.3")
    with socket.create_connection(("127.0.0.1", web.port)) as body, \
            socket.create_connection(("127.0.0.1", web.port)) as head:
        body.sendall(b"POST /cart HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded"
                     b"\r\nContent-Length: 100\r\n\r\nitem=")
        head.sendall(b"GET /healthz HTTP/1.0\r\n")
        assert get(web.url + "/healthz").status == 200  # both are accepted by now
        started = time.monotonic()
        web.proc.send_signal(signal.SIGTERM)
        assert web.proc.popen.wait(5) == 0
    assert time.monotonic() - started < 2
    assert "cutting off" in web.proc.output()


def test_head_gets_the_headers_of_get_without_the_body(web):
    for path in ("/", "/session", "/healthz"):
        full, head = get(web.url + path), http("HEAD", web.url + path)
        assert head.status == 200 and head.body == b""
        assert head.headers["content-length"] == full.headers["content-length"]


def test_expect_100_continue_is_answered_before_the_body_is_sent(web):
    body = b"item=tea"
    with socket.create_connection(("127.0.0.1", web.port), timeout=1) as sock:
        sock.sendall(b"POST /cart HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: "
                     b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        assert sock.recv(65536).startswith(b"HTTP/1.0 100 Continue\r\n")
        sock.sendall(body)
        assert read_reply(sock).startswith(b"HTTP/1.0 303")
    too_big = (b"POST /cart HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: "
               b"2000000\r\n\r\n")
    assert raw_request(web.port, too_big).startswith(b"HTTP/1.0 413")  # no 100 first


@pytest.mark.parametrize("disposition, content_type, filename, served_type", [
    ('filename="caf\u00e9 \u20ac.txt"', "text/plain; charset=utf-8", "caf\u00e9 \u20ac.txt",
     "text/plain; charset=utf-8"),
    ("filename*=UTF-8''%E2%82%AC%20rates.txt", "text/csv", "\u20ac rates.txt", "text/csv"),
    ('filename="a\x1b]0;x\x07\u202etxt.exe"', "t\u00ebxt/plain", "a]0;xtxt.exe",
     "application/octet-stream"),
    ('filename="evil.txt"', "text/plain\r\n X-Evil: 1", "evil.txt",
     "application/octet-stream"),  # a folded header; it came back as a header of its own
], ids=["UTF-8", "RFC 5987", "control characters", "folded"])
def test_uploads_keep_utf8_names_and_only_clean_content_types(web, disposition, content_type,
                                                             filename, served_type):
    body = (f'--b\r\nContent-Disposition: form-data; name="file"; {disposition}\r\n'
            f"Content-Type: {content_type}\r\n\r\nhello\r\n--b--\r\n").encode()
    made = http("POST", web.url + "/uploads", body,
                {"Content-Type": "multipart/form-data; boundary=b"})
    assert made.status == 303
    fetched = get(web.url + made.headers["location"], session_cookie(made))
    assert fetched.headers["content-type"] == served_type and "x-evil" not in fetched.headers
    db = database_from_env(web.env)
    try:
        upload_id = made.headers["location"].rsplit("/", 1)[1]
        assert store_from_env(web.env, db).upload_info(upload_id).filename == filename
    finally:
        db.close()


def test_a_client_that_hangs_up_early_leaves_no_traceback(web):
    logged_before = len(web.proc.output())
    made = upload(web.url, b"x" * (4 << 20))
    request = (f"GET {made.headers['location']} HTTP/1.0\r\nCookie: sid="
               f"{session_cookie(made)}\r\n\r\n").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", web.port)) as sock:
            sock.sendall(request)
            # Close at once with a reset: the copy's write of 4 MiB then fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: logged_since(web, logged_before).count("left before the answer was sent")
               == 3, what="three hang-ups in the log")
    assert "Traceback" not in logged_since(web, logged_before)
    assert get(web.url + "/healthz").status == 200


def test_a_lone_surrogate_in_job_args_is_refused_where_it_comes_in(web):
    response = post_form(web.url + "/jobs",
                         {"task": "wordcount", "args": '{"upload": "\\ud800"}'})
    assert response.status == 400 and b"surrogate" in response.body


def test_what_one_session_may_hold_is_bounded(web):
    sid = login(web.url, "ada")
    db = database_from_env(web.env)
    try:
        store_from_env(web.env, db).edit(sid, lambda session: session.data.update(
            cart=["tea"] * 1999))
    finally:
        db.close()
    assert post_form(web.url + "/cart", {"item": "one more"}, sid).status == 303
    refused = post_form(web.url + "/cart", {"item": "and another"}, sid)
    assert refused.status == 400 and b"the cart is full" in refused.body
    assert len(get(web.url + "/session", sid).json()["cart"]) == 2000


def test_a_probes_user_agent_hides_nothing_but_the_probe_itself(web):
    response = http("POST", web.url + "/cart?from=a-probe", b"item=hidden", {
        "User-Agent": "kube-probe/1.29",
        "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 303
    wait_until(lambda: "POST /cart?from=a-probe" in web.proc.output(),
               what="the POST's log line")


@pytest.mark.parametrize("headers, status", [
    ({"Transfer-Encoding": "Chunked"}, 411),   # any spelling: the body is not read
    ({"Content-Length": "9 "}, 303),           # whitespace around a value is allowed
])
def test_body_headers_are_read_as_rfc_9110_says(web, headers, status):
    sent = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    with socket.create_connection(("127.0.0.1", web.port), timeout=5) as sock:
        sock.sendall(b"POST /cart HTTP/1.0\r\n" + "".join(f"{name}: {value}\r\n" for name, value
                     in sent.items()).encode() + b"\r\nitem=mint")
        assert sock.recv(100).split()[1] == str(status).encode()


def test_a_multipart_part_with_kilobytes_of_headers_is_refused(web):
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
            + b"X: a\r\n" * 4000 + b"\r\ndata\r\n--B--\r\n")
    response = http("POST", web.url + "/uploads", body,
                    {"Content-Type": "multipart/form-data; boundary=B"})
    assert response.status == 400 and b"headers are over" in response.body


def test_the_job_list_is_bounded_in_bytes_and_pages_on(start_web):
    web = start_web()
    big = '{"pad": "' + "x" * (60 << 10) + '"}'  # 60 KiB of args each: public, so listed
    ids = [int(post_form(web.url + "/jobs", {"task": "sleep", "args": big})
               .headers["location"].rsplit("/", 1)[1]) for _ in range(30)]
    seen, url, pages = [], web.url + "/jobs?task=sleep", 0
    while url:
        answer = get(url)
        assert answer.status == 200 and len(answer.body) <= 1 << 20
        seen += [job["id"] for job in answer.json()]
        pages += 1
        link = answer.headers.get("link")
        url = web.url + link[1:link.index(">")] if link else None
    assert seen == sorted(ids, reverse=True) and pages >= 2  # each once, newest first
    assert get(web.url + "/jobs?before=x").status == 400


def test_cookieless_jobs_past_the_public_quota_get_429_and_a_users_job_still_goes_in(
        start_web):
    web = start_web(MAX_PUBLIC_QUEUED=3)
    answers = [post_form(web.url + "/jobs", {"task": "sleep", "args": '{"seconds": 3600}'})
               for _ in range(5)]
    assert [answer.status for answer in answers] == [303, 303, 303, 429, 429]
    assert b"MAX_PUBLIC_QUEUED" in answers[-1].body
    sid = session_cookie(post_form(web.url + "/login", {"name": "ada"}))
    assert post_form(web.url + "/jobs", {"task": "sleep", "args": "{}"}, sid).status == 303
