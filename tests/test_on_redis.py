"""The web process on Redis, as its users and its operator meet it: one URL changes, and
copies share sessions and uploads; a Redis that freezes or restarts is a wait (503), never
a hang or a crash, and everything resumes by itself; bad settings are one line and exit 2,
the password never printed. (The store's and the queue's contracts on Redis are in
test_session_store.py and test_job_queue.py; the client's in test_redis_client.py.)"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from conftest import (REPO, app_env, free_port, get, post_form, session_cookie, upload,
                      wait_until)
from redis_client import Redis
from test_redis_client import FakeRedis

pytestmark = pytest.mark.usefixtures("shared_redis")  # skipped, saying why, without one


def login_to(url: str, name: str) -> str:
    response = post_form(url + "/login", {"name": name})
    assert response.status == 303
    return session_cookie(response)


@pytest.fixture
def copies(start_web, fresh_redis):
    """copies(n, **env) runs n web copies on the emptied shared Redis."""
    def start(count: int, **env) -> list:
        return [start_web(DATABASE_URL=fresh_redis, DYNO=f"web.{n}", **env)
                for n in range(1, count + 1)]
    return start


def test_two_copies_on_one_redis_share_sessions_and_uploads_byte_for_byte(copies):
    one, two = copies(2)
    sid = login_to(one.url, "ada")
    assert post_form(two.url + "/cart", {"item": "tea"}, sid).status == 303
    assert get(one.url + "/session", sid).json() | {"pid": 0} == {
        "user": "ada", "cart": ["tea"], "uploads": [], "served_by": "web.1", "pid": 0,
        "store": "redis"}
    data = (bytes(range(256)) * (40 << 10))[:-1024]  # the limit is 10 MiB of request body
    made = upload(two.url, data, "application/octet-stream", sid)
    assert made.status == 303
    assert get(one.url + made.headers["location"], sid).body == data


def test_120_cart_adds_from_12_clients_over_3_copies_leave_120_items(copies):
    web = copies(3)
    sid = login_to(web[0].url, "ada")
    answers = []

    def client(number: int) -> None:
        for n in range(10):
            answers.append(post_form(web[(number + n) % 3].url + "/cart",
                                     {"item": f"{number}-{n}"}, sid).status)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [303] * 120
    assert sorted(get(web[1].url + "/session", sid).json()["cart"]) == sorted(
        f"{number}-{n}" for number in range(12) for n in range(10))


def test_a_session_and_its_uploads_expire_in_redis_together(copies):
    [web] = copies(1, SESSION_TTL=1)
    made = upload(web.url, b"gone soon")
    location, sid = made.headers["location"], session_cookie(made)
    assert get(web.url + location, sid).status == 200
    wait_until(lambda: get(web.url + "/session", sid).json()["uploads"] == [], timeout=5,
               what="the session to expire")
    assert get(web.url + location, sid).status == 404


def test_a_frozen_redis_is_a_503_in_time_and_a_thawed_one_serves_again(start_redis, start_web):
    redis = start_redis()
    web = start_web(DATABASE_URL=redis.url, DATABASE_BUSY_TIMEOUT="0.5")
    sid = login_to(web.url, "ada")
    redis.freeze()
    try:
        began = time.monotonic()
        frozen = post_form(web.url + "/cart", {"item": "tea"}, sid)
        took = time.monotonic() - began
        assert frozen.status == 503 and frozen.text == "the store is not answering; try again\n"
        assert frozen.headers["retry-after"] == "1" and took < 2
        assert get(web.url + "/healthz").status == 200  # the copy itself is fine
    finally:
        redis.thaw()
    wait_until(lambda: post_form(web.url + "/cart", {"item": "cake"}, sid).status == 303,
               what="the copy to reach Redis again")
    assert get(web.url + "/session", sid).json()["cart"][-1] == "cake"
    assert web.proc.popen.poll() is None


def test_a_restarted_redis_keeps_its_data_and_the_copies_resume_by_themselves(start_redis,
                                                                              start_web):
    redis = start_redis("--appendonly", "yes", "--appendfsync", "always")
    web = start_web(DATABASE_URL=redis.url, DATABASE_BUSY_TIMEOUT="0.5")
    sid = login_to(web.url, "ada")
    assert post_form(web.url + "/cart", {"item": "tea"}, sid).status == 303
    redis.stop()  # SIGKILL: a crash, not a shutdown
    assert post_form(web.url + "/cart", {"item": "lost"}, sid).status == 503
    redis.start()
    wait_until(lambda: get(web.url + "/session", sid).status == 200
               and get(web.url + "/session", sid).json()["user"] == "ada",
               what="the copy to reach the restarted Redis")
    assert get(web.url + "/session", sid).json()["cart"] == ["tea"]
    assert web.proc.popen.poll() is None


def test_redis_out_of_memory_is_a_507_never_a_lost_write_nor_a_500(copies, fresh_redis):
    [web] = copies(1)
    sid = login_to(web.url, "ada")
    redis = Redis(fresh_redis)
    redis.execute("CONFIG", "SET", "maxmemory", "1")  # full, and refusing to grow
    try:
        answers = [post_form(web.url + "/login", {"name": "bob"}),
                   post_form(web.url + "/cart", {"item": "tea"}, sid),
                   upload(web.url, b"x" * (3 << 20), cookie=sid)]
        assert [answer.status for answer in answers] == [507] * 3
        assert all(answer.text.startswith("redis is out of memory") for answer in answers)
        assert "set-cookie" not in answers[0].headers
        assert get(web.url + "/session", sid).json()["cart"] == []
        # A logout frees memory, and Redis takes a DEL even when full: the session ends.
        assert post_form(web.url + "/logout", {}, sid).status == 303
        assert get(web.url + "/session", sid).json()["user"] is None
    finally:
        redis.execute("CONFIG", "SET", "maxmemory", "0")
    assert redis.execute("KEYS", "upload:*") == []
    assert "Traceback" not in web.proc.output()


@pytest.fixture
def loading_redis():
    """A server that answers every command as a Redis loading its data after a restart."""
    server = FakeRedis(lambda command, conn: conn.sendall(
        b"-LOADING Redis is loading the dataset in memory\r\n"))
    yield f"redis://127.0.0.1:{server.port}/0"
    server.close()


def test_a_copy_started_while_redis_loads_starts_and_answers_503(start_web, loading_redis):
    web = start_web(DATABASE_URL=loading_redis)
    answers = [get(web.url + "/session"), post_form(web.url + "/cart", {"item": "tea"}),
               post_form(web.url + "/jobs", {"task": "sleep"})]
    assert [answer.status for answer in answers] == [503] * 3
    assert all(answer.text == "the store is not answering; try again\n"
               and answer.headers["retry-after"] == "1" for answer in answers)
    assert "cannot answer yet (LOADING" in web.proc.output()
    assert "Traceback" not in web.proc.output()


@pytest.mark.parametrize("program", ["worker.py", "clock.py"])
def test_a_worker_or_clock_started_while_redis_loads_waits_for_it(spawn, tmp_path,
                                                                 loading_redis, program):
    proc = spawn([sys.executable, program], app_env(tmp_path, DATABASE_URL=loading_redis))
    wait_until(lambda: "trying again until it answers" in proc.output() or
               proc.popen.poll() is not None, what=f"{program} to wait for Redis")
    assert proc.popen.poll() is None, proc.output()


def refusal(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "webapp.py"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=20)


def test_a_wrong_password_is_one_line_and_exit_2_without_the_password(redis_server, tmp_path):
    wrong = redis_server.url.replace(urllib.parse.quote(redis_server.password, safe=""),
                                     "hunter2-wrong")
    done = refusal(app_env(tmp_path, DATABASE_URL=wrong, PORT=free_port()))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "hunter2" not in done.stderr + done.stdout and ":***@" in done.stderr


@pytest.mark.parametrize("url", [
    "redis://:s3cret@127.0.0.1:notaport/0",
    "redis://:s3cret@127.0.0.1:6379/zero",
    "redis://:s3cret@/0",
    "redis://:s3c#ret@127.0.0.1:6379/0",
])
def test_a_malformed_redis_url_is_one_line_and_exit_2_without_the_password(tmp_path, url):
    done = refusal(app_env(tmp_path, DATABASE_URL=url, PORT=free_port()))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "s3c" not in done.stderr + done.stdout


def test_redis_url_is_read_when_database_url_is_unset(start_web, fresh_redis):
    web = start_web(DATABASE_URL="", REDIS_URL=fresh_redis)  # as Heroku's Redis sets it
    assert get(web.url + "/session").json()["store"] == "redis"
