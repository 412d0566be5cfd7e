"""The Redis client, against a real redis-server and against fake servers that misbehave
on cue (answer late, dribble, hang up) where a real one cannot be made to.

The story these tests tell: one caller never gets another caller's reply; a frozen or dead
Redis costs a caller at most a timeout and then fails fast; Redis coming back needs no
restart of ours.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from conftest import REDIS_SERVER, free_port, wait_until
from redis_client import (Backoff, Redis, RedisAuthError, RedisError, RedisUnavailable,
                          parse_url)


def reply_or_none(client: Redis, *args):
    """The reply, or None while Redis is unavailable (or the client's backoff still runs)."""
    try:
        return client.execute(*args)
    except RedisUnavailable:
        return None


@pytest.fixture
def client(redis_server):
    client = Redis(redis_server.url)
    yield client
    client.close()


# --- Fake servers --------------------------------------------------------------------------

def read_command(reader) -> list[bytes] | None:
    """One command (an array of bulk strings) from a socket's file, or None at its end."""
    header = reader.readline()
    if not header:
        return None
    command = []
    for _ in range(int(header[1:])):
        length = int(reader.readline()[1:])
        command.append(reader.read(length + 2)[:-2])
    return command


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class FakeRedis:
    """A server on threads that answers as a test says: `answer(command, conn)` gets each
    command read (a list of bytes) and writes what it likes on `conn`. With no `answer`,
    it hangs up on every connection as soon as it accepts it."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.stopping = False
        self.connections: list[socket.socket] = []
        self.threads = [threading.Thread(target=self.accept)]
        self.threads[0].start()

    def accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            if self.stopping:
                conn.close()
                return
            self.accepted += 1
            if self.answer is None:
                conn.close()
                continue
            self.connections.append(conn)
            self.threads.append(threading.Thread(target=self.serve, args=(conn,)))
            self.threads[-1].start()

    def serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader, suppress(OSError, ValueError):
            while (command := read_command(reader)) is not None:
                self.answer(command, conn)

    def close(self) -> None:
        self.stopping = True
        socket.create_connection(("127.0.0.1", self.port)).close()  # wakes accept()
        self.threads[0].join(5)
        for conn in self.connections:  # wakes the threads still reading a client's commands
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self.threads[1:]:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def fake_redis():
    """fake_redis(answer) starts a FakeRedis; every one is closed at teardown."""
    servers: list[FakeRedis] = []

    def start(answer) -> FakeRedis:
        servers.append(FakeRedis(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# --- URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected, masked", [
    ("redis://localhost", ("localhost", 6379, 0, None, None, False), "redis://localhost:6379/0"),
    ("rediss://:p%40ss%2Fw@cache.example:6380/2",
     ("cache.example", 6380, 2, None, "p@ss/w", True), "rediss://:***@cache.example:6380/2"),
    ("redis://app:s3cret@10.0.0.5/1", ("10.0.0.5", 6379, 1, "app", "s3cret", False),
     "redis://app:***@10.0.0.5:6379/1"),
    ("redis://[::1]:7000/", ("::1", 7000, 0, None, None, False), "redis://[::1]:7000/0"),
])
def test_a_url_names_host_port_database_and_credentials(url, expected, masked):
    parsed = parse_url(url)
    assert (parsed.host, parsed.port, parsed.db, parsed.username, parsed.password,
            parsed.tls) == expected
    assert parsed.masked == masked
    assert "s3cret" not in repr(parsed) and "p@ss" not in repr(parsed)


@pytest.mark.parametrize("url", [
    "http://:s3cret@host", "redis://:s3cret@host:port", "redis://:s3cret@host:99999",
    "redis://:s3cret@host:0", "redis://:s3cret@", "redis://:s3cret@host/db0",
    "redis://:s3cret@host/1/2", "redis://:s3cret@host/0?ssl_cert_reqs=none",
    "redis://s3cret@host", "redis://:s3cr/et@host", "redis://:s3cret@[::1",
])
def test_a_malformed_url_says_what_is_wrong_in_one_line_without_the_password(url):
    with pytest.raises(ValueError) as raised:
        Redis(url)
    message = str(raised.value)
    assert "s3cr" not in message and "\n" not in message
    assert raised.value.__suppress_context__ or raised.value.__context__ is None


@pytest.mark.parametrize("url", ["redis://:s3c#ret@host", "redis://:s3c?ret@host:6379/0",
                                 "redis://app:s3c/ret@host/1"])
def test_a_password_with_a_character_that_ends_the_host_is_named_as_the_cause(url):
    with pytest.raises(ValueError) as raised:
        parse_url(url)
    assert str(raised.value).startswith(
        "the Redis URL has a '/', '?' or '#' in its password or user name: write them "
        "percent-encoded, as %2F, %3F, %23;")
    assert "s3c" not in str(raised.value)


def test_the_client_shows_its_url_masked(redis_server):
    client = Redis(redis_server.url)
    assert repr(client) == f"<Redis redis://:***@127.0.0.1:{redis_server.port}/0>"
    assert redis_server.password not in repr(client.url)


# --- RESP, binary safety, errors -----------------------------------------------------------

def test_every_kind_of_reply_comes_back_as_its_python_value(client):
    assert client.execute("PING") == "PONG"
    assert client.execute("SET", "word", "héllo") == "OK"
    assert client.execute("GET", "word") == "héllo".encode()
    assert client.execute("GET", "missing") is None
    assert client.execute("INCRBY", "count", -3) == -3
    assert client.execute("RPUSH", "list", "a", b"b", 3, 1.5, bytearray(b"c")) == 5
    assert client.execute("LRANGE", "list", 0, -1) == [b"a", b"b", b"3", b"1.5", b"c"]
    assert client.execute("LRANGE", "nothing", 0, -1) == []
    assert client.execute("BLPOP", "nothing", 0.01) is None  # a nil array
    nested = client.eval("return {1, {KEYS[1], ARGV[1]}, 'x'}", ["k"], ["a"])
    assert nested == [1, [b"k", b"a"], b"x"]


def test_any_byte_survives_the_trip_in_keys_and_values(client):
    every_byte = bytes(range(256))
    client.execute("SET", every_byte, every_byte * 2)
    assert client.execute("GET", every_byte) == every_byte * 2
    big = os.urandom(10 * 1024 * 1024)
    client.execute("SET", "big", big)
    assert client.execute("GET", "big") == big


def test_a_large_value_and_the_replies_after_it_arrive_whole_in_one_pipeline(client):
    big = os.urandom(3 * 1024 * 1024 + 7)
    with client.connection() as conn:
        replies = conn.pipeline([("SET", "big", big), ("GET", "big"), ("ECHO", "after"),
                                 ("GET", "big")])
    assert replies == ["OK", big, b"after", big]


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$3\r\nabcdef\r\n", b":12x\r\n",
                                     b"$-5\r\n"])
def test_a_reply_that_is_not_resp2_closes_the_connection(fake_redis, garbage):
    server = fake_redis(lambda command, conn: conn.sendall(
        garbage if command[1] == b"first" else bulk(b"reply to " + command[1])))
    client = Redis(f"redis://127.0.0.1:{server.port}")
    with pytest.raises(RedisUnavailable, match="not RESP2"):
        client.execute("GET", "first")
    assert wait_until(lambda: reply_or_none(client, "GET", "second")) == b"reply to second"
    client.close()


def test_an_error_reply_raises_and_the_connection_stays_in_use(client):
    client.execute("SET", "text", "abc")
    first = client.execute("CLIENT", "ID")
    with pytest.raises(RedisError) as raised:
        client.execute("LPUSH", "text", "x")
    assert raised.value.code == "WRONGTYPE"
    with pytest.raises(RedisError, match="unknown command"):
        client.execute("NO-SUCH-COMMAND", "arg")
    with pytest.raises(TypeError):
        client.execute("SET", "flag", True)  # refused before anything is sent
    assert client.execute("GET", "text") == b"abc"
    assert client.execute("CLIENT", "ID") == first  # the same connection, still clean


def test_a_pipeline_reads_every_reply_then_raises_the_first_error_even_inside_exec(client):
    first = client.execute("CLIENT", "ID")
    with client.connection() as conn:
        with pytest.raises(RedisError) as raised:
            conn.pipeline([("MULTI",), ("SET", "a", "1"), ("LPUSH", "a", "x"), ("EXEC",),
                           ("GET", "a")])
    assert raised.value.code == "WRONGTYPE"  # the LPUSH failed inside EXEC; the SET ran
    assert client.execute("GET", "a") == b"1"
    assert client.execute("CLIENT", "ID") == first  # read whole: the same connection, clean


def test_a_transaction_refused_for_lack_of_memory_raises_oom_and_writes_nothing(client):
    client.execute("CONFIG", "SET", "maxmemory", "1")  # full, and refusing to grow
    try:
        with client.connection() as conn:
            with pytest.raises(RedisError) as raised:  # replies: OK, -OOM, -EXECABORT
                conn.transaction([("SET", "a", "1"), ("EXPIRE", "a", 60)])
            assert raised.value.code == "OOM"
    finally:
        client.execute("CONFIG", "SET", "maxmemory", "0")
    assert client.execute("GET", "a") is None
    with client.connection() as conn:  # given back clean: not left inside MULTI
        assert conn.transaction([("SET", "a", "1")]) == ["OK"]


@pytest.mark.parametrize("code", ["LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN"])
def test_a_redis_that_cannot_answer_yet_is_unavailable_not_an_error(fake_redis, code):
    server = fake_redis(lambda command, conn: conn.sendall(
        b"-%s Redis cannot serve this yet\r\n" % code.encode()))
    client = Redis(f"redis://127.0.0.1:{server.port}")
    with pytest.raises(RedisUnavailable, match=f"cannot answer yet \\({code} "):
        client.execute("GET", "a")
    with client.connection() as conn:  # the reply stands in a pipeline, never decoded
        with pytest.raises(RedisUnavailable):
            conn.pipeline([("WATCH", "a"), ("GET", "a")])
    with pytest.raises(RedisUnavailable):  # even to AUTH: a wait, not a wrong password
        Redis(f"redis://:pw@127.0.0.1:{server.port}").execute("PING")
    client.close()


# --- Passwords -----------------------------------------------------------------------------

def test_a_wrong_or_missing_password_is_an_auth_error_that_does_not_repeat_it(redis_server):
    wrong = Redis(redis_server.url.replace(":pw", ":wrong-pw", 1))
    with pytest.raises(RedisAuthError) as raised:
        wrong.execute("PING")
    assert "wrong-pw" not in str(raised.value) and "wrong-pw" not in repr(wrong)
    for database in ("0", "2"):  # with no password, PING or SELECT is refused
        with pytest.raises(RedisAuthError, match="NOAUTH"):
            Redis(f"redis://127.0.0.1:{redis_server.port}/{database}").execute("PING")
    with pytest.raises(RedisError, match="SELECT 99: ERR DB index is out of range") as raised:
        Redis(redis_server.url.removesuffix("/0") + "/99").execute("PING")
    assert not isinstance(raised.value, RedisAuthError)


def test_the_password_is_scrubbed_even_when_the_server_repeats_it(fake_redis):
    server = fake_redis(lambda command, conn: conn.sendall(
        b"-ERR unknown command 'AUTH', with args beginning with: '%s' \r\n" % command[-1]))
    with pytest.raises(RedisAuthError) as raised:
        Redis(f"redis://:hunter2@127.0.0.1:{server.port}").execute("PING")
    assert "hunter2" not in str(raised.value) and "'***'" in str(raised.value)


# --- The late reply: redis-py's CVE-2023-28858 ---------------------------------------------

class Interrupted(Exception):
    """What a signal handler raises in the middle of a read, as Ctrl-C raises KeyboardInterrupt."""


def give_up_by_timeout(client: Redis) -> None:
    with pytest.raises(RedisUnavailable, match=r"timed out after 0\.3s"):
        client.execute("GET", "first")


def give_up_by_interrupt(client: Redis) -> None:
    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Interrupted):
            client.execute("GET", "first")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("give_up", [give_up_by_timeout, give_up_by_interrupt])
@pytest.mark.parametrize("late", ["while idle", "with the next reply"])
def test_a_reply_that_comes_late_is_never_read_as_the_next_commands(fake_redis, give_up, late):
    """The late reply either arrives while the connection would sit in the pool, or just
    before the next command's reply, as Redis sends them in order once it catches up."""
    gave_up, answered_late = threading.Event(), threading.Event()
    held: dict[socket.socket, bytes] = {}  # a late reply, per connection

    def answer(command, conn):
        if command == [b"GET", b"first"] and late == "while idle":
            gave_up.wait(5)
            with suppress(OSError):
                conn.sendall(bulk(b"the first caller's secret"))
            answered_late.set()
        elif command == [b"GET", b"first"]:
            held[conn] = bulk(b"the first caller's secret")
        else:
            conn.sendall(held.pop(conn, b"") + bulk(b"reply to " + command[1]))

    server = fake_redis(answer)
    client = Redis(f"redis://127.0.0.1:{server.port}", reply_timeout=0.3)
    give_up(client)
    gave_up.set()
    assert late != "while idle" or answered_late.wait(5)
    assert wait_until(lambda: reply_or_none(client, "GET", "second")) == b"reply to second"
    client.close()


def test_a_server_that_dribbles_its_reply_is_given_up_on_at_the_reply_timeout(fake_redis):
    stop = threading.Event()

    def answer(command, conn):  # a byte every 50 ms: each read is quick, the reply is not
        for byte in bulk(b"0123456789"):
            conn.sendall(bytes([byte]))
            if stop.wait(0.05):
                return

    server = fake_redis(answer)
    client = Redis(f"redis://127.0.0.1:{server.port}", reply_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="timed out"):
        client.execute("GET", "slow")
    assert time.monotonic() - started < 0.5
    stop.set()


# --- A frozen, dead, restarted Redis -------------------------------------------------------

def test_a_frozen_server_costs_one_reply_timeout_then_answers_afresh(redis_server):
    client = Redis(redis_server.url, connect_timeout=0.3, reply_timeout=0.5)
    client.execute("SET", "word", "before")
    redis_server.freeze()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"timed out after 0\.5s"):
        client.execute("GET", "word")
    assert time.monotonic() - started < 0.7
    for _ in range(3):  # more calls while frozen: at once (backoff) or at the connect timeout
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="timed out"):
            client.execute("GET", "word")
        assert time.monotonic() - started < 0.5
    redis_server.thaw()
    assert wait_until(lambda: reply_or_none(client, "ECHO", "after")) == b"after"
    client.close()


def test_a_dead_server_fails_calls_fast_and_its_return_needs_no_new_client(start_redis):
    server = start_redis("--appendonly", "yes", "--appendfsync", "always")
    client = Redis(server.url, connect_timeout=0.5, reply_timeout=0.5)
    client.execute("SET", "word", "kept")
    server.stop()
    slowest = 0.0
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Connection refused"):
            client.execute("GET", "word")
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5
    server.start()
    assert wait_until(lambda: reply_or_none(client, "GET", "word")) == b"kept"
    client.close()


def test_a_dead_server_is_tried_at_doubling_intervals_not_at_every_call(fake_redis):
    server = fake_redis(None)  # hangs up at once: every try fails
    client = Redis(f"redis://127.0.0.1:{server.port}")
    calls, started = 0, time.monotonic()
    while time.monotonic() - started < 0.8:
        with pytest.raises(RedisUnavailable):  # reset or closed, as it happens
            client.execute("PING")
        calls += 1
    # Tries at 0, 0.1, 0.3 and 0.7 s; every other call failed at once with the last error.
    assert 2 <= server.accepted <= 4 and calls > 100


def test_the_backoff_doubles_to_its_cap_and_a_clean_reply_ends_it():
    now = 0.0
    backoff = Backoff(first=0.1, cap=1.0, clock=lambda: now)
    error = RedisUnavailable("redis at host:6379 is not answering (Connection refused)")
    delays = []
    for _ in range(6):
        backoff.failed(error)
        delays.append(backoff.delay)
        with pytest.raises(RedisUnavailable, match="Connection refused"):
            backoff.check()
        now += backoff.delay
        backoff.check()  # the delay is over: the next try may go ahead
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.succeeded()
    backoff.check()
    backoff.failed(error)
    backoff.failed(error)  # from a command that was already waiting: not another try
    assert backoff.delay == 0.1


def test_a_pooled_connection_the_server_closed_is_replaced_without_an_error(client, redis_server):
    first = client.execute("CLIENT", "ID")
    killer = Redis(redis_server.url)
    assert killer.execute("CLIENT", "KILL", "ID", first) == 1
    assert client.execute("CLIENT", "ID") != first
    killer.close()


# --- Threads, transactions, scripts --------------------------------------------------------

def test_32_threads_incrementing_one_key_lose_no_increment(client):
    def increment():
        for _ in range(100):
            client.execute("INCR", "hits")

    threads = [threading.Thread(target=increment) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.execute("GET", "hits") == b"3200"


def test_exec_returns_none_when_a_watched_key_changed(client):
    client.execute("SET", "stock", 5)
    with client.connection() as conn:
        conn.execute("WATCH", "stock")
        stock = int(conn.execute("GET", "stock"))
        client.execute("SET", "stock", 4)  # another caller, on another connection, was quicker
        conn.execute("MULTI")
        conn.execute("SET", "stock", stock - 1)
        assert conn.execute("EXEC") is None
    assert client.execute("GET", "stock") == b"4"


@pytest.mark.parametrize("multi", [False, True])
def test_a_block_that_leaves_a_watch_or_multi_gives_back_a_clean_connection(client, multi):
    first = client.execute("CLIENT", "ID")
    with pytest.raises(LookupError):
        with client.connection() as conn:
            conn.execute("WATCH", "key")
            if multi:
                conn.execute("MULTI")
                conn.execute("SET", "key", "queued")
            raise LookupError("the caller's own bug")
    assert client.execute("SET", "key", "changed") == "OK"  # not "QUEUED"
    with client.connection() as conn:
        assert conn.execute("CLIENT", "ID") == first  # cleaned up and reused, not reopened
        conn.execute("MULTI")
        conn.execute("INCR", "n")
        assert conn.execute("EXEC") == [1]  # no WATCH left over to void it
    assert client.execute("GET", "key") == b"changed"


def test_the_urls_database_is_used_and_a_select_is_never_passed_on(redis_server):
    Redis(redis_server.url.removesuffix("/0") + "/3").execute("SET", "where", "three")
    client = Redis(redis_server.url)
    assert client.execute("GET", "where") is None
    with client.connection() as conn:
        first = conn.execute("CLIENT", "ID")
        conn.execute("SELECT", 3)
        assert conn.execute("GET", "where") == b"three"
    assert client.execute("GET", "where") is None  # that connection was closed, not reused
    assert client.execute("CLIENT", "ID") != first


def calls(client: Redis, command: str) -> int:
    stats = client.execute("INFO", "commandstats").decode()
    found = re.search(rf"^cmdstat_{command}:calls=(\d+),", stats, re.MULTILINE)
    return int(found[1]) if found else 0


def test_a_script_runs_by_its_sha_and_is_sent_again_after_a_script_flush(client):
    script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    assert client.eval(script, ["n"], [2]) == 2  # NOSCRIPT, then EVAL
    assert client.eval(script, ["n"], [3]) == 5  # EVALSHA
    client.execute("SCRIPT", "FLUSH")  # as a restart would
    assert client.eval(script, ["n"], [4]) == 9  # NOSCRIPT, then EVAL
    # EVALSHA tried each time (NOSCRIPT counts as a call); the text sent only twice.
    assert (calls(client, "evalsha"), calls(client, "eval")) == (3, 2)
    sha = hashlib.sha1(script.encode()).hexdigest()
    assert client.execute("SCRIPT", "EXISTS", sha) == [1]
    with pytest.raises(RedisError, match="ERR"):
        client.eval("return redis.call('NO-SUCH-COMMAND')")


# --- TLS, fork -----------------------------------------------------------------------------

def make_certificates(folder: Path) -> None:
    """A throwaway CA (ca.crt) and a certificate for 127.0.0.1 it signed (server.crt/.key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    new_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=Test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *new_key, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "server.ext")


def test_rediss_checks_the_certificate_against_ssl_cert_file(start_redis, tmp_path,
                                                             monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no way to make a test CA")
    if b"libssl" not in Path(REDIS_SERVER).read_bytes():
        pytest.skip("this redis-server was built without TLS")
    make_certificates(tmp_path)
    tls_port = free_port()
    server = start_redis("--tls-port", str(tls_port), "--tls-auth-clients", "no",
                         "--tls-cert-file", str(tmp_path / "server.crt"),
                         "--tls-key-file", str(tmp_path / "server.key"),
                         "--tls-ca-cert-file", str(tmp_path / "ca.crt"))
    url = server.url.replace("redis://", "rediss://").replace(f":{server.port}/", f":{tls_port}/")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(RedisUnavailable, match="certificate verify failed"):
        Redis(url).execute("PING")  # the system's CAs do not know our test CA
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))
    client = Redis(url)
    first = client.execute("CLIENT", "ID")
    assert client.execute("CLIENT", "ID") == first  # a TLS connection is pooled too
    big = os.urandom(1024 * 1024)
    client.execute("SET", "big", big)
    assert client.execute("GET", "big") == big
    client.close()


def test_a_forked_child_never_uses_its_parents_connections(client):
    with client.connection() as held:
        held_id = held.execute("CLIENT", "ID")
        pooled_id = client.execute("CLIENT", "ID")  # a second connection, idle in the pool
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report the id of the connection it gets, then vanish
            try:
                with pytest.raises(RuntimeError, match="fork"):
                    held.execute("PING")
                os.write(write_end, b"%d" % client.execute("CLIENT", "ID"))
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            child_id = int(pipe.read() or -1)
        os.waitpid(pid, 0)
        assert child_id not in (held_id, pooled_id, -1)
        assert held.execute("CLIENT", "ID") == held_id  # the parent's, untouched
    assert client.execute("CLIENT", "ID") in (held_id, pooled_id)
