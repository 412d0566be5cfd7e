"""Health: is a copy alive, and which upstreams may take requests (Factor VIII).

A platform that runs N copies must know which of them can serve. The terrible day this
module prevents: a copy freezes (a deadlock, a stuck disk, SIGSTOP), its port still
accepts, because the kernel completes the handshake into its listen backlog, and every
request sent there waits forever, while the platform counts the copy as fine. So health
is not "the port accepts": it is "GET /healthz answers 2xx or 3xx in time", as a
Kubernetes probe asks.

`HealthCheck` asks one address, again and again, and reports each outcome; it decides
nothing. The launcher hands those outcomes to its formation (`formation.py`), whose rule
replaces a copy after CHECKS_FAILED misses in a row. When the router runs on its own, in
front of several hosts, `Upstreams` is its small supervisor: it looks the upstreams' names
up, checks each address, and hands the router (`class Router` in router.py) the ones that
answer.
"""
from __future__ import annotations

import queue
import re
import selectors
import signal
import socket
import threading
import time
from contextlib import suppress
from functools import partial
from typing import Callable

from formation import CHECKS_FAILED

Address = tuple[str, int]  # (host, port) of a copy, or of an upstream host's front port
RESOLVE_EVERY = 5.0        # seconds from the end of a lookup of a name to the next


def at(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


HEALTH_REQUEST = (b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                  b"User-Agent: router.py health check\r\n\r\n")
HEALTHY = re.compile(rb"HTTP/1\.[01] [23][0-9][0-9] ")  # 2xx or 3xx, as a Kubernetes probe
PROBE_EVERY = 0.05  # a copy that does not listen yet is asked this often, until it answers
CHECK_EVERY = 1.0   # then this often, with as long to answer


def seconds_until(times: list[float]) -> float | None:
    """How long a loop may wait for the soonest of these monotonic times (None: none)."""
    return max(0.0, min(times) - time.monotonic()) if times else None


class HealthCheck:
    """Asks one web copy `GET /healthz` again and again, as Kubernetes probes a pod, and
    reports each outcome: `report(True)` for a 2xx or 3xx, `report(False)` for a wrong
    answer or none within `every` seconds. What a row of them means (up, dead) is the
    formation's rule, not this class's.

    A port that accepts proves nothing: the kernel completes the handshake of a frozen or
    deadlocked copy into its backlog, and a request then waits there forever. Each
    question is a non-blocking socket in the supervisor's own `selectors` loop, so that a
    copy that never answers cannot stall the supervisor; `due` is the supervisor's timer:
    when to ask next, or, with a question in flight, when to give up waiting.
    """

    def __init__(self, address: tuple[str, int], every: float,
                 selector: selectors.BaseSelector, report: Callable[[bool], None]):
        self.address, self.every, self.selector, self.report = address, every, selector, report
        self.answered_once = False
        self.sock: socket.socket | None = None    # the question in flight
        self.sent = False
        self.answer = b""                         # the start of its answer, so far
        self.due: float | None = time.monotonic()

    def run_timer(self, now: float) -> None:
        if self.due is None or now < self.due:
            return
        if self.sock is not None:
            self.answered(False)  # no answer in time
            return
        try:
            self.sock = socket.socket()
        except OSError:  # no descriptor left: the launcher's trouble, not the copy's
            self.due = now + self.every
            return
        self.sock.setblocking(False)
        self.sock.connect_ex(self.address)  # refused or in progress: `step` sees which
        self.selector.register(self.sock, selectors.EVENT_WRITE, self.step)
        self.sent, self.answer, self.due = False, b"", now + self.every

    def step(self) -> None:
        if self.sock is None:
            return  # stopped earlier in this round of events
        try:
            if self.sent:
                # Read to the end, which HTTP/1.0 marks by closing: hanging up on a copy
                # still writing its answer would reset its connection, an error in its log.
                data = self.sock.recv(4096)
                self.answer = (self.answer + data)[:64]  # the status line is all we judge
                if not data:
                    self.answered(bool(HEALTHY.match(self.answer)))
            elif self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.answered(False)  # refused: not listening (yet, or any more)
            else:
                self.sock.send(HEALTH_REQUEST)  # small: a new socket's buffer takes it whole
                self.sent = True
                self.selector.modify(self.sock, selectors.EVENT_READ, self.step)
        except OSError:
            self.answered(False)

    def answered(self, healthy: bool) -> None:
        self.close()
        # Until a starting copy listens, ask again soon; once it answers, at the usual pace.
        soon = not (self.answered_once or healthy or self.answer)
        self.answered_once = self.answered_once or healthy
        self.due = time.monotonic() + (PROBE_EVERY if soon else self.every)
        self.report(healthy)

    def stop(self) -> None:
        self.close()
        self.due = None

    def close(self) -> None:
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


def find_addresses(host: str, port: int) -> list[Address]:
    """The IPv4 addresses a name stands for. It blocks as long as DNS takes: with its server
    out of reach, glibc tries for seconds before it gives up."""
    found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({info[4][:2] for info in found})


class Upstreams:
    """The router's own small supervisor, when it runs alone in front of several hosts:
    which addresses the upstream names stand for (one name may stand for several, as a
    Compose service scaled to 4 does in Docker's DNS; looked up again every few seconds),
    which of them answer `GET /healthz`, and so the rotation. An address joins on its
    first answer; CHECKS_FAILED misses in a row take it out; its next answer brings it
    back. It starts and stops nothing: each host's launcher looks after its own copies.

    DNS is never waited for. Each name is looked up on a thread of its own, one lookup of
    it at a time, whose answer comes back to this loop through a queue (and a byte that
    wakes it): a name slow to look up delays nobody's health check. A name that cannot be
    found keeps the addresses of its last answer, which a health check still judges: a
    DNS hiccup must not empty the rotation. It is looked up again `resolve_every` seconds
    after its last lookup ended. `find` does the lookup (a test passes its own).
    """

    def __init__(self, names: list[Address], every: float,
                 publish: Callable[[tuple[Address, ...]], None], log: Callable[[str], None],
                 find: Callable[[str, int], list[Address]] = find_addresses,
                 resolve_every: float = RESOLVE_EVERY):
        self.names, self.every, self.publish_rotation, self.log = names, every, publish, log
        self.find, self.resolve_every = find, resolve_every
        self.selector = selectors.DefaultSelector()
        self.checks: dict[Address, HealthCheck] = {}
        self.misses: dict[Address, int] = {}
        self.order: list[Address] = []       # every address, in the order the names came
        self.in_rotation: set[Address] = set()
        self.found: dict[Address, list[Address]] = {name: [] for name in names}  # last answer
        self.lookup_due: dict[Address, float | None] = dict.fromkeys(names, 0.0)  # None: now
        self.answers: queue.SimpleQueue = queue.SimpleQueue()  # (name, addresses or error)
        self.woken, self.wake = socket.socketpair()
        self.woken.setblocking(False)
        self.selector.register(self.woken, selectors.EVENT_READ, self.take_answers)
        self.unresolved: set[str] = set()    # names that did not resolve: said once
        self.stopping = False

    def run(self) -> None:
        """Until `stop` (the caller wires it to SIGTERM and SIGINT through `selector`)."""
        try:
            while not self.stopping:
                now = time.monotonic()
                self.start_lookups(now)
                for check in list(self.checks.values()):
                    check.run_timer(now)
                for key, _ in self.selector.select(self.seconds_to_wait()):
                    key.data()
        finally:
            for check in self.checks.values():
                check.stop()
            self.selector.close()
            self.woken.close()
            self.wake.close()  # a lookup still running finds it closed, and ends

    def stop(self, signum: int) -> None:
        self.log(f"router got {signal.Signals(signum).name}: stopping")
        self.stopping = True

    def seconds_to_wait(self) -> float | None:
        times = [check.due for check in self.checks.values() if check.due is not None]
        times += [due for due in self.lookup_due.values() if due is not None]
        return seconds_until(times)

    def start_lookups(self, now: float) -> None:
        for name, due in self.lookup_due.items():
            if due is not None and now >= due:
                self.lookup_due[name] = None
                threading.Thread(target=self.look_up, args=(name,), daemon=True,
                                 name=f"lookup {name[0]}").start()

    def look_up(self, name: Address) -> None:
        """On the lookup's own thread: ask, and hand the answer to the loop."""
        try:
            answer: list[Address] | Exception = self.find(*name)
        except (OSError, UnicodeError) as error:  # UnicodeError: a label over 63 letters
            answer = error
        self.answers.put((name, answer))
        with suppress(OSError):  # the loop has ended meanwhile
            self.wake.send(b"\0")

    def take_answers(self) -> None:
        with suppress(BlockingIOError):
            self.woken.recv(4096)
        while not self.answers.empty():
            name, answer = self.answers.get()
            self.lookup_due[name] = time.monotonic() + self.resolve_every  # from its end
            host = name[0]
            if isinstance(answer, Exception):
                if host not in self.unresolved:  # not (yet) in the DNS, or DNS in trouble
                    kept = "; keeping its last addresses" if self.found[name] else ""
                    reason = getattr(answer, "strerror", None) or answer
                    self.log(f"router: cannot find {host}: {reason}{kept}")
                self.unresolved.add(host)
            else:
                self.unresolved.discard(host)
                self.found[name] = answer
        self.update_checks()

    def update_checks(self) -> None:
        """A health check for each address the names stand for, and none for the others."""
        addresses: list[Address] = []
        for name in self.names:
            addresses += [address for address in self.found[name] if address not in addresses]
        for address in addresses:
            if address not in self.checks:
                self.checks[address] = HealthCheck(address, self.every, self.selector,
                                                   partial(self.report, address))
                self.misses[address] = 0
        for address in set(self.checks) - set(addresses):
            self.checks.pop(address).stop()
            self.in_rotation.discard(address)
            self.log(f"router: {at(address)} is no longer an upstream")
        self.order = addresses
        self.publish()

    def report(self, address: Address, healthy: bool) -> None:
        if healthy:
            self.misses[address] = 0
            if address not in self.in_rotation:
                self.in_rotation.add(address)
                self.log(f"router: {at(address)} answers GET /healthz: in the rotation")
        else:
            self.misses[address] += 1
            if self.misses[address] == CHECKS_FAILED and address in self.in_rotation:
                self.in_rotation.discard(address)
                self.log(f"router: {at(address)} failed {CHECKS_FAILED} health checks in a "
                         f"row: out of the rotation until it answers again")
        self.publish()

    def publish(self) -> None:
        self.publish_rotation(tuple(a for a in self.order if a in self.in_rotation))
