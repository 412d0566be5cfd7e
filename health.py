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

import re
import selectors
import signal
import socket
import time
from functools import partial
from typing import Callable

from formation import CHECKS_FAILED

Address = tuple[str, int]  # (host, port) of a copy, or of an upstream host's front port
RESOLVE_EVERY = 5.0        # seconds between two lookups of the upstreams' names


def at(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


HEALTH_REQUEST = (b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                  b"User-Agent: router.py health check\r\n\r\n")
HEALTHY = re.compile(rb"HTTP/1\.[01] [23][0-9][0-9] ")  # 2xx or 3xx, as a Kubernetes probe
PROBE_EVERY = 0.05  # a copy that does not listen yet is asked this often, until it answers
CHECK_EVERY = 1.0   # then this often, with as long to answer


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


class Upstreams:
    """The router's own small supervisor, when it runs alone in front of several hosts:
    which addresses the upstream names stand for (one name may stand for several, as a
    Compose service scaled to 4 does in Docker's DNS; looked up again every few seconds),
    which of them answer `GET /healthz`, and so the rotation. An address joins on its
    first answer; CHECKS_FAILED misses in a row take it out; its next answer brings it
    back. It starts and stops nothing: each host's launcher looks after its own copies.
    """

    def __init__(self, names: list[Address], every: float,
                 publish: Callable[[tuple[Address, ...]], None], log: Callable[[str], None]):
        self.names, self.every, self.publish_rotation, self.log = names, every, publish, log
        self.selector = selectors.DefaultSelector()
        self.checks: dict[Address, HealthCheck] = {}
        self.misses: dict[Address, int] = {}
        self.order: list[Address] = []       # every address, in the order the names came
        self.in_rotation: set[Address] = set()
        self.unresolved: set[str] = set()    # names that did not resolve: said once
        self.resolve_at = 0.0
        self.stopping = False

    def run(self) -> None:
        """Until `stop` (the caller wires it to SIGTERM and SIGINT through `selector`)."""
        while not self.stopping:
            now = time.monotonic()
            if now >= self.resolve_at:
                self.resolve()
                self.resolve_at = now + RESOLVE_EVERY
            for check in list(self.checks.values()):
                check.run_timer(now)
            due = [check.due for check in self.checks.values() if check.due is not None]
            timeout = min([*due, self.resolve_at]) - time.monotonic()
            for key, _ in self.selector.select(max(0.0, timeout)):
                key.data()

    def stop(self, signum: int) -> None:
        self.log(f"router got {signal.Signals(signum).name}: stopping")
        self.stopping = True

    def resolve(self) -> None:
        addresses: list[Address] = []
        for host, port in self.names:
            try:
                found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as error:  # not (yet) in the DNS: a service still starting
                if host not in self.unresolved:
                    self.log(f"router: cannot find {host}: {error.strerror or error}")
                self.unresolved.add(host)
                continue
            self.unresolved.discard(host)
            addresses += sorted({info[4][:2] for info in found} - set(addresses))
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
